"""The end of a sweep: one row per trial, the summary (``summary.json``, the parent run's metrics
and tags, the best config as YAML) and what ``lada-sweep`` prints.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from sweeps.settings import BEST_CONFIG, DEFAULT_STORAGE, SUMMARY_FILE, Settings, join_path, write_text


def storage_stop(s: Settings, grid: Any, client: Any, parent: str, tracker: Any, message: str,
                 t_start: float, t_fit: float, t_end: float, study: Any = None) -> int:
    """The sweep was stopped by a storage failure: one line naming the path, what is kept, how to
    continue; the parent run says why. Nothing more is written to the results folder."""
    from mlflow.entities import RunTag

    from sweeps.storage import EXIT_STORAGE

    rows = trial_rows(grid, s.num_tasks or 0, interrupted=True) if grid is not None else []
    done = sum(1 for r in rows if r["outcome"] in ("completed", "pruned"))
    if grid is None and study is not None:  # Tune itself stopped: the study (read, not written) counts them
        try:
            from optuna.trial import TrialState

            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        except Exception:
            pass
    try:
        client.log_batch(parent, tags=[RunTag("lada.error", message[:4000]), RunTag("lada.stopped", "storage")])
        client.set_terminated(parent, status="FAILED")
    except Exception:
        pass
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    if rows:
        print(f"sweep {s.name}: {len(rows)} trials ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}) "
              f"after {t_end - t_start:.1f}s", file=sys.stdout)
    storage_flag = f" --storage {s.storage}" if s.storage != str(Path(DEFAULT_STORAGE).resolve()) else ""
    print(f"lada-sweep: error: {message}: the sweep stopped; its {done} finished trial{'' if done == 1 else 's'} {'is' if done == 1 else 'are'} kept in {s.folder}; "
          f"free space (or make the folder writable) and continue with: lada-sweep --resume --name {s.name}{storage_flag}",
          file=sys.stderr, flush=True)
    return EXIT_STORAGE


def selection_note(peek_test: bool) -> str:
    """How the sweep's best was chosen, in words (the summary, the parent run, the report)."""
    if peek_test:
        return ("selection: the best was selected with test data in view (--peek-test: trial runs show test/... metrics); "
                "it was scored on validation data, but its test scores are not an unbiased estimate: run lada-sweep-evaluate")
    return ("selection: trials were scored and the best selected on validation data only (val/... metrics); "
            "no test image or feature was read")


def trial_rows(grid: Any, num_tasks: int, interrupted: bool = False) -> list[dict[str, Any]]:
    """One row per trial of a ResultGrid: id, status, outcome, objective, params, times.
    ``interrupted``: the sweep was stopped (storage failure), so an unfinished trial is "stopped"."""
    from sweeps.objective import OBJECTIVE, PEEK_SPLIT, VAL_METRICS, metric_key
    from sweeps.results import DIVERGED, NODE_ID, STOPPED, STORAGE_ERROR, TASK_SECONDS, TASKS_DONE, classify

    rows = []
    for r in grid:
        m = r.metrics or {}
        done = int(m.get(TASKS_DONE, 0) or 0)
        if m.get(STORAGE_ERROR) or (interrupted and done < num_tasks and not m.get(DIVERGED)):
            outcome = STOPPED
        else:
            outcome = classify(m, error=r.error is not None, num_tasks=num_tasks)
        rows.append({
            "trial_id": m.get("trial_id") or (r.path.rsplit("/", 1)[-1] if r.path else "?"),
            "outcome": outcome,
            "objective": m.get(OBJECTIVE),
            **{k: m.get(k) for k in VAL_METRICS},
            **{k: m[k] for k in (metric_key(v.split("/", 1)[1], PEEK_SPLIT) for v in VAL_METRICS) if k in m},
            "tasks_done": done,
            "time_total_s": float(m.get("time_total_s", 0.0) or 0.0),
            "task_seconds": float(m.get(TASK_SECONDS, 0.0) or 0.0),
            "node_id": m.get(NODE_ID),
            "config": dict(r.config or {}),
        })
    return rows


