"""Fast checks of the sweep layer's parts (no Ray cluster): the objective, the resource check, the
Optuna searcher's outcomes, the importances' direction, the MLflow callback's runs and batching."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from lada_core import metrics as M
from sweeps.objective import OBJECTIVE, VAL_METRICS, MetricError, Objective, metric_key, parse_metric
from sweeps.resources import ResourceError, check_request, validate_request
from sweeps.trainable import NUM_TASKS, TASKS_DONE, TrialSpec, step_result

optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- objective --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,weights", [
    ("average", {"average": 1.0}),
    ("Transfer", {"transfer": 1.0}),
    ("LAST", {"last": 1.0}),
    ("last=0.5,average=0.5", {"last": 0.5, "average": 0.5}),
    ("last:1+transfer:3", {"last": 1.0, "transfer": 3.0}),
])
def test_parse_metric(text: str, weights: dict[str, float]) -> None:
    assert dict(parse_metric(text).weights) == weights


@pytest.mark.parametrize("text", ["", "accuracy", "last=abc", "last=-1", "last=0,average=0", "last,last", "last=inf"])
def test_parse_metric_rejects(text: str) -> None:
    with pytest.raises(MetricError) as err:
        parse_metric(text)
    assert "\n" not in str(err.value)


def test_objective_value_matches_hand_computation() -> None:
    values = {M.TRANSFER: 60.0, M.AVERAGE: 70.0, M.LAST: 80.0}
    assert Objective({"average": 1.0}).value(values) == 70.0
    assert Objective({"last": 0.5, "average": 0.5}).value(values) == pytest.approx(75.0)
    assert Objective({"last": 1.0, "transfer": 3.0}).value(values) == pytest.approx((80 + 180) / 4)
    assert math.isnan(Objective({"transfer": 1.0}).value({M.LAST: 1.0}))


def test_step_result_fields() -> None:
    rows = np.array([[50.0, 10.0, 20.0], [40.0, 60.0, 30.0]])
    metrics = {**M.partial_summary(rows), "acc/a": 40.0, "acc/b": 60.0, "acc/c": 30.0}
    r = step_result(metrics, 1, 3, 2.5, Objective({"last": 1.0}))
    assert r[M.TASK_INDEX] == 1 and r[TASKS_DONE] == 2 and r[NUM_TASKS] == 3
    assert r[OBJECTIVE] == pytest.approx(50.0)  # mean of a[1, :2]
    assert r["val/transfer"] == pytest.approx((10.0 + (20.0 + 30.0) / 2) / 2)
    # Every metric is a validation metric, named val/...; nothing else carries a bare metric name.
    assert r["val/acc/b"] == 60.0 and r["val/seen_mean"] == pytest.approx(50.0)
    assert not {M.TRANSFER, M.AVERAGE, M.LAST, "acc/a"} & set(r) and not any(k.startswith("test/") for k in r)
    peeked = step_result(metrics, 1, 3, 2.5, Objective({"last": 1.0}), {"test/last": 10.0, "test/acc/a": 5.0})
    assert peeked["test/last"] == 10.0 and peeked[OBJECTIVE] == pytest.approx(50.0)  # the objective stays on val
    with pytest.raises(ValueError, match="not a test/ metric"):
        step_result(metrics, 1, 3, 2.5, Objective({"last": 1.0}), {"last": 1.0})


def test_trial_spec_precedence() -> None:
    from lada_core.config import build_config

    base = build_config(sample={"optim.lr": 3e-4, "lada.memory_size": 8})
    spec = TrialSpec(base_config=base.to_dict(), overrides=("lada.memory_size=4",))
    cfg = spec.config({"lada.memory_size": 32, "optim.lr": 1e-2})
    assert cfg.optim.lr == 1e-2  # sample over base
    assert cfg.lada.memory_size == 4  # --set over sample


# -- resources --------------------------------------------------------------------------------------
def test_resource_request_shapes() -> None:
    validate_request(1, 0.25)
    validate_request(2, 4)
    for cpus, gpus in [(0, 0), (1, -1), (1, 1.5), (1, float("nan"))]:
        with pytest.raises(ResourceError):
            validate_request(cpus, gpus)


def test_resource_request_must_fit_one_node() -> None:
    nodes = [
        {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}},
        {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}},
        {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},
    ]
    check_request({"CPU": 4, "GPU": 1}, nodes)
    check_request({"CPU": 1, "GPU": 0.5}, nodes)
    with pytest.raises(ResourceError) as err:
        check_request({"CPU": 1, "GPU": 2}, nodes)  # 2 GPUs in the cluster, but not on one node
    msg = str(err.value)
    assert "1 CPU, 2 GPU" in msg and "4 CPU, 1 GPU" in msg and "\n" not in msg
    check_request({"CPU": 1, "GPU": 2}, nodes, {"gpu2": {"CPU": 8.0, "GPU": 2.0}})  # the autoscaler can add one


# -- Optuna searcher -----------------------------------------------------------------------------------
def _space(trial: Any) -> None:
    trial.suggest_int("lada.memory_size", 1, 64, log=True)
    trial.suggest_float("optim.lr", 1e-4, 1e-2, log=True)


DEFAULTS = {"lada.memory_size": 16, "optim.lr": 1e-3}


def _searcher(url: str, name: str = "s") -> Any:
    from sweeps.optuna_storage import make_sampler
    from sweeps.search import LadaSearcher

    return LadaSearcher(_space, metric=OBJECTIVE, mode="max", points_to_evaluate=[DEFAULTS], sampler=make_sampler(0), study_name=name, storage=url)


def test_searcher_tells_pruned_failed_and_complete(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = _searcher(url)
    first = s.suggest("t0")
    assert first == DEFAULTS, "the paper defaults are evaluated first"
    for tid in ("t1", "t2", "t3", "t4"):
        s.suggest(tid)
    for step in range(3):
        s.on_trial_result("t0", {OBJECTIVE: 50.0 + step, M.TASK_INDEX: step})
    s.on_trial_complete("t0", {OBJECTIVE: 52.0, TASKS_DONE: 3, NUM_TASKS: 3})
    s.on_trial_result("t1", {OBJECTIVE: 10.0, M.TASK_INDEX: 0})
    s.on_trial_complete("t1", {OBJECTIVE: 10.0, TASKS_DONE: 1, NUM_TASKS: 3})  # stopped by ASHA
    s.on_trial_complete("t2", {OBJECTIVE: float("nan"), TASKS_DONE: 1, NUM_TASKS: 3, "diverged": 1, "error_message": "loss is nan"})
    s.on_trial_complete("t3", None, error=True)
    s.on_trial_complete("t4", {OBJECTIVE: 40.0, TASKS_DONE: 3, NUM_TASKS: 3})
    study = optuna.load_study(study_name="s", storage=url)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    t0, t1 = study.trials[0], study.trials[1]
    assert t0.value == 52.0 and t0.intermediate_values == {0: 50.0, 1: 51.0, 2: 52.0}
    assert t1.intermediate_values == {0: 10.0}  # Optuna keeps the last intermediate value of a pruned trial
    assert study.trials[2].user_attrs["error"] == "loss is nan"
    assert t0.user_attrs["ray_trial_id"] == "t0"
    # A second completion (a restored driver) is not told twice.
    s.on_trial_complete("t1", {OBJECTIVE: 10.0, TASKS_DONE: 3, NUM_TASKS: 3})
    assert optuna.load_study(study_name="s", storage=url).trials[1].state == TrialState.PRUNED


def test_full_study_database_is_a_storage_error_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sqlite says "database or disk is full" without a path: the searcher's error names the study file
    and says what it means."""
    import sqlite3

    from sweeps.storage import StorageError

    db = tmp_path / "optuna.db"
    s = _searcher(f"sqlite:///{db}")

    def full(self: Any, *args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(optuna.Study, "ask", full)
    with pytest.raises(StorageError) as exc:
        s.suggest("t0")
    assert str(exc.value) == f"No space left on device (sqlite: database or disk is full): {db} (the Optuna study)"


def test_a_new_study_database_opened_by_two_processes_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second process to stamp a new database's schema version fails on the first one's row (seen
    when ``lada-sweep-report`` or a test polls a starting sweep): opening is tried again; any other
    database error is raised at once."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    from sweeps import optuna_storage as search

    real, calls = optuna.storages.RDBStorage, []

    def flaky(url: str) -> Any:
        calls.append(url)
        if len(calls) == 1:
            raise IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed: alembic_version.version_num"))
        return real(url)

    monkeypatch.setattr(optuna.storages, "RDBStorage", flaky)
    storage = search.open_storage(str(tmp_path / "optuna.db"))
    assert len(calls) == 2 and storage is not None
    assert search.storage_file(str(tmp_path / "optuna.db")) == search.storage_file(f"sqlite:///{(tmp_path / 'optuna.db').resolve()}")

    def full(url: str) -> Any:
        calls.append(url)
        raise OperationalError("INSERT", {}, Exception("database or disk is full"))

    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", full)
    with pytest.raises(OperationalError):
        search.open_storage(str(tmp_path / "other.db"))
    assert len(calls) == 1


OPEN_STUDY = """
import sys, time
import optuna
from sweeps.optuna_storage import open_storage
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
study = optuna.create_study(study_name="s", storage=open_storage(sys.argv[1]), load_if_exists=True)
print(study._study_id)
"""


@pytest.mark.integration
def test_a_new_study_database_opened_by_many_processes_at_the_same_instant(tmp_path: Path) -> None:
    """Real processes: four open each of three new sqlite study databases at the same instant (a
    sweep creating its study while ``lada-sweep-report`` or a notebook opens it). Plain
    ``RDBStorage`` fails here about one time in four ("table studies already exists", the
    alembic_version stamp); through ``open_storage`` every process gets the one study."""
    import subprocess
    import sys
    import time

    start = time.time() + 8  # every process has imported optuna by then
    procs = [(db, subprocess.Popen([sys.executable, "-c", OPEN_STUDY, str(tmp_path / f"db{db}.db"), str(start)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for db in range(3) for _ in range(4)]
    ids: dict[int, set[str]] = {}
    for db, p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        ids.setdefault(db, set()).add(out.strip())
    assert all(len(v) == 1 for v in ids.values()), ids


OPEN_STORE = """
import sys, time
from sweeps.tracking import get_or_create_experiment, open_client
uri, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
client = open_client(uri)
print(get_or_create_experiment(client, "lada-sweeps", uri))
"""


@pytest.mark.integration
def test_sweeps_started_together_share_a_new_sqlite_mlflow_store(tmp_path: Path) -> None:
    """Three processes open the same new sqlite MLflow store and its experiment at the same moment
    (two sweeps started together in one folder). Without the lock MLflow's table migrations collide
    and leave a database no process can open; with it, all three get the one experiment."""
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = str(time.time() + 6)  # after every interpreter has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri, start], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    ids = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(ids) == 1
    assert [e.experiment_id for e in MlflowClient(uri).search_experiments() if e.name == "lada-sweeps"] == list(ids)


@pytest.mark.parametrize("exc, path, expected", [
    (OSError(28, "No space left on device", "/r/a.json"), None, "No space left on device: /r/a.json"),
    (OSError(30, "Read-only file system"), "/r", "Read-only file system: /r"),
    (OSError("[Errno 28] Failed to write '/r/b/result.json'. Detail: [errno 28] No space left on device"), None,
     "No space left on device: /r/b/result.json"),
    (RuntimeError("attempt to write a readonly database"), "/r/optuna.db", "read-only database: /r/optuna.db"),
    (ValueError("loss is nan"), "/r", None),
    (OSError(2, "No such file or directory", "/r/x"), None, None),
])
def test_storage_failures_are_recognised_in_one_line(exc: BaseException, path: str | None, expected: str | None) -> None:
    from sweeps.storage import describe

    wrapped = RuntimeError("trial failed")
    wrapped.__cause__ = exc
    assert describe(wrapped, path) == expected


def test_searcher_rerun_does_not_enqueue_twice_and_fails_orphans(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = _searcher(url)
    s.suggest("t0")  # takes the enqueued defaults, then the driver "dies" before saving its state
    s2 = _searcher(url)  # same study: the defaults are not enqueued again
    study = s2.study
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 0
    assert s2.fail_orphans() == [0]
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.WAITING], "the orphaned defaults are enqueued again"
    assert s2.suggest("t9") == DEFAULTS


def test_restored_searcher_reconciles_with_the_trials_tune_restores(tmp_path: Path) -> None:
    """A driver killed while uploading a snapshot: Tune's experiment state knows t1 but the
    searcher's saved state predates t1 (the searcher state is uploaded after it). The restored
    searcher adopts t1 (it was failed as an orphan, and its end never told). A searcher state that
    holds a trial Tune's state lacks (the other way round) fails that trial."""
    import json

    from sweeps.recovery import expect_tune_trials, saved_tune_trials

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = _searcher(url)
    s.suggest("t0")
    s.on_trial_complete("t0", {OBJECTIVE: 50.0, TASKS_DONE: 3, NUM_TASKS: 3})
    s.save(str(tmp_path / "old-state.pkl"))  # the searcher state on disk when the driver dies
    s.suggest("t1")
    s.on_trial_result("t1", {OBJECTIVE: 40.0, M.TASK_INDEX: 0})
    s.suggest("t2")

    folder = tmp_path / "sweep"
    folder.mkdir()
    trial_data = [[json.dumps({"trial_id": tid, "status": "RUNNING"}), "{}"] for tid in ("t0", "t1")]
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": [trial_data[0]]}))
    (folder / "experiment_state-2026-01-02_00-00-00.json").write_text(json.dumps({"trial_data": trial_data}))
    assert saved_tune_trials(folder) == {"t0": "RUNNING", "t1": "RUNNING"}, "the newest experiment state"
    assert saved_tune_trials(tmp_path / "nothing-here") is None

    try:
        expect_tune_trials(saved_tune_trials(folder))
        r = _searcher(url)
        r.restore(str(tmp_path / "old-state.pkl"))
        for step in range(3):
            r.on_trial_result("t1", {OBJECTIVE: 41.0 + step, M.TASK_INDEX: step})
        r.on_trial_complete("t1", {OBJECTIVE: 43.0, TASKS_DONE: 3, NUM_TASKS: 3})
        by_id = {t.user_attrs["ray_trial_id"]: t for t in r.study.get_trials()}
        assert by_id["t1"].state == TrialState.COMPLETE and by_id["t1"].value == 43.0
        assert sorted(by_id["t1"].intermediate_values) == [0, 1, 2]
        assert by_id["t2"].state == TrialState.FAIL, "asked, but neither Tune nor the searcher holds it"

        # The other way round: the searcher's state holds u1, Tune's state does not.
        b = _searcher(url, "b")
        b.suggest("u0")
        b.suggest("u1")
        b.save(str(tmp_path / "b-state.pkl"))
        expect_tune_trials({"u0": "RUNNING"})
        rb = _searcher(url, "b")
        rb.restore(str(tmp_path / "b-state.pkl"))
        states = {t.user_attrs["ray_trial_id"]: t.state for t in rb.study.get_trials()}
        assert states == {"u0": TrialState.RUNNING, "u1": TrialState.FAIL}
        rb.on_trial_complete("u0", {OBJECTIVE: 30.0, TASKS_DONE: 3, NUM_TASKS: 3})
        assert rb.study.get_trials()[0].state == TrialState.COMPLETE
    finally:
        expect_tune_trials(None)


def test_restored_search_ends_when_its_searcher_state_is_older_than_tunes(tmp_path: Path) -> None:
    """Tune's own search loop (SearchGenerator, ConcurrencyLimiter) saving and restoring a sweep of 2
    trials, 1 at a time. The searcher's files on disk were saved while t0 ran; Tune's experiment state
    is newer (t0 TERMINATED, t1 running): a full disk cut the upload after the experiment state.
    Restored, t1 runs again and ends; the search must then be finished. With Tune's limiter holding
    the concurrency, t0 stayed live forever: no suggestion, no end, the sweep hung (CI, stop 13)."""
    from ray.tune.experiment import Experiment
    from ray.tune.search import ConcurrencyLimiter, SearchGenerator

    from sweeps.recovery import expect_tune_trials

    url = f"sqlite:///{tmp_path / 'optuna.db'}"

    def search() -> Any:
        s = _searcher(url)
        s.num_samples = 2
        g = SearchGenerator(ConcurrencyLimiter(s, max_concurrent=1))
        g.set_search_properties(OBJECTIVE, "max", {})
        g.add_configurations([Experiment("x", run=lambda config: None, num_samples=2, storage_path=str(tmp_path))])
        return g

    done = {OBJECTIVE: 50.0, TASKS_DONE: 3, NUM_TASKS: 3}
    g = search()
    t0 = g.next_trial()
    assert t0 is not None and g.next_trial() is None, "one at a time"
    (tmp_path / "saved").mkdir()
    g.save_to_dir(str(tmp_path / "saved"), "s")  # the searcher's files the driver leaves on disk
    g.on_trial_complete(t0.trial_id, done)
    t1 = g.next_trial()
    assert t1 is not None and g.next_trial() is None

    try:
        expect_tune_trials({t0.trial_id: "TERMINATED", t1.trial_id: "RUNNING"})
        r = search()
        r.restore_from_dir(str(tmp_path / "saved"))
        assert r.next_trial() is None, "t1 runs again: no third trial meanwhile"
        r.on_trial_complete(t1.trial_id, {OBJECTIVE: 60.0, TASKS_DONE: 3, NUM_TASKS: 3})
        assert r.next_trial() is None and r.is_finished(), "both trials of the budget ended"
        by_id = {t.user_attrs["ray_trial_id"]: t.state for t in r.searcher.searcher.study.get_trials()}
        assert by_id == {t0.trial_id: TrialState.COMPLETE, t1.trial_id: TrialState.COMPLETE}
    finally:
        expect_tune_trials(None)


def test_importances_follow_the_direction() -> None:
    """Parameter 'a' decides whether a trial reaches HIGH accuracy; 'b' only spreads the low ones.
    Our importances rank 'a' first; PED-ANOVA given the accuracy as target ranks for LOW values."""
    from sweeps.importance import importances

    rng = np.random.default_rng(0)
    study = optuna.create_study(direction="maximize")
    dists = {"a": optuna.distributions.FloatDistribution(0, 1), "b": optuna.distributions.FloatDistribution(0, 1)}
    for _ in range(200):
        a, b = rng.uniform(), rng.uniform()
        value = 90.0 + rng.uniform(0, 0.1) if a > 0.8 else 10.0 + 40.0 * b
        study.add_trial(optuna.trial.create_trial(params={"a": a, "b": b}, distributions=dists, value=value))
    imp = importances(study)
    assert list(imp)[0] == "a"
    with pytest.warns(UserWarning):
        trap = optuna.importance.get_param_importances(study, target=lambda t: t.value)
    assert list(trap)[0] == "b", "the trap the report avoids"


# -- MLflow callback -------------------------------------------------------------------------------------
@dataclass
class FakeTrial:
    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)
    checkpoint: Any = None
    local_path: str | None = None
    status: str = "RUNNING"

    @property
    def trial_name(self) -> str:
        return f"trial_{self.trial_id}"

    def get_error(self) -> Any:
        return RuntimeError("worker died\nValueError: boom")

    def __str__(self) -> str:
        return self.trial_name


NAMES = ["d0", "d1", "d2"]


def _result(step: int) -> dict[str, Any]:
    rows = np.array([[50.0 + 10 * j + t for t in range(3)] for j in range(step + 1)])
    m = {**M.partial_summary(rows), **{f"acc/{n}": float(v) for n, v in zip(NAMES, rows[-1], strict=True)}}
    r = step_result(m, step, 3, 1.0, Objective({"average": 1.0}))
    r["node_id"] = "abc"
    return r


@pytest.fixture
def tracker_env(tmp_path: Path) -> tuple[Any, str, str, str]:
    from mlflow.tracking import MlflowClient

    from sweeps.tracking import get_or_create_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = get_or_create_experiment(client, "t", uri)
    parent = client.create_run(exp, run_name="sweep").info.run_id
    return client, uri, exp, parent


def _tracker(uri: str, exp: str, parent: str) -> Any:
    from sweeps.tracking import MlflowTracker

    return MlflowTracker(uri, exp, parent, sweep_name="sw", flush_interval_s=3600, log_checkpoint=False, background=False)


def test_tracker_child_runs_batching_and_resume(tracker_env: tuple[Any, str, str, str]) -> None:
    from sweeps.tracking import MATRIX_CSV, MATRIX_PNG, OUTCOME_TAG, PARENT_TAG, TRIAL_ID_TAG, close_orphans

    client, uri, exp, parent = tracker_env
    tr = _tracker(uri, exp, parent)
    trial = FakeTrial("t1", {"lada.memory_size": 8, "optim.lr": 0.002})
    tr.on_trial_start(0, [trial], trial)
    calls_after_start = tr.calls
    for step in range(2):
        tr.on_trial_result(0, [trial], trial, _result(step))
        tr.on_step_end(0, [trial])
    assert tr.calls == calls_after_start, "metrics are queued, not sent one by one"
    assert tr.flush() and tr.calls == calls_after_start + 1, "one log_batch for all queued metrics"
    run_id = tr.runs["t1"]
    run = client.get_run(run_id)
    assert run.data.tags[PARENT_TAG] == parent and run.data.tags[TRIAL_ID_TAG] == "t1"
    assert run.data.params == {"lada.memory_size": "8", "optim.lr": "0.002"}

    # The driver restarts with the saved state: the trial continues its run, no step twice.
    state = tr.get_state()
    tr2 = _tracker(uri, exp, parent)
    tr2.set_state(state)
    tr2.on_trial_start(0, [trial], trial)
    for step in (1, 2):
        tr2.on_trial_result(0, [trial], trial, _result(step))
    trial.last_result = _result(2)
    tr2.on_trial_complete(0, [trial], trial)
    assert tr2.runs["t1"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[OUTCOME_TAG] == "completed"
    for key in (*VAL_METRICS, OBJECTIVE, "val/acc/d1", M.TASK_INDEX):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 1, 2], key
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {MATRIX_CSV, MATRIX_PNG} <= arts
    csv = Path(client.download_artifacts(run_id, MATRIX_CSV)).read_text().splitlines()
    assert csv[0] == "step,d0,d1,d2" and csv[3].startswith("d2,70.0000,71.0000")

    # A driver that lost its state (killed before saving) finds the run by its tag.
    trial2 = FakeTrial("t2", {"lada.memory_size": 4, "optim.lr": 0.001})
    tr.on_trial_start(0, [trial2], trial2)
    tr.on_trial_result(0, [trial2], trial2, _result(0))
    tr.flush()
    tr3 = _tracker(uri, exp, parent)  # no set_state
    tr3.on_trial_start(0, [trial2], trial2)
    tr3.on_trial_result(0, [trial2], trial2, _result(0))
    tr3.on_trial_result(0, [trial2], trial2, _result(1))
    trial2.last_result = _result(1)
    tr3.on_trial_complete(0, [trial2], trial2)
    assert tr3.runs["t2"] == tr.runs["t2"]
    assert [m.step for m in client.get_metric_history(tr.runs["t2"], metric_key(M.AVERAGE))] == [0, 1]
    assert client.get_run(tr.runs["t2"]).data.tags[OUTCOME_TAG] == "pruned"

    # Errors and orphans.
    trial3 = FakeTrial("t3", {"lada.memory_size": 2, "optim.lr": 0.001})
    tr3.on_trial_start(0, [trial3], trial3)
    tr3.on_trial_error(0, [trial3], trial3)
    r3 = client.get_run(tr3.runs["t3"])
    assert r3.info.status == "FAILED" and r3.data.tags["lada.error"] == "ValueError: boom"
    orphan = FakeTrial("t4", {"lada.memory_size": 2, "optim.lr": 0.001})
    tr3.on_trial_start(0, [orphan], orphan)
    assert close_orphans(client, exp, parent, keep=["t1", "t2", "t3"]) == [tr3.runs["t4"]]
    assert client.get_run(tr3.runs["t4"]).info.status == "KILLED"
    children = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in children) == ["t1", "t2", "t3", "t4"], "one run per trial"


def test_tracker_closes_runs_of_trials_that_ended_before_the_driver_was_killed(tracker_env: tuple[Any, str, str, str],
                                                                             tmp_path: Path) -> None:
    """A driver killed after a trial's last result (Tune saved it as ended) but before its run was
    closed: the resumed driver's first step closes that run, with the steps MLflow lacked (from the
    trial's result.json), the matrix and the outcome; an errored trial's run is closed FAILED; a run
    already closed is left as it is."""
    import json

    from sweeps.tracking import MATRIX_CSV, OUTCOME_TAG

    client, uri, exp, parent = tracker_env
    tr = _tracker(uri, exp, parent)

    def result(trial: FakeTrial, step: int) -> None:
        with (Path(trial.local_path) / "result.json").open("a") as f:
            f.write(json.dumps(_result(step)) + "\n")
        tr.on_trial_result(0, [trial], trial, _result(step))
        trial.last_result = _result(step)

    trials = []
    for tid in ("t1", "t2", "t3"):
        (tmp_path / tid).mkdir()
        trials.append(FakeTrial(tid, {"optim.lr": 0.001}, local_path=str(tmp_path / tid)))
        tr.on_trial_start(0, trials, trials[-1])
        result(trials[-1], 0)
    t1, t2, t3 = trials
    for step in (1, 2):
        result(t3, step)
    t3.status = "TERMINATED"
    tr.on_trial_complete(0, trials, t3)  # t3 ended and its run was closed
    for step in (1, 2):  # t1's and t2's last steps stay queued: the driver is killed
        result(t1, step)
        result(t2, step)
    closed_before = client.get_run(tr.runs["t3"]).info.end_time
    state = tr.get_state()
    tr.writer._pending.clear()  # t1's and t2's last steps die with the driver
    for tid in ("t1", "t2"):
        assert [m.step for m in client.get_metric_history(tr.runs[tid], metric_key(M.AVERAGE))] == [0], "MLflow lacks steps 1 and 2"
    # The state Tune saved says t1 and t2 ended (t1 completed, t2 errored); their runs are RUNNING.
    t1.status, t2.status = "TERMINATED", "ERROR"
    tr2 = _tracker(uri, exp, parent)
    tr2.set_state(state)
    tr2.on_step_begin(0, trials)
    r1, r2, r3 = (client.get_run(tr.runs[t]) for t in ("t1", "t2", "t3"))
    assert r1.info.status == "FINISHED" and r1.data.tags[OUTCOME_TAG] == "completed"
    assert r2.info.status == "FAILED" and r2.data.tags[OUTCOME_TAG] == "failed"
    assert r3.info.status == "FINISHED" and r3.info.end_time == closed_before, "a closed run is left as it is"
    for r in (r1, r2):
        assert [m.step for m in client.get_metric_history(r.info.run_id, metric_key(M.AVERAGE))] == [0, 1, 2], "every step once"
    csv = Path(client.download_artifacts(r1.info.run_id, MATRIX_CSV)).read_text().splitlines()
    assert len(csv) == 4 and csv[3].startswith("d2,70.0000")
    tr2.on_step_begin(1, trials)
    assert [m.step for m in client.get_metric_history(r1.info.run_id, M.TASK_INDEX)] == [0, 1, 2]


class FlakyClient:
    """An MlflowClient that can be switched off (every call raises, as for a stopped server); counts calls."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.down = False
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.down:
                raise ConnectionError("Connection refused")
            return attr(*args, **kwargs)

        return call


def test_tracker_keeps_metrics_when_mlflow_is_down(tracker_env: tuple[Any, str, str, str], tmp_path: Path) -> None:
    """MLflow down mid-sweep: no call is tried during the retry window (Tune's loop never waits on
    it), metrics and trial ends are kept, a trial that starts meanwhile gets its run when MLflow is
    back (filled from its result.json), and every step is logged exactly once."""
    import json

    from mlflow.tracking import MlflowClient

    from sweeps.tracking import OUTCOME_TAG, TRIAL_ID_TAG

    client, uri, exp, parent = tracker_env
    tr = _tracker(uri, exp, parent)
    flaky = FlakyClient(MlflowClient(uri))
    tr.writer._client = flaky
    t1 = FakeTrial("t1", {"optim.lr": 0.001})
    tr.on_trial_start(0, [t1], t1)
    tr.on_trial_result(0, [t1], t1, _result(0))
    flaky.down = True
    assert tr.flush() is False
    assert not tr.available() and len(tr.writer._pending) > 0, "kept for a retry"
    calls = flaky.calls
    # While down: results, a new trial, a trial end - none of them calls MLflow.
    tr.on_trial_result(0, [t1], t1, _result(1))
    d2 = tmp_path / "t2"
    d2.mkdir()
    t2 = FakeTrial("t2", {"optim.lr": 0.002}, local_path=str(d2))
    tr.on_trial_start(0, [t1, t2], t2)
    for step in range(2):
        with (d2 / "result.json").open("a") as f:
            f.write(json.dumps(_result(step)) + "\n")
        tr.on_trial_result(0, [t1, t2], t2, _result(step))
    tr.on_trial_result(0, [t1], t1, _result(2))
    t1.last_result = _result(2)
    tr.on_trial_complete(0, [t1, t2], t1)
    tr.on_step_end(0, [t1, t2])
    assert flaky.calls == calls, "no MLflow call while it is down"
    assert tr.unsent()[1] == 1 and "t2" not in tr.runs
    # Back up (the retry time has passed): the next step sends everything.
    flaky.down = False
    tr.writer._down_until = 0.0
    tr.on_step_end(0, [t1, t2])
    with (d2 / "result.json").open("a") as f:
        f.write(json.dumps(_result(2)) + "\n")
    tr.on_trial_result(0, [t1, t2], t2, _result(2))
    t2.last_result = _result(2)
    tr.on_trial_complete(0, [t1, t2], t2)
    tr.on_experiment_end([t1, t2])
    assert tr.unsent() == (0, 0)
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in runs) == ["t1", "t2"], "one run per trial"
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags[OUTCOME_TAG] == "completed"
        assert [m.step for m in client.get_metric_history(r.info.run_id, metric_key(M.AVERAGE))] == [0, 1, 2]
        assert [m.step for m in client.get_metric_history(r.info.run_id, M.TASK_INDEX)] == [0, 1, 2]


def test_tracker_is_picklable(tracker_env: tuple[Any, str, str, str]) -> None:
    import pickle

    client, uri, exp, parent = tracker_env
    tr = _tracker(uri, exp, parent)
    trial = FakeTrial("t1", {"optim.lr": 0.001})
    tr.on_trial_start(0, [trial], trial)
    clone = pickle.loads(pickle.dumps(tr))
    assert clone.runs == tr.runs and clone.writer._client is None and clone.writer.unsent() == (0, 0)


# -- report ---------------------------------------------------------------------------------------------
def test_paper_numbers_beside_xtail_only() -> None:
    from sweeps.report import paper_comparison

    best = {"val/transfer": 60.0, "val/average": 71.25, "val/last": 82.5}
    text = paper_comparison("xtail", 16, best)
    assert text is not None and "16-shot" in text
    lada = next(line for line in text.splitlines() if line.startswith("LADA"))
    assert lada.split()[1:] == ["61.50", "72.70", "83.10"]
    mine = next(line for line in text.splitlines() if line.startswith("this sweep"))
    assert mine.split()[-3:] == ["60.00", "71.25", "82.50"]
    assert "full-shot" in paper_comparison("xtail", None, best)
    assert paper_comparison("mini-tail", 16, best) is None


def test_report_table_orders_by_value(tmp_path: Path) -> None:
    from sweeps.report import format_table, top_trials

    study = optuna.create_study(direction="maximize", storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    dist = {"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    for i, (state, value) in enumerate([(TrialState.COMPLETE, 50.0), (TrialState.PRUNED, None), (TrialState.COMPLETE, 70.0), (TrialState.FAIL, None)]):
        study.add_trial(optuna.trial.create_trial(state=state, value=value, params={"optim.lr": 1e-3 * (i + 1)}, distributions=dist,
                                                   user_attrs={"ray_trial_id": f"t{i}"}, intermediate_values={0: 10.0 * i}))
    results = {"t2": {"val/transfer": 1.0, "val/average": 70.0, "val/last": 75.0, "tasks_done": 7}}
    rows = top_trials(study, results, top=3)
    assert [r["trial_id"] for r in rows][:2] == ["t2", "t0"] and len(rows) == 3
    table = format_table(rows).splitlines()
    assert table[0].split()[:4] == ["#", "trial", "state", "value"]
    assert table[1].split()[1:4] == ["t2", "COMPLETE", "70.00"]


def test_tracker_background_thread(tracker_env: tuple[Any, str, str, str]) -> None:
    """In a sweep the MLflow I/O runs on one background thread; the experiment end waits for it."""
    from sweeps.tracking import MlflowTracker

    client, uri, exp, parent = tracker_env
    tr = MlflowTracker(uri, exp, parent, flush_interval_s=0, log_checkpoint=False)
    trial = FakeTrial("t1", {"optim.lr": 0.001})
    tr.on_trial_start(0, [trial], trial)
    for step in range(3):
        tr.on_trial_result(0, [trial], trial, _result(step))
        tr.on_step_end(0, [trial])
    trial.last_result = _result(2)
    tr.on_trial_complete(0, [trial], trial)
    tr.on_experiment_end([trial])
    run = client.get_run(tr.runs["t1"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, metric_key(M.AVERAGE))] == [0, 1, 2]
    assert "accuracy_matrix.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


# -- the trial function: what a restored trial reports ------------------------------------------------
@dataclass
class _FakeTune:
    """Stands in for the parts of ``ray.tune`` the trial function calls (no Ray): the checkpoint it is
    restored from, and a record of every report (each checkpoint copied, as Tune persists it)."""

    root: Path
    restore_from: Any = None
    reports: list[tuple[dict[str, Any], Path | None]] = field(default_factory=list)

    def report(self, result: dict[str, Any], checkpoint: Any = None) -> None:
        kept = None
        if checkpoint is not None:
            kept = self.root / f"kept-{len(self.reports):03d}"
            checkpoint.to_directory(str(kept))
        self.reports.append((dict(result), kept))


def _run_trial(monkeypatch: pytest.MonkeyPatch, fake: _FakeTune, spec: TrialSpec) -> list[int]:
    import ray
    from ray import tune

    from sweeps.trainable import lada_trainable

    class Context:
        def get_trial_id(self) -> str:
            return "t0"

        def get_trial_dir(self) -> str:
            return str(fake.root)

        def get_node_id(self) -> str:
            return "node"

    fake.reports.clear()
    monkeypatch.setattr(tune, "get_checkpoint", lambda: fake.restore_from)
    monkeypatch.setattr(tune, "report", fake.report)
    monkeypatch.setattr(tune, "get_context", Context)
    monkeypatch.setattr(ray, "get_runtime_context", Context)
    monkeypatch.setattr(ray, "get_gpu_ids", list)  # outside a worker the real one starts a local Ray
    lada_trainable({}, spec)
    return [r[M.TASK_INDEX] for r, _ in fake.reports]


@pytest.mark.integration
def test_a_restored_trial_reports_each_task_once(mini_cache: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial restored from a task's checkpoint (its worker or node lost, a driver restart) reports
    only the tasks after it, with the uninterrupted trial's results; one restored from its last task's
    checkpoint reports nothing (Tune ends it with the result it already holds: a second report of the
    last task was a duplicate step in Ray's results, seen when a node was lost just after that report)."""
    from ray import tune

    cfg, info, _ = mini_cache
    spec = TrialSpec(base_config=cfg.to_dict(), overrides=("optim.epochs=1",), cache_path=str(info.path), work_root=str(tmp_path / "work"))
    fake = _FakeTune(tmp_path)
    assert _run_trial(monkeypatch, fake, spec) == list(range(7))
    whole = list(fake.reports)
    assert all(ckpt is not None and (ckpt / f"task-{r[M.TASK_INDEX]:03d}" / "state.pt").is_file() for r, ckpt in whole)

    fake.restore_from = tune.Checkpoint.from_directory(str(whole[3][1]))
    assert _run_trial(monkeypatch, fake, spec) == [4, 5, 6]
    for (again, _), (first, _) in zip(fake.reports, whole[4:]):
        assert again[OBJECTIVE] == pytest.approx(first[OBJECTIVE], abs=1e-9)

    fake.restore_from = tune.Checkpoint.from_directory(str(whole[6][1]))
    assert _run_trial(monkeypatch, fake, spec) == []


@pytest.mark.integration
def test_a_restored_trial_replays_the_steps_it_finds_stored(mini_cache: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune took a trial's results up to task 5 but the worker was lost before Tune fetched the
    checkpoints of tasks 4 and 5 (Tune fetches a result's checkpoint in a second call): restored from
    task 3, the trial finds task 5 stored in the sweep's folder. Tasks 4 and 5 are reported again,
    marked replayed, not trained (the driver may hold them already: every reader keeps a step's first
    report), then task 6 is trained. With task 6 stored, nothing is trained: 4, 5 and 6 are replayed."""
    import shutil
    from dataclasses import replace

    from ray import tune

    from sweeps.trainable import REPLAYED, TASK_SECONDS

    cfg, info, _ = mini_cache
    results = tmp_path / "results"
    spec = TrialSpec(base_config=cfg.to_dict(), overrides=("optim.epochs=1",), cache_path=str(info.path), work_root=str(tmp_path / "work"),
                     results_dir=str(results))
    fake = _FakeTune(tmp_path)
    assert _run_trial(monkeypatch, fake, replace(spec, results_dir=None)) == list(range(7))
    whole = list(fake.reports)
    trial_dir = results / "lada_trainable_t0_00000_0_2026"

    def stored(task: int) -> None:
        shutil.rmtree(trial_dir, ignore_errors=True)
        shutil.copytree(whole[task][1], trial_dir / f"checkpoint_{task:06d}")

    fake.restore_from = tune.Checkpoint.from_directory(str(whole[3][1]))
    stored(5)
    assert _run_trial(monkeypatch, fake, spec) == [4, 5, 6]
    assert [r.get(REPLAYED) for r, _ in fake.reports] == [1, 1, None]
    assert [r[TASK_SECONDS] == 0 for r, _ in fake.reports] == [True, True, False]
    assert fake.reports[1][1] is not None, "the last replayed step carries its checkpoint"
    assert fake.reports[2][0][OBJECTIVE] == pytest.approx(whole[6][0][OBJECTIVE], abs=1e-9), "trained from the stored task 5"

    stored(6)
    assert _run_trial(monkeypatch, fake, spec) == [4, 5, 6]
    assert [r.get(REPLAYED) for r, _ in fake.reports] == [1, 1, 1], "nothing trained"
    assert fake.reports[2][1] is not None

    # That trial ends with Tune holding task 3's checkpoint: its MLflow run gets the stored task 6.
    from mlflow.tracking import MlflowClient

    from sweeps.tracking import MlflowTracker, get_or_create_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = get_or_create_experiment(client, "t", uri)
    tracker = MlflowTracker(uri, exp, client.create_run(exp, run_name="sweep").info.run_id, spec=spec, background=False)
    trial = FakeTrial("t0", {}, last_result=whole[6][0], checkpoint=fake.restore_from)
    tracker.on_trial_start(0, [trial], trial)
    tracker.on_trial_complete(0, [trial], trial)
    assert [a.path for a in client.list_artifacts(tracker.runs["t0"], "checkpoint")] == ["checkpoint/task-006"]


def test_searcher_pickles_and_its_copy_continues_the_study(tmp_path: Path) -> None:
    """Tune pickles the searcher with the Tuner (and its state at every snapshot): the copy reports
    to and tells the same Optuna trial, which keeps its history."""
    import pickle

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = _searcher(url)
    s.suggest("t0")
    s.on_trial_result("t0", {OBJECTIVE: 50.0, M.TASK_INDEX: 0})
    copy = pickle.loads(pickle.dumps(s))
    copy.on_trial_result("t0", {OBJECTIVE: 51.0, M.TASK_INDEX: 1})
    copy.on_trial_complete("t0", {OBJECTIVE: 51.0, TASKS_DONE: 2, NUM_TASKS: 2})
    (t,) = optuna.load_study(study_name="s", storage=url).get_trials()
    assert t.state == TrialState.COMPLETE and t.intermediate_values == {0: 50.0, 1: 51.0} and t.value == 51.0


def test_fault_seams_fire_as_planned_and_log_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sweeps.faults: nothing without a plan; ``nth`` fires on that call only; ``once`` fires once
    (its marker holds the pid); ``until`` holds until its file exists; an entry naming ``task`` acts at
    that task only; ``exit`` ends the process with that code."""
    import json
    import os

    from sweeps import faults

    log = tmp_path / "faults.log"
    monkeypatch.setenv(faults.LOG_ENV, str(log))
    monkeypatch.delenv(faults.PLAN_ENV, raising=False)
    faults.at("search.ask")
    assert faults.fired(log, "search.ask") == []
    monkeypatch.setenv(faults.PLAN_ENV, json.dumps({"search.ask": {"nth": 2, "sleep": 0}, "x.once": {"once": str(tmp_path / "m")}}))
    monkeypatch.setattr(faults, "_counts", {})
    for _ in range(3):
        faults.at("search.ask")
        faults.at("x.once")
    assert len(faults.fired(log, "search.ask")) == 1 and len(faults.fired(log, "x.once")) == 1
    assert (tmp_path / "m").read_text() == str(os.getpid())
    (tmp_path / "go").touch()
    monkeypatch.setenv(faults.PLAN_ENV, json.dumps({"held": {"until": str(tmp_path / "go")}}))
    faults.at("held")
    assert len(faults.fired(log, "held")) == 1, "returns once the file exists"

    monkeypatch.setenv(faults.PLAN_ENV, json.dumps({"trial.after_task": {"task": 2, "nth": 1, "until": str(tmp_path / "go")}}))
    for k in range(4):
        faults.at("trial.after_task", task=k)
    assert [e["task"] for e in faults.fired(log, "trial.after_task")] == [2], "only task 2 acts (and counts)"

    exits: list[int] = []
    monkeypatch.setattr(faults.os, "_exit", exits.append)
    monkeypatch.setenv(faults.PLAN_ENV, json.dumps({"trial.after_task": {"exit": 7}}))
    faults.at("trial.after_task", task=0)
    assert exits == [7]
