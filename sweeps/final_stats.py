"""Statistics of the final evaluation (issue 11, section 3; Cha & Cho, "Hyperparameters in Continual
Learning: A Reality Check", TMLR 2025): a config chosen on validation data is trained with several
seeds and scored on test, beside the paper defaults trained with the same seeds.

Pure functions over plain numbers: mean +- std over seeds, the difference to the defaults with a
95% interval paired over seeds (seed s of a config and seed s of the defaults share everything the
seed fixes, so the per-seed differences are what varies), and a one-line verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

BEATS = "beats the defaults"
SAME = "indistinguishable"
WORSE = "worse"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std 0 for one value, NaN for none."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass(frozen=True)
class PairedDiff:
    """``config - defaults`` over paired seeds: mean and the two-sided interval (Student's t, n - 1
    degrees of freedom); the interval is NaN with fewer than two pairs."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95


def paired_interval(config: Sequence[float], defaults: Sequence[float], confidence: float = 0.95) -> PairedDiff:
    """The mean of the per-seed differences ``config[s] - defaults[s]`` and its ``confidence``
    interval, ``mean +- t_{(1+c)/2, n-1} * sd / sqrt(n)``. The two sequences are paired by position."""
    if len(config) != len(defaults):
        raise ValueError(f"paired values need as many seeds on both sides, got {len(config)} and {len(defaults)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diffs = [c - d for c, d in zip(config, defaults)]
    mean, sd = mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return PairedDiff(mean, math.nan, math.nan, n, confidence)
    from scipy.stats import t

    half = float(t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return PairedDiff(mean, mean - half, mean + half, n, confidence)


def verdict(diff: PairedDiff, higher_is_better: bool = True) -> str:
    """``beats the defaults`` when the whole interval is on the better side of 0, ``worse`` when it
    is on the other side, else ``indistinguishable`` (also with too few seeds for an interval)."""
    if math.isnan(diff.low) or math.isnan(diff.high):
        return SAME
    better, worse = (diff.low > 0, diff.high < 0) if higher_is_better else (diff.high < 0, diff.low > 0)
    return BEATS if better else WORSE if worse else SAME
