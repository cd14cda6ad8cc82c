"""Report statistics against independent references: t tables, closed forms, quadrature, hand formulas."""

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cdgrad.experiments import report
from cdgrad.experiments.config import RunConfig
from cdgrad.experiments.store import Run

# Two-sided 95 % (upper 0.975) and one-sided 95 % (upper 0.95) critical values from published t tables.
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    15: 2.131,
    20: 2.086,
    24: 2.064,
    30: 2.042,
    60: 2.000,
    120: 1.980,
}
T95 = {1: 6.314, 2: 2.920, 5: 2.015, 10: 1.812, 20: 1.725, 30: 1.697, 120: 1.658}
T995 = {1: 63.657, 4: 4.604, 9: 3.250, 24: 2.797}


@pytest.mark.parametrize("table, level", [(T975, 0.95), (T95, 0.90), (T995, 0.99)])
def test_confidence_intervals_use_the_published_t_quantiles(table, level):
    """The half-width of the CI of n = df + 1 values is t_{(1+level)/2, df} s / sqrt(n), t from a printed table."""
    for df, value in table.items():
        xs = [float(i % 7) for i in range(df + 1)] if df > 1 else [0.0, 1.0]
        m, s = report.mean_std(xs)
        lo, hi = report.confidence_interval(xs, level)
        assert (hi - m) * math.sqrt(len(xs)) / s == pytest.approx(value, abs=6e-4)
        assert m - lo == pytest.approx(hi - m, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.floats(-50, 50), st.floats(-20, 20), st.floats(0.1, 5.0))
@example(0.0, 0.0, 1.0)
def test_welch_p_closed_form_at_two_degrees_of_freedom(x, y, d):
    """Two pairs with the same spread: Welch's df is exactly 2, where P(|T| > t) = 1 - |t| / sqrt(2 + t^2)."""
    t, df, p = report.welch_test([x, x + d], [y, y + d])
    assert df == pytest.approx(2.0, rel=1e-12)
    assert t == pytest.approx(math.sqrt(2) * (x - y) / d, rel=1e-9, abs=1e-9)  # s^2 = d^2 / 2 in each pair
    assert p == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), abs=1e-10)


def test_confidence_interval_by_hand():
    xs = [91.0, 92.5, 90.0, 93.0]
    m = sum(xs) / 4
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / 3)
    lo, hi = report.confidence_interval(xs)
    assert (lo, hi) == pytest.approx((m - 3.182 * s / 2, m + 3.182 * s / 2), abs=2e-3)
    assert report.mean_std(xs) == pytest.approx((m, s), abs=1e-12)
    assert all(math.isnan(v) for v in report.confidence_interval([1.0]))


def test_welch_by_hand_and_against_the_table():
    a, b = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1], [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8]
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t_ref = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df_ref = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t, df, p = report.welch_test(a, b)
    assert (t, df) == pytest.approx((t_ref, df_ref), rel=1e-12) and 0.0 < p < 1.0
    # equal variances and sizes: df = 2n - 2; a t equal to the tabled 0.975 point gives p = 0.05
    n = 6
    x = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    s = np.std(x, ddof=1)
    shift = T975[10] * s * math.sqrt(2 / n)
    t, df, p = report.welch_test([v + shift for v in x], x)
    assert df == pytest.approx(10, abs=1e-12) and t == pytest.approx(T975[10]) and p == pytest.approx(0.05, abs=1e-4)
    assert all(math.isnan(v) for v in report.welch_test([1.0], [1.0, 2.0]))
    assert all(math.isnan(v) for v in report.welch_test([1.0, 1.0], [1.0, 1.0]))  # 0/0: degenerate


