"""The touches of Ray internals (see :mod:`sweeps.ray_compat`); each one asks the gate first."""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sweeps.ray_compat.checks import RAY_LOGGERS
from sweeps.ray_compat.gate import active, problem

logger = logging.getLogger("sweeps.ray_compat")


# -- stale_task_failures -------------------------------------------------------------------------
class _GuardedSchedule:
    """``TuneController._schedule_trial_task`` whose ``on_error`` drops a failure of an actor the
    trial no longer runs on (Ray 2.60: a lost node's actor fails its ``reset`` and ``train`` tasks;
    the first failure requeues the trial, the second one ended it as ERROR whatever ``max_failures``
    allows)."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def __get__(self, controller: Any, owner: Any = None) -> Any:
        if controller is None:
            return self
        return functools.partial(self, controller)

    def __call__(self, controller: Any, trial: Any, method_name: str, *args: Any, **kwargs: Any) -> Any:
        on_error = kwargs.get("on_error")
        actors = getattr(controller, "_trial_to_actor", None)
        if on_error is not None and isinstance(actors, dict):
            kwargs["on_error"] = functools.partial(_on_task_error, controller, actors.get(trial), on_error)
        return self.original(controller, trial, method_name, *args, **kwargs)


def _on_task_error(controller: Any, scheduled_on: Any, on_error: Callable[..., Any], trial: Any, exception: Exception) -> Any:
    if is_stale(controller, trial, scheduled_on):
        first = str(exception).strip().splitlines()[0][:200] if str(exception).strip() else type(exception).__name__
        logger.info("trial %s: ignoring a failure of an actor it no longer runs on (%s); its retry goes on", trial, first)
        return None
    return on_error(trial, exception)


def is_stale(controller: Any, trial: Any, scheduled_on: Any) -> bool:
    """A task failure of the actor ``scheduled_on`` that reaches ``trial`` after Tune requeued it:
    the trial is PENDING and its current actor (none, or a new one) is not the one the task ran on.
    False whenever that cannot be told (no actor recorded, the controller's map is gone): the
    failure then goes to Tune, as without the guard."""
    actors = getattr(controller, "_trial_to_actor", None)
    if scheduled_on is None or not isinstance(actors, dict):
        return False
    return getattr(trial, "status", None) == "PENDING" and actors.get(trial) is not scheduled_on


def ignore_stale_task_failures() -> bool:
    """Install the stale-failure guard (once per process); False (and one warning) when refused."""
    if not active("stale_task_failures"):
        return False
    from ray.tune.execution.tune_controller import TuneController

    current = TuneController.__dict__["_schedule_trial_task"]
    if not isinstance(current, _GuardedSchedule):
        TuneController._schedule_trial_task = _GuardedSchedule(current)  # type: ignore[method-assign,assignment]
    return True


# -- atomic_uploads ------------------------------------------------------------------------------
def wrap_uploads(make: Callable[[Any], Any], wrapper_type: type) -> bool:
    """Replace Ray's driver-side ``_upload_to_fs_path`` by ``make(original)`` (an instance of
    ``wrapper_type`` with an ``original`` attribute); False when refused."""
    if not active("atomic_uploads"):
        return False
    from ray.train._internal import storage as ray_storage

    if not isinstance(ray_storage._upload_to_fs_path, wrapper_type):
        ray_storage._upload_to_fs_path = make(ray_storage._upload_to_fs_path)
    return True


def unwrap_uploads(wrapper_type: type) -> None:
    """Put Ray's own ``_upload_to_fs_path`` back."""
    if problem("atomic_uploads") is not None:
        return
    from ray.train._internal import storage as ray_storage

    if isinstance(ray_storage._upload_to_fs_path, wrapper_type):
        ray_storage._upload_to_fs_path = getattr(ray_storage._upload_to_fs_path, "original")  # noqa: B009


def storage_loggers() -> tuple[str, ...]:
    """Ray's driver logger names that carry storage failures (empty when refused)."""
    return RAY_LOGGERS if active("storage_log_records") else ()


# -- trial_persist -------------------------------------------------------------------------------
def trial_storage(trial: Any) -> tuple[str, str, Any] | None:
    """(local folder, results folder, pyarrow filesystem) of a Tune trial; None when refused or unknown."""
    if not active("trial_persist"):
        return None
    try:
        return trial.local_path, trial.path, trial.storage.storage_filesystem
    except Exception:
        return None


# -- tuner_internals -----------------------------------------------------------------------------
def tuner_callbacks(tuner: Any) -> list[Any]:
    """The callbacks of the run config a Tuner really runs (a restored Tuner: its unpickled copies)."""
    if tuner is None or not active("tuner_internals"):
        return []
    internal = getattr(tuner, "_local_tuner", None)
    return list(getattr(getattr(internal, "_run_config", None), "callbacks", None) or [])


def apply_runtime_overrides(tuner: Any, max_concurrent: int, time_budget_s: float | None, verbose: int, max_failures: int) -> bool:
    """On ``--resume``, set what may change between drivers on a restored Tuner; False when refused."""
    if not active("tuner_internals"):
        return False
    internal = getattr(tuner, "_local_tuner", None)
    if internal is None:
        return False
    tc = internal._tune_config
    if max_concurrent:
        tc.max_concurrent_trials = max_concurrent
    tc.time_budget_s = time_budget_s
    internal._run_config.verbose = verbose
    internal._run_config.failure_config.max_failures = max_failures
    return True


# -- experiment_state ----------------------------------------------------------------------------
def saved_tune_trials(folder: str | Path) -> dict[str, str] | None:
    """The trials in the newest ``experiment_state-*.json`` of a local sweep folder (the one
    ``Tuner.restore`` loads), as trial id -> Tune status (``TERMINATED``, ``ERROR``, ``RUNNING``...);
    None when there is none, it cannot be read, or the touch is refused."""
    if not active("experiment_state"):
        return None
    states = sorted(Path(folder).glob("experiment_state-*.json"))
    if not states:
        return None
    try:
        data = json.loads(states[-1].read_text())
        out = {}
        for entry in data["trial_data"]:
            state = entry[0]
            state = json.loads(state) if isinstance(state, str) else state
            out[str(state["trial_id"])] = str(state["status"])
        return out
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


# -- trial_folders -------------------------------------------------------------------------------
TRIAL_DIR_ID = re.compile(r"_([0-9a-f]{8}(?:_\d{5})?)_\d+_")
"""The trial id in a Tune trial folder name (``<trainable>_<trial id>_<n>_<params>_<date>``)."""


def trial_dirs(results_dir: str | Path, trial_id: str) -> list[Path]:
    """The folders of ``trial_id`` under a sweep's folder (empty when refused)."""
    if not active("trial_folders"):
        return []
    return sorted(Path(results_dir).glob(f"*_{trial_id}_*"))


def trial_id_of_dir(name: str) -> str | None:
    """The trial id in a trial folder's name, None when it has none (or the touch is refused)."""
    if not active("trial_folders"):
        return None
    m = TRIAL_DIR_ID.search(name)
    return m.group(1) if m else None


# -- ray_address ---------------------------------------------------------------------------------
def running_cluster_address() -> str | None:
    """The address ``ray.init(address="auto")`` would use (the last ``ray start`` on this machine, a
    running GCS), None when there is none; ``"auto"`` (Ray's own lookup) when refused."""
    if not active("ray_address"):
        return "auto"
    from ray._private.services import get_ray_address_from_environment

    try:
        return get_ray_address_from_environment("auto", None)
    except ConnectionError:
        return None
    except Exception:
        return "auto"
