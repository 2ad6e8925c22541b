"""Every touch of a Ray (or Optuna) internal, in one place: version-gated, fail-closed, contract-tested.

The sweep layer uses the public APIs of Ray Tune and Optuna. Where a guarantee the README promises
needs more (a Ray 2.60 bug, a file format Ray does not document), the touch lives here, and only here:

- each touch names the versions it was checked on (:data:`TESTED_RAY`, :data:`TESTED_OPTUNA`) and
  checks, before it is used, that the version is in that range and that what it touches is there with
  the signature it expects;
- outside the range, or when a check fails, the touch refuses: it logs ONE warning, changes nothing,
  and :func:`guarantees` reports it inactive (the sweep's summary carries that table). It never
  guesses: a guard that cannot tell stale from real failures lets every failure through;
- ``tests/test_ray_compat.py`` holds one fast contract test per touch, which fails in seconds when a
  new Ray or Optuna moves the internal.

The touches, by name, and what each one keeps: :data:`GUARANTEES`. Inside: ``checks`` (the versions
and one check per touch), ``gate`` (each check once, one warning, the table), ``tune`` and
``optuna_trials`` (the touches themselves, each asking the gate first).
"""

from sweeps.ray_compat.checks import GUARANTEES, RAY_LOGGERS, TESTED_OPTUNA, TESTED_RAY, version_tuple
from sweeps.ray_compat.gate import _reset_for_tests, active, guarantees, problem
from sweeps.ray_compat.optuna_trials import enqueued_params, optuna_trial
from sweeps.ray_compat.tune import (
    TRIAL_DIR_ID,
    _GuardedSchedule,
    apply_runtime_overrides,
    ignore_stale_task_failures,
    is_stale,
    running_cluster_address,
    saved_tune_trials,
    storage_loggers,
    trial_dirs,
    trial_id_of_dir,
    trial_storage,
    tuner_callbacks,
    unwrap_uploads,
    wrap_uploads,
)

__all__ = [
    "GUARANTEES", "RAY_LOGGERS", "TESTED_OPTUNA", "TESTED_RAY", "TRIAL_DIR_ID", "_GuardedSchedule", "_reset_for_tests", "active",
    "apply_runtime_overrides", "enqueued_params", "guarantees", "ignore_stale_task_failures", "is_stale", "optuna_trial", "problem",
    "running_cluster_address", "saved_tune_trials", "storage_loggers", "trial_dirs", "trial_id_of_dir", "trial_storage",
    "tuner_callbacks", "unwrap_uploads", "version_tuple", "wrap_uploads",
]
