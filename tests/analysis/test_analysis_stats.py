"""analysis.stats against the textbook formulas (scipy only for the t distribution's quantiles)."""
from __future__ import annotations

import math
import statistics

import pytest
from scipy.stats import t as t_dist

from analysis.stats import PAIRED, compare, mean_std, paired_power, seeds_needed


def test_mean_and_sample_std():
    assert mean_std([0.9519, 0.9537, 0.9555]) == pytest.approx((0.9537, 0.0018), abs=1e-15)
    mean, std = mean_std([0.95])
    assert mean == 0.95 and math.isnan(std)  # no std from one seed
    assert all(math.isnan(v) for v in mean_std([]))


def welch_by_hand(a, b, level=0.95):
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    se2 = va / na + vb / nb
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    t = (ma - mb) / math.sqrt(se2)
    half = t_dist.ppf(0.5 + level / 2, df) * math.sqrt(se2)
    return ma - mb, t, df, 2 * t_dist.sf(abs(t), df), (ma - mb - half, ma - mb + half)


def test_welch_matches_the_formula_and_the_studys_bug_ablation():
    # The study: bugged 95.00 ± 0.18 vs corrected 94.95 ± 0.20 over 5 seeds, Welch p = 0.69.
    bugged = [0.9500 + 0.0018 * d for d in (-1, -1, 0, 1, 1)]
    fixed = [0.9495 + 0.0020 * d for d in (-1, -1, 0, 1, 1)]
    comp = compare(bugged, [0, 1, 2, 3, 4], fixed, [5, 6, 7, 8, 9])  # different seeds: unpaired
    delta, t, df, p, ci = welch_by_hand(bugged, fixed)
    assert not comp.paired and comp.basis == "Welch, unpaired: no seed in common"
    assert (comp.seeds, comp.only_a, comp.only_b) == ((), (), ())  # all compared, unpaired
    assert comp.delta == pytest.approx(delta, abs=1e-15) == pytest.approx(0.0005, abs=1e-12)
    assert (comp.welch.t, comp.welch.df, comp.welch_p) == pytest.approx((t, df, p), rel=1e-9)
    assert comp.ci == pytest.approx(ci, rel=1e-9)
    assert round(comp.welch_p, 2) == 0.69
    assert comp.within_noise is True and comp.p == comp.welch_p


def test_paired_when_the_seeds_match():
    kd = {0: 0.9512, 1: 0.9498, 2: 0.9530}
    base = {0: 0.9490, 1: 0.9480, 2: 0.9500}
    # Given in different orders: pairing is by seed, not by position.
    comp = compare([kd[s] for s in (2, 0, 1)], [2, 0, 1], [base[s] for s in (0, 1, 2)], [0, 1, 2])
    diffs = [kd[s] - base[s] for s in (0, 1, 2)]  # 0.0022, 0.0018, 0.0030
    md = sum(diffs) / 3
    sd = math.sqrt(sum((d - md) ** 2 for d in diffs) / 2)
    t = md / (sd / math.sqrt(3))
    half = t_dist.ppf(0.975, 2) * sd / math.sqrt(3)
    assert comp.paired and comp.seeds == (0, 1, 2) and comp.basis == "paired t, seeds 0, 1, 2"
    assert (comp.result.t, comp.result.df) == pytest.approx((t, 2), rel=1e-9)
    assert comp.p == pytest.approx(2 * t_dist.sf(t, 2), rel=1e-9)
    assert comp.ci == pytest.approx((md - half, md + half), rel=1e-9)
    assert comp.within_noise is False
    # Welch is still computed (the study's test) and here does not exclude 0: pairing matters.
    _, _, _, p, ci = welch_by_hand(list(kd.values()), list(base.values()))
    assert comp.welch_p == pytest.approx(p, rel=1e-9) and comp.welch.ci == pytest.approx(ci, rel=1e-9)
    assert comp.welch.ci[0] < 0 < comp.welch.ci[1]


def test_only_the_shared_seeds_are_compared_and_the_others_listed():
    # KD ran seeds 0-4, the baseline 0-2: seeds 3 and 4 (a good draw here) must not lift the KD mean.
    kd = {0: 0.9500, 1: 0.9490, 2: 0.9510, 3: 0.9600, 4: 0.9610}
    base = {0: 0.9495, 1: 0.9480, 2: 0.9500}
    comp = compare(list(kd.values()), list(kd), list(base.values()), list(base))
    assert (comp.seeds, comp.only_a, comp.only_b) == ((0, 1, 2), (3, 4), ())
    assert comp.delta == pytest.approx(0.00083333333, abs=1e-10)  # not 0.0053 (5-seed mean − 3-seed mean)
    diffs = [kd[s] - base[s] for s in (0, 1, 2)]
    md = sum(diffs) / 3
    sd = math.sqrt(sum((d - md) ** 2 for d in diffs) / 2)
    assert comp.p == pytest.approx(2 * t_dist.sf(md / (sd / math.sqrt(3)), 2), rel=1e-9)
    assert comp.basis == "paired t, seeds 0, 1, 2"
    # Welch on the same three seeds, not on all eight values.
    assert comp.welch_p == pytest.approx(welch_by_hand([kd[s] for s in (0, 1, 2)], list(base.values()))[3],
                                         rel=1e-9)


