"""The sweep objective: one metric of :mod:`lada_core.metrics` or a weighted mix of them.

``--metric average`` (or ``Transfer``, ``Last``), or a mix such as ``--metric last=0.5,average=0.5``.
The value is computed from the metrics the trainer reports after every task step, so ASHA can compare
trials between tasks and Optuna gets the final value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from lada_core import metrics as M

OBJECTIVE = "objective"
"""The result key that carries the objective value in every Tune result and MLflow step; it is
computed from the validation metrics only (:data:`TUNE_SPLIT`)."""

TUNE_SPLIT = "val"
"""The split a sweep scores its trials on (honest tuning: Cha & Cho, "Hyperparameters in Continual
Learning: A Reality Check", TMLR 2025). Every metric a trial reports is named ``val/<metric>``."""
PEEK_SPLIT = "test"
"""The split ``--peek-test`` adds, as ``test/<metric>`` (shown, never selected on)."""


def metric_key(name: str, split: str = TUNE_SPLIT) -> str:
    """The result and MLflow key of metric ``name`` (``average``, ``acc/<dataset>``...) on ``split``:
    ``val/average``, ``val/acc/<dataset>``, ``test/last``."""
    return f"{split}/{name}"


VAL_METRICS = tuple(metric_key(m) for m in M.METRICS)
"""``val/transfer``, ``val/average``, ``val/last``: Transfer / Average / Last on the validation split."""


class MetricError(ValueError):
    """An unknown metric or a malformed weighted mix (one-line message)."""


@dataclass(frozen=True)
class Objective:
    """What a sweep optimizes: ``weights`` over metric names (one entry for a plain metric)."""

    weights: Mapping[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if len(self.weights) == 1:
            return next(iter(self.weights))
        return ",".join(f"{k}={v:g}" for k, v in self.weights.items())

    def value(self, values: Mapping[str, float]) -> float:
        """The objective over a metrics dict (NaN when a needed metric is missing or NaN)."""
        try:
            if len(self.weights) == 1:
                out = float(values[next(iter(self.weights))])
            else:
                out = M.weighted(values, self.weights)
        except KeyError:
            return math.nan
        return out


def _show(value: str, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def parse_metric(text: str) -> Objective:
    """``average`` / ``Transfer`` / ``last=0.5,average=0.5`` (``:`` also separates name and weight).
    Raises :class:`MetricError` with one line for anything else."""
    if not isinstance(text, str):
        raise MetricError(f"--metric must be a string, got {type(text).__name__}")
    raw = text.strip()
    if not raw:
        raise MetricError(f"--metric is empty (valid: {', '.join(M.METRICS)}, or a mix like last=0.5,average=0.5)")
    weights: dict[str, float] = {}
    for part in raw.replace("+", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part or ":" in part:
            name, _, w = part.replace(":", "=").partition("=")
            try:
                weight = float(w)
            except ValueError:
                raise MetricError(f"--metric {_show(raw)}: weight of {_show(name.strip())} is not a number: {_show(w)}") from None
            if not math.isfinite(weight) or weight < 0:
                raise MetricError(f"--metric {_show(raw)}: weights must be finite and >= 0, got {_show(w)}")
        else:
            name, weight = part, 1.0
        key = name.strip().lower()
        if key not in M.METRICS:
            raise MetricError(f"unknown metric {_show(name.strip())} (valid: {', '.join(M.METRICS)}, or a mix like last=0.5,average=0.5)")
        if key in weights:
            raise MetricError(f"--metric {_show(raw)}: {key} is given twice")
        weights[key] = weight
    if not weights or sum(weights.values()) == 0:
        raise MetricError(f"--metric {_show(raw)}: the weights must not sum to zero")
    return Objective(weights)
