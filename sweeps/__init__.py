"""The sweep layer: Ray Tune places trials, Optuna chooses settings, MLflow records every task step.

Dependencies point one way (``tests/test_sweeps_layout.py`` checks it): :mod:`sweeps.cli` (flags,
exit codes) -> :mod:`sweeps.settings` (frozen settings, resume identity) and :mod:`sweeps.plan`
(every check before anything runs) -> :mod:`sweeps.runner` (Ray, the cache, MLflow, the Tuner) ->
:mod:`sweeps.search` (Optuna under Tune), :mod:`sweeps.optuna_storage` (the study, no Ray),
:mod:`sweeps.tracking` (MLflow), :mod:`sweeps.storage` (a full or read-only disk),
:mod:`sweeps.trainable` (one trial), :mod:`sweeps.console` and :mod:`sweeps.progress` (what the terminal
shows; the libraries' logs to the sweep's log file), :mod:`sweeps.summary` -> :mod:`sweeps.visuals` and
:mod:`sweeps.notes` (plots, the parent run's description, the HTML page); :mod:`sweeps.ray_compat` holds
every touch of a Ray or Optuna internal. :mod:`sweeps.report` reads a sweep; ``sweeps/run.py`` is the
``python sweeps/run.py`` shim.
"""