def test_equal_variance_test_by_hand():
    """Brown-Forsythe: one-way ANOVA of |x - median|; with two groups F = t^2 of the pooled t-test on them, and
    F at the printed F_{0.95}(1, 10) = 4.965 gives p = 0.05."""
    a, b = [1.0, 2.0, 4.0, 7.0, 11.0, 16.0], [3.0, 3.5, 4.0, 4.2, 5.0, 6.0]
    za = np.abs(np.array(a) - np.median(a))
    zb = np.abs(np.array(b) - np.median(b))
    sp = math.sqrt((np.var(za, ddof=1) + np.var(zb, ddof=1)) / 2)
    f_ref = ((za.mean() - zb.mean()) / (sp * math.sqrt(2 / 6))) ** 2
    p = report.variance_test(a, b)

    # scale b's deviations by k (a spread k times b's) until F equals the tabled 0.95 point: p must be 0.05
    def f_of(k: float) -> float:
        sp_k = math.sqrt((np.var(za, ddof=1) + np.var(zb * k, ddof=1)) / 2)
        return float(((za.mean() - k * zb.mean()) / (sp_k * math.sqrt(2 / 6))) ** 2)

    assert f_ref > 4.965 and p < 0.05
    lo, hi = 1.0, float(za.mean() / zb.mean())  # F falls from f_ref to 0 on this interval
    for _ in range(100):
        k = 0.5 * (lo + hi)
        lo, hi = (k, hi) if f_of(k) > 4.965 else (lo, k)
    scaled = [float(np.median(b) + k * (v - np.median(b))) for v in b]
    assert report.variance_test(a, scaled) == pytest.approx(0.05, abs=2e-3)
    assert math.isnan(report.variance_test([1.0], [1.0, 2.0]))
    assert math.isnan(report.variance_test([2.0, 2.0], [5.0, 5.0]))  # constant samples: F = 0/0
    assert math.isnan(report.variance_test([1.0, 2.0], [5.0, 7.0]))  # two values each: degenerate


# ------------------------------------------------------------------------------- degenerate input: nan, "-"
FINITE = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(st.tuples(FINITE, FINITE), st.tuples(FINITE, FINITE))
@example((60.4, 56.2), (56.2, 58.2))  # the rounded median once gave p = 1.04e-29
def test_variance_test_of_two_values_per_sample_is_nan(a, b):
    """Two values deviate equally from their median, so neither sample has spread of deviations: F = x/0."""
    assert math.isnan(report.variance_test(list(a), list(b)))


@settings(max_examples=100, deadline=None)
@given(FINITE, FINITE, st.integers(2, 12), st.integers(2, 12))
@example(0.1, 0.2, 3, 3)  # float means of [0.1] * 3 are not 0.1: a spread of 1.7e-17 once gave p = 1.8e-46
@example(0.1, 0.1, 3, 3)
def test_constant_samples_have_zero_spread_and_no_test(v, w, n, m):
    a, b = [v] * n, [w] * m
    assert report.mean_std(a) == (v, 0.0)  # exactly: no round-off spread
    assert report.confidence_interval(a) == (v, v)
    assert all(math.isnan(x) for x in report.welch_test(a, b))  # t = x/0, df = 0/0
    assert math.isnan(report.variance_test(a, b))  # F = 0/0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_value_makes_every_statistic_nan(bad):
    xs, other = [90.0, bad, 91.0], [92.0, 93.5, 92.5]
    assert all(math.isnan(v) for v in (*report.mean_std(xs), *report.confidence_interval(xs)))
    assert all(math.isnan(v) for v in (*report.welch_test(xs, other), *report.welch_test(other, xs)))
    assert math.isnan(report.variance_test(xs, other)) and math.isnan(report.variance_test(other, xs))
    assert math.isnan(report.error_reduction(bad, 90.0)) and math.isnan(report.error_reduction(90.0, bad))
    assert math.isnan(report.error_reduction(100.0, 90.0))  # no baseline error to reduce


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 100, allow_nan=False), min_size=3, max_size=10),
    st.lists(st.floats(0, 100, allow_nan=False), min_size=3, max_size=10),
)
def test_welch_and_brown_forsythe_match_scipy_away_from_degenerate_input(a, b):
    """Against `scipy.stats` (float arithmetic) where the spreads are far from round-off."""
    from scipy import stats

    za, zb = (np.abs(np.array(x) - np.median(x)) for x in (a, b))
    if min(np.ptp(a), np.ptp(b)) > 1e-3:
        ref = stats.ttest_ind(a, b, equal_var=False)
        t, df, p = report.welch_test(a, b)
        assert (t, df, p) == pytest.approx((ref.statistic, ref.df, ref.pvalue), rel=1e-7, abs=1e-12)
    within = sum(np.var(z) * len(z) for z in (za, zb))
    if within > 1e-3 * max(1.0, float(np.max(np.concatenate([za, zb])))) ** 2:
        ref_p = stats.levene(a, b, center="median").pvalue
        assert report.variance_test(a, b) == pytest.approx(ref_p, rel=1e-6, abs=1e-12)