def summarize(s: Settings, grid: Any, objective: Any, t_start: float, t_fit: float, t_end: float, concurrency: int) -> dict[str, Any]:
    from sweeps import ray_compat

    rows = trial_rows(grid, s.num_tasks or 0)
    completed = [r for r in rows if r["outcome"] == "completed" and r["objective"] is not None and math.isfinite(r["objective"])]
    sign = 1 if s.mode == "max" else -1
    best = max(completed, key=lambda r: sign * r["objective"]) if completed else None
    trial_time = sum(r["time_total_s"] for r in rows)
    fit_wall = t_end - t_fit
    ideal = trial_time / max(1, concurrency)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    return {
        "name": s.name,
        "space": s.space,
        "objective": objective.name,
        "mode": s.mode,
        "tuned_on": "val",
        "peek_test": s.peek_test,
        "selection": selection_note(s.peek_test),
        "trials": len(rows),
        "completed": len(completed),
        "outcomes": counts,
        "best": best,
        "rows": rows,
        "wall_s": t_end - t_start,
        "t_start": t_start,
        "t_fit": t_fit,
        "t_end": t_end,
        "fit_wall_s": fit_wall,
        "setup_s": t_fit - t_start,
        "trial_time_sum_s": trial_time,
        "concurrency": concurrency,
        "overhead_share": max(0.0, 1.0 - ideal / fit_wall) if fit_wall > 0 else 0.0,
        "overhead_share_total": max(0.0, 1.0 - ideal / (t_end - t_start)) if t_end > t_start else 0.0,
        "folder": s.folder,
        "study_storage": s.study_storage,
        "mlflow_uri": s.mlflow_uri,
        "parent_run_id": s.parent_run_id,
        "guarantees": ray_compat.guarantees(),
    }


def finish_parent(s: Settings, client: Any, parent: str, summary: dict[str, Any], spec: Any) -> None:
    """Best config YAML (next to the results and on the parent run), best value, importances."""
    from lada_core.config import config_to_yaml

    best = summary["best"]
    yaml_text = config_to_yaml(spec.config(best["config"])) if best is not None else None
    try:
        write_text(join_path(s.folder, SUMMARY_FILE), json.dumps({k: v for k, v in summary.items()}, indent=2, default=str))
        if yaml_text is not None:
            write_text(join_path(s.folder, BEST_CONFIG), yaml_text)
    except OSError as exc:
        from sweeps.storage import describe

        print(f"lada-sweep: warning: summary not written ({describe(exc, s.folder) or exc})", file=sys.stderr)
    try:
        write_parent_end(client, parent, summary, yaml_text, parent_views(s, summary, yaml_text))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        print(f"lada-sweep: warning: MLflow parent run not updated ({first}); once MLflow is reachable: "
              f"python -m sweeps.report --name {s.name} --storage {s.storage} --sync-mlflow", file=sys.stderr)


def parent_views(s: Settings, summary: dict[str, Any], yaml_text: str | None) -> tuple[str, dict[str, Any]]:
    """The parent run's Markdown description and its plots (PNG figures by name); what cannot be
    drawn (too few trials) is left out and said in the log."""
    from sweeps.notes import markdown_note, reproduce_commands

    log = logging.getLogger(__name__)
    imp: dict[str, float] = {}
    figs: dict[str, Any] = {}
    try:
        from sweeps.importance import importances
        from sweeps.optuna_storage import load_study
        from sweeps.visuals import best_matrix, png_figures

        study = load_study(s.study_storage, s.name)
        try:
            imp = importances(study)
        except Exception as exc:  # too few finished trials, constant parameters
            log.info("no importances: %s", exc)
        best = summary.get("best")
        figs = png_figures(study, best_matrix(s.folder, best["trial_id"] if best else None))
    except Exception as exc:
        log.info("no plots: %s", exc)
    try:
        note = markdown_note(summary, yaml_text, imp, reproduce_commands(s, join_path(s.folder, BEST_CONFIG)))
    except Exception as exc:  # a summary.json written by an older version
        log.info("no description: %s", exc)
        note = ""
    return note, figs


