"""Seed statistics: mean ± sample std, and KD-vs-baseline differences with t-tests and CIs.

KD gains in the study are a few tenths of a point, the size of the seed-to-seed std, so every
difference comes with Welch's t-test (as the study reports) and a confidence interval. When both
sides ran the same seeds, seed i of one shares initialisation and data order with seed i of the
other, so the paired interval is the better estimate; it is then the one the verdict uses.
"""
from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Sequence

from scipy import stats as sps

LEVEL = 0.95
NAN = float("nan")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1, NaN below two values).

    Uses the `statistics` module, as the study's own aggregation does, so that values that
    sit on a rounding boundary print exactly as the study printed them.
    """
    if not values:
        return NAN, NAN
    mean = statistics.mean(values)
    return float(mean), float(statistics.stdev(values)) if len(values) > 1 else NAN


@dataclass(frozen=True)
class Comparison:
    """a − b for two sets of per-seed accuracies (fractions)."""

    delta: float
    n_a: int
    n_b: int
    welch_t: float
    welch_df: float
    welch_p: float
    welch_ci: tuple[float, float]
    paired_seeds: tuple[int, ...]  # empty unless both sides ran exactly these seeds
    paired_t: float
    paired_df: float
    paired_p: float
    paired_ci: tuple[float, float]
    level: float = LEVEL

    @property
    def paired(self) -> bool:
        return bool(self.paired_seeds)

    @property
    def ci(self) -> tuple[float, float]:
        return self.paired_ci if self.paired else self.welch_ci

    @property
    def p(self) -> float:
        return self.paired_p if self.paired else self.welch_p

    @property
    def basis(self) -> str:
        if self.paired:
            return f"paired by seed ({', '.join(map(str, self.paired_seeds))})"
        return "Welch (unpaired)"

    @property
    def within_noise(self) -> bool | None:
        """True when the CI contains 0; None when there are too few seeds for an interval."""
        low, high = self.ci
        if math.isnan(low) or math.isnan(high):
            return None
        return low <= 0 <= high


def compare(a: Sequence[float], a_seeds: Sequence[int], b: Sequence[float], b_seeds: Sequence[int],
            level: float = LEVEL) -> Comparison:
    """Welch's t-test and CI of mean(a) − mean(b), plus the seed-paired test where seeds match.

    A test is left undefined (NaN) where its samples have no spread: with every difference
    identical there is no variance to test against, and scipy's answer is float noise.
    """
    delta = mean_std(a)[0] - mean_std(b)[0] if a and b else NAN
    welch = (NAN, NAN, NAN, (NAN, NAN))
    if len(a) >= 2 and len(b) >= 2 and not (_constant(a) and _constant(b)):
        with warnings.catch_warnings():
            # scipy warns about one constant sample (e.g. a baseline at 100 %); Welch is still
            # defined by the other sample's variance. Both constant is excluded above.
            warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
            res = sps.ttest_ind(a, b, equal_var=False)
        ci = res.confidence_interval(confidence_level=level)
        welch = (float(res.statistic), float(res.df), float(res.pvalue), (float(ci.low), float(ci.high)))
    paired_seeds: tuple[int, ...] = ()
    paired = (NAN, NAN, NAN, (NAN, NAN))
    same_seeds = sorted(a_seeds) == sorted(b_seeds) and len(set(a_seeds)) == len(a_seeds)
    if len(a) >= 2 and same_seeds:
        by_seed_a, by_seed_b = dict(zip(a_seeds, a)), dict(zip(b_seeds, b))
        seeds = tuple(sorted(a_seeds))
        diffs = [by_seed_a[s] - by_seed_b[s] for s in seeds]
        if not _constant(diffs):
            paired_seeds = seeds
            res = sps.ttest_1samp(diffs, 0.0)  # = ttest_rel(a, b) on seed-aligned values
            ci = res.confidence_interval(confidence_level=level)
            paired = (float(res.statistic), float(res.df), float(res.pvalue), (float(ci.low), float(ci.high)))
    return Comparison(delta, len(a), len(b), *welch, paired_seeds, *paired, level=level)


def _constant(values: Sequence[float]) -> bool:
    # Accuracies have a resolution of 1e-4 or coarser; below 1e-12 a spread is rounding noise.
    return max(values) - min(values) < 1e-12