def test_degenerate_statistics_are_shown_as_a_dash():
    runs = [_run("none", s, a) for s, a in enumerate([56.2, 58.2])]
    runs += [_run("h0", s, a, lam=1.0) for s, a in enumerate([60.4, 56.2])]
    runs += [_run("sobolev", s, 57.0, lam=1.0) for s in range(2)]
    (setting,) = report.summarize(runs)
    base, h0, sob = setting.rows
    assert math.isnan(h0.variance_p) and 0.0 < h0.p_value < 1.0 and math.isnan(sob.variance_p)
    lines = report.markdown([setting]).splitlines()
    h0_cells = next(line for line in lines if line.startswith("| h0")).split(" | ")
    assert h0_cells[-3] == "-" and h0_cells[-4] == format(h0.p_value, ".2g")  # equal-variance p, Welch p
    assert "e-" not in "".join(lines)  # no tiny p from round-off anywhere


def test_error_reduction_is_the_papers():
    assert report.error_reduction(90.0, 92.0) == pytest.approx(0.2)  # err 10 -> 8
    assert report.error_reduction(93.24, 93.57) == pytest.approx((6.76 - 6.43) / 6.76)
    assert report.error_reduction(95.0, 94.0) == pytest.approx(-0.2)


def _run(method, seed, acc, **kw):
    config = RunConfig(dataset="cifar10", model="resnet56", batch_size=128, method=method, **kw)
    return Run(
        f"{method}{seed}{kw}", seed, config, "0", {}, {"test_epoch": [1], "test_acc": [acc]}, {"test_acc": acc}, 1.0, ""
    )


def test_summary_table_groups_settings_and_uses_published_numbers():
    runs = [_run("none", s, a) for s, a in enumerate([93.0, 93.4, 92.9])]
    runs += [_run("h0", s, a, lam=1.0, convention="paper") for s, a in enumerate([93.6, 93.5, 93.8])]
    runs += [_run("none", 0, 90.0, lr=0.2), _run("none", 1, 91.0, lr=0.2)]
    settings_ = report.summarize(runs)
    assert len(settings_) == 2
    main = next(s for s in settings_ if s.setting["lr"] == 0.01)
    base, h0 = main.rows
    assert base.label == "none" and h0.label == "h0 lam=1 (paper)"
    assert h0.reduction == pytest.approx(report.error_reduction(base.mean, h0.mean))
    assert h0.p_value == pytest.approx(report.welch_test(h0.accs, base.accs)[2])
    assert (base.paper, h0.paper) == (93.24, 93.57)
    text = report.markdown(settings_)
    assert text.count("| method |") == 2 and "93.57" in text and "| paper |" in text
    assert "| h0 lam=1 (paper) | 3 | 93.63 ± 0.15 |" in text


def _stored(method, seed, acc, status="completed", env=None, **kw):
    run = _run(method, seed, acc, **kw)
    return Run(run.key, run.seed, run.config, run.version, env or {}, run.curves, run.final, 1.0, "", status=status)


def test_diverged_runs_are_counted_not_averaged():
    runs = [_stored("none", s, a) for s, a in enumerate([93.0, 93.4, 92.9])]
    runs += [_stored("h0", s, a, lam=1.0) for s, a in enumerate([93.6, 93.5])]
    runs += [_stored("h0", 2, math.nan, status="diverged", lam=1.0), _stored("h0", 3, 10.0, "diverged", lam=1.0)]
    (st,) = report.summarize(runs)
    base, h0 = st.rows
    assert (base.diverged, h0.diverged) == (0, 2)
    assert h0.accs == [93.6, 93.5] and h0.mean == pytest.approx(93.55)
    assert h0.p_value == pytest.approx(report.welch_test([93.6, 93.5], base.accs)[2])
    text = report.markdown([st])
    assert "| method | seeds | diverged | test acc" in text
    assert "| h0 lam=1 | 2 | 2 | 93.55 ± 0.07 |" in text and "| none | 3 | 0 |" in text
    assert "2 runs diverged" in text
    # no diverged run: the table keeps its usual columns
    assert "diverged" not in report.markdown(report.summarize(runs[:5]))


