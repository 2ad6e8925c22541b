"""The plots of a sweep: Optuna's own (optimisation history, parameter importances, parallel
coordinates of the parameters against the objective) and the best trial's accuracy heatmap.

Two renderings of the same plots: PNG figures (``optuna.visualization.matplotlib``, and the heatmap
of :func:`sweeps.tracking.heatmap_figure`) for the parent MLflow run, and interactive plotly figures
(``optuna.visualization``, a plotly heatmap) for the HTML page of ``lada-sweep-report --html``.
Importances use :func:`sweeps.importance.evaluator_for` (PED-ANOVA for a high objective; fANOVA
when PED-ANOVA cannot rank the study's trials).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sweeps.importance import evaluator_for
from sweeps.tracking.store import ACC_PREFIX

logger = logging.getLogger(__name__)

HISTORY = "optimization_history"
IMPORTANCES = "param_importances"
PARALLEL = "parallel_coordinate"
HEATMAP = "best_trial_accuracy_matrix"
PLOTS = (HISTORY, IMPORTANCES, PARALLEL, HEATMAP)
"""Plot names; the parent run holds ``plots/<name>.png``."""
TITLES = {
    HISTORY: "Optimisation history",
    IMPORTANCES: "Parameter importances",
    PARALLEL: "Parameters against the objective (parallel coordinates)",
    HEATMAP: "Best trial: accuracy (%) on each dataset after each task",
}


def matrix_of(steps: Sequence[Mapping[str, Any]]) -> tuple[list[list[float]], list[str]]:
    """The accuracy matrix of a trial from its task steps (Tune results with ``acc/<dataset>``)."""
    if not steps:
        return [], []
    names = [k[len(ACC_PREFIX):] for k in steps[0] if k.startswith(ACC_PREFIX)]
    rows = [[float(s.get(ACC_PREFIX + n, float("nan"))) for n in names] for s in steps]
    return rows, names


def best_matrix(folder: str, trial_id: str | None) -> tuple[list[list[float]], list[str]]:
    """The matrix of ``trial_id`` from Ray's results in a local ``folder`` (empty if not found)."""
    if not trial_id or "://" in folder or not Path(folder).is_dir():
        return [], []
    from sweeps.results import read_results

    rec = read_results(folder).get(trial_id)
    return matrix_of(rec.steps) if rec is not None else ([], [])


def _optuna_plots(study: Any, module: Any) -> dict[str, Any]:
    """History, importances and parallel coordinates from ``module`` (plotly or matplotlib); a
    plot that cannot be drawn yet (too few trials) is left out."""
    out: dict[str, Any] = {}
    calls = {
        HISTORY: lambda: module.plot_optimization_history(study),
        IMPORTANCES: lambda: module.plot_param_importances(study, evaluator=evaluator_for(study)),
        PARALLEL: lambda: module.plot_parallel_coordinate(study),
    }
    for name, call in calls.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for the matplotlib plots
                out[name] = call()
        except Exception as exc:  # no completed trial, a single parameter value, ...
            logger.info("no %s plot: %s", name, exc)
    return out


def png_figures(study: Any, matrix: tuple[Sequence[Sequence[float]], Sequence[str]] | None = None) -> dict[str, Any]:
    """The plots as matplotlib figures, by name (for ``MlflowClient.log_figure``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import optuna.visualization.matplotlib as ovm

    figs = {name: ax.figure for name, ax in _optuna_plots(study, ovm).items()}  # Optuna returns the Axes
    for fig in figs.values():
        fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
        fig.tight_layout()
    if matrix and matrix[0]:
        from sweeps.tracking.artifacts import heatmap_figure

        figs[HEATMAP] = heatmap_figure(matrix[0], matrix[1])
    return figs


def plotly_figures(study: Any, matrix: tuple[Sequence[Sequence[float]], Sequence[str]] | None = None) -> dict[str, Any]:
    """The plots as interactive plotly figures, by name (for the HTML page)."""
    import optuna.visualization as ov

    figs = _optuna_plots(study, ov)
    if matrix and matrix[0]:
        import plotly.graph_objects as go

        rows, names = matrix
        fig = go.Figure(go.Heatmap(z=[list(r) for r in rows], x=list(names), y=[f"after {n}" for n in names[: len(rows)]],
                                   zmin=0, zmax=100, colorscale="Viridis", texttemplate="%{z:.0f}",
                                   colorbar={"title": "accuracy %"}))
        fig.update_yaxes(autorange="reversed")
        fig.update_layout(title=TITLES[HEATMAP], xaxis_title="dataset", yaxis_title="step")
        figs[HEATMAP] = fig
    return figs
