"""Statistics that decide an A/B test of two model versions on per-user data.

The unit of analysis is the unit of assignment (the user), so every metric arrives as one value per user
(or, for ratio metrics such as CTR, a numerator and a denominator per user, handled with the delta method).
What is here, and why:

- :func:`srm_test`: a sample-ratio mismatch (chi-square goodness of fit) means the assignment or the logging
  is broken; no effect estimate can be trusted then.
- :func:`cuped` / :func:`cuped_arms`: CUPED lowers the variance with a pre-period covariate. Theta is fitted on
  both arms pooled, so that the adjustment is the same function of x in both arms and the estimate stays
  unbiased.
- :func:`diff_in_means` / :func:`ratio_diff`: the difference (absolute and relative) with its standard error
  (Welch; delta method for the relative lift and for ratio metrics).
- :func:`msprt` / :func:`sequential_looks`: the mixture sequential probability ratio test (Johari, Pekelis,
  Walsh, "Always Valid Inference", 2017) with a normal mixture N(0, tau^2) over the effect. Its p-value and
  confidence interval stay valid however often the test is looked at, so a daily dashboard cannot inflate the
  false positive rate (a naive z-test looked at 20 times rejects an A/A about 25 % of the time at 5 %).
- :func:`non_inferiority`, :func:`quantile_non_inferiority`: one-sided guardrail tests against a margin, with
  a (cluster-)bootstrap for p99 latency, whose sampling distribution has no simple closed form.
- :func:`decide`: the ship / stop / keep_running / invalid rule on top of these results.
- :func:`mde`, :func:`sample_size_per_arm`: fixed-horizon power by the normal approximation (scipy only).

Everything is large-sample (normal) inference unless said otherwise; the functions refuse NaN/inf values
rather than silently dropping them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats as sps

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]
GuardrailStatus = Literal["pass", "fail", "inconclusive"]
Verdict = Literal["ship", "stop", "keep_running", "invalid"]


def _values(data: ArrayLike, name: str, min_len: int = 2) -> FloatArray:
    """1-D float array of finite values with at least ``min_len`` entries."""
    arr = np.asarray(data, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size < min_len:
        raise ValueError(f"{name} needs at least {min_len} values, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


# --- sample ratio mismatch -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SRMResult:
    """Chi-square goodness-of-fit of the arm counts against the designed shares."""

    statistic: float
    p_value: float
    mismatch: bool
    dof: int
    expected: tuple[float, ...]
    threshold: float


def srm_test(counts: Sequence[int], expected_shares: Sequence[float], threshold: float = 0.001) -> SRMResult:
    """Sample-ratio mismatch test: flags ``mismatch`` when p < ``threshold``.

    The default threshold is strict (0.001) because the check runs every day on large counts, and a false
    alarm invalidates the whole test. Shares are normalised to sum to 1."""
    obs = np.asarray(counts, dtype=np.float64)
    shares = np.asarray(expected_shares, dtype=np.float64)
    if obs.ndim != 1 or obs.shape != shares.shape or obs.size < 2:
        raise ValueError("counts and expected_shares must be 1-D, of the same length >= 2")
    if np.any(obs < 0) or np.any(shares <= 0) or obs.sum() <= 0:
        raise ValueError("counts must be >= 0 with a positive total, and shares > 0")
    expected = shares / shares.sum() * obs.sum()
    statistic = float(np.sum((obs - expected) ** 2 / expected))
    dof = obs.size - 1
    p_value = float(sps.chi2.sf(statistic, dof))
    return SRMResult(statistic, p_value, p_value < threshold, dof, tuple(expected.tolist()), threshold)


# --- CUPED ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CupedResult:
    """CUPED-adjusted metric ``y - theta * (x - mean(x))`` and the variance it removed (1 - var(adj)/var(y))."""

    adjusted: FloatArray
    theta: float
    variance_reduction: float


def cuped(y: ArrayLike, x: ArrayLike) -> CupedResult:
    """CUPED adjustment of ``y`` by the pre-period covariate ``x`` (same users, same order), with
    theta = cov(y, x) / var(x). Pass both arms pooled (or use :func:`cuped_arms`). When var(x) = 0 the
    covariate carries no information: theta = 0 and ``y`` is returned unchanged."""
    y_arr, x_arr = _values(y, "y"), _values(x, "x")
    if y_arr.shape != x_arr.shape:
        raise ValueError(f"y and x must have the same length, got {y_arr.size} and {x_arr.size}")
    var_x = float(np.var(x_arr, ddof=1))
    if var_x == 0.0:
        logger.warning("CUPED: the covariate is constant; no adjustment")
        return CupedResult(y_arr.copy(), 0.0, 0.0)
    theta = float(np.cov(y_arr, x_arr, ddof=1)[0, 1]) / var_x
    adjusted = y_arr - theta * (x_arr - x_arr.mean())
    var_y = float(np.var(y_arr, ddof=1))
    reduction = 1.0 - float(np.var(adjusted, ddof=1)) / var_y if var_y > 0 else 0.0
    return CupedResult(adjusted, theta, reduction)


def cuped_arms(
    y_control: ArrayLike, x_control: ArrayLike, y_treatment: ArrayLike, x_treatment: ArrayLike
) -> tuple[FloatArray, FloatArray, float]:
    """(adjusted control, adjusted treatment, theta), with theta and mean(x) fitted on both arms pooled."""
    y_c = _values(y_control, "y_control")
    result = cuped(
        np.concatenate([y_c, _values(y_treatment, "y_treatment")]),
        np.concatenate([_values(x_control, "x_control"), _values(x_treatment, "x_treatment")]),
    )
    return result.adjusted[: y_c.size], result.adjusted[y_c.size :], result.theta


# --- difference in means -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeanDiff:
    """Treatment minus control, absolute and relative (treatment / control - 1), with standard errors.

    ``dof`` is the Welch-Satterthwaite degrees of freedom (inf for delta-method ratio metrics)."""

    control_mean: float
    treatment_mean: float
    diff: float
    se: float
    relative: float
    relative_se: float
    n_control: int
    n_treatment: int
    dof: float

    def p_value(self) -> float:
        """Two-sided fixed-horizon p-value (Welch t); valid only if looked at once."""
        if self.se == 0.0:
            return 1.0 if self.diff == 0.0 else 0.0
        return float(2.0 * sps.t.sf(abs(self.diff / self.se), self.dof))

    def ci(self, alpha: float = 0.05) -> tuple[float, float]:
        """Two-sided fixed-horizon (1 - alpha) confidence interval of ``diff`` (Welch t)."""
        _check_alpha(alpha)
        half = float(sps.t.ppf(1.0 - alpha / 2.0, self.dof)) * self.se
        return self.diff - half, self.diff + half


def _mean_diff(mc: float, vc: float, nc: int, mt: float, vt: float, nt: int, dof: float) -> MeanDiff:
    """MeanDiff from each arm's mean and the variance of that mean (``vc``, ``vt``); relative lift by the
    delta method: Var(mt/mc) ~= vt/mc^2 + mt^2 vc/mc^4 (nan when the control mean is 0)."""
    if mc == 0.0:
        relative = relative_se = math.nan
    else:
        relative = mt / mc - 1.0
        relative_se = math.sqrt(vt / mc**2 + mt**2 * vc / mc**4)
    return MeanDiff(mc, mt, mt - mc, math.sqrt(vc + vt), relative, relative_se, nc, nt, dof)


def _welch_dof(vc: float, nc: int, vt: float, nt: int) -> float:
    """Welch-Satterthwaite dof from the variances of the two means."""
    denom = vc**2 / (nc - 1) + vt**2 / (nt - 1)
    return (vc + vt) ** 2 / denom if denom > 0 else math.inf


def diff_in_means(control: ArrayLike, treatment: ArrayLike) -> MeanDiff:
    """Difference in means of per-user values with the Welch standard error sqrt(s_c^2/n_c + s_t^2/n_t)."""
    c, t = _values(control, "control"), _values(treatment, "treatment")
    vc, vt = float(np.var(c, ddof=1)) / c.size, float(np.var(t, ddof=1)) / t.size
    return _mean_diff(float(c.mean()), vc, c.size, float(t.mean()), vt, t.size, _welch_dof(vc, c.size, vt, t.size))


def _ratio_mean_and_var(num: FloatArray, den: FloatArray) -> tuple[float, float]:
    """sum(num)/sum(den) and the delta-method variance of that ratio (units are users, not events)."""
    mean_den = float(den.mean())
    if mean_den == 0.0:
        raise ValueError("ratio metric: the denominators sum to 0")
    ratio = float(num.sum() / den.sum())
    linearised = (num - ratio * den) / mean_den
    return ratio, float(np.var(linearised, ddof=1)) / num.size


def ratio_diff(
    num_control: ArrayLike, den_control: ArrayLike, num_treatment: ArrayLike, den_treatment: ArrayLike
) -> MeanDiff:
    """Difference of ratio metrics (e.g. CTR = clicks / impressions per user) with delta-method errors:
    events of one user are correlated, so treating impressions as independent would understate the SE."""
    arms = []
    for num, den, name in ((num_control, den_control, "control"), (num_treatment, den_treatment, "treatment")):
        n_arr, d_arr = _values(num, f"num_{name}"), _values(den, f"den_{name}")
        if n_arr.shape != d_arr.shape:
            raise ValueError(f"{name}: numerator and denominator lengths differ")
        arms.append((*_ratio_mean_and_var(n_arr, d_arr), n_arr.size))
    (mc, vc, nc), (mt, vt, nt) = arms
    return _mean_diff(mc, vc, nc, mt, vt, nt, math.inf)


# --- always-valid sequential test (mSPRT) ---------------------------------------------------------------------


def always_valid(estimate: float, se: float, tau: float, alpha: float = 0.05) -> tuple[float, float, float]:
    """(p-value, ci_low, ci_high) of the normal-mixture SPRT at one look, for an asymptotically normal
    ``estimate`` ~ N(delta, se^2) of the effect delta and the mixture delta ~ N(0, tau^2).

    With V = se^2 the mixture likelihood ratio against delta = d0 is
        L(d0) = sqrt(V / (V + tau^2)) * exp(tau^2 (estimate - d0)^2 / (2 V (V + tau^2)))
    and p = min(1, 1 / L(0)). The confidence set {d0 : L(d0) < 1/alpha} is estimate +- r with
        r^2 = 2 V (V + tau^2) / tau^2 * (log(1/alpha) + log((V + tau^2) / V) / 2).
    Choose tau near the smallest effect worth detecting: the test is most sensitive there."""
    _check_alpha(alpha)
    if tau <= 0 or se < 0 or not math.isfinite(estimate):
        raise ValueError(f"need tau > 0, se >= 0 and a finite estimate (tau={tau}, se={se}, estimate={estimate})")
    if se == 0.0:
        return (1.0 if estimate == 0.0 else 0.0), estimate, estimate
    v, t2 = se * se, tau * tau
    log_lr = 0.5 * math.log(v / (v + t2)) + t2 * estimate**2 / (2.0 * v * (v + t2))
    p_value = 1.0 if log_lr <= 0.0 else math.exp(-log_lr)
    half = math.sqrt(2.0 * v * (v + t2) / t2 * (math.log(1.0 / alpha) + 0.5 * math.log((v + t2) / v)))
    return p_value, estimate - half, estimate + half


@dataclass(frozen=True)
class SequentialResult:
    """Always-valid result at one look: p-value and confidence intervals (absolute and relative lift).

    From :func:`sequential_looks` the p-value is the running minimum over the looks so far and the intervals
    are the running intersections, which are still always valid and never widen."""

    n_control: int
    n_treatment: int
    estimate: MeanDiff
    p_value: float
    ci_low: float
    ci_high: float
    rel_ci_low: float
    rel_ci_high: float
    alpha: float
    tau: float
    relative_tau: float

    @property
    def diff(self) -> float:
        return self.estimate.diff

    @property
    def relative(self) -> float:
        return self.estimate.relative


def msprt(
    control: ArrayLike, treatment: ArrayLike, tau: float, alpha: float = 0.05, relative_tau: float | None = None
) -> SequentialResult:
    """Always-valid test of the difference in means at one look (no running min/intersection: see
    :func:`sequential_looks`). ``tau`` is in the metric's units; ``relative_tau`` (for the relative lift)
    defaults to tau / |control mean|."""
    return sequential_result(diff_in_means(control, treatment), tau, alpha, relative_tau)


def sequential_result(
    estimate: MeanDiff, tau: float, alpha: float = 0.05, relative_tau: float | None = None
) -> SequentialResult:
    """:func:`msprt` for an estimate computed elsewhere (e.g. :func:`ratio_diff`, or on CUPED-adjusted data)."""
    if relative_tau is None:
        relative_tau = tau / abs(estimate.control_mean) if estimate.control_mean else math.nan
    p_value, low, high = always_valid(estimate.diff, estimate.se, tau, alpha)
    rel_low = rel_high = math.nan
    if math.isfinite(estimate.relative) and math.isfinite(relative_tau):
        _, rel_low, rel_high = always_valid(estimate.relative, estimate.relative_se, relative_tau, alpha)
    return SequentialResult(
        estimate.n_control,
        estimate.n_treatment,
        estimate,
        p_value,
        low,
        high,
        rel_low,
        rel_high,
        alpha,
        tau,
        relative_tau,
    )


def _tighten(previous: SequentialResult, current: SequentialResult) -> SequentialResult:
    """Running minimum of the p-value and running intersection of the intervals."""

    def inter(lo_a: float, hi_a: float, lo_b: float, hi_b: float) -> tuple[float, float]:
        if math.isnan(lo_a):
            return lo_b, hi_b
        return max(lo_a, lo_b), min(hi_a, hi_b)

    low, high = inter(previous.ci_low, previous.ci_high, current.ci_low, current.ci_high)
    rel_low, rel_high = inter(previous.rel_ci_low, previous.rel_ci_high, current.rel_ci_low, current.rel_ci_high)
    if low > high:
        logger.warning("mSPRT: the running confidence intervals no longer intersect (a rare miscoverage)")
    return SequentialResult(
        current.n_control,
        current.n_treatment,
        current.estimate,
        min(previous.p_value, current.p_value),
        low,
        high,
        rel_low,
        rel_high,
        current.alpha,
        current.tau,
        current.relative_tau,
    )


def sequential_looks(
    looks: Iterable[tuple[ArrayLike, ArrayLike]], tau: float, alpha: float = 0.05, relative_tau: float | None = None
) -> list[SequentialResult]:
    """mSPRT over a sequence of looks, each ``(control, treatment)`` holding all the per-user data up to that
    look (cumulative, see :func:`cumulative_looks`). Returns one result per look with running-minimum
    p-values and running-intersection intervals: what to plot as the cumulative effect over time. When not
    given, ``relative_tau`` is fixed at the first look (tau / |control mean| there) so the mixture does not
    change between looks."""
    results: list[SequentialResult] = []
    for control, treatment in looks:
        estimate = diff_in_means(control, treatment)
        if relative_tau is None and estimate.control_mean:
            relative_tau = tau / abs(estimate.control_mean)
        current = sequential_result(estimate, tau, alpha, relative_tau if relative_tau is not None else math.nan)
        results.append(_tighten(results[-1], current) if results else current)
    return results


def cumulative_looks(
    control: ArrayLike, control_day: ArrayLike, treatment: ArrayLike, treatment_day: ArrayLike
) -> list[tuple[FloatArray, FloatArray]]:
    """Cumulative looks from per-user values and the day (look index) each user entered the test: look d
    holds the users with day <= d, for every distinct day in either arm, in increasing order."""
    c, t = _values(control, "control", 1), _values(treatment, "treatment", 1)
    dc, dt = np.asarray(control_day), np.asarray(treatment_day)
    if dc.shape != c.shape or dt.shape != t.shape:
        raise ValueError("each arm needs one day per value")
    return [(c[dc <= day], t[dt <= day]) for day in np.unique(np.concatenate([dc, dt]))]


# --- guardrails: non-inferiority -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardrailResult:
    """One-sided non-inferiority test of a guardrail.

    ``estimate`` is treatment minus control (relative: treatment / control - 1). ``threshold`` is the worst
    acceptable estimate (+margin when lower is better, -margin when higher is better) and ``bound`` the
    (1 - alpha) one-sided confidence bound on the side that must clear it. ``status``: "pass" when the bound
    clears the threshold (non-inferiority shown), "fail" when even the opposite bound is beyond the threshold
    (harm beyond the margin shown), "inconclusive" otherwise (not enough data yet). ``p_value`` is the
    one-sided p-value of H0 "worse than the threshold"."""

    name: str
    status: GuardrailStatus
    estimate: float
    bound: float
    threshold: float
    p_value: float
    alpha: float
    relative: bool
    lower_is_better: bool

    @property
    def passed(self) -> bool:
        return self.status == "pass"


def _check_margin(margin: float) -> None:
    if not margin >= 0 or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")


def _status(worse_low: float, worse_high: float, margin: float) -> GuardrailStatus:
    """Status from the one-sided bounds of the degradation (positive = worse)."""
    if worse_high < margin:
        return "pass"
    return "fail" if worse_low > margin else "inconclusive"


def non_inferiority_from_diff(
    diff: MeanDiff,
    margin: float,
    *,
    relative: bool = False,
    lower_is_better: bool = True,
    alpha: float = 0.05,
    name: str = "guardrail",
) -> GuardrailResult:
    """:func:`non_inferiority` on an estimate computed elsewhere (e.g. :func:`ratio_diff` for a rate)."""
    _check_alpha(alpha)
    _check_margin(margin)
    estimate, se = (diff.relative, diff.relative_se) if relative else (diff.diff, diff.se)
    if not math.isfinite(estimate):
        raise ValueError(f"{name}: the relative difference is undefined (control mean 0)")
    sign = 1.0 if lower_is_better else -1.0
    worse, z = sign * estimate, float(sps.norm.ppf(1.0 - alpha))
    status = _status(worse - z * se, worse + z * se, margin)
    p_value = float(sps.norm.cdf((worse - margin) / se)) if se > 0 else float(worse >= margin)
    return GuardrailResult(
        name, status, estimate, estimate + sign * z * se, sign * margin, p_value, alpha, relative, lower_is_better
    )


def non_inferiority(
    control: ArrayLike,
    treatment: ArrayLike,
    margin: float,
    *,
    relative: bool = False,
    lower_is_better: bool = True,
    alpha: float = 0.05,
    name: str = "guardrail",
) -> GuardrailResult:
    """Non-inferiority of the mean of per-user values (a per-user rate, a 0/1 flag, a mean latency).

    ``margin`` >= 0 is the largest acceptable degradation, in the metric's units or, with ``relative``, as a
    fraction of the control mean (0.05 = 5 %). ``lower_is_better`` for latency or error rates; False for
    coverage. A fixed-horizon z-test: judged at every look it fails a truly harmless challenger more often
    than alpha, which is why "fail" needs the harm itself to be significant."""
    return non_inferiority_from_diff(
        diff_in_means(control, treatment),
        margin,
        relative=relative,
        lower_is_better=lower_is_better,
        alpha=alpha,
        name=name,
    )


# --- guardrails: quantiles (p99 latency) by bootstrap --------------------------------------------------------


@dataclass(frozen=True)
class QuantileDiff:
    """Difference of q-quantiles (treatment - control, inverted-CDF definition) and its bootstrap draws."""

    q: float
    control_quantile: float
    treatment_quantile: float
    diff: float
    relative: float
    boot_diff: FloatArray
    boot_relative: FloatArray

    def ci(self, alpha: float = 0.05, relative: bool = False) -> tuple[float, float]:
        """Two-sided (1 - alpha) bootstrap percentile interval."""
        draws = self.boot_relative if relative else self.boot_diff
        low, high = np.quantile(draws, [alpha / 2.0, 1.0 - alpha / 2.0])
        return float(low), float(high)


def _units_codes(n: int, units: ArrayLike | None, name: str) -> NDArray[np.intp]:
    """Integer cluster code per value (each value its own cluster when ``units`` is None)."""
    if units is None:
        return np.arange(n)
    arr = np.asarray(units)
    if arr.shape != (n,):
        raise ValueError(f"{name} must give one unit per value")
    return np.unique(arr, return_inverse=True)[1].reshape(-1)


def _boot_quantiles(
    values: FloatArray, codes: NDArray[np.intp], q: float, n_boot: int, rng: np.random.Generator
) -> FloatArray:
    """Bootstrap q-quantiles resampling whole clusters: each draw weights every value by how often its
    cluster was drawn, and the weighted inverted-CDF quantile is read off the sorted values."""
    order = np.argsort(values, kind="stable")
    sorted_values, sorted_codes = values[order], codes[order]
    n_units = int(codes.max()) + 1
    batch = max(1, min(n_boot, 4_000_000 // max(values.size, n_units)))
    out = np.empty(n_boot)
    for start in range(0, n_boot, batch):
        size = min(batch, n_boot - start)
        counts = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=size)
        cum = np.cumsum(counts[:, sorted_codes], axis=1)
        idx = np.argmax(cum >= q * cum[:, -1:] - 1e-9, axis=1)
        out[start : start + size] = sorted_values[idx]
    return out


def quantile_diff(
    control: ArrayLike,
    treatment: ArrayLike,
    q: float = 0.99,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    control_units: ArrayLike | None = None,
    treatment_units: ArrayLike | None = None,
) -> QuantileDiff:
    """Difference of q-quantiles with a seeded bootstrap. Latency is logged per request but users are the
    randomised unit, so pass ``*_units`` (the user of each request) to resample users, not requests:
    requests of one user are correlated, and resampling them independently understates the spread."""
    if not 0.0 < q < 1.0 or n_boot < 100:
        raise ValueError(f"need 0 < q < 1 and n_boot >= 100 (q={q}, n_boot={n_boot})")
    c, t = _values(control, "control"), _values(treatment, "treatment")
    rng = np.random.default_rng(seed)
    boot_c = _boot_quantiles(c, _units_codes(c.size, control_units, "control_units"), q, n_boot, rng)
    boot_t = _boot_quantiles(t, _units_codes(t.size, treatment_units, "treatment_units"), q, n_boot, rng)
    qc = float(np.quantile(c, q, method="inverted_cdf"))
    qt = float(np.quantile(t, q, method="inverted_cdf"))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot_rel = boot_t / boot_c - 1.0
    return QuantileDiff(q, qc, qt, qt - qc, qt / qc - 1.0 if qc else math.nan, boot_t - boot_c, boot_rel)


def quantile_non_inferiority(
    control: ArrayLike,
    treatment: ArrayLike,
    margin: float,
    *,
    q: float = 0.99,
    relative: bool = True,
    lower_is_better: bool = True,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    control_units: ArrayLike | None = None,
    treatment_units: ArrayLike | None = None,
    name: str = "p99",
) -> GuardrailResult:
    """Non-inferiority of a quantile (default p99 latency, relative margin: 0.10 = at most 10 % slower), with
    bootstrap percentile bounds and the bootstrap p-value (share of draws at or beyond the threshold)."""
    _check_alpha(alpha)
    _check_margin(margin)
    res = quantile_diff(
        control, treatment, q, n_boot=n_boot, seed=seed, control_units=control_units, treatment_units=treatment_units
    )
    estimate, draws = (res.relative, res.boot_relative) if relative else (res.diff, res.boot_diff)
    if not math.isfinite(estimate) or not np.all(np.isfinite(draws)):
        raise ValueError(f"{name}: the relative difference is undefined (a control quantile is 0)")
    sign = 1.0 if lower_is_better else -1.0
    worse_low, worse_high = np.quantile(sign * draws, [alpha, 1.0 - alpha])
    status = _status(float(worse_low), float(worse_high), margin)
    p_value = float((np.sum(sign * draws >= margin) + 1) / (draws.size + 1))
    return GuardrailResult(
        name, status, estimate, sign * float(worse_high), sign * margin, p_value, alpha, relative, lower_is_better
    )


# --- the decision ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What to do with the test, and why (one human-readable line per reason)."""

    decision: Verdict
    reasons: tuple[str, ...]


