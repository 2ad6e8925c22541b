"""Continual-learning metrics over the accuracy matrix (method page, section 8).

``acc[j, t]`` is the accuracy (in percent) on dataset ``t`` after training step ``j``; steps and
datasets are both in task order and the matrix is square (K x K). Pure functions: inputs are never
modified. Metric names are defined here once; the trainer, the sweep layer and MLflow import them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

TRANSFER = "transfer"
AVERAGE = "average"
LAST = "last"
METRICS = (TRANSFER, AVERAGE, LAST)
# Per-step metric: the accuracy on the tasks seen so far, after the current step (what a sweep can
# compare between trials at every task step, and what ASHA reads).
SEEN_MEAN = "seen_mean"
TASK_INDEX = "task_index"


def _check(acc: np.ndarray) -> np.ndarray:
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"accuracy matrix must be square K x K, got shape {a.shape}")
    return a


def transfer_per_dataset(acc: np.ndarray) -> np.ndarray:
    """``mean_{j < t} a[j, t]`` for t = 2..K (zero-shot ability kept on future tasks); NaN for t = 1."""
    a = _check(acc)
    k = a.shape[0]
    out = np.full(k, np.nan)
    for t in range(1, k):
        out[t] = a[:t, t].mean()
    return out


def average_per_dataset(acc: np.ndarray) -> np.ndarray:
    """Column means: ``mean_j a[j, t]``."""
    return _check(acc).mean(axis=0)


def last_per_dataset(acc: np.ndarray) -> np.ndarray:
    """The last row: ``a[K, t]``."""
    return _check(acc)[-1].copy()


def summarize(acc: np.ndarray) -> dict[str, float]:
    """Transfer / Average / Last as means over datasets (Transfer over t = 2..K)."""
    tr = transfer_per_dataset(acc)
    return {
        TRANSFER: float(np.nanmean(tr)) if np.isfinite(tr).any() else float("nan"),
        AVERAGE: float(average_per_dataset(acc).mean()),
        LAST: float(last_per_dataset(acc).mean()),
    }


def per_dataset(acc: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{dataset: {transfer, average, last}}``; transfer is absent for the first dataset."""
    tr, av, la = transfer_per_dataset(acc), average_per_dataset(acc), last_per_dataset(acc)
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(names):
        row = {AVERAGE: float(av[i]), LAST: float(la[i])}
        if np.isfinite(tr[i]):
            row[TRANSFER] = float(tr[i])
        out[name] = row
    return out


def partial_summary(rows: np.ndarray) -> dict[str, float]:
    """Metrics available after step j (rows ``0..j`` of the matrix, all K columns): the accuracy on
    the seen tasks, and Transfer / Average / Last of the matrix *so far* (the step's view).

    ``seen_mean`` = mean of ``a[j, t]`` for t <= j. ``last`` = mean of the current row over seen tasks.
    ``average`` = mean over seen datasets t <= j of mean_{i<=j} a[i, t]. ``transfer`` = mean over
    t = 2..j+1 of mean_{i<t} a[i, t] (needs j >= 1). At j = K-1 these equal :func:`summarize`.
    """
    a = np.asarray(rows, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError("rows must be 2-D")
    j = a.shape[0] - 1
    seen = a[j, : j + 1]
    # Dataset t (0-based, t >= 1) has its whole transfer window i < t once step t - 1 is done.
    trans = [a[:t, t].mean() for t in range(1, min(j + 2, a.shape[1]))]
    out = {
        SEEN_MEAN: float(seen.mean()),
        LAST: float(seen.mean()),
        AVERAGE: float(a[:, : j + 1].mean(axis=0).mean()),
    }
    out[TRANSFER] = float(np.mean(trans)) if trans else float("nan")
    return out


def weighted(summary: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """A weighted mix of metrics, e.g. ``{"last": 0.5, "average": 0.5}``."""
    total = sum(weights.values())
    if total == 0:
        raise ValueError("weights must not sum to zero")
    return float(sum(summary[k] * w for k, w in weights.items()) / total)
