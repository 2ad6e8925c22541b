"""``lada_smoke``: the offline demo: the three parameters users come for, in a few minutes on 2 CPU cores.

It runs offline on a fresh machine: ``mini-tail`` 16-shot (seven domains, 60 class names) on the
project's own mini CLIP (``lada-mini`` with ``lada-offline``: pretrained on first use, about two
minutes on 2 cores, then kept in the user's cache folder), no augmented views, the benchmark's
per-task schedule at half length. It searches memory size (lambda1), distillation weight (gamma) and
Gaussian components (lambda2); the paper's defaults are the first trial. It exists to check an
installation and to demo the product, not to find settings for X-TAIL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lada_core import metrics
from search_spaces import paper_defaults

if TYPE_CHECKING:  # pragma: no cover
    import optuna

DESCRIPTION = "the offline demo: mini-tail 16-shot on the mini CLIP; lambda1, gamma, lambda2; 4 trials"
METRIC = metrics.AVERAGE
MODE = "max"
NUM_SAMPLES = 4

BASE: dict[str, Any] = {
    "data.benchmark": "mini-tail",
    "data.shots": 16,
    "data.views": 0,
    "backbone.model": "lada-mini",
    "backbone.pretrained": "lada-offline",
    "optim.epochs_scale": 0.5,
    "lada.kmeans_n_init": 2,
}

MEMORY_SIZE = "lada.memory_size"
DISTILL_WEIGHT = "lada.distill_weight"
GAUSSIAN_COMPONENTS = "lada.gaussian_components"
FIRST_POINT = paper_defaults(MEMORY_SIZE, DISTILL_WEIGHT, GAUSSIAN_COMPONENTS)


def space(trial: optuna.Trial) -> dict[str, Any] | None:
    trial.suggest_int(MEMORY_SIZE, 2, 16, log=True)
    trial.suggest_float(DISTILL_WEIGHT, 4.0, 256.0, log=True)
    trial.suggest_int(GAUSSIAN_COMPONENTS, 1, 8)
    return None
