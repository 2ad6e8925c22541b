"""Contract tests of ``sweeps/ray_compat.py``: one per touch of a Ray or Optuna internal, each fast
(no Ray started), so that a new Ray or Optuna that moves what a touch relies on fails here in seconds;
plus the gate itself (outside the tested range every touch refuses, warns once, and says so)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from sweeps import ray_compat

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _fresh_checks() -> Any:
    ray_compat._reset_for_tests()
    yield
    ray_compat._reset_for_tests()


def _stub_trial(tmp_path: Path, tag: str = "0_lr=0.1") -> Any:
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="sweep")
    trial = Trial("train_lada", config={"optim.lr": 0.1}, experiment_tag=tag, storage=storage, stub=True)
    trial.storage.trial_dir_name = trial._generate_dirname()
    return trial


def test_every_touch_is_active_on_the_tested_versions() -> None:
    assert ray_compat.guarantees() == {name: "active" for name in ray_compat.GUARANTEES}


def test_outside_the_tested_range_every_touch_refuses_once_and_says_so(monkeypatch: pytest.MonkeyPatch, caplog: Any,
                                                                      tmp_path: Path) -> None:
    import ray
    from ray.train._internal import storage as ray_storage
    from ray.tune.execution.tune_controller import TuneController

    schedule, upload = TuneController.__dict__["_schedule_trial_task"], ray_storage._upload_to_fs_path
    monkeypatch.setattr(ray, "__version__", "2.99.0")
    with caplog.at_level(logging.WARNING, logger="sweeps.ray_compat"):
        assert not ray_compat.ignore_stale_task_failures() and not ray_compat.ignore_stale_task_failures()
        assert TuneController.__dict__["_schedule_trial_task"] is schedule, "nothing installed"
        assert not ray_compat.wrap_uploads(lambda f: f, type(None)) and ray_storage._upload_to_fs_path is upload
        assert ray_compat.storage_loggers() == ()
        assert ray_compat.saved_tune_trials(tmp_path) is None, "unknown, never guessed"
        assert ray_compat.trial_dirs(tmp_path, "abcd1234") == [] and ray_compat.trial_id_of_dir("t_abcd1234_0_x") is None
        assert ray_compat.tuner_callbacks(object()) == [] and not ray_compat.apply_runtime_overrides(object(), 1, None, 1, 1)
        assert ray_compat.running_cluster_address() == "auto", "Ray's own lookup"
    stale = [r for r in caplog.records if "stale_task_failures is inactive" in r.getMessage()]
    assert len(stale) == 1 and "2.99.0" in stale[0].getMessage(), "one warning per touch"
    table = ray_compat.guarantees()
    assert all(v.startswith("inactive: Ray 2.99.0 is outside the tested range 2.60") for v in table.values())


def test_an_optuna_outside_its_range_refuses_the_optuna_touches(monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna

    monkeypatch.setattr(optuna, "__version__", "6.1.0")
    frozen = optuna.trial.create_trial(value=1.0)
    assert ray_compat.optuna_trial(object(), frozen) == frozen.number, "the number: its end can still be told"
    assert ray_compat.enqueued_params(frozen) is None
    assert ray_compat.guarantees()["optuna_trials"] == "inactive: Optuna 6.1.0 is outside the tested range 5.0-5.0"


def test_version_tuple() -> None:
    assert ray_compat.version_tuple("2.60.0") == (2, 60) and ray_compat.version_tuple("2.61.0rc1") == (2, 61)
    assert ray_compat.version_tuple("nightly") == (0, 0)


# -- stale_task_failures -------------------------------------------------------------------------
class _Trial:
    def __init__(self, name: str, status: str) -> None:
        self.name, self.status = name, status

    def __repr__(self) -> str:
        return self.name


def test_stale_task_failures_contract() -> None:
    """Installed once, on the method Tune 2.60 schedules every trial task with."""
    from ray.tune.execution.tune_controller import TuneController

    assert ray_compat.ignore_stale_task_failures() and ray_compat.ignore_stale_task_failures()
    guard = TuneController.__dict__["_schedule_trial_task"]
    assert isinstance(guard, ray_compat._GuardedSchedule) and not isinstance(guard.original, ray_compat._GuardedSchedule)


def test_is_stale_compares_the_failing_actor_with_the_trials_current_one() -> None:
    a, b = object(), object()

    class Controller:
        def __init__(self) -> None:
            self._trial_to_actor: dict[Any, Any] = {}

    c = Controller()
    requeued, running, restarted, starting = (_Trial("requeued", "PENDING"), _Trial("running", "RUNNING"),
                                               _Trial("restarted", "PENDING"), _Trial("starting", "PENDING"))
    c._trial_to_actor[restarted] = b
    c._trial_to_actor[starting] = a
    assert ray_compat.is_stale(c, requeued, a), "requeued, no actor: its old actor's second failure"
    assert ray_compat.is_stale(c, restarted, a), "requeued onto a new actor: the old actor's failure"
    assert not ray_compat.is_stale(c, running, a), "the first failure (Tune already dropped the dead actor)"
    assert not ray_compat.is_stale(c, starting, a), "a failure of the actor the trial holds"
    assert not ray_compat.is_stale(c, requeued, None), "unknown actor: never dropped"
    assert not ray_compat.is_stale(object(), requeued, a), "a controller without the map: never fails open"


def test_the_guard_drops_only_stale_failures() -> None:
    seen: list[tuple[str, str]] = []
    old_actor = object()

    class Controller:
        def __init__(self) -> None:
            self._trial_to_actor: dict[Any, Any] = {}
            self.handlers: dict[str, Any] = {}

        def _original(self, trial: Any, method_name: str, args: Any = None, kwargs: Any = None, on_result: Any = None,
                      on_error: Any = None, _return_future: bool = False) -> None:
            self.handlers[trial.name] = on_error

        _schedule_trial_task = ray_compat._GuardedSchedule(_original)

    c = Controller()
    requeued, running = _Trial("requeued", "RUNNING"), _Trial("running", "RUNNING")
    c._trial_to_actor[requeued] = c._trial_to_actor[running] = old_actor
    for t in (requeued, running):
        c._schedule_trial_task(t, "train", on_error=lambda trial, exc: seen.append((trial.name, str(exc))))
    c.handlers["requeued"](requeued, RuntimeError("first"))  # Tune requeues it: PENDING, actor taken away
    requeued.status = "PENDING"
    del c._trial_to_actor[requeued]
    c.handlers["requeued"](requeued, RuntimeError("second"))
    c.handlers["running"](running, RuntimeError("real"))
    assert seen == [("requeued", "first"), ("running", "real")]


# -- atomic_uploads / storage_log_records / trial_persist ----------------------------------------
def test_atomic_uploads_contract(tmp_path: Path) -> None:
    """Ray's driver-side upload is replaced and put back; Ray's callers reach the replacement."""
    import pyarrow.fs as pafs
    from ray.train._internal import storage as ray_storage

    from sweeps.storage import _SafeUpload

    original = ray_storage._upload_to_fs_path
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "result.json").write_text("{}\n")
    try:
        assert ray_compat.wrap_uploads(_SafeUpload, _SafeUpload)
        assert isinstance(ray_storage._upload_to_fs_path, _SafeUpload) and ray_storage._upload_to_fs_path.original is original
        ray_storage._upload_to_fs_path(local_path=str(tmp_path / "src"), fs=pafs.LocalFileSystem(), fs_path=str(tmp_path / "dst"))
        assert (tmp_path / "dst" / "result.json").read_text() == "{}\n"
    finally:
        ray_compat.unwrap_uploads(_SafeUpload)
    assert ray_storage._upload_to_fs_path is original


def test_storage_log_records_contract() -> None:
    """Each logger is the module logger of a module Ray still has."""
    import importlib

    for name in ray_compat.storage_loggers():
        assert importlib.import_module(name).logger.name == name


def test_trial_persist_contract(tmp_path: Path) -> None:
    import pyarrow.fs as pafs
    from ray.tune.experiment import Trial

    trial = _stub_trial(tmp_path)
    assert isinstance(Trial.local_path, property)
    assert trial.path.startswith(str(tmp_path / "sweep"))
    assert isinstance(trial.storage.storage_filesystem, pafs.LocalFileSystem)


# -- tuner_internals -----------------------------------------------------------------------------
def test_tuner_internals_contract(tmp_path: Path) -> None:
    from ray import tune

    cb = tune.Callback()
    tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(storage_path=str(tmp_path), name="x", callbacks=[cb],
                                                                      failure_config=tune.FailureConfig(max_failures=0)))
    assert ray_compat.tuner_callbacks(tuner) == [cb]
    assert ray_compat.apply_runtime_overrides(tuner, 3, 60.0, 0, 5)
    assert tuner._local_tuner._tune_config.max_concurrent_trials == 3 and tuner._local_tuner._tune_config.time_budget_s == 60.0
    assert tuner._local_tuner._run_config.verbose == 0 and tuner._local_tuner._run_config.failure_config.max_failures == 5


# -- experiment_state / trial_folders ------------------------------------------------------------
def test_experiment_state_contract(tmp_path: Path) -> None:
    """The trial ids of the newest state file written the way TuneController.save_to_dir writes it."""
    from ray.tune.execution.tune_controller import TuneController

    trials = [_stub_trial(tmp_path, f"{i}_lr=0.1") for i in range(2)]
    for i, kept in enumerate((trials[:1], trials)):
        name = TuneController.CKPT_FILE_TMPL.format(f"2026-01-0{i + 1}_00-00-00")
        (tmp_path / name).write_text(json.dumps({"trial_data": [list(t.get_json_state()) for t in kept]}, default=str))
    assert ray_compat.saved_tune_trials(tmp_path) == {t.trial_id: t.status for t in trials}
    assert ray_compat.saved_tune_trials(tmp_path / "nothing-here") is None


def test_trial_folders_contract(tmp_path: Path) -> None:
    trial = _stub_trial(tmp_path)
    folder = tmp_path / trial._generate_dirname()
    folder.mkdir()
    (tmp_path / "other_ffffffff_1_x").mkdir()
    assert ray_compat.trial_dirs(tmp_path, trial.trial_id) == [folder]
    assert ray_compat.trial_id_of_dir(folder.name) == trial.trial_id


# -- ray_address ---------------------------------------------------------------------------------
def test_ray_address_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert ray_compat.running_cluster_address() == "10.1.2.3:6379"


# -- optuna_trials -------------------------------------------------------------------------------
def test_optuna_trials_contract() -> None:
    """A RUNNING trial adopted by its number reports and is told like one from ``ask``; an enqueued
    point's parameters are found on its trial."""
    import optuna

    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"x": 0.25})
    asked = study.ask()
    asked.suggest_float("x", 0, 1)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))[0]
    adopted = ray_compat.optuna_trial(study, running)
    assert isinstance(adopted, optuna.trial.Trial) and adopted.number == asked.number
    adopted.report(0.5, 0)
    study.tell(adopted, 0.75)
    (done,) = study.get_trials()
    assert done.intermediate_values == {0: 0.5} and done.value == 0.75
    assert ray_compat.enqueued_params(done) == {"x": 0.25}
    assert ray_compat.enqueued_params(optuna.trial.create_trial(value=1.0)) is None
