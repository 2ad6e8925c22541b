"""``python -m sweeps.report --name NAME``: the state of a finished or running sweep.

``--sync-mlflow`` instead writes to MLflow whatever it lacks of the sweep, from Ray's results (after
the tracking server was unreachable during the sweep); a second call writes nothing.

Prints the top trials (from the Optuna study, which the driver updates as trials end, joined with
each trial's last Tune result for Transfer / Average / Last), writes the best config as YAML ready for
``lada-train --config``, prints Optuna's parameter importances and, for X-TAIL, the paper's numbers
beside the best trial's.

Importances: :mod:`sweeps.importance` (PED-ANOVA for a high objective, fANOVA as the fallback).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sweeps.importance import importances
from sweeps.objective import VAL_METRICS
from sweeps.optuna_storage import RAY_TRIAL_ID_ATTR, load_study


def tune_results(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The last reported result of every trial of a (local) sweep, by trial id."""
    from sweeps.results import read_results

    return {tid: rec.last for tid, rec in read_results(folder).items() if rec.rows}


def top_trials(study: Any, results: dict[str, dict[str, Any]], top: int) -> list[dict[str, Any]]:
    from optuna.study import StudyDirection
    from optuna.trial import TrialState


    sign = 1 if study.direction == StudyDirection.MAXIMIZE else -1
    rows = []
    for t in study.get_trials(deepcopy=False):
        tid = t.user_attrs.get(RAY_TRIAL_ID_ATTR)
        res = results.get(tid, {}) if tid else {}
        value = t.value if t.state == TrialState.COMPLETE else None
        last_inter = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        rows.append({
            "number": t.number,
            "trial_id": tid or "-",
            "state": t.state.name,
            "value": value,
            "last_step_value": last_inter,
            "tasks_done": res.get("tasks_done"),
            **{k: res.get(k) for k in VAL_METRICS},
            "params": dict(t.params),
        })

    def key(r: dict[str, Any]) -> tuple[int, float]:
        v = r["value"]
        return (0 if v is not None and math.isfinite(v) else 1, -sign * v if v is not None and math.isfinite(v) else 0.0)

    rows.sort(key=key)
    return rows[:top] if top > 0 else rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    params = sorted({k for r in rows for k in r["params"]})
    head = ["#", "trial", "state", "value", *VAL_METRICS, "tasks", *params]
    body = [
        [str(r["number"]), r["trial_id"], r["state"], _fmt(r["value"]), *(_fmt(r[k]) for k in VAL_METRICS), _fmt(r["tasks_done"]),
         *(_fmt(r["params"].get(p)) for p in params)]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def best_config_yaml(settings: Any, params: dict[str, Any]) -> str:
    """The best trial's full config as YAML (defaults < --config < space < flags < sample < --set)."""
    from lada_core.config import config_to_yaml
    spec = settings.trial_spec()
    return config_to_yaml(spec.config(params))


def paper_comparison(benchmark: str, shots: int | None, best: dict[str, Any] | None) -> str | None:
    from sweeps.paper import XTAIL, XTAIL_BENCHMARKS, xtail_setting

    if benchmark not in XTAIL_BENCHMARKS:
        return None
    setting = xtail_setting(shots)
    lines = [f"X-TAIL {setting}, ViT-B/16, order I: the paper's test numbers beside this sweep's best trial on validation data "
             "(not the same images: lada-sweep-evaluate gives test scores)", f"{'':24}{'transfer':>10}{'average':>10}{'last':>10}"]
    if best is not None:
        lines.append(f"{'this sweep (best, val)':24}" + "".join(f"{_fmt(best.get(k)):>10}" for k in VAL_METRICS))
    for method, vals in XTAIL[setting].items():
        lines.append(f"{method:24}" + "".join(f"{_fmt(vals[k.split('/', 1)[1]]):>10}" for k in VAL_METRICS))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweeps.report", description="Top trials, best config, importances of a sweep (finished or running).")
    p.add_argument("--name", required=True, help="the sweep's name (its results folder and study)")
    p.add_argument("--storage", default="sweep_results", help="the sweep's --storage")
    p.add_argument("--top", type=int, default=10, help="rows of the table (0: all)")
    p.add_argument("--out", default=None, help="where to write the best config YAML (default: <storage>/<name>/best_config.yaml)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--html", default=None, metavar="FILE",
                   help="also write one self-contained HTML page (opens offline): the leaderboard, the best config, the importances, "
                        "how to reproduce, and Optuna's plots (history, importances, parallel coordinates) with the best trial's accuracy heatmap")
    p.add_argument("--sync-mlflow", action="store_true",
                   help="write to MLflow what it lacks of the sweep (runs, task steps, trial ends, the parent's end) from Ray's "
                        "results, e.g. after the tracking server was unreachable; never writes a step twice; then exit")
    return p


def sync_main(settings: Any, as_json: bool) -> int:
    """``--sync-mlflow``: catch MLflow up with Ray's results (:func:`sweeps.tracking.sync_sweep`)."""
    import os

    from sweeps.settings import is_uri
    from sweeps.tracking import sync_sweep

    if is_uri(settings.folder):
        print(f"report: error: --sync-mlflow reads Ray's results from a local or shared folder, not {settings.folder}", file=sys.stderr)
        return 2
    if settings.mlflow_uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        counts = sync_sweep(settings)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        print(f"report: error: MLflow at {settings.mlflow_uri}: {first}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(counts))
        return 0
    written = counts["runs_created"] + counts["metrics_logged"] + counts["runs_closed"] + counts["parent_closed"]
    if written == 0:
        print(f"MLflow sync of {settings.name}: nothing to write (MLflow at {settings.mlflow_uri} has everything Ray's results hold)")
    else:
        print(f"MLflow sync of {settings.name} to {settings.mlflow_uri}: {counts['runs_created']} runs created, "
              f"{counts['metrics_logged']} metric points logged, {counts['runs_closed']} trial runs closed"
              + (", parent run closed" if counts["parent_closed"] else ""))
    if counts["duplicate_runs"]:
        print(f"note: {counts['duplicate_runs']} trials have more than one run (left as they are)")
    return 0


def write_html(path: str, settings: Any, study: Any, rows: list[dict[str, Any]], yaml_text: str | None,
               imp: dict[str, float], best_config_path: str) -> None:
    """``--html FILE``: :func:`sweeps.notes.html_page` with the plots of :func:`sweeps.visuals.plotly_figures`."""
    from sweeps.notes import html_page, leaderboard, reproduce_commands
    from sweeps.visuals import TITLES, best_matrix, plotly_figures

    board = [{"trial_id": r["trial_id"], "outcome": r["state"].lower(), "objective": r["value"], "tasks_done": r["tasks_done"],
              "config": r["params"], **{k: r[k] for k in VAL_METRICS}} for r in rows]
    best = next((r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None), None)
    figs = plotly_figures(study, best_matrix(settings.folder, best["trial_id"] if best else None))
    counts = ", ".join(f"{n} {st.lower()}" for st, n in sorted({r["state"]: sum(1 for x in rows if x["state"] == r["state"]) for r in rows}.items()))
    intro = f"Space {settings.space}, objective {settings.metric} ({settings.mode}); {len(rows)} trials ({counts}); results {settings.folder}."
    page = html_page(f"Sweep {settings.name}", intro, leaderboard(board, settings.mode, top=0), yaml_text, imp,
                     reproduce_commands(settings, best_config_path), figs, TITLES)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(page, encoding="utf-8")
    print(f"HTML report: {Path(path).resolve()}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    from optuna.trial import TrialState

    from sweeps.settings import BEST_CONFIG, FINAL_MD, is_uri, join_path, load_settings, read_text, storage_root, write_text
    from sweeps.summary import selection_note

    args = build_parser().parse_args(argv)
    storage = storage_root(args.storage)
    settings = load_settings(storage, args.name)
    if settings is None:
        print(f"report: error: no sweep {args.name!r} in {storage}", file=sys.stderr)
        return 2
    if args.sync_mlflow:
        return sync_main(settings, args.json)
    study = load_study(settings.study_storage, settings.name)
    results = tune_results(settings.folder) if not is_uri(settings.folder) else {}
    rows = top_trials(study, results, 0)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    complete = [r for r in rows if r["state"] == TrialState.COMPLETE.name and r["value"] is not None]
    best = complete[0] if complete else None
    yaml_text = best_config_yaml(settings, best["params"]) if best else None
    out_path = args.out or join_path(settings.folder, BEST_CONFIG)
    if yaml_text is not None:
        if is_uri(out_path):
            write_text(out_path, yaml_text)
        else:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(yaml_text)
    try:
        imp = importances(study)
    except Exception as exc:
        imp = {}
        imp_note = str(exc)
    else:
        imp_note = ""
    from lada_core.config import build_config
    cfg = build_config(overrides=settings.set, base=settings.base_config())
    paper = paper_comparison(cfg.data.benchmark, cfg.data.shots, best)
    if args.html:
        write_html(args.html, settings, study, rows, yaml_text, imp, out_path)
    if args.json:
        print(json.dumps({
            "name": settings.name, "space": settings.space, "metric": settings.metric, "mode": settings.mode,
            "states": counts, "top": rows[: args.top] if args.top else rows, "best_config_path": out_path if yaml_text else None,
            "best_config": yaml_text, "importances": imp, "selection": selection_note(settings.peek_test),
        }, indent=2, default=str))
        return 0
    print(f"sweep {settings.name}: space {settings.space}, objective {settings.metric} on val ({settings.mode}); trials: "
          + ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())))
    print(selection_note(settings.peek_test))
    print(format_table(rows[: args.top] if args.top else rows))
    if yaml_text is not None and best is not None:
        print(f"\nbest config (trial {best['trial_id']}) -> {out_path}\n  lada-train --config {out_path}")
    else:
        print("\nno completed trial yet")
    if imp:
        print("\nparameter importances (PED-ANOVA, for a high objective):")
        for k, v in imp.items():
            print(f"  {k:32} {v:.3f}")
    elif imp_note:
        print(f"\nparameter importances: not yet ({imp_note})")
    if paper:
        print("\n" + paper)
    final = read_text(join_path(settings.folder, FINAL_MD))
    if final:
        print("\n" + final.rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
