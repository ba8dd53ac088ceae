"""Paired comparisons across seeds (capsnet_core.stats), checked against scipy and by hand."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from capsnet_core.stats import paired_difference


def test_interval_matches_a_hand_computed_paired_t_interval() -> None:
    a, b = [0.90, 0.92, 0.95], [0.88, 0.91, 0.90]
    diffs = [0.02, 0.01, 0.05]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    result = paired_difference(a, b)
    assert result.mean == pytest.approx(mean)
    assert (result.low, result.high) == pytest.approx((mean - half, mean + half))
    assert result.p_value == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert not result.significant  # the interval spans 0: three noisy seeds prove nothing here
    assert result.describe().startswith("+2.7 [")


def test_a_consistent_gap_is_significant_and_its_sign_is_kept() -> None:
    result = paired_difference([0.50, 0.55, 0.52, 0.51], [0.60, 0.64, 0.63, 0.60])
    assert result.significant and result.high < 0 and result.p_value < 0.05
    assert result.describe().endswith("*")


def test_identical_differences_give_a_point_interval_and_one_seed_gives_none() -> None:
    same = paired_difference([0.9, 0.8], [0.8, 0.7])
    assert same.low == pytest.approx(same.high) == pytest.approx(0.1) and same.significant
    single = paired_difference([0.9], [0.8])
    assert math.isnan(single.low) and not single.significant and "1 seed" in single.describe()
    with pytest.raises(ValueError, match="same, non-zero length"):
        paired_difference([0.9, 0.8], [0.8])
