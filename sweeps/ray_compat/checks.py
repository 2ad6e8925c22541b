"""The checks of :mod:`sweeps.ray_compat`: the tested versions, what each touch keeps, and for each
touch a check that says why it may not be used here (None: it may)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

TESTED_RAY = ((2, 60), (2, 60))
"""Ray releases (major, minor), inclusive, on which every touch was checked."""
TESTED_OPTUNA = ((5, 0), (5, 0))
"""Optuna releases (major, minor), inclusive, on which the Optuna touches were checked."""

GUARANTEES: dict[str, str] = {
    "stale_task_failures": "a trial requeued after a lost node is not ended by its old actor's second failure",
    "atomic_uploads": "Ray's driver rewrites only changed files, each renamed into place (a full disk keeps finished trials whole)",
    "storage_log_records": "a storage failure Ray only logs stops the sweep with one line",
    "trial_persist": "a finished trial is written to the results folder at once",
    "tuner_internals": "--resume applies new concurrency, time budget, verbosity and max failures",
    "experiment_state": "a restored Optuna study reconciles with the trials Tune restores",
    "trial_folders": "a restored trial finds checkpoints it stored after Tune's last snapshot",
    "ray_address": "--address auto finds a cluster started with 'ray start'",
    "optuna_trials": "an Optuna trial a restored Tune trial owns keeps its per-task values; an orphaned enqueued point runs again",
}

# Ray's driver loggers whose records carry a storage failure (an experiment-state upload).
RAY_LOGGERS = (
    "ray.tune.execution.experiment_state",
    "ray.tune.tune",
    "ray.tune.execution.tune_controller",
    "ray.train._internal.syncer",
    "ray.train._internal.storage",
)


def version_tuple(version: str) -> tuple[int, int]:
    """``"2.60.0"`` -> ``(2, 60)``; a version that does not parse -> ``(0, 0)`` (outside every range)."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _in_range(version: str, tested: tuple[tuple[int, int], tuple[int, int]]) -> bool:
    low, high = tested
    return low <= version_tuple(version) <= high


def _ray_version_problem() -> str | None:
    import ray

    if _in_range(ray.__version__, TESTED_RAY):
        return None
    (a, b), (c, d) = TESTED_RAY
    return f"Ray {ray.__version__} is outside the tested range {a}.{b}-{c}.{d}"


def _optuna_version_problem() -> str | None:
    import optuna

    if _in_range(optuna.__version__, TESTED_OPTUNA):
        return None
    (a, b), (c, d) = TESTED_OPTUNA
    return f"Optuna {optuna.__version__} is outside the tested range {a}.{b}-{c}.{d}"


def _params(fn: Any) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def _source_mentions(fn: Any, *names: str) -> bool:
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return all(n in text for n in names)


# -- the checks: None when the touch may be used, else why not ------------------------------------
def _check_stale_task_failures() -> str | None:
    from ray.tune.execution.tune_controller import TuneController

    fn = TuneController.__dict__.get("_schedule_trial_task")
    fn = getattr(fn, "original", fn)
    if fn is None:
        return "TuneController._schedule_trial_task is gone"
    if _params(fn)[:3] != ["self", "trial", "method_name"] or "on_error" not in _params(fn):
        return f"TuneController._schedule_trial_task{inspect.signature(fn)} changed"
    if not _source_mentions(TuneController.__init__, "self._trial_to_actor"):
        return "TuneController no longer keeps _trial_to_actor"
    if not _source_mentions(fn, "on_error(trial, exception)", "tracked_actor = self._trial_to_actor[trial]"):
        return "TuneController._schedule_trial_task no longer calls on_error(trial, exception) for its trial's actor"
    return None


