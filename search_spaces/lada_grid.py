"""``lada_grid``: the paper's lambda1 x lambda2 grid, {8, 16, 32} x {1, 4, 16} (9 trials).

The default (16, 4) is evaluated first, then the rest of the grid in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lada_core import metrics
from search_spaces import paper_defaults

if TYPE_CHECKING:  # pragma: no cover
    import optuna

DESCRIPTION = "the paper's grid lambda1 in {8, 16, 32} x lambda2 in {1, 4, 16}"
METRIC = metrics.AVERAGE
MODE = "max"

MEMORY_SIZE = "lada.memory_size"
GAUSSIAN_COMPONENTS = "lada.gaussian_components"
GRID: dict[str, list[Any]] = {MEMORY_SIZE: [8, 16, 32], GAUSSIAN_COMPONENTS: [1, 4, 16]}
NUM_SAMPLES = len(GRID[MEMORY_SIZE]) * len(GRID[GAUSSIAN_COMPONENTS])
FIRST_POINT = paper_defaults(MEMORY_SIZE, GAUSSIAN_COMPONENTS)


def space(trial: optuna.Trial) -> dict[str, Any] | None:
    trial.suggest_categorical(MEMORY_SIZE, GRID[MEMORY_SIZE])
    trial.suggest_categorical(GAUSSIAN_COMPONENTS, GRID[GAUSSIAN_COMPONENTS])
    return None
