"""Catching MLflow up with Ray's results (``python -m sweeps.report --sync-mlflow``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lada_core import metrics as M
from sweeps.results import ERROR, TASKS_DONE, mlflow_status
from sweeps.tracking.artifacts import outcome_tags, step_metrics, write_trial_end
from sweeps.tracking.store import (
    ACC_PREFIX,
    MAX_BATCH,
    OUTCOME_TAG,
    PARENT_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    _param_value,
    open_client,
)

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient


def sync_sweep(settings: Any, log: Any = None) -> dict[str, int]:
    """Write to MLflow what it lacks of a sweep, from Ray's results (the source of truth, read by
    :func:`sweeps.results.read_results`: each task step once): child runs of trials that have none,
    task steps not logged yet (by ``task_index`` history: never twice), the end of finished trials
    whose run was not closed, and the parent run's end once the sweep has a ``summary.json``. A
    second call writes nothing. Returns counts of what was written."""
    from sweeps.results import read_results

    log = log or (lambda m: None)
    counts = {"runs_created": 0, "metrics_logged": 0, "runs_closed": 0, "parent_closed": 0, "duplicate_runs": 0}
    if not settings.parent_run_id:
        raise ValueError(f"sweep {settings.name} has no parent run (it stopped before MLflow was reached)")
    client = open_client(settings.mlflow_uri)
    parent = client.get_run(settings.parent_run_id)
    by_trial = _runs_by_trial(client, parent.info.experiment_id, settings.parent_run_id, counts)
    folder = Path(settings.folder)
    summary = _read_summary(folder)
    outcomes = _known_outcomes(settings, summary, log)
    spec = None
    try:
        spec = settings.trial_spec()
    except Exception as exc:
        log(f"no config for config.yaml: {exc}")
    for tid, rec in read_results(folder).items():
        _sync_trial(client, settings, parent.info.experiment_id, rec, by_trial.get(tid), outcomes(tid, rec), spec, counts)
    if summary is not None and (parent.info.status == "RUNNING" or "trials_completed" not in parent.data.metrics):
        _close_parent(client, settings, folder, summary)
        counts["parent_closed"] = 1
    return counts


def _runs_by_trial(client: MlflowClient, exp_id: str, parent_run_id: str, counts: dict[str, int]) -> dict[str, Any]:
    """The child runs of the sweep by trial id (the oldest one; more than one is counted)."""
    runs = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=5000)
    by_trial: dict[str, Any] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        tid = r.data.tags.get(TRIAL_ID_TAG)
        if tid in by_trial:
            counts["duplicate_runs"] += 1
        elif tid:
            by_trial[tid] = r
    return by_trial


def _read_summary(folder: Path) -> dict[str, Any] | None:
    import json

    from sweeps.settings import SUMMARY_FILE

    f = folder / SUMMARY_FILE
    return json.loads(f.read_text()) if f.is_file() else None  # type: ignore[no-any-return]


def _known_outcomes(settings: Any, summary: dict[str, Any] | None, log: Any) -> Any:
    """``outcome(trial id, record)``: how a trial ended, from the summary, else the Optuna study
    (None while it has not ended; a trial that never finished a task has an outcome only if it
    failed)."""
    from sweeps.optuna_storage import RAY_TRIAL_ID_ATTR, load_study
    from sweeps.results import FAILED, NOT_RUN, from_optuna_state

    summary_rows = {str(r["trial_id"]): r["outcome"] for r in (summary or {}).get("rows", [])}
    study_states: dict[str, str] = {}
    try:
        for t in load_study(settings.study_storage, settings.name).get_trials(deepcopy=False):
            if t.user_attrs.get(RAY_TRIAL_ID_ATTR):
                study_states[t.user_attrs[RAY_TRIAL_ID_ATTR]] = t.state.name
    except Exception as exc:  # no study (yet): outcomes from summary.json only
        log(f"no Optuna study: {exc}")

    def outcome(tid: str, rec: Any) -> str | None:
        found = summary_rows.get(tid) or from_optuna_state(study_states.get(tid), rec.last)
        if found == NOT_RUN:
            return FAILED if rec.error else None
        return found

    return outcome


def _sync_trial(client: MlflowClient, settings: Any, exp_id: str, rec: Any, run: Any, outcome: str | None, spec: Any,
                counts: dict[str, int]) -> None:
    """One trial: its run (created if missing), the steps it lacks, its end once it has ended."""
    from mlflow.entities import Metric, Param

    if not rec.steps and outcome is None:
        return  # nothing Ray holds that MLflow could lack
    if run is None:
        name = rec.dir.name.split("_lada")[0] if "_lada" in rec.dir.name else rec.dir.name[:60]
        run_id = client.create_run(exp_id, run_name=name[:250], tags={
            PARENT_TAG: settings.parent_run_id, TRIAL_ID_TAG: rec.trial_id, SWEEP_TAG: settings.name,
            "lada.space": settings.space, "lada.synced_from": "ray-results",
        }).info.run_id
        params = [Param(str(k), _param_value(v)) for k, v in sorted((rec.config or {}).items())]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        counts["runs_created"] += 1
        logged_steps: set[int] = set()
        status, tags = "RUNNING", {}
    else:
        run_id = run.info.run_id
        logged_steps = {int(m.step) for m in client.get_metric_history(run_id, M.TASK_INDEX)}
        status, tags = run.info.status, run.data.tags
    metrics = []
    for r in rec.steps:
        step = int(r[M.TASK_INDEX])
        if step not in logged_steps:
            ts = int(1000 * float(r.get("timestamp", time.time())))
            metrics += [Metric(k, v, ts, step) for k, v in step_metrics(r).items()]
            metrics.append(Metric(M.TASK_INDEX, float(step), ts, step))
    for i in range(0, len(metrics), MAX_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_BATCH])
    counts["metrics_logged"] += len(metrics)
    if outcome is not None and (status == "RUNNING" or OUTCOME_TAG not in tags):
        _close_trial_run(client, run_id, rec, outcome, spec)
        counts["runs_closed"] += 1


def _close_trial_run(client: MlflowClient, run_id: str, rec: Any, outcome: str, spec: Any) -> None:
    matrix: dict[int, list[float]] = {}
    names: list[str] = []
    for r in rec.steps:
        accs = [k for k in r if k.startswith(ACC_PREFIX)]
        names = names or [k[len(ACC_PREFIX):] for k in accs]
        matrix[int(r[M.TASK_INDEX])] = [float(r[k]) for k in accs]
    config_yaml = None
    if spec is not None:
        try:
            from lada_core.config import config_to_yaml

            config_yaml = config_to_yaml(spec.config(rec.config or {}))
        except Exception:
            config_yaml = None
    status = mlflow_status(outcome)
    message = str(rec.last.get(ERROR) or rec.error or "") if status == "FAILED" else ""
    write_trial_end(client, run_id, status, outcome_tags(outcome, rec.last.get(TASKS_DONE), message), matrix, names,
                    config_yaml, rec.checkpoint)


def _close_parent(client: MlflowClient, settings: Any, folder: Path, summary: dict[str, Any]) -> None:
    from sweeps.settings import BEST_CONFIG
    from sweeps.summary import parent_views, write_parent_end

    best_yaml = (folder / BEST_CONFIG).read_text() if (folder / BEST_CONFIG).is_file() else None
    write_parent_end(client, settings.parent_run_id, summary, best_yaml, parent_views(settings, summary, best_yaml))