def _check_atomic_uploads() -> str | None:
    try:
        from ray.train._internal import storage as ray_storage
    except ImportError:
        return "ray.train._internal.storage is gone"
    fn = getattr(ray_storage, "_upload_to_fs_path", None)
    fn = getattr(fn, "original", fn)
    if not callable(fn):
        return "ray.train._internal.storage._upload_to_fs_path is gone"
    if _params(fn)[:4] != ["local_path", "fs", "fs_path", "exclude"]:
        return f"_upload_to_fs_path{inspect.signature(fn)} changed"
    return None


def _check_storage_log_records() -> str | None:
    import importlib.util

    missing = [name for name in RAY_LOGGERS if importlib.util.find_spec(name) is None]
    return f"Ray's modules {missing} are gone" if missing else None


def _check_trial_persist() -> str | None:
    from ray.tune.experiment import Trial

    missing = [a for a in ("local_path", "path") if not isinstance(getattr(Trial, a, None), property)]
    if missing:
        return f"Trial lost its properties {missing}"
    if not _source_mentions(Trial.__init__, "self.storage ="):
        return "Trial.storage is gone"
    from ray.train._internal.storage import StorageContext

    if not _source_mentions(StorageContext, "self.storage_filesystem"):
        return "StorageContext.storage_filesystem is gone"
    return None


def _check_tuner_internals() -> str | None:
    from ray.tune import Tuner

    if not _source_mentions(Tuner.__init__, "self._local_tuner"):
        return "Tuner._local_tuner is gone"
    from ray.tune.impl.tuner_internal import TunerInternal

    if not _source_mentions(TunerInternal.__init__, "self._tune_config", "self._run_config"):
        return "TunerInternal._tune_config / _run_config are gone"
    return None


def _check_experiment_state() -> str | None:
    from ray.tune.execution.tune_controller import TuneController

    if getattr(TuneController, "CKPT_FILE_TMPL", None) != "experiment_state-{}.json":
        return "Tune's experiment state file name changed"
    if not (_source_mentions(TuneController.save_to_dir, '"trial_data"', "_get_trial_checkpoints")
            and _source_mentions(TuneController._get_trial_checkpoints, "get_json_state")):
        return "Tune's experiment state no longer holds trial_data as Trial.get_json_state()"
    return None


def _check_trial_folders() -> str | None:
    from ray.tune.experiment import Trial

    if not (_source_mentions(Trial._generate_dirname, "str(self)", "experiment_tag")
            and _source_mentions(Trial._trainable_name, "self.trial_id")):
        return "Tune's trial folder naming (<trainable>_<trial id>_<tag>_<date>) moved"
    return None


def _check_ray_address() -> str | None:
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:
        return "ray._private.services.get_ray_address_from_environment is gone"
    if _params(get_ray_address_from_environment)[:2] != ["addr", "temp_dir"]:
        return f"get_ray_address_from_environment{inspect.signature(get_ray_address_from_environment)} changed"
    return None


def _check_optuna_trials() -> str | None:
    problem = _optuna_version_problem()
    if problem:
        return problem
    from optuna.study import Study
    from optuna.trial import FrozenTrial
    from optuna.trial import Trial as OptunaTrial

    if _params(OptunaTrial.__init__)[:3] != ["self", "study", "trial_id"]:
        return f"optuna.trial.Trial{inspect.signature(OptunaTrial.__init__)} changed"
    if not _source_mentions(FrozenTrial.__init__, "self._trial_id"):
        return "FrozenTrial._trial_id is gone"
    if not _source_mentions(Study.enqueue_trial, '"fixed_params"'):
        return "Study.enqueue_trial no longer stores fixed_params"
    return None


_CHECKS: dict[str, Callable[[], str | None]] = {
    "stale_task_failures": _check_stale_task_failures,
    "atomic_uploads": _check_atomic_uploads,
    "storage_log_records": _check_storage_log_records,
    "trial_persist": _check_trial_persist,
    "tuner_internals": _check_tuner_internals,
    "experiment_state": _check_experiment_state,
    "trial_folders": _check_trial_folders,
    "ray_address": _check_ray_address,
    "optuna_trials": _check_optuna_trials,
}


