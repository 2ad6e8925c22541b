"""The paper's published X-TAIL numbers (ViT-B/16, order I; method page, section 9), for comparison."""

from __future__ import annotations

from lada_core import metrics as M

# setting -> method -> {transfer, average, last}; None where the paper gives no value.
XTAIL: dict[str, dict[str, dict[str, float | None]]] = {
    "16-shot": {
        "LADA": {M.TRANSFER: 61.5, M.AVERAGE: 72.7, M.LAST: 83.1},
        "text AdaptFormer only": {M.TRANSFER: 59.4, M.AVERAGE: 70.9, M.LAST: 82.1},
        "+ replay only": {M.TRANSFER: 59.9, M.AVERAGE: 71.6, M.LAST: 82.6},
        "+ memory units only": {M.TRANSFER: 61.2, M.AVERAGE: 72.3, M.LAST: 83.0},
        "Primal-RAIL": {M.TRANSFER: None, M.AVERAGE: 71.1, M.LAST: 81.4},
        "ZSCL": {M.TRANSFER: 59.0, M.AVERAGE: 60.0, M.LAST: 63.4},
    },
    "full-shot": {
        "LADA": {M.TRANSFER: 61.9, M.AVERAGE: 75.2, M.LAST: 86.9},
        "text AdaptFormer only": {M.TRANSFER: 59.6, M.AVERAGE: 73.2, M.LAST: 85.6},
        "+ replay only": {M.TRANSFER: 60.3, M.AVERAGE: 74.4, M.LAST: 86.3},
        "+ memory units only": {M.TRANSFER: 61.1, M.AVERAGE: 74.9, M.LAST: 86.8},
        "Primal-RAIL": {M.TRANSFER: None, M.AVERAGE: 72.8, M.LAST: 84.0},
        "ZSCL": {M.TRANSFER: 59.0, M.AVERAGE: 64.5, M.LAST: 72.1},
    },
}
XTAIL_BENCHMARKS = ("xtail",)  # order I; the paper's table is for order I only


def xtail_setting(shots: int | None) -> str:
    return "full-shot" if shots is None else "16-shot"
