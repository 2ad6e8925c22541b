"""``lada_full``: every method hyperparameter of LADA at once (TPE); the rest at the paper's defaults.

lambda1 (memory units per class) is an integer on a log scale, gamma (replay weight) and the learning
rate are log-uniform around the paper's values, lambda2 (Gaussian components) an integer, alpha and
beta log-uniform around 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lada_core import metrics
from search_spaces import paper_defaults

if TYPE_CHECKING:  # pragma: no cover
    import optuna

DESCRIPTION = "lambda1, lambda2, gamma, lr, alpha and beta together (TPE)"
METRIC = metrics.AVERAGE
MODE = "max"
NUM_SAMPLES = 32
SCHEDULER = "asha"  # many trials: stop the weak ones between tasks

MEMORY_SIZE = "lada.memory_size"
GAUSSIAN_COMPONENTS = "lada.gaussian_components"
DISTILL_WEIGHT = "lada.distill_weight"
LR = "optim.lr"
ALPHA = "lada.alpha"
BETA = "lada.beta"

FIRST_POINT = paper_defaults(MEMORY_SIZE, GAUSSIAN_COMPONENTS, DISTILL_WEIGHT, LR, ALPHA, BETA)


def space(trial: optuna.Trial) -> dict[str, Any] | None:
    trial.suggest_int(MEMORY_SIZE, 1, 64, log=True)
    trial.suggest_int(GAUSSIAN_COMPONENTS, 1, 16, log=True)
    trial.suggest_float(DISTILL_WEIGHT, 1.0, 256.0, log=True)
    trial.suggest_float(LR, 1e-4, 1e-2, log=True)
    trial.suggest_float(ALPHA, 0.1, 10.0, log=True)
    trial.suggest_float(BETA, 0.1, 10.0, log=True)
    return None
