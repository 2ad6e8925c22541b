"""``lada_paper``: the paper's defaults only; one trial, a reproduction run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lada_core import metrics

if TYPE_CHECKING:  # pragma: no cover
    import optuna

DESCRIPTION = "the paper's defaults (one trial, a reproduction run)"
METRIC = metrics.AVERAGE
MODE = "max"
NUM_SAMPLES = 1
FIRST_POINT: dict[str, Any] = {}  # nothing is suggested: every value is the paper's default


def space(trial: optuna.Trial) -> dict[str, Any] | None:
    return None
