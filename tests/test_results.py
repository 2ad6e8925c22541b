"""``sweeps/results.py``: the one outcome rule, and the one reader of Ray's results (each task step once,
whatever Ray's at-least-once ``result.json`` repeats), and the MLflow sync built on it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from lada_core import metrics as M
from sweeps import results as R
from sweeps.objective import OBJECTIVE

pytestmark = pytest.mark.unit


def _step(k: int, n: int = 3, value: float = 50.0, **extra: Any) -> dict[str, Any]:
    return {M.TASK_INDEX: k, R.TASKS_DONE: k + 1, R.NUM_TASKS: n, OBJECTIVE: value, "acc/a": value, **extra}


@pytest.mark.parametrize(("result", "error", "outcome", "state", "status"), [
    (_step(2), False, R.COMPLETED, "COMPLETE", "FINISHED"),
    (_step(0), False, R.PRUNED, "PRUNED", "FINISHED"),
    (_step(1, diverged=1), False, R.DIVERGED_OUTCOME, "FAIL", "FAILED"),
    (_step(2), True, R.FAILED, "FAIL", "FAILED"),
    (_step(2, value=math.nan), False, R.FAILED, "FAIL", "FAILED"),
    (None, False, R.NOT_RUN, "PRUNED", "FINISHED"),
    ({R.TASKS_DONE: 0, R.NUM_TASKS: 3}, False, R.NOT_RUN, "PRUNED", "FINISHED"),
])
def test_one_outcome_rule(result: Any, error: bool, outcome: str, state: str, status: str) -> None:
    assert R.classify(result, error) == outcome
    assert R.optuna_state(outcome) == state and R.mlflow_status(outcome) == status


def test_the_sweeps_task_count_when_the_result_lacks_it() -> None:
    assert R.classify({R.TASKS_DONE: 2, OBJECTIVE: 1.0}, num_tasks=3) == R.PRUNED
    assert R.classify({R.TASKS_DONE: 3, OBJECTIVE: 1.0}, num_tasks=3) == R.COMPLETED


def test_the_searcher_tells_what_the_rule_says() -> None:
    from optuna.trial import TrialState

    from sweeps.search import LadaSearcher

    assert LadaSearcher.outcome(_step(2, value=61.5), OBJECTIVE, False) == (TrialState.COMPLETE, 61.5)
    assert LadaSearcher.outcome(_step(0), OBJECTIVE, False) == (TrialState.PRUNED, None)
    assert LadaSearcher.outcome(_step(1, diverged=1), OBJECTIVE, False) == (TrialState.FAIL, None)


def test_from_optuna_state() -> None:
    assert R.from_optuna_state("COMPLETE", {}) == R.COMPLETED and R.from_optuna_state("PRUNED", None) == R.PRUNED
    assert R.from_optuna_state("FAIL", {R.DIVERGED: 1}) == R.DIVERGED_OUTCOME and R.from_optuna_state("FAIL", {}) == R.FAILED
    assert R.from_optuna_state("RUNNING", {}) is None and R.from_optuna_state(None, {}) is None


def _trial_folder(root: Path, tid: str, rows: list[dict[str, Any]], error: str | None = None) -> Path:
    d = root / f"lada_trainable_{tid}_0_lr=0.1_2026-01-01_00-00-00"
    d.mkdir(parents=True)
    (d / "params.json").write_text(json.dumps({"optim.lr": 0.1}))
    (d / "result.json").write_text("".join(json.dumps({**r, "trial_id": tid}) + "\n" for r in rows) + '{"cut sh')
    (d / "checkpoint_000001").mkdir()
    (d / "checkpoint_000000").mkdir()
    if error:
        (d / "error.txt").write_text(f"Traceback\n  ...\n{error}\n\n")
    return d


def test_the_reader_keeps_each_task_step_once(tmp_path: Path) -> None:
    """A step Ray's results hold twice (a replay after a killed driver) is read once; a line cut
    short by a crash is skipped; checkpoint, config and error come with the trial."""
    d = _trial_folder(tmp_path, "aaaa0001", [_step(0), _step(1), _step(1, replayed=1, task_seconds=0.0), _step(2)])
    _trial_folder(tmp_path, "aaaa0002", [_step(0)], error="RuntimeError: boom")
    (tmp_path / "experiment_state-2026.json").write_text("{}")
    (tmp_path / "not-a-trial").mkdir()
    found = R.read_results(tmp_path)
    assert sorted(found) == ["aaaa0001", "aaaa0002"]
    rec = found["aaaa0001"]
    assert len(rec.rows) == 4 and [s[M.TASK_INDEX] for s in rec.steps] == [0, 1, 2]
    assert R.REPLAYED not in rec.steps[1], "the first report of a step is kept"
    assert rec.last[M.TASK_INDEX] == 2 and rec.config == {"optim.lr": 0.1}
    assert rec.checkpoint == d / "checkpoint_000001" and rec.error is None
    assert found["aaaa0002"].error == "RuntimeError: boom"
    assert [s[M.TASK_INDEX] for s in R.trial_steps(d)] == [0, 1, 2]
    assert R.read_results(tmp_path / "missing") == {}


def test_report_reads_the_last_result_through_the_reader(tmp_path: Path) -> None:
    from sweeps.report import tune_results

    _trial_folder(tmp_path, "aaaa0001", [_step(0), _step(1, value=70.0)])
    assert tune_results(tmp_path)["aaaa0001"][OBJECTIVE] == 70.0


def test_sync_writes_each_step_once_and_nothing_twice(tmp_path: Path) -> None:
    """The MLflow sync from a results folder with a replayed step: each task step once in MLflow,
    the finished trial's run closed with the rule's outcome; a second sync writes nothing."""
    from sweeps.settings import Settings
    from sweeps.tracking import OUTCOME_TAG, PARENT_TAG, TRIAL_ID_TAG, get_or_create_experiment, open_client, sync_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = open_client(uri)
    exp = get_or_create_experiment(client, "e", uri)
    parent = client.create_run(exp, run_name="s").info.run_id
    s = Settings(name="s", space="lada_smoke", benchmark=None, data_root=None, num_samples=1, metric="transfer", mode="max",
                 scheduler="fifo", grace_period=1, reduction_factor=2.0, gpus_per_trial=0.0, cpus_per_trial=1.0, seed=0,
                 config=None, set=(), storage=str(tmp_path / "results"), study_storage=f"sqlite:///{tmp_path / 'none.db'}",
                 mlflow_uri=uri, experiment="e", parent_run_id=parent)
    folder = Path(s.folder)
    _trial_folder(folder, "aaaa0001", [_step(0), _step(1), _step(0, replayed=1), _step(1, replayed=1), _step(2)])
    (folder / "summary.json").write_text(json.dumps({"rows": [{"trial_id": "aaaa0001", "outcome": "completed"}],
                                                     "completed": 1, "wall_s": 1.0, "overhead_share": 0.1, "outcomes": {}}))
    counts = sync_sweep(s)
    assert counts["runs_created"] == 1 and counts["runs_closed"] == 1 and counts["parent_closed"] == 1
    (run,) = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    assert run.data.tags[TRIAL_ID_TAG] == "aaaa0001" and run.data.tags[OUTCOME_TAG] == "completed"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, M.TASK_INDEX)) == [0, 1, 2]
    again = sync_sweep(s)
    assert again["runs_created"] == again["metrics_logged"] == again["runs_closed"] == again["parent_closed"] == 0


def test_final_trials_look_for_their_stored_checkpoints_in_their_own_run(tmp_path: Path) -> None:
    """A final trial restored from an older checkpoint than it had stored (lada-sweep-evaluate killed
    between two of Tune's snapshots) must find its newest stored task, as a sweep's trial does: the
    final trials' spec names their run's folder (it named none, and such a trial trained its last
    task again)."""
    from types import SimpleNamespace

    from sweeps.evaluate import final_run_target
    from sweeps.trainable import TrialSpec

    spec = TrialSpec(base_config={})
    local = SimpleNamespace(storage=str(tmp_path), name="fin")
    path, final = final_run_target(local, spec, ".xtail-1")  # type: ignore[arg-type]
    assert path == str(tmp_path / "fin-final.xtail-1") and final.results_dir == path
    cloud = SimpleNamespace(storage="s3://bucket/sweeps", name="fin")
    path, final = final_run_target(cloud, spec)  # type: ignore[arg-type]
    assert path == "s3://bucket/sweeps/fin-final" and final.results_dir is None
