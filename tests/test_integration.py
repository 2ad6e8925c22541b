"""Integration layer: an in-process local Ray and a real ``Tuner`` with the real searcher, MLflow
tracker, storage guard and restore path (``Tuner.restore`` after ``sweeps.recovery``), driven by toy
trainables that report seven "tasks" in milliseconds and can be told (by their sampled ``x``) to
diverge, raise, lose their worker process or meet a full disk at a given step. Each fault scenario of
``tests/test_faults.py`` has its bookkeeping checked here, in seconds; the fault layer keeps one real
end-to-end run per fault."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lada_core import metrics as M
from sweeps import results as R
from sweeps.objective import OBJECTIVE

pytestmark = pytest.mark.integration

TASKS = 7
DIVERGE, RAISE = 0.91, 0.07  # points whose trials diverge at task 2, raise at task 1


def _space(trial: Any) -> None:
    trial.suggest_float("x", 0.2, 0.8)


def toy_trainable(config: dict[str, Any]) -> None:
    from ray import tune

    x = float(config["x"])
    for k in range(TASKS):
        if x == RAISE and k == 1:
            raise RuntimeError("told to raise at task 1")
        value = math.nan if (x == DIVERGE and k == 2) else 10.0 * (k + 1) * x
        result = {M.TASK_INDEX: k, R.TASKS_DONE: k + 1, R.NUM_TASKS: TASKS, OBJECTIVE: value, "val/acc/a": value, "val/acc/b": value / 2}
        if math.isnan(value):
            tune.report({**result, R.DIVERGED: 1, R.ERROR: "loss is nan"})
            return
        tune.report(result)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray
    from sweeps_helpers import short_tmp

    tmp = short_tmp("rti")
    here = Path(__file__).resolve().parent  # the workers import this module (the toy trainable)
    path = os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp),
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_sweep_records_every_step_once_and_each_outcome_by_the_one_rule(local_ray: None, tmp_path: Path) -> None:
    import optuna
    from optuna.trial import TrialState
    from ray import tune

    from sweeps.search import LadaSearcher
    from sweeps.storage import StorageGuard
    from sweeps.tracking import OUTCOME_TAG, PARENT_TAG, TRIAL_ID_TAG, MlflowTracker, get_or_create_experiment, open_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = open_client(uri)
    exp = get_or_create_experiment(client, "integration", uri)
    parent = client.create_run(exp, run_name="s").info.run_id
    folder = tmp_path / "results" / "s"
    study_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = LadaSearcher(_space, points_to_evaluate=[{"x": DIVERGE}, {"x": RAISE}], study_name="s", storage=study_url,
                            sampler=optuna.samplers.TPESampler(seed=0))
    tracker = MlflowTracker(uri, exp, parent, sweep_name="s", log_checkpoint=False)
    guard = StorageGuard(str(folder))
    tuner = tune.Tuner(
        tune.with_resources(toy_trainable, {"cpu": 1}),
        tune_config=tune.TuneConfig(search_alg=searcher, metric=OBJECTIVE, mode="max", num_samples=4, max_concurrent_trials=2),
        run_config=tune.RunConfig(name="s", storage_path=str(tmp_path / "results"), verbose=0,
                                  callbacks=[tracker, guard],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    guard.install_filters()
    try:
        grid = tuner.fit()
    finally:
        guard.remove_filters()
    assert len(grid) == 4 and not guard.tripped

    by_x = {round(float(t.params["x"]), 2): t for t in optuna.load_study(study_name="s", storage=study_url).get_trials()}
    assert by_x[DIVERGE].state == TrialState.FAIL and by_x[RAISE].state == TrialState.FAIL
    normal = [t for x, t in by_x.items() if x not in (DIVERGE, RAISE)]
    assert len(normal) == 2 and all(t.state == TrialState.COMPLETE and sorted(t.intermediate_values) == list(range(TASKS))
                                    for t in normal)
    assert sorted(by_x[DIVERGE].intermediate_values) == [0, 1], "the diverged step reports no value"

    outcomes = {}
    for rec in R.read_results(folder).values():
        x = round(float(rec.config["x"]), 2)
        outcomes[x] = R.classify(rec.last, error=rec.error is not None)
        assert [s[M.TASK_INDEX] for s in rec.steps] == list(range(len(rec.steps)))
    assert outcomes[DIVERGE] == R.DIVERGED_OUTCOME and outcomes[RAISE] == R.FAILED
    assert sorted(outcomes[x] for x in outcomes if x not in (DIVERGE, RAISE)) == [R.COMPLETED, R.COMPLETED]

    runs = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    assert len(runs) == 4, "one child run per trial"
    tags = {}
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, M.TASK_INDEX)]
        assert sorted(steps) == sorted(set(steps)), "each task step once in MLflow"
        tags[run.data.tags[TRIAL_ID_TAG]] = run.data.tags[OUTCOME_TAG]
    assert sorted(tags.values()) == sorted([R.COMPLETED, R.COMPLETED, R.DIVERGED_OUTCOME, R.FAILED])
    assert tracker.unsent() == (0, 0)


# -- a worker process lost mid-trial; a full disk, then a restored sweep ------------------------------------
DIE, DIE_LAST, FULL = 0.33, 0.44, 0.66  # first attempts that lose their worker after task 3 / after the last task, meet a full disk at task 3


def checkpointed_trainable(config: dict[str, Any], marks: str) -> None:
    """Seven tasks, a checkpoint (the task index) with each report, resumed after the restored one.
    ``x == DIE``: the worker process dies (``os._exit``) after reporting task 3, once; ``x == DIE_LAST``:
    the same after its last task (its node lost just then); ``x == FULL``:
    task 3 meets a full disk (reported as the real trainable does, then the trial waits to be
    stopped), once. ``marks``: a folder where each fault leaves a file when it fires."""
    import json
    import tempfile
    import time

    from ray import tune

    x = float(config["x"])
    start = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.loads((Path(d) / "task.json").read_text())["task"] + 1
    for k in range(start, TASKS):
        value = 10.0 * (k + 1) * x
        result = {M.TASK_INDEX: k, R.TASKS_DONE: k + 1, R.NUM_TASKS: TASKS, OBJECTIVE: value, "val/acc/a": value}
        fired = Path(marks) / f"{x}"
        if x == FULL and k == 3 and not fired.exists():
            fired.write_text("full")
            tune.report({**result, OBJECTIVE: math.nan, R.STORAGE_ERROR: "No space left on device: '/x'", R.ERROR: "disk full"})
            time.sleep(60)  # the guard stops the sweep meanwhile
            return
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "task.json").write_text(json.dumps({"task": k}))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))
        if ((x == DIE and k == 3) or (x == DIE_LAST and k == TASKS - 1)) and not fired.exists():
            fired.write_text("died")
            os._exit(1)


class _Sweep:
    """A sweep's stores and Tune's configs, as ``sweeps.runner`` assembles them (the toy trainable
    in place of ``lada_trainable``)."""

    def __init__(self, tmp_path: Path, points: list[dict[str, float]], num_samples: int) -> None:
        import optuna

        from sweeps.search import LadaSearcher
        from sweeps.storage import StorageGuard
        from sweeps.tracking import MlflowTracker, get_or_create_experiment, open_client

        self.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        self.client = open_client(self.uri)
        self.exp = get_or_create_experiment(self.client, "integration", self.uri)
        self.parent = self.client.create_run(self.exp, run_name="s").info.run_id
        self.storage = tmp_path / "results"
        self.folder = self.storage / "s"
        self.marks = tmp_path / "marks"
        self.marks.mkdir()
        self.study_url = f"sqlite:///{tmp_path / 'optuna.db'}"
        self.searcher = LadaSearcher(_space, metric=OBJECTIVE, mode="max", points_to_evaluate=points, study_name="s",
                                     storage=self.study_url, sampler=optuna.samplers.TPESampler(seed=0), num_samples=num_samples)
        self.tracker = MlflowTracker(self.uri, self.exp, self.parent, sweep_name="s", log_checkpoint=False)
        self.guard = StorageGuard(str(self.folder))
        self.num_samples = num_samples

    def trainable(self) -> Any:
        from ray import tune

        return tune.with_resources(tune.with_parameters(checkpointed_trainable, marks=str(self.marks)), {"cpu": 1})

    def tuner(self) -> Any:
        from ray import tune

        return tune.Tuner(
            self.trainable(),
            tune_config=tune.TuneConfig(search_alg=self.searcher, metric=OBJECTIVE, mode="max", num_samples=self.num_samples,
                                        max_concurrent_trials=2),
            run_config=tune.RunConfig(name="s", storage_path=str(self.storage), verbose=0, callbacks=[self.tracker, self.guard],
                                      stop=self.guard, failure_config=tune.FailureConfig(max_failures=1)),
        )

    def fit(self, tuner: Any) -> Any:
        """``tuner.fit()`` with the storage guard's filters and upload wrapper in place, then removed
        from the guard Tune ran too (a restored Tuner runs its own unpickled copy), as
        ``sweeps.runner`` does: nothing of it outlives the sweep."""
        from sweeps.runner import callback_of
        from sweeps.storage import StorageGuard

        self.guard.install_filters()
        try:
            return tuner.fit()
        finally:
            used = callback_of(tuner, StorageGuard)
            for g in (self.guard, used) if used is not None else (self.guard,):
                g.remove_filters()
            if used is not None and used is not self.guard and used.tripped:
                self.guard.message = used.message

    def fired(self) -> dict[float, str]:
        return {float(p.name): p.read_text() for p in self.marks.iterdir()}

    def check_every_step_once(self, trials: int) -> None:
        """Each reader of the sweep - the study, the results reader, MLflow - holds every task of every
        trial once; every trial COMPLETE, its MLflow run FINISHED and the only one of its trial."""
        import optuna
        from optuna.trial import TrialState

        from sweeps.tracking import PARENT_TAG, TRIAL_ID_TAG

        study = optuna.load_study(study_name="s", storage=self.study_url).get_trials()
        assert len(study) == trials and all(t.state == TrialState.COMPLETE for t in study), [t.state for t in study]
        assert all(sorted(t.intermediate_values) == list(range(TASKS)) for t in study)
        recs = R.read_results(self.folder)
        assert len(recs) == trials
        for rec in recs.values():
            assert [st[M.TASK_INDEX] for st in rec.steps] == list(range(TASKS))
            assert R.classify(rec.last, error=rec.error is not None) == R.COMPLETED
        runs = self.client.search_runs([self.exp], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent}'")
        assert sorted(r.data.tags[TRIAL_ID_TAG] for r in runs) == sorted(recs), "one MLflow run per trial"
        for run in runs:
            assert run.info.status == "FINISHED"
            steps = [m.step for m in self.client.get_metric_history(run.info.run_id, M.TASK_INDEX)]
            assert sorted(steps) == list(range(TASKS)), steps


@pytest.mark.parametrize("point", [DIE, DIE_LAST], ids=["after task 3", "after the last task"])
def test_a_lost_worker_process_resumes_its_trial_from_the_last_task(local_ray: None, tmp_path: Path, point: float) -> None:
    """The worker of one trial dies after its fourth task (the OOM killer, a SIGKILL), or just after
    reporting its last one (its node lost then): Tune retries it from that task's checkpoint (after
    the last task there is nothing left to do, and nothing is reported again); the trial keeps its one
    study trial (COMPLETE once, with its last value) and its one MLflow run, no task is run again, and
    every reader has every step once."""
    import optuna

    sweep = _Sweep(tmp_path, [{"x": point}], num_samples=2)
    grid = sweep.fit(sweep.tuner())
    assert sweep.fired() == {point: "died"}, "the worker died"
    assert len(grid) == 2 and not grid.errors
    rows = R.read_results(sweep.folder)
    (died,) = [rec for rec in rows.values() if round(float(rec.config["x"]), 2) == point]
    assert [r[M.TASK_INDEX] for r in died.rows] == list(range(TASKS)), "every task reported once: the retry began after the last checkpoint"
    sweep.check_every_step_once(trials=2)
    (trial,) = [t for t in optuna.load_study(study_name="s", storage=sweep.study_url).get_trials() if t.params["x"] == point]
    assert trial.value == pytest.approx(10.0 * TASKS * point), "the study holds the trial's last value"
    assert sweep.tracker.unsent() == (0, 0)


def test_a_full_disk_stops_the_sweep_and_the_restored_sweep_finishes_it(local_ray: None, tmp_path: Path) -> None:
    """A trial meets a full disk after three tasks: the storage guard stops the sweep (as Ctrl+C
    would, nothing marked finished), then the sweep is restored (``sweeps.recovery`` tells the
    restored searcher what Tune restores) and finishes: the study, the results and MLflow hold every
    step of every trial once."""
    from ray import tune

    from sweeps.recovery import expect_tune_trials, saved_tune_trials

    sweep = _Sweep(tmp_path, [{"x": FULL}], num_samples=3)
    sweep.fit(sweep.tuner())
    assert sweep.fired() == {FULL: "full"} and sweep.guard.tripped, "the disk was full and the guard tripped"
    assert "No space left on device" in (sweep.guard.message or "")
    import optuna
    from optuna.trial import TrialState

    trials = optuna.load_study(study_name="s", storage=sweep.study_url).get_trials()
    stopped = [t for t in trials if t.params["x"] == FULL]
    assert stopped and stopped[0].state == TrialState.RUNNING, "the stopped trial is not ended"
    assert all(t.state in (TrialState.RUNNING, TrialState.COMPLETE) for t in trials), [t.state for t in trials]

    saved = saved_tune_trials(sweep.folder)
    assert saved and any(st != "TERMINATED" for st in saved.values()), saved
    expect_tune_trials(saved)
    try:
        restored = tune.Tuner.restore(str(sweep.folder), sweep.trainable(), resume_unfinished=True, resume_errored=True)
        grid = sweep.fit(restored)
    finally:
        expect_tune_trials(None)
    assert len(grid) == 3 and not grid.errors
    sweep.check_every_step_once(trials=3)

