"""``lada_smoke``: a tiny space and schedule that finishes in a few minutes on a 2-core CPU.

It runs offline on a fresh machine: ``mini-tail`` few-shot, the small random-init open_clip model that
``lada_core`` ships (``lada-tiny``, no download), 8 shots, two augmented views, three epochs per task
in batches of 8 (a few optimizer steps per task, so that the learning rate and the replay weight
change the outcome).
It exists to check an installation and to demo the product, not to find good settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lada_core import metrics
from search_spaces import paper_defaults

if TYPE_CHECKING:  # pragma: no cover
    import optuna

DESCRIPTION = "a tiny offline demo: mini-tail 8-shot, random-init small model, 4 trials"
METRIC = metrics.AVERAGE
MODE = "max"
NUM_SAMPLES = 4

BASE: dict[str, Any] = {
    "data.benchmark": "mini-tail",
    "data.shots": 8,
    "data.views": 2,
    "backbone.model": "lada-tiny",
    "backbone.pretrained": None,
    "optim.epochs": 3,
    "optim.batch_size": 8,
    "lada.kmeans_n_init": 2,
}

MEMORY_SIZE = "lada.memory_size"
DISTILL_WEIGHT = "lada.distill_weight"
LR = "optim.lr"
FIRST_POINT = paper_defaults(MEMORY_SIZE, DISTILL_WEIGHT, LR)


def space(trial: optuna.Trial) -> dict[str, Any] | None:
    trial.suggest_int(MEMORY_SIZE, 2, 16, log=True)
    trial.suggest_float(DISTILL_WEIGHT, 4.0, 256.0, log=True)
    trial.suggest_float(LR, 3e-4, 1e-2, log=True)
    return None