def test_a_method_whose_runs_all_diverged():
    runs = [_stored("none", s, a) for s, a in enumerate([93.0, 93.4])]
    runs += [_stored("sobolev", s, math.nan, status="diverged", lam=1.0) for s in range(3)]
    (st,) = report.summarize(runs)
    row = st.rows[1]
    assert row.accs == [] and row.diverged == 3 and math.isnan(row.mean)
    text = report.markdown([st])
    assert "| sobolev lam=1 | 0 | 3 | - ± - | [-, -] | - | - |" in text


def test_mixed_kernel_paths_and_thread_counts_are_noted():
    same = {"kernel": "native", "threads": 2}
    runs = [_stored("none", s, 93.0 + s / 10, env=same) for s in range(3)]
    assert report.summarize(runs)[0].notes == []
    assert "Note:" not in report.markdown(report.summarize(runs))
    runs.append(_stored("h0", 0, 93.1, env={"kernel": "reference", "threads": 2}, lam=1.0))
    runs.append(_stored("h0", 1, 93.2, env={"kernel": "native", "threads": 1}, lam=1.0))
    (st,) = report.summarize(runs)
    assert len(st.notes) == 2
    text = report.markdown([st])
    assert "mix kernel paths (native: 4 runs, reference: 1 run)" in text
    assert "mix thread counts (1: 1 run, 2: 4 runs)" in text
    # runs stored before the kernel path was recorded: no note unless a recorded one differs
    old = [_stored("none", s, 93.0, env={}) for s in range(2)]
    assert report.summarize(old)[0].notes == []
    (st,) = report.summarize(old + [_stored("none", 2, 93.0, env=same)])
    assert any("not recorded: 2 runs" in n for n in st.notes)


def test_rows_follow_the_method_registry():
    from cdgrad.experiments.methods import METHODS

    methods = list(METHODS)
    runs = [_stored(m, 0, 90.0 + i) for i, m in enumerate(reversed(methods))]
    (st,) = report.summarize(runs)
    assert [r.config.method for r in st.rows] == methods


def test_wall_time_relative_to_the_baseline():
    """Mean wall time of each row's completed runs over the baseline's; diverged runs and missing baselines aside."""

    def timed(method, seed, wall, status="completed", **kw):
        run = _run(method, seed, 90.0 + seed, **kw)
        return Run(run.key, seed, run.config, "0", {}, run.curves, run.final, wall, "", status=status)

    runs = [timed("none", 0, 10.0), timed("none", 1, 14.0)]
    runs += [timed("opnorm", 0, 30.0, clip_norm=1.0), timed("opnorm", 1, 42.0, clip_norm=1.0)]
    runs.append(timed("opnorm", 2, 1000.0, "diverged", clip_norm=1.0))
    (st,) = report.summarize(runs)
    base, clip = st.rows
    assert (base.seconds, clip.seconds) == (12.0, 36.0)
    text = report.markdown([st])
    assert "| wall time vs SGD |" in text
    lines = text.splitlines()
    assert "| baseline | - | - | 1.00x |" in lines[4] and lines[5].startswith("| opnorm clip_norm=1 | 2 | 1 |")
    assert "| 3.00x |" in lines[5]
    (alone,) = report.summarize(runs[2:4])
    assert report.markdown([alone]).splitlines()[4].endswith("| - | - |")


def test_sgs_published_numbers_only_for_the_papers_setting():
    c100 = RunConfig(dataset="cifar100", model="vgg11", batch_size=128, lr=0.1)
    assert report.published(c100) == 70.8
    assert report.published(c100.replace(method="sgs")) == 73.2
    assert report.published(c100.replace(model="resnet18", method="sgs")) == 78.8
    assert report.published(c100.replace(method="sgs", sgs_on="update")) is None  # not the paper's variant
    assert report.published(c100.replace(method="dbb")) is None  # no number known here
    assert report.published(c100.replace(batch_size=64)) is None
    assert report.published(c100.replace(optimizer="adam")) is None
