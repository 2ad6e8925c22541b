"""What a researcher reads about a finished sweep: the parent run's Markdown description (MLflow's
``mlflow.note.content``) and the self-contained HTML page of ``lada-sweep-report --html``.

Both hold the leaderboard, the best config, the parameter importances and how to reproduce the best
trial; the page also holds the plots of :mod:`sweeps.visuals` (plotly, its script inlined once, so
the file opens offline).
"""

from __future__ import annotations

import html
import math
import shlex
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sweeps.objective import VAL_METRICS

NOTE_TAG = "mlflow.note.content"
LEADERBOARD_ROWS = 10
NOTE_LIMIT = 8000  # MLflow's longest tag value


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}"
    return str(v)


def leaderboard(rows: Sequence[Mapping[str, Any]], mode: str = "max", top: int = LEADERBOARD_ROWS) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the top trials (finite objective first, best first). A row: ``trial_id``,
    ``outcome``, ``objective``, the validation metrics (:data:`sweeps.objective.VAL_METRICS`), ``tasks_done``,
    ``config`` (the sampled parameters)."""
    sign = 1 if mode == "max" else -1

    def key(r: Mapping[str, Any]) -> tuple[int, float]:
        v = r.get("objective")
        if v is None or not math.isfinite(float(v)):
            return (1, 0.0)
        return (0, -sign * float(v))

    ranked = sorted(rows, key=key)[: top if top > 0 else None]
    params = sorted({k for r in ranked for k in (r.get("config") or {})})
    head = ["rank", "trial", "outcome", "objective", *VAL_METRICS, "tasks", *params]
    cells = [[str(i + 1), str(r.get("trial_id", "-")), str(r.get("outcome", "-")), _num(r.get("objective")),
              *(_num(r.get(k)) for k in VAL_METRICS), _num(r.get("tasks_done")), *(_num((r.get("config") or {}).get(p)) for p in params)]
             for i, r in enumerate(ranked)]
    return head, cells


def reproduce_commands(s: Any, best_config_path: str) -> list[str]:
    """How to train the best config again, look at the sweep again, and run the same sweep again."""
    storage = f" --storage {shlex.quote(s.storage)}"
    sweep = ["lada-sweep", "--space", s.space, "--num-samples", str(s.num_samples), "--seed", str(s.seed), "--metric", s.metric,
             "--scheduler", s.scheduler, *(a for kv in s.set for a in ("--set", kv))]
    for flag, value in (("--benchmark", s.benchmark), ("--data-root", s.data_root), ("--config", s.config)):
        if value:
            sweep += [flag, value]
    sweep += [a for p in s.point for a in ("--point", p)] + (["--tiny-model"] if s.tiny_model else [])
    return [
        f"lada-train --config {shlex.quote(best_config_path)} --output runs/best",
        f"lada-sweep-report --name {shlex.quote(s.name)}{storage} --html {shlex.quote(s.name)}.html",
        " ".join(shlex.quote(a) for a in sweep) + storage,
        f"optuna-dashboard {shlex.quote(s.study_storage)}",
    ]


def markdown_note(summary: Mapping[str, Any], yaml_text: str | None, importances: Mapping[str, float],
                  commands: Sequence[str], limit: int = NOTE_LIMIT) -> str:
    """The parent run's description: outcome counts, leaderboard, best config, importances, how to
    reproduce (Markdown), within MLflow's ``limit`` on a tag's length (too long: the best config is
    referred to as the run's ``best_config.yaml`` artifact)."""
    text = _markdown(summary, yaml_text, importances, commands)
    if len(text) > limit and yaml_text:
        text = _markdown(summary, None, importances, commands).replace("No trial completed.", "The artifact `best_config.yaml`.")
    return text if len(text) <= limit else text[: limit - 20] + "\n\n(truncated)\n"


def _markdown(summary: Mapping[str, Any], yaml_text: str | None, importances: Mapping[str, float], commands: Sequence[str]) -> str:
    counts = ", ".join(f"{v} {k}" for k, v in sorted((summary.get("outcomes") or {}).items()))
    objective = summary.get("objective", "objective")
    rows = summary.get("rows") or []
    lines = [f"## Sweep `{summary.get('name', '?')}`", "",
             f"Space `{summary.get('space', '?')}`, objective **{objective}** ({summary.get('mode', 'max')}); "
             f"{summary.get('trials', len(rows))} trials ({counts}); wall time {float(summary.get('wall_s') or 0.0):.0f} s.", ""]
    best = summary.get("best")
    if best is not None:
        lines += [f"**Best {objective}: {float(best['objective']):.3f}** (trial `{best['trial_id']}`).", ""]
    head, cells = leaderboard(rows, summary.get("mode", "max"))
    lines += ["### Leaderboard", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    lines += ["", "### Best config", ""]
    lines += ["```yaml", yaml_text.rstrip(), "```"] if yaml_text else ["No trial completed."]
    lines += ["", "### Parameter importances", ""]
    if importances:
        lines += ["| parameter | importance |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in importances.items()]
    else:
        lines += ["Not available (fewer than two completed trials, or no parameter varied)."]
    lines += ["", "Plots: the artifacts under `plots/`.", "", "### Reproduce", "", "```bash", *commands, "```", ""]
    return "\n".join(lines)


def _table(head: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def html_page(title: str, intro: str, board: tuple[Sequence[str], Sequence[Sequence[str]]], yaml_text: str | None,
              importances: Mapping[str, float], commands: Sequence[str], figures: Mapping[str, Any], titles: Mapping[str, str]) -> str:
    """One self-contained HTML page: the tables, the best config, the commands and the plotly
    figures (plotly.js inlined once)."""
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>", "<h2>Leaderboard</h2>", _table(*board)]
    parts += ["<h2>Best config</h2>", f"<pre>{html.escape(yaml_text) if yaml_text else 'No trial completed.'}</pre>"]
    parts.append("<h2>Parameter importances</h2>")
    parts.append(_table(["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in importances.items()]) if importances
                 else "<p>Not available (fewer than two completed trials, or no parameter varied).</p>")
    parts += ["<h2>Reproduce</h2>", "<pre>" + html.escape("\n".join(commands)) + "</pre>"]
    first = True
    for name, fig in figures.items():
        parts.append(f'<h2 id="{html.escape(name)}">{html.escape(titles.get(name, name))}</h2>')
        parts.append(fig.to_html(full_html=False, include_plotlyjs=first, div_id=f"plot-{name}"))
        first = False
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}pre{background:#f4f4f4;padding:8px}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(parts)
            + f"\n<p><small>written {time.strftime('%Y-%m-%d %H:%M:%S')}</small></p>\n</body></html>\n")