def write_parent_end(client: Any, parent: str, summary: dict[str, Any], yaml_text: str | None,
                     views: tuple[str, dict[str, Any]] | None = None) -> None:
    """Close the sweep's parent run: counts, wall time, overhead, best value and config, and
    (``views``) its Markdown description and plots (``plots/<name>.png``)."""
    from mlflow.entities import Metric, RunTag

    from sweeps.notes import NOTE_TAG

    now = int(time.time() * 1000)
    best = summary.get("best")
    metrics = [
        Metric("trials_completed", float(summary["completed"]), now, 0),
        Metric("sweep_wall_s", float(summary["wall_s"]), now, 0),
        Metric("overhead_share", float(summary["overhead_share"]), now, 0),
    ]
    tags = [RunTag("lada.outcomes", json.dumps(summary["outcomes"])), RunTag("lada.selection", summary.get("selection", ""))]
    if views is not None and views[0]:
        tags.append(RunTag(NOTE_TAG, views[0]))
    if best is not None:
        name = summary["objective"] if "," not in summary["objective"] else "objective"
        metrics.append(Metric(f"best_val_{name}", float(best["objective"]), now, 0))
        tags.append(RunTag("lada.best_trial_id", str(best["trial_id"])))
        if yaml_text is not None:
            client.log_text(parent, yaml_text, BEST_CONFIG)
    client.log_batch(parent, metrics=metrics, tags=tags)
    client.log_dict(parent, {k: v for k, v in summary.items() if k != "rows"}, SUMMARY_FILE)
    for plot, fig in (views[1] if views is not None else {}).items():
        client.log_figure(parent, fig, f"plots/{plot}.png")
    client.set_terminated(parent, status="FINISHED")


def print_summary(summary: dict[str, Any]) -> None:
    best = summary["best"]
    out = sys.stdout
    print(f"sweep {summary['name']}: {summary['trials']} trials ({', '.join(f'{v} {k}' for k, v in sorted(summary['outcomes'].items()))})", file=out)
    if best is not None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(best["config"].items()))
        print(f"best {summary['objective']} on the validation split = {best['objective']:.3f} (trial {best['trial_id']}: {params or 'paper defaults'})", file=out)
        print(f"best config: {join_path(summary['folder'], BEST_CONFIG)}  (lada-train --config {join_path(summary['folder'], BEST_CONFIG)})", file=out)
    print(summary.get("selection") or selection_note(False), file=out)
    print(
        f"wall time {summary['wall_s']:.1f}s (setup {summary['setup_s']:.1f}s + trials {summary['fit_wall_s']:.1f}s); "
        f"sum of trial times {summary['trial_time_sum_s']:.1f}s over concurrency {summary['concurrency']}: "
        f"Ray+MLflow overhead {100 * summary['overhead_share']:.1f}% of the trial phase, "
        f"{100 * summary['overhead_share_total']:.1f}% of the whole command",
        file=out,
    )
    if "mlflow_callback_s" in summary:
        print(
            f"of the trial phase, the MLflow callback took {summary['mlflow_callback_s']:.1f}s in the driver "
            f"({summary['mlflow_calls']} MLflow calls, batched); the rest of the overhead is Ray "
            f"(actor start, scheduling, checkpoint persistence, experiment snapshots)",
            file=out,
        )
    inactive = {k: v for k, v in (summary.get("guarantees") or {}).items() if v != "active"}
    for name, why in sorted(inactive.items()):
        print(f"guarantee {name} was {why} (see sweeps/ray_compat.py)", file=out)
    print(f"MLflow: mlflow ui --backend-store-uri {summary['mlflow_uri']}  (parent run {summary['parent_run_id']})", file=out)
    if summary.get("mlflow_run_url"):
        print(f"parent run: {summary['mlflow_run_url']}  (description, leaderboard and plots; "
              f"the study: optuna-dashboard {summary['study_storage']})", file=out)
    pending, deferred = summary.get("mlflow_unsent") or (0, 0)
    if pending or deferred:
        print(f"MLflow was unreachable: {pending} metric points and {deferred} trial ends are not in it yet (Ray's results hold them); "
              f"once it is back: python -m sweeps.report --name {summary['name']} --storage {Path(summary['folder']).parent} --sync-mlflow", file=out)
