"""Seed statistics: mean ± sample std, and differences between two configurations.

KD gains in the study are a few tenths of a point, the size of the seed-to-seed std. Seed i of
one configuration shares initialisation and data order with seed i of the other, so two
configurations are compared on the seeds both ran, paired by seed; a seed only one side ran is
left out of the difference and listed (averaging it into one side would compare different
seeds as if they were alike). Where no seed is shared the comparison falls back to Welch's test
on all seeds and says so. The CI, the p-value and the verdict always come from one test.
"""
from __future__ import annotations

import functools
import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Sequence

from scipy import stats as sps

LEVEL = 0.95
NAN = float("nan")

PAIRED = "paired t"
WELCH = "Welch"


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
class TTest:
    t: float = NAN
    df: float = NAN
    p: float = NAN
    ci: tuple[float, float] = (NAN, NAN)


UNDEFINED = TTest()


POWER = 0.8  # the power the seed counts are stated at, at the test's two-sided level (1 - LEVEL)


@dataclass(frozen=True)
class Power:
    """What the seeds of a paired comparison can tell apart, taking the paired differences as normal
    and their observed std as the true one (statsmodels' one-sample t-test power, which a paired
    t-test is on the differences)."""
    detectable: float          # the smallest |Δ| these seeds detect with POWER (fraction)
    seeds_needed: int | None   # the seeds the observed Δ needs for POWER; None: Δ is 0, no number will


@dataclass(frozen=True)
class Comparison:
    """a − b for two sets of per-seed accuracies (fractions)."""

    delta: float
    seeds: tuple[int, ...]     # the seeds compared: those both sides ran; () when none is shared
    only_a: tuple[int, ...]    # seeds left out of the difference (run by one side only), by side
    only_b: tuple[int, ...]
    test: str                  # PAIRED, WELCH, or "" where neither is defined
    result: TTest              # that test: the CI, p and verdict come from it
    welch: TTest               # Welch's test (the study's) on the same values, for reference
    level: float = LEVEL
    power: Power | None = None  # for the paired test only

    @property
    def p(self) -> float:
        return self.result.p

    @property
    def ci(self) -> tuple[float, float]:
        return self.result.ci

    @property
    def welch_p(self) -> float:
        return self.welch.p

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def paired(self) -> bool:
        return self.test == PAIRED

    @property
    def basis(self) -> str:
        """Which test, on which seeds: printed beside every difference."""
        seeds = ", ".join(map(str, self.seeds))
        if not self.seeds:
            return f"{WELCH}, unpaired: no seed in common" if self.test else "-"
        if self.test == PAIRED:
            return f"{PAIRED}, seeds {seeds}"
        if self.test == WELCH:  # paired differences without spread: no paired test
            return f"{WELCH}, seeds {seeds} (paired differences constant)"
        return f"seed {seeds} only: no test" if self.n == 1 else f"seeds {seeds}: no spread, no test"

    @property
    def within_noise(self) -> bool | None:
        """True when the CI contains 0; None when there are too few seeds for an interval."""
        low, high = self.ci
        if math.isnan(low) or math.isnan(high):
            return None
        return low <= 0 <= high