def test_too_few_seeds_give_no_interval():
    comp = compare([0.95], [0], [0.94, 0.945], [0, 1])
    assert comp.delta == pytest.approx(0.95 - 0.94)  # seed 0 only: seed 1 has no partner
    assert comp.only_b == (1,) and comp.basis == "seed 0 only: no test"
    assert math.isnan(comp.welch_p) and not comp.paired and comp.within_noise is None


def test_identical_differences_fall_back_to_welch():
    # Every seed gains exactly 0.5 pp: no variance for a paired test; Welch still applies.
    comp = compare([0.952, 0.953, 0.954], [0, 1, 2], [0.947, 0.948, 0.949], [0, 1, 2])
    assert not comp.paired and comp.basis == "Welch, seeds 0, 1, 2 (paired differences constant)"
    assert comp.ci == comp.welch.ci and comp.within_noise is False
    same = compare([0.95, 0.95], [0, 1], [0.95, 0.95], [0, 1])
    assert math.isnan(same.welch_p) and same.within_noise is None


def test_one_constant_side_is_still_a_welch_test():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        comp = compare([0.957, 0.914], [0, 1], [1.0, 1.0], [0, 1])
    _, t, df, p, ci = welch_by_hand([0.957, 0.914], [1.0, 1.0])
    assert (comp.welch.t, comp.welch.df, comp.welch_p) == pytest.approx((t, df, p), rel=1e-9)
    assert comp.paired  # the differences vary, so the paired test is defined too


# --- power: what the seeds can detect (statsmodels), checked against the noncentral t by hand ---

def _power_by_hand(n: int, effect: float, alpha: float = 0.05) -> float:
    """Two-sided one-sample (= paired) t-test power from its definition: T = (Z + δ) / √(W/ν) with
    Z ~ N(0, 1), W ~ χ²(ν), ν = n − 1, δ = effect·√n, and P(|T| > c) = E_W[Φ(δ − c√(W/ν)) + Φ(−δ − c√(W/ν))],
    integrated numerically (scipy's noncentral t gives NaN far out)."""
    from scipy import integrate
    from scipy import stats as sps
    df, shift = n - 1, effect * math.sqrt(n)
    crit = sps.t.ppf(1 - alpha / 2, df)

    def rejected(w: float) -> float:
        scale = crit * math.sqrt(w / df)
        return (sps.norm.cdf(shift - scale) + sps.norm.cdf(-shift - scale)) * sps.chi2.pdf(w, df)

    return integrate.quad(rejected, 0, math.inf, limit=200)[0]


@pytest.mark.parametrize("differences", [[0.001, 0.002, 0.003], [0.004, -0.001, 0.002, 0.001, 0.003],
                                         [0.0005, 0.0011, -0.0002, 0.0009, 0.0001, 0.0004, 0.0007, 0.0003, 0.0008, 0.0010]])
def test_the_detectable_delta_and_the_seeds_a_delta_needs_match_the_noncentral_t(differences):
    from scipy.optimize import brentq
    n, mean, std = len(differences), statistics.mean(differences), statistics.stdev(differences)
    power = paired_power(differences)
    effect = brentq(lambda d: _power_by_hand(n, d) - 0.8, 1e-6, 12)  # 3 seeds need d ≈ 3.1
    assert power.detectable == pytest.approx(effect * std, rel=1e-4)
    needed = next(k for k in range(2, 100_000) if _power_by_hand(k, abs(mean) / std) >= 0.8)
    assert power.seeds_needed == needed


@pytest.mark.parametrize("effect, seeds", [(10.0, 3), (11.6, 2), (50.0, 2), (1.0, 10), (0.3, 90)])
def test_seeds_needed_where_statsmodels_root_finder_falls_short(effect, seeds):
    """At d=10 statsmodels' solver stops at its lower bound, 2 seeds, whose power is 0.73; at d=50 it
    returns NaN. Both are checked against the power they must reach."""
    assert seeds_needed(effect) == seeds
    assert _power_by_hand(seeds, effect) >= 0.8 and (seeds == 2 or _power_by_hand(seeds - 1, effect) < 0.8)


def test_a_comparison_carries_the_power_of_its_paired_test_only():
    paired = compare([0.95, 0.951, 0.949, 0.952, 0.948], [0, 1, 2, 3, 4], [0.948, 0.9495, 0.9485, 0.95, 0.9475],
                     [0, 1, 2, 3, 4])
    assert paired.test == PAIRED and paired.power.seeds_needed == 5
    unpaired = compare([0.95, 0.951], [0, 1], [0.948, 0.949], [2, 3])
    assert unpaired.test == "Welch" and unpaired.power is None
    assert compare([0.95, 0.96], [0, 1], [0.94, 0.95], [0, 1]).power is None  # constant differences: Welch
