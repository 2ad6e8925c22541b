"""The final evaluation's statistics on hand-made numbers (values worked out by hand, t from tables)."""

from __future__ import annotations

import math

import pytest

from sweeps.final_stats import BEATS, SAME, WORSE, mean_std, paired_interval, verdict

pytestmark = pytest.mark.unit


def test_mean_std_is_the_sample_std() -> None:
    assert mean_std([70.0, 72.0, 74.0]) == (72.0, 2.0)  # deviations -2, 0, 2: sqrt(8 / 2)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def test_paired_interval_on_hand_made_numbers() -> None:
    # differences 2, 3, 2: mean 7/3, sd sqrt(1/3), se 1/3; t(0.975, 2) = 4.302653 -> half width 1.434218
    d = paired_interval([72.0, 74.0, 73.0], [70.0, 71.0, 71.0])
    assert d.n == 3 and d.mean == pytest.approx(7 / 3)
    assert d.low == pytest.approx(7 / 3 - 1.434218, abs=1e-5) and d.high == pytest.approx(7 / 3 + 1.434218, abs=1e-5)
    assert verdict(d) == BEATS and verdict(d, higher_is_better=False) == WORSE
    # Pairing matters: the same values unpaired would overlap; shuffled pairs give another interval.
    swapped = paired_interval([72.0, 74.0, 73.0], [71.0, 70.0, 71.0])
    assert swapped.mean == pytest.approx(7 / 3) and swapped.high - swapped.low > d.high - d.low


def test_verdicts() -> None:
    # differences 1, -1, 0.5: mean 1/6, the interval straddles 0
    assert verdict(paired_interval([71.0, 69.0, 70.5], [70.0, 70.0, 70.0])) == SAME
    # differences -2, -3, -2: the mirror of the first case
    worse = paired_interval([70.0, 71.0, 71.0], [72.0, 74.0, 73.0])
    assert worse.high == pytest.approx(-7 / 3 + 1.434218, abs=1e-5) and verdict(worse) == WORSE
    one = paired_interval([75.0], [70.0])  # one seed: no interval, no claim
    assert one.mean == 5.0 and math.isnan(one.low) and verdict(one) == SAME
    # two seeds: t(0.975, 1) = 12.7062; differences 4 and 6: mean 5, se 1 -> [-7.706, 17.706]
    two = paired_interval([74.0, 76.0], [70.0, 70.0])
    assert two.low == pytest.approx(5 - 12.7062, abs=1e-3) and verdict(two) == SAME


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="as many seeds"):
        paired_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_interval([1.0], [1.0], confidence=1.5)
