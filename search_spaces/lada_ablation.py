"""``lada_ablation``: the four ablation variants of the paper's Table 4 (method page, section 9).

Text AdaptFormer only, + Gaussian replay, + memory units, and the full method (evaluated first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lada_core import metrics
from lada_core.config import VARIANTS
from search_spaces import paper_defaults

if TYPE_CHECKING:  # pragma: no cover
    import optuna

DESCRIPTION = "the four ablation variants (adapter only, + replay, + memory units, full)"
METRIC = metrics.AVERAGE
MODE = "max"

VARIANT = "lada.variant"
GRID: dict[str, list[Any]] = {VARIANT: list(VARIANTS)}
NUM_SAMPLES = len(VARIANTS)
FIRST_POINT = paper_defaults(VARIANT)


def space(trial: optuna.Trial) -> dict[str, Any] | None:
    trial.suggest_categorical(VARIANT, GRID[VARIANT])
    return None
