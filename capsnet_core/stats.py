"""Paired comparisons of two models across seeds: the difference, its 95 % interval, a p-value.

Two runs with the same seed see the same training order and the same augmentation stream (both
are drawn from ``(seed, epoch)``, not from the model), so the per-seed differences are paired.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over paired seeds, with a two-sided 95 % t interval and the paired t-test's p."""

    mean: float
    low: float
    high: float
    p_value: float
    n: int

    @property
    def significant(self) -> bool:
        """The 95 % interval excludes zero (equivalently p < 0.05)."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def describe(self, scale: float = 100.0, unit: str = "") -> str:
        """``+1.3 [+0.4, +2.2]*`` (points), ``*`` where the interval excludes zero."""
        if self.n < 2:
            return f"{scale * self.mean:+.1f} (1 seed)"
        return (f"{scale * self.mean:+.1f}{unit} [{scale * self.low:+.1f}, {scale * self.high:+.1f}]"
                f"{'*' if self.significant else ''}")


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """Compare paired samples (same seeds, same order). With identical differences the interval is a point."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples need the same, non-zero length (got {len(a)} and {len(b)})")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return PairedDifference(mean, math.nan, math.nan, math.nan, n)
    sd = statistics.stdev(diffs)
    if sd == 0.0:
        return PairedDifference(mean, mean, mean, 0.0 if mean != 0 else 1.0, n)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    p_value = float(stats.ttest_rel(a, b).pvalue)
    return PairedDifference(mean, mean - half, mean + half, p_value, n)
