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

The touches, by name, and what each one keeps: :data:`GUARANTEES`. The Optuna searcher's touch
(``optuna_search_state``) is required: outside its range the searcher refuses to start
(:class:`RayCompatError`) instead.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

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
    "optuna_search_state": "the Optuna searcher (required)",
}

# Ray's driver loggers whose records carry a storage failure (an experiment-state upload).
RAY_LOGGERS = (
    "ray.tune.execution.experiment_state",
    "ray.tune.tune",
    "ray.tune.execution.tune_controller",
    "ray.train._internal.syncer",
    "ray.train._internal.storage",
)


class RayCompatError(RuntimeError):
    """A required internal is missing or outside its tested range (one-line message)."""


_lock = threading.Lock()
_status: dict[str, str | None] = {}  # touch -> None (active) or the reason it is inactive
_warned: set[str] = set()


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


def _check_optuna_search_state() -> str | None:
    problem = _optuna_version_problem()
    if problem:
        return problem
    from optuna.trial import Trial as OptunaTrial
    from ray.tune.search.optuna import OptunaSearch

    if not _source_mentions(OptunaSearch, "self._ot_study", "self._ot_trials", "self._completed_trials"):
        return "OptunaSearch no longer keeps _ot_study / _ot_trials / _completed_trials"
    if _params(OptunaTrial.__init__)[:3] != ["self", "study", "trial_id"]:
        return f"optuna.trial.Trial{inspect.signature(OptunaTrial.__init__)} changed"
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
    "optuna_search_state": _check_optuna_search_state,
}


def problem(touch: str) -> str | None:
    """Why ``touch`` may not be used here (None: it may). Checked once per process."""
    with _lock:
        if touch in _status:
            return _status[touch]
    found = _ray_version_problem()
    if found is None:
        try:
            found = _CHECKS[touch]()
        except Exception as exc:  # an import that moved, a source that cannot be read
            found = f"{type(exc).__name__}: {exc}"
    with _lock:
        _status[touch] = found
    return found


def active(touch: str) -> bool:
    """True when ``touch`` may be used; otherwise logs one warning per touch and process."""
    found = problem(touch)
    if found is None:
        return True
    with _lock:
        first = touch not in _warned
        _warned.add(touch)
    if first:
        logger.warning("lada-sweep: %s is inactive (%s): %s", touch, found, GUARANTEES[touch])
    return False


def require(touch: str) -> None:
    """Raise :class:`RayCompatError` when a required touch may not be used."""
    found = problem(touch)
    if found is not None:
        raise RayCompatError(f"{GUARANTEES[touch]} needs Ray {_range(TESTED_RAY)} and Optuna {_range(TESTED_OPTUNA)}: {found}")


def _range(tested: tuple[tuple[int, int], tuple[int, int]]) -> str:
    (a, b), (c, d) = tested
    return f"{a}.{b}" if (a, b) == (c, d) else f"{a}.{b}-{c}.{d}"


def guarantees() -> dict[str, str]:
    """Every touch: ``"active"`` or ``"inactive: <reason>"`` (for the sweep's summary)."""
    return {name: "active" if problem(name) is None else f"inactive: {problem(name)}" for name in _CHECKS}


def _reset_for_tests() -> None:
    with _lock:
        _status.clear()
        _warned.clear()


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
def saved_tune_trials(folder: str | Path) -> set[str] | None:
    """The trial ids in the newest ``experiment_state-*.json`` of a local sweep folder (the one
    ``Tuner.restore`` loads); None when there is none, it cannot be read, or the touch is refused."""
    if not active("experiment_state"):
        return None
    states = sorted(Path(folder).glob("experiment_state-*.json"))
    if not states:
        return None
    try:
        data = json.loads(states[-1].read_text())
        out = set()
        for entry in data["trial_data"]:
            state = entry[0]
            out.add(str((json.loads(state) if isinstance(state, str) else state)["trial_id"]))
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


# -- optuna_search_state -------------------------------------------------------------------------
def search_study(searcher: Any) -> Any:
    """The Optuna study of an ``OptunaSearch``."""
    return searcher._ot_study


def search_trials(searcher: Any) -> dict[str, Any]:
    """Tune trial id -> Optuna ``Trial`` of an ``OptunaSearch`` (its own dict: changes stick)."""
    return searcher._ot_trials  # type: ignore[no-any-return]


def search_completed(searcher: Any) -> set[str]:
    """The Tune trial ids an ``OptunaSearch`` has told Optuna the end of (its own set)."""
    return searcher._completed_trials  # type: ignore[no-any-return]


def optuna_trial(study: Any, frozen: Any) -> Any:
    """A live ``optuna.trial.Trial`` for a RUNNING trial of ``study`` (adopting it)."""
    import optuna

    return optuna.trial.Trial(study, frozen._trial_id)


def frozen_trial(study: Any, trial: Any) -> Any:
    """The stored ``FrozenTrial`` of a live Optuna ``Trial`` (its state as the storage holds it now)."""
    return study._storage.get_trial(trial._trial_id)


def optuna_storage_file(storage: Any) -> str | None:
    """The file behind an Optuna storage (a sqlite database, a journal file), for error messages;
    None for a database server or a storage this cannot see into."""
    for _ in range(3):  # Optuna wraps an RDBStorage in a cache, a journal file in a JournalStorage
        url = getattr(storage, "url", None)
        if isinstance(url, str) and url.startswith("sqlite:///"):
            return url[len("sqlite:///"):]
        path = getattr(storage, "_file_path", None)
        if path:
            return str(path)
        storage = getattr(storage, "_backend", None)
        if storage is None:
            break
    return None


def study_storage(study: Any) -> Any:
    """The storage object of an Optuna study (``Study._storage``)."""
    return getattr(study, "_storage", None)


def touched() -> Iterable[str]:
    return tuple(_CHECKS)
