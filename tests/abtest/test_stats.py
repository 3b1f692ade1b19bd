"""hllm.abtest.stats: hand-computed values, scipy/statsmodels/tea-tasting oracles, and a Monte-Carlo check
that the mSPRT stays valid under daily peeking while still detecting a planted effect."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from hllm.abtest.stats import (
    GuardrailResult,
    MeanDiff,
    SequentialResult,
    SRMResult,
    always_valid,
    cumulative_looks,
    cuped,
    cuped_arms,
    decide,
    diff_in_means,
    mde,
    msprt,
    non_inferiority,
    non_inferiority_from_diff,
    quantile_diff,
    quantile_non_inferiority,
    ratio_diff,
    sample_size_per_arm,
    sequential_looks,
    sequential_result,
    srm_test,
)

# --- SRM ----------------------------------------------------------------------------------------------------


def test_srm_two_arms_by_hand() -> None:
    # expected 50/50; chi2 = (60-50)^2/50 + (40-50)^2/50 = 4; dof 1; p = P(|Z| > 2) = 0.0455003
    res = srm_test([60, 40], [0.5, 0.5])
    assert res.statistic == pytest.approx(4.0)
    assert res.dof == 1
    assert res.p_value == pytest.approx(2 * sps.norm.sf(2.0)) and res.p_value == pytest.approx(0.0455003, abs=1e-7)
    assert not res.mismatch


def test_srm_three_arms_by_hand_unnormalised_shares() -> None:
    # shares 1:2:1 of 100 -> expected 25, 50, 25; chi2 = 25/25 + 0 + 25/25 = 2; dof 2; p = exp(-2/2) = e^-1
    res = srm_test([30, 50, 20], [1, 2, 1])
    assert res.expected == pytest.approx((25.0, 50.0, 25.0))
    assert res.statistic == pytest.approx(2.0)
    assert res.p_value == pytest.approx(math.exp(-1.0))


def test_srm_threshold_and_anchor() -> None:
    # the anchor note's 50,500 / 49,500: chi2 = 2 * 500^2 / 50,000 = 10, p = 0.00157
    res = srm_test([50_500, 49_500], [0.5, 0.5])
    assert res.statistic == pytest.approx(10.0)
    assert res.p_value == pytest.approx(0.001565, abs=1e-6)
    assert not res.mismatch  # 0.00157 >= 0.001
    assert srm_test([50_500, 49_500], [0.5, 0.5], threshold=0.01).mismatch
    assert srm_test([900, 100], [0.9, 0.1]).p_value == pytest.approx(1.0)
    assert srm_test([1000, 1300], [0.5, 0.5]).mismatch


def test_srm_matches_scipy_chisquare() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        shares = rng.dirichlet(np.ones(3))
        counts = rng.multinomial(5000, shares)
        ref = sps.chisquare(counts, f_exp=shares * counts.sum())
        res = srm_test(counts.tolist(), shares.tolist())
        assert (res.statistic, res.p_value) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-10)


@pytest.mark.parametrize("counts, shares", [([10], [1.0]), ([1, 2], [0.5]), ([0, 0], [0.5, 0.5]), ([5, 5], [1, 0])])
def test_srm_refuses_bad_input(counts: list[int], shares: list[float]) -> None:
    with pytest.raises(ValueError):
        srm_test(counts, shares)


# --- CUPED --------------------------------------------------------------------------------------------------


def test_cuped_by_hand() -> None:
    # x = 1..4: mean 2.5, var = (2.25+.25+.25+2.25)/3 = 5/3; y = 2,4,5,9: mean 5, deviations -3,-1,0,4
    # cov = (4.5 + .5 + 0 + 6)/3 = 11/3 -> theta = 11/5 = 2.2; adjusted = y - 2.2 (x - 2.5) = 5.3, 5.1, 3.9, 5.7
    # var(adjusted) = (.09+.01+1.21+.49)/3 = .6, var(y) = 26/3 -> reduction = 1 - .6/(26/3) = 121/130 = rho^2
    res = cuped([2, 4, 5, 9], [1, 2, 3, 4])
    assert res.theta == pytest.approx(2.2)
    assert res.adjusted == pytest.approx([5.3, 5.1, 3.9, 5.7])
    assert res.adjusted.mean() == pytest.approx(5.0)  # the mean is unchanged
    assert res.variance_reduction == pytest.approx(121 / 130)


def test_cuped_constant_covariate_is_no_adjustment() -> None:
    res = cuped([1.0, 2.0, 4.0], [3.0, 3.0, 3.0])
    assert res.theta == 0.0 and res.variance_reduction == 0.0
    assert res.adjusted.tolist() == [1.0, 2.0, 4.0]


def test_cuped_arms_pools_theta() -> None:
    c, t, theta = cuped_arms([2, 4], [1, 2], [5, 9], [3, 4])
    assert theta == pytest.approx(2.2)  # the pooled fit above, not a per-arm one
    assert np.concatenate([c, t]) == pytest.approx([5.3, 5.1, 3.9, 5.7])


def test_cuped_keeps_the_effect_and_shrinks_its_se() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(10, 3, 8000)
    y = 0.9 * x + rng.normal(0, 1, 8000)
    y[4000:] += 0.2  # planted effect in the second half (treatment)
    raw = diff_in_means(y[:4000], y[4000:])
    c, t, _ = cuped_arms(y[:4000], x[:4000], y[4000:], x[4000:])
    adj = diff_in_means(c, t)
    assert adj.se < raw.se / 2
    assert abs(adj.diff - 0.2) < 3 * adj.se


def test_cuped_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        cuped([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        cuped([1, 2, float("nan")], [1, 2, 3])


# --- Welch / delta method -----------------------------------------------------------------------------------


def test_welch_by_hand_and_against_scipy() -> None:
    # control 1,2,3: mean 2, var 1 -> 1/3; treatment 2,4,6,8: mean 5, var 20/3 -> 5/3
    # se = sqrt(1/3 + 5/3) = sqrt 2; dof = 2^2 / ((1/3)^2/2 + (5/3)^2/3) = 216/53
    d = diff_in_means([1, 2, 3], [2, 4, 6, 8])
    assert (d.diff, d.se, d.dof) == pytest.approx((3.0, math.sqrt(2.0), 216 / 53))
    # relative lift 5/2 - 1 = 1.5, delta-method se = sqrt((5/3)/2^2 + 5^2 (1/3)/2^4) = sqrt(0.9375)
    assert (d.relative, d.relative_se) == pytest.approx((1.5, math.sqrt(0.9375)))
    ref = sps.ttest_ind([2, 4, 6, 8], [1, 2, 3], equal_var=False)
    assert d.p_value() == pytest.approx(ref.pvalue)
    assert d.ci(0.05) == pytest.approx(tuple(ref.confidence_interval(0.95)))


def test_ratio_metric_by_hand() -> None:
    # clicks 1,0,2 over impressions 2,2,4: R = 3/8; linearised (num - R den)/mean(den) = (.25, -.75, .5) * 3/8
    # = (.09375, -.28125, .1875): mean 0, var = .123046875/2 = .0615234375, var of R = that / 3
    d = ratio_diff([1, 0, 2], [2, 2, 4], [1, 0, 2], [2, 2, 4])
    assert d.control_mean == pytest.approx(0.375) and d.diff == 0.0
    assert d.se == pytest.approx(math.sqrt(2 * 0.0615234375 / 3))
    # with all denominators 1 the delta method is the plain difference in means
    plain, ratio = diff_in_means([1, 0, 3], [2, 2, 5]), ratio_diff([1, 0, 3], [1, 1, 1], [2, 2, 5], [1, 1, 1])
    assert (ratio.diff, ratio.se) == pytest.approx((plain.diff, plain.se))


# --- mSPRT --------------------------------------------------------------------------------------------------


def test_always_valid_by_hand() -> None:
    # estimate 2, se 1, tau 1: L = sqrt(1/2) exp(1*4/(2*1*2)) = e/sqrt 2 -> p = sqrt 2 / e = 0.520260
    # r^2 = 2*1*2/1 * (ln 20 + ln(2)/2) = 4 * (2.995732 + 0.346574) = 13.369224 -> r = 3.656395
    p, low, high = always_valid(2.0, 1.0, 1.0, 0.05)
    assert p == pytest.approx(math.sqrt(2) / math.e)
    assert (low, high) == pytest.approx((2 - 3.656395, 2 + 3.656395), abs=1e-6)
    assert always_valid(0.0, 1.0, 1.0)[0] == 1.0


def test_always_valid_ci_boundary_is_where_the_likelihood_ratio_hits_one_over_alpha() -> None:
    estimate, se, tau, alpha = 0.3, 0.1, 0.2, 0.05
    _, low, high = always_valid(estimate, se, tau, alpha)
    for d0 in (low, high):  # p-value against d0 (shift the estimate) is exactly alpha at the bounds
        assert always_valid(estimate - d0, se, tau, alpha)[0] == pytest.approx(alpha)


def test_always_valid_p_and_ci_agree_and_ci_is_wider_than_fixed() -> None:
    for estimate in np.linspace(-1.0, 1.0, 81):
        p, low, high = always_valid(float(estimate), 0.2, 0.2, 0.05)
        assert (p < 0.05) == (low > 0 or high < 0)
        assert high - low > 2 * 1.959964 * 0.2


def test_msprt_relative_interval() -> None:
    rng = np.random.default_rng(2)
    res = msprt(rng.normal(10, 1, 3000), rng.normal(11, 1, 3000), tau=0.5)
    assert res.p_value < 1e-6 and res.ci_low > 0
    assert res.rel_ci_low < res.relative < res.rel_ci_high and res.rel_ci_low > 0.05
    assert res.relative_tau == pytest.approx(0.5 / res.estimate.control_mean)


def test_sequential_looks_are_running_min_and_intersection() -> None:
    rng = np.random.default_rng(3)
    c, t = rng.normal(0, 1, 2000), rng.normal(0.05, 1, 2000)
    days = np.repeat(np.arange(10), 200)
    looks = cumulative_looks(c, days, t, days)
    assert [len(lc) for lc, _ in looks] == list(range(200, 2001, 200))
    res = sequential_looks(looks, tau=0.1)
    raw = [msprt(lc, lt, tau=0.1, relative_tau=res[0].relative_tau) for lc, lt in looks]
    assert [r.p_value for r in res] == pytest.approx(np.minimum.accumulate([r.p_value for r in raw]).tolist())
    assert [r.ci_low for r in res] == pytest.approx(np.maximum.accumulate([r.ci_low for r in raw]).tolist())
    assert [r.ci_high for r in res] == pytest.approx(np.minimum.accumulate([r.ci_high for r in raw]).tolist())
    assert all(r.relative_tau == res[0].relative_tau for r in res)  # the mixture is fixed


def _simulate(effect: float, sims: int, seed: int) -> tuple[float, float, float]:
    """(rate of ever rejecting with the mSPRT, with a naive z-test, coverage of the final running CI) over
    ``sims`` tests of 20 daily looks with 50 new users per arm per day."""
    rng = np.random.default_rng(seed)
    days = np.repeat(np.arange(20), 50)
    msprt_hits = naive_hits = covered = 0
    for _ in range(sims):
        c, t = rng.normal(0, 1, days.size), rng.normal(effect, 1, days.size)
        looks = cumulative_looks(c, days, t, days)
        res = sequential_looks(looks, tau=0.1, alpha=0.05)
        msprt_hits += res[-1].p_value < 0.05
        covered += res[-1].ci_low <= effect <= res[-1].ci_high
        naive_hits += any(diff_in_means(lc, lt).p_value() < 0.05 for lc, lt in looks)
    return msprt_hits / sims, naive_hits / sims, covered / sims


def test_msprt_is_valid_under_daily_peeking() -> None:
    msprt_rate, naive_rate, coverage = _simulate(0.0, 300, seed=2024)
    assert msprt_rate <= 0.07  # alpha 0.05 plus a small Monte-Carlo tolerance
    assert naive_rate > 0.12  # the naive test peeked at daily is not (why the mSPRT exists)
    assert coverage >= 0.93


def test_msprt_detects_a_planted_effect() -> None:
    # 0.2 sd with 1,000 users per arm at the end: z = 0.2 / sqrt(2/1000) = 4.5
    msprt_rate, _, coverage = _simulate(0.2, 100, seed=7)
    assert msprt_rate >= 0.8
    assert coverage >= 0.9


# --- non-inferiority ----------------------------------------------------------------------------------------


def _md(diff: float, se: float, control_mean: float = 100.0) -> MeanDiff:
    return MeanDiff(
        control_mean, control_mean + diff, diff, se, diff / control_mean, se / control_mean, 1000, 1000, math.inf
    )


def test_non_inferiority_lower_is_better_by_hand() -> None:
    # diff +2 ms, se 1: upper 95 % one-sided bound 2 + 1.644854 = 3.644854; p = Phi((2 - margin)/1)
    ok = non_inferiority_from_diff(_md(2.0, 1.0), 5.0, name="mean_ms")
    assert (ok.status, ok.threshold) == ("pass", 5.0) and ok.passed
    assert ok.bound == pytest.approx(3.644854, abs=1e-6)
    assert ok.p_value == pytest.approx(sps.norm.cdf(-3.0))  # 0.0013499
    assert non_inferiority_from_diff(_md(2.0, 1.0), 1.0).status == "inconclusive"  # 0.355 < 1 < 3.645
    assert non_inferiority_from_diff(_md(2.0, 1.0), 0.3).status == "fail"  # harm beyond 0.3 shown: 0.355 > 0.3


def test_non_inferiority_higher_is_better_and_relative() -> None:
    # coverage -1 pt, se 0.4 pt, margin 2 pt: lower bound -1 - 1.644854 * 0.4 = -1.657942 > -2
    res = non_inferiority_from_diff(_md(-1.0, 0.4, 50.0), 2.0, lower_is_better=False)
    assert (res.status, res.threshold) == ("pass", -2.0)
    assert res.bound == pytest.approx(-1.657942, abs=1e-6)
    # relative: +4 % with se 1 % against a 5 % margin: 4 + 1.645 = 5.645 > 5 and 4 - 1.645 < 5 -> inconclusive
    assert non_inferiority_from_diff(_md(4.0, 1.0), 0.05, relative=True).status == "inconclusive"
    assert non_inferiority_from_diff(_md(4.0, 1.0), 0.06, relative=True).status == "pass"


def test_non_inferiority_matches_a_shifted_one_sided_welch_test() -> None:
    rng = np.random.default_rng(4)
    c, t = rng.normal(100, 20, 5000), rng.normal(101, 20, 5000)
    res = non_inferiority(c, t, margin=2.0)
    ref = sps.ttest_ind(t - 2.0, c, equal_var=False, alternative="less")  # H1: mean_t - mean_c < margin
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-2)
    assert res.status == ("pass" if ref.pvalue < 0.05 else "inconclusive")


def test_non_inferiority_refuses_bad_margins() -> None:
    with pytest.raises(ValueError, match="margin"):
        non_inferiority([1, 2, 3], [1, 2, 3], -1.0)


# --- quantiles (p99) ----------------------------------------------------------------------------------------


def test_quantile_diff_is_seeded_and_uses_the_inverted_cdf() -> None:
    rng = np.random.default_rng(5)
    c, t = rng.lognormal(3, 0.5, 3000), rng.lognormal(3, 0.5, 3000)
    a, b = quantile_diff(c, t, n_boot=500, seed=1), quantile_diff(c, t, n_boot=500, seed=1)
    assert np.array_equal(a.boot_diff, b.boot_diff)
    assert not np.array_equal(a.boot_diff, quantile_diff(c, t, n_boot=500, seed=2).boot_diff)
    assert a.control_quantile == np.quantile(c, 0.99, method="inverted_cdf")
    assert a.diff == a.treatment_quantile - a.control_quantile
    low, high = a.ci(0.05)
    assert low < 0 < high  # same distribution


def test_p99_guardrail_catches_a_slowdown_and_passes_no_change() -> None:
    rng = np.random.default_rng(6)
    c = rng.lognormal(3, 0.5, 5000)
    slow = quantile_non_inferiority(c, rng.lognormal(3, 0.5, 5000) * 1.3, 0.10, n_boot=500)
    assert slow.status == "fail" and slow.estimate > 0.1 and slow.p_value > 0.5
    same = quantile_non_inferiority(c, rng.lognormal(3, 0.5, 5000), 0.25, n_boot=500)
    assert same.status == "pass" and same.bound < 0.25 and same.p_value < 0.05


def test_cluster_bootstrap_is_wider_when_requests_of_a_user_are_correlated() -> None:
    rng = np.random.default_rng(8)
    users = np.repeat(np.arange(300), 20)
    level = rng.lognormal(0, 0.6, 300)[users]  # each user's own latency level
    c, t = level * rng.lognormal(3, 0.1, users.size), rng.permutation(level) * rng.lognormal(3, 0.1, users.size)
    naive = quantile_diff(c, t, 0.9, n_boot=400, seed=0)
    clustered = quantile_diff(c, t, 0.9, n_boot=400, seed=0, control_units=users, treatment_units=users)
    assert np.std(clustered.boot_diff) > 1.5 * np.std(naive.boot_diff)


# --- decide -------------------------------------------------------------------------------------------------


SRM_OK = SRMResult(0.1, 0.75, False, 1, (500.0, 500.0), 0.001)
SRM_BAD = SRMResult(30.0, 4e-8, True, 1, (500.0, 500.0), 0.001)


def _primary(diff: float, se: float = 0.01, n: int = 10_000) -> SequentialResult:
    md = MeanDiff(0.1, 0.1 + diff, diff, se, diff / 0.1, se / 0.1, n // 2, n // 2, math.inf)
    return sequential_result(md, tau=0.01)


def _guard(status: str, name: str = "p99_ms") -> GuardrailResult:
    return GuardrailResult(name, status, 0.01, 0.02, 0.10, 0.01, 0.05, True, True)  # type: ignore[arg-type]


BETTER, WORSE, FLAT = _primary(0.05), _primary(-0.05), _primary(0.001)


@pytest.mark.parametrize(
    "srm, primary, guards, kw, verdict, reason",
    [
        (SRM_BAD, BETTER, [_guard("pass")], {}, "invalid", "sample ratio mismatch"),
        (
            SRM_OK,
            BETTER,
            [_guard("pass"), _guard("fail", "fallback_rate")],
            {},
            "stop",
            "guardrail fallback_rate failed",
        ),
        (SRM_OK, BETTER, [_guard("pass")], {}, "ship", "significantly better"),
        (SRM_OK, BETTER, [_guard("pass")], {"min_units": 20_000}, "keep_running", "minimum sample"),
        (SRM_OK, WORSE, [_guard("pass")], {"min_units": 20_000}, "stop", "significantly worse"),
        (SRM_OK, BETTER, [_guard("inconclusive")], {}, "keep_running", "not shown non-inferior"),
        (SRM_OK, BETTER, [_guard("inconclusive")], {"max_units": 10_000}, "stop", "non-inferior: ['p99_ms'] at max"),
        (SRM_OK, FLAT, [_guard("pass")], {}, "keep_running", "no significant difference yet"),
        (SRM_OK, FLAT, [_guard("pass")], {"max_units": 10_000}, "stop", "no detectable difference at max sample"),
        (
            SRM_OK,
            FLAT,
            [_guard("pass")],
            {"days": 28, "max_days": 28},
            "stop",
            "no detectable difference at max sample",
        ),
        (SRM_OK, WORSE, [_guard("pass")], {"higher_is_better": False}, "ship", "significantly better"),
    ],
)
def test_decide(
    srm: SRMResult, primary: SequentialResult, guards: list[GuardrailResult], kw: dict, verdict: str, reason: str
) -> None:
    out = decide(srm, primary, guards, **{"min_units": 1000, **kw})  # type: ignore[arg-type]
    assert out.decision == verdict
    assert any(reason in r for r in out.reasons), out.reasons


def test_decide_end_to_end_on_simulated_data() -> None:
    rng = np.random.default_rng(9)
    c, t = rng.binomial(1, 0.10, 20_000).astype(float), rng.binomial(1, 0.12, 20_000).astype(float)
    srm = srm_test([c.size, t.size], [0.5, 0.5])
    primary = sequential_looks([(c[:10_000], t[:10_000]), (c, t)], tau=0.01)[-1]
    guard = non_inferiority(
        rng.normal(50, 10, 20_000), rng.normal(50, 10, 20_000), 0.05, relative=True, name="mean_latency"
    )
    out = decide(srm, primary, [guard], min_units=10_000)
    assert out.decision == "ship", out.reasons


# --- power / MDE --------------------------------------------------------------------------------------------


def test_mde_and_sample_size_by_hand() -> None:
    # z_.975 + z_.8 = 1.959964 + 0.841621 = 2.801585; mde = 2.801585 * 1 * sqrt(2/1000) = 0.125291
    assert mde(1.0, 1000) == pytest.approx(0.125291, abs=1e-6)
    assert sample_size_per_arm(mde(1.0, 1000), 1.0) in (1000, 1001)
    # 10 % -> 10.5 % hit rate, average variance: statsmodels' NormalIndPower gave 57,756 per arm (anchor note)
    sd = math.sqrt((0.10 * 0.90 + 0.105 * 0.895) / 2)
    assert sample_size_per_arm(0.005, sd) == pytest.approx(57_756, rel=1e-3)


# --- tea-tasting oracle -------------------------------------------------------------------------------------


def test_cuped_and_srm_match_tea_tasting() -> None:
    import pandas as pd
    import tea_tasting as tt  # a test dependency (pyproject [test]): the independent oracle
    rng = np.random.default_rng(3)
    n_c, n_t = 2000, 2100
    variant = np.r_[np.zeros(n_c, int), np.ones(n_t, int)]
    x = rng.normal(10, 2, variant.size)
    y = 0.8 * x + rng.normal(0, 1, variant.size) + 0.1 * variant
    ref = tt.Experiment(m=tt.Mean("y", "x"), sr=tt.SampleRatio(method="norm", correction=False)).analyze(
        pd.DataFrame({"variant": variant, "y": y, "x": x}), control=0
    )
    c, t, _ = cuped_arms(y[:n_c], x[:n_c], y[n_c:], x[n_c:])
    ours = diff_in_means(c, t)
    assert ours.diff == pytest.approx(ref["m"].effect_size, rel=1e-9)
    assert (ours.control_mean, ours.treatment_mean) == pytest.approx((ref["m"].control, ref["m"].treatment))
    assert ours.p_value() == pytest.approx(ref["m"].pvalue, rel=1e-6)
    assert ours.ci() == pytest.approx((ref["m"].effect_size_ci_lower, ref["m"].effect_size_ci_upper), rel=1e-6)
    assert srm_test([n_c, n_t], [0.5, 0.5]).p_value == pytest.approx(ref["sr"].pvalue, rel=1e-9)