def _primary_direction(primary: SequentialResult, higher_is_better: bool) -> int:
    """+1 significantly better, -1 significantly worse, 0 neither (always-valid p and CI must agree)."""
    if primary.p_value >= primary.alpha:
        return 0
    sign = 1.0 if higher_is_better else -1.0
    low, high = sorted((sign * primary.ci_low, sign * primary.ci_high))
    return 1 if low > 0 else (-1 if high < 0 else 0)


def _at_max(n_units: int, max_units: int | None, days: float | None, max_days: float | None) -> bool:
    return (max_units is not None and n_units >= max_units) or (
        max_days is not None and days is not None and days >= max_days
    )


def decide(
    srm: SRMResult,
    primary: SequentialResult,
    guardrails: Sequence[GuardrailResult],
    *,
    min_units: int,
    max_units: int | None = None,
    days: float | None = None,
    max_days: float | None = None,
    higher_is_better: bool = True,
) -> Decision:
    """ship / stop / keep_running / invalid, in this order of precedence:

    1. SRM mismatch -> invalid (assignment or logging is broken; nothing else can be trusted);
    2. a guardrail fails (harm beyond its margin) -> stop;
    3. primary significantly worse (always-valid) -> stop, even before ``min_units``: stopping is the safe side;
    4. fewer than ``min_units`` users -> keep_running (the normal approximation needs data);
    5. primary significantly better (p < alpha and the CI excludes 0) and every guardrail passes -> ship;
    6. at ``max_units`` users or ``max_days`` days -> stop (no detectable difference, or guardrails not shown
       non-inferior); otherwise keep_running."""
    n_units = primary.n_control + primary.n_treatment
    fmt = (
        f"primary: diff {primary.diff:+.4g} (always-valid CI [{primary.ci_low:.4g}, {primary.ci_high:.4g}], "
        f"p {primary.p_value:.3g}, alpha {primary.alpha}), {n_units} users"
    )
    if srm.mismatch:
        return Decision(
            "invalid",
            (
                f"sample ratio mismatch: p {srm.p_value:.3g} < {srm.threshold} "
                f"(chi2 {srm.statistic:.3g}, expected {[round(e) for e in srm.expected]})",
            ),
        )
    failed = [g for g in guardrails if g.status == "fail"]
    if failed:
        return Decision(
            "stop",
            tuple(
                f"guardrail {g.name} failed: estimate {g.estimate:+.4g} is beyond {g.threshold:+.4g}" for g in failed
            ),
        )
    direction = _primary_direction(primary, higher_is_better)
    if direction < 0:
        return Decision("stop", (f"challenger significantly worse: {fmt}",))
    if n_units < min_units:
        return Decision("keep_running", (f"{n_units} users < minimum sample {min_units}", fmt))
    pending = [g.name for g in guardrails if g.status != "pass"]
    at_max = _at_max(n_units, max_units, days, max_days)
    if direction > 0 and not pending:
        return Decision("ship", (f"challenger significantly better: {fmt}", "all guardrails pass"))
    if direction > 0:
        reason = f"guardrails not shown non-inferior: {pending}"
        return Decision("stop" if at_max else "keep_running", (f"{reason} at max sample" if at_max else reason, fmt))
    if at_max:
        return Decision("stop", ("no detectable difference at max sample", fmt))
    return Decision("keep_running", ("no significant difference yet", fmt))


