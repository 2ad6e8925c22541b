"""What closes a trial's MLflow run: per-step metric values, the accuracy matrix (CSV and heatmap),
the config YAML, the checkpoint, the outcome tags."""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeps.tracking.store import ACC_PREFIX, MATRIX_CSV, MATRIX_PNG, OUTCOME_TAG, PEEK_PREFIX, STEP_METRICS

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient


def step_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of one Tune result that go to MLflow (finite numbers only)."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if key in STEP_METRICS or key.startswith((ACC_PREFIX, PEEK_PREFIX)):
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                out[key] = v
    return out


def heatmap_figure(rows: Sequence[Sequence[float]], names: Sequence[str]) -> Any:
    """The accuracy matrix as a heatmap (rows = after step j, columns = dataset t)."""
    import numpy as np
    from matplotlib.figure import Figure

    a = np.asarray(rows, dtype=float)
    fig = Figure(figsize=(1.0 + 0.6 * max(4, a.shape[1]), 1.0 + 0.45 * max(3, a.shape[0])), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(a.shape[1]), list(names), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(a.shape[0]), [f"after {names[j]}" if j < len(names) else str(j) for j in range(a.shape[0])], fontsize=8)
    for j in range(a.shape[0]):
        for t in range(a.shape[1]):
            ax.text(t, j, f"{a[j, t]:.0f}", ha="center", va="center", fontsize=7, color="w" if a[j, t] < 60 else "k")
    ax.set_title("accuracy (%) on dataset t after step j")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def outcome_tags(outcome: str, tasks_done: Any, message: str = "") -> dict[str, str]:
    """The tags that close a trial's run: its outcome, tasks done and, for a failure, the reason."""
    tags = {OUTCOME_TAG: outcome}
    if tasks_done is not None:
        tags["lada.tasks_done"] = str(tasks_done)
    if message:
        tags["lada.error"] = message[:4000]
    return tags


def matrix_csv(rows: Mapping[int, Sequence[float]], names: Sequence[str]) -> str:
    lines = ["step," + ",".join(names)]
    for k in sorted(rows):
        lines.append(f"{names[k] if k < len(names) else k}," + ",".join(f"{v:.4f}" for v in rows[k]))
    return "\n".join(lines) + "\n"


def write_trial_end(client: MlflowClient, run_id: str, status: str, tags: Mapping[str, str], rows: Mapping[int, Sequence[float]],
                    names: Sequence[str], config_yaml: str | None, checkpoint_dir: str | Path | None) -> int:
    """Write a trial's end to its run (matrix CSV and heatmap, config YAML, checkpoint folder, tags,
    status); returns the number of MLflow calls. Idempotent: artifacts are overwritten in place."""
    from mlflow.entities import RunTag

    calls = 0
    tmp = Path(tempfile.mkdtemp(prefix="lada-mlflow-"))
    try:
        if rows and names:
            (tmp / MATRIX_CSV).write_text(matrix_csv(rows, names))
            heatmap_figure([rows[k] for k in sorted(rows)], names).savefig(tmp / MATRIX_PNG, dpi=100)
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        if any(tmp.iterdir()):
            client.log_artifacts(run_id, str(tmp))
            calls += 1
        if checkpoint_dir is not None and Path(checkpoint_dir).is_dir():
            client.log_artifacts(run_id, str(checkpoint_dir), artifact_path="checkpoint")
            calls += 1
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        client.set_terminated(run_id, status=status)
        calls += 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return calls