def compare(a: Sequence[float], a_seeds: Sequence[int], b: Sequence[float], b_seeds: Sequence[int],
            level: float = LEVEL) -> Comparison:
    """mean(a) − mean(b) on the seeds both ran, with the paired t-test and its CI.

    Without a shared seed: Welch's test on all values. A test is left undefined (NaN) where its
    samples have no spread: there is no variance to test against, and scipy's answer is float noise.
    """
    by_a, by_b = dict(zip(a_seeds, a)), dict(zip(b_seeds, b))
    shared = tuple(sorted(set(by_a) & set(by_b)))
    if shared:
        a_vals, b_vals = [by_a[s] for s in shared], [by_b[s] for s in shared]
        only_a = tuple(sorted(set(by_a) - set(shared)))
        only_b = tuple(sorted(set(by_b) - set(shared)))
    else:  # unpaired: every seed is compared
        a_vals, b_vals, only_a, only_b = list(a), list(b), (), ()
    delta = mean_std(a_vals)[0] - mean_std(b_vals)[0] if a_vals and b_vals else NAN
    welch = _welch(a_vals, b_vals, level)
    test, result, power = "", UNDEFINED, None
    differences = [x - y for x, y in zip(a_vals, b_vals)] if shared else []
    if len(shared) >= 2 and not _constant(differences):
        test, result = PAIRED, _paired(a_vals, b_vals, level)
        power = paired_power(differences, 1 - level)
    elif welch is not UNDEFINED and len(shared) != 1:
        test, result = WELCH, welch
    return Comparison(delta, shared, only_a, only_b, test, result, welch, level, power)


def paired_power(differences: Sequence[float], alpha: float = 1 - LEVEL, power: float = POWER) -> Power:
    """The Power of a two-sided paired t-test on `differences` (at least two, not all equal)."""
    mean, std = mean_std(differences)
    detectable = _effect_detected(len(differences), alpha, power) * std
    return Power(detectable, None if mean == 0 else seeds_needed(abs(mean) / std, alpha, power))


def seeds_needed(effect: float, alpha: float = 1 - LEVEL, power: float = POWER) -> int:
    """The fewest seeds whose paired t-test detects a standardised effect (|mean| / std of the
    differences) with `power`. statsmodels' root finder starts at 2 seeds, returns 2 where even 2 fall
    short of large effects and NaN where its noncentral t overflows: its answer is checked, and
    stepped up, against its own power function."""
    if effect >= _effect_detected(2, alpha, power):
        return 2
    model = _power_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: the check below decides
        guess = model.solve_power(effect_size=effect, nobs=None, alpha=alpha, power=power, alternative="two-sided")
    seeds = max(2, math.ceil(guess)) if math.isfinite(guess) else 2
    while model.power(effect_size=effect, nobs=seeds, alpha=alpha, alternative="two-sided") < power:
        seeds += 1
    return seeds


@functools.cache
def _effect_detected(seeds: int, alpha: float, power: float) -> float:
    """The smallest standardised effect `seeds` paired seeds detect with `power`."""
    return float(_power_model().solve_power(effect_size=None, nobs=seeds, alpha=alpha, power=power,
                                            alternative="two-sided"))


@functools.cache
def _power_model():
    from statsmodels.stats.power import TTestPower  # here: ~0.7 s of imports only tables with a Δ need
    # imported now, not on its first non-convergence inside seeds_needed's filter: importing it adds
    # filters that would override that one
    import statsmodels.tools.sm_exceptions  # noqa: F401
    return TTestPower()


def _welch(a: Sequence[float], b: Sequence[float], level: float) -> TTest:
    if len(a) < 2 or len(b) < 2 or (_constant(a) and _constant(b)):
        return UNDEFINED
    with warnings.catch_warnings():
        # scipy warns about one constant sample (e.g. a baseline at 100 %); Welch is still
        # defined by the other sample's variance. Both constant is excluded above.
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        res = sps.ttest_ind(a, b, equal_var=False)
    return _ttest(res, level)


def _paired(a: Sequence[float], b: Sequence[float], level: float) -> TTest:
    return _ttest(sps.ttest_1samp([x - y for x, y in zip(a, b)], 0.0), level)  # = ttest_rel(a, b)


def _ttest(res, level: float) -> TTest:
    ci = res.confidence_interval(confidence_level=level)
    return TTest(float(res.statistic), float(res.df), float(res.pvalue), (float(ci.low), float(ci.high)))


def _constant(values: Sequence[float]) -> bool:
    # Accuracies have a resolution of 1e-4 or coarser; below 1e-12 a spread is rounding noise.
    return max(values) - min(values) < 1e-12
