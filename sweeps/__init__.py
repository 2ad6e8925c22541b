"""The sweep layer: Ray Tune places trials, Optuna chooses settings, MLflow records every task step.

Modules: :mod:`sweeps.run` (the ``lada-sweep`` CLI), :mod:`sweeps.trainable` (one trial = one
``run_continual`` with per-task reports and checkpoints), :mod:`sweeps.search` (Optuna under Tune,
early-stopped trials told as pruned), :mod:`sweeps.tracking` (the driver-side MLflow callback),
:mod:`sweeps.resources` (resource checks before a sweep starts), :mod:`sweeps.distributed`
(data-parallel trials over several GPUs), :mod:`sweeps.report` (tables, best config, importances).
"""