# --- power / MDE (fixed horizon, normal approximation) -------------------------------------------------------


def _z_sum(alpha: float, power: float) -> float:
    _check_alpha(alpha)
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    return float(sps.norm.ppf(1.0 - alpha / 2.0) + sps.norm.ppf(power))


def mde(sd: float, n_control: float, alpha: float = 0.05, power: float = 0.8, ratio: float = 1.0) -> float:
    """Minimum detectable absolute effect of a two-sided fixed-horizon z-test with ``n_control`` users in
    control and ``ratio * n_control`` in treatment. The always-valid test needs more users for the same
    power: use this as a lower bound when sizing a sequential test."""
    if sd <= 0 or n_control <= 0 or ratio <= 0:
        raise ValueError("sd, n_control and ratio must be > 0")
    return _z_sum(alpha, power) * sd * math.sqrt(1.0 / n_control + 1.0 / (ratio * n_control))


def sample_size_per_arm(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8, ratio: float = 1.0) -> int:
    """Control-arm users needed to detect an absolute ``effect`` (treatment: ``ratio`` times as many); for a
    proportion p use sd = sqrt(p (1 - p)) (or the average of both arms' variances, then the square root)."""
    if effect == 0 or sd <= 0 or ratio <= 0:
        raise ValueError("effect must be != 0, sd and ratio > 0")
    return math.ceil(_z_sum(alpha, power) ** 2 * sd**2 * (1.0 + 1.0 / ratio) / effect**2)
