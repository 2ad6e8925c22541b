"""Integration layer: an in-process local Ray and a real ``Tuner`` with the real searcher, MLflow
tracker and storage guard, driven by a toy trainable that reports seven "tasks" in
milliseconds and can be told (by its sampled ``x``) to diverge or raise at a given step."""

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
