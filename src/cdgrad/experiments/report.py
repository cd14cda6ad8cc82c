"""Tables of results: mean +- std, 95% confidence interval, error reduction, Welch's t-test, a variance test.

For final test accuracies `x_1..x_n` of one method (distributions from `scipy.stats`):

    mean m, sample std s (ddof 1), 95% CI  m +- t_{0.975, n-1} s / sqrt(n)            (Student t)
    error reduction vs the baseline        (err_base - err) / err_base, err = 100 - accuracy   (the paper's)
    Welch's test vs the baseline           t = (m - m_b) / sqrt(s^2/n + s_b^2/n_b),
                                           df = (s^2/n + s_b^2/n_b)^2 / ((s^2/n)^2/(n-1) + (s_b^2/n_b)^2/(n_b-1)),
                                           two-sided p = 2 P(T_df > |t|)
    equal variances vs the baseline        Brown-Forsythe test (Levene's test on deviations from the median),
                                           two-sided p: the test behind a claim of lower trial-to-trial variance

Means and spreads are computed exactly (rationals, rounded once), so identical seeds have a spread of exactly 0.
A statistic of degenerate input is nan and shown as "-": fewer than two values, a non-finite value, or a test
whose statistic divides by zero (two constant samples in Welch's test; no spread of the median deviations within
either sample in the Brown-Forsythe test, which always holds for two values per sample).

Runs are grouped into settings (everything but the method and its hyper-parameters); each setting's baseline is
its `method=none` group. Rows follow the method registry's order and labels (`cdgrad.experiments.methods`).

Runs stored as diverged (a non-finite loss) are counted in their row's "diverged" column and left out of
every statistic. When the runs of a setting ran on different kernel paths (the native C kernel or the
PyTorch reference) or with different thread counts, whose numbers may differ at round-off, the table says so; a run
resumed with other settings than it started with counts as mixing them (its environment's `segments`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from scipy import stats

from cdgrad.experiments.config import FIELDS, RunConfig, identity_dict
from cdgrad.experiments.methods import describe, sort_key
from cdgrad.experiments.store import Run
from cdgrad.experiments.tasks import TASKS, Task, get_task

# ------------------------------------------------------------------------------------------------ statistics


def _exact(xs: Sequence[float]) -> list[Fraction] | None:
    """The values as exact rationals (every finite float is one); None if any is not a finite number."""
    try:
        return [Fraction(x) for x in xs]
    except (TypeError, ValueError, OverflowError):  # nan, inf, or not a number
        return None


def _moments(xs: Sequence[float]) -> tuple[Fraction, Fraction] | None:
    """Exact mean and sum of squared deviations `sum (x_i - m)^2`; None for an empty or non-finite sample.

    Exact arithmetic keeps a constant sample's spread exactly 0 (a float mean of [0.1, 0.1, 0.1] is not 0.1,
    which would give a standard deviation of 1.7e-17 and a p-value of 1e-46 between two constant samples).
    """
    q = _exact(xs)
    if not q:
        return None
    m = sum(q, Fraction(0)) / len(q)
    return m, sum(((x - m) ** 2 for x in q), Fraction(0))


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation `s = sqrt(sum (x_i - m)^2 / (n - 1))`, computed exactly and rounded once.

    nan std for one value; both nan for none, or when a value is not a finite number (degenerate input).
    """
    mom = _moments(xs)
    if mom is None:
        return math.nan, math.nan
    m, ss = mom
    return float(m), math.sqrt(float(ss / (len(xs) - 1))) if len(xs) > 1 else math.nan


def confidence_interval(xs: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """`m +- t_{(1+level)/2, n-1} s / sqrt(n)`; (nan, nan) for fewer than two values or a non-finite one."""
    n = len(xs)
    if n < 2:
        return math.nan, math.nan
    m, s = mean_std(xs)
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * s / math.sqrt(n)
    return m - half, m + half


def welch_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's unequal-variance t-test: (t, df, two-sided p) with `v = s^2 / n` per sample,

    `t = (m_a - m_b) / sqrt(v_a + v_b)`, `df = (v_a + v_b)^2 / (v_a^2 / (n_a - 1) + v_b^2 / (n_b - 1))`,
    `p = 2 P(T_df > |t|)`; moments exact. All nan where the test is degenerate: a sample with < 2 values or a
    non-finite one, or both samples constant (`v_a + v_b = 0`: t is x/0 and df 0/0).
    """
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, math.nan
    ma_, mb_ = _moments(a), _moments(b)
    if ma_ is None or mb_ is None:
        return math.nan, math.nan, math.nan
    va, vb = ma_[1] / ((len(a) - 1) * len(a)), mb_[1] / ((len(b) - 1) * len(b))
    if va + vb == 0:
        return math.nan, math.nan, math.nan
    t = float(ma_[0] - mb_[0]) / math.sqrt(float(va + vb))
    df = float((va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)))
    return t, df, float(2.0 * stats.t.sf(abs(t), df))


def _median(q: list[Fraction]) -> Fraction:
    s, n = sorted(q), len(q)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def variance_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the Brown-Forsythe test that `a` and `b` have equal variances.

    Levene's test on the absolute deviations from each sample's median, `z_ij = |x_ij - median_i|` (robust to
    non-normal accuracies): with N values in k = 2 groups,
    `F = (N - k) / (k - 1) * sum_i n_i (zbar_i - zbar)^2 / sum_ij (z_ij - zbar_i)^2`, `p = P(F_{k-1, N-k} > F)`,
    as `scipy.stats.levene(center="median")`, with the deviations and F exact. nan where the test is degenerate:
    a sample with < 2 values or a non-finite one, or no spread of the deviations within either sample (two
    values per sample deviate equally from their median; constant samples): F is then x/0 or 0/0.
    """
    if len(a) < 2 or len(b) < 2:
        return math.nan
    qa, qb = _exact(a), _exact(b)
    if qa is None or qb is None:
        return math.nan
    za, zb = ([abs(x - _median(q)) for x in q] for q in (qa, qb))
    groups = [(sum(z, Fraction(0)) / len(z), z) for z in (za, zb)]
    n = len(za) + len(zb)
    grand = (sum(za, Fraction(0)) + sum(zb, Fraction(0))) / n
    between = sum((len(z) * (zbar - grand) ** 2 for zbar, z in groups), Fraction(0))
    within = sum(((x - zbar) ** 2 for zbar, z in groups for x in z), Fraction(0))
    if within == 0:
        return math.nan
    return float(stats.f.sf(float((n - 2) * between / within), 1, n - 2))


def error_reduction(acc_base: float, acc: float, task: Task | None = None) -> float:
    """The paper's relative error reduction `(err_base - err) / err_base`, accuracies in percent (err = 100 - acc);
    for a task whose primary metric is itself an error (FID), err is the metric. nan where `err_base <= 0` or
    either error is not finite."""
    task = task or TASKS["classification"]
    err_base, err = task.error(acc_base), task.error(acc)
    if not (math.isfinite(err_base) and math.isfinite(err)) or err_base <= 0:
        return math.nan  # no baseline error to reduce, or a non-finite mean: degenerate
    return (err_base - err) / err_base


# --------------------------------------------------------------------------------------- published numbers

# Paper Table 2 (CIFAR-10 test accuracy, %): (model, optimizer, batch) -> {method: accuracy}.
PUBLISHED_TABLE2: dict[tuple[str, str, int], dict[str, float]] = {}
for _model, _opt, _batches, _rows in (
    ("resnet56", "sgd", (128, 32, 8), ((93.24, 91.96, 86.54), (93.39, 92.27, 87.99), (93.57, 92.25, 88.04))),
    ("vgg16", "sgd", (128, 8, 6), ((93.02, 92.31, 91.88), (93.26, 92.77, 92.25), (93.19, 92.79, 92.43))),
    ("resnet56", "adam", (128, 32, 8), ((91.20, 91.04, 89.53), (91.42, 91.13, 90.02), (91.20, 91.06, 89.70))),
):
    for _i, _b in enumerate(_batches):
        PUBLISHED_TABLE2[(_model, _opt, _b)] = {m: r[_i] for m, r in zip(("none", "sobolev", "h0"), _rows, strict=True)}


# The SGS paper (CIFAR-100 test accuracy, %, as the authors' repository README quotes the paper): model -> method.
PUBLISHED_SGS_CIFAR100: dict[str, dict[str, float]] = {
    "vgg11": {"none": 70.8, "sgs": 73.2},
    "vgg16": {"none": 74.9, "sgs": 76.2},
    "resnet18": {"none": 77.8, "sgs": 78.8},
}


def published(config: RunConfig) -> float | None:
    """The paper's number for this configuration, where one is known: the channel-directed paper's Table 2
    (CIFAR-10, output direction) or the SGS paper's CIFAR-100 table (SGD, batch 128, SGS on the gradient)."""
    if config.dataset == "cifar100" and config.optimizer == "sgd" and config.batch_size == 128:
        if config.method == "sgs" and (config.arg("sgs_on") or "gradient") != "gradient":
            return None
        return PUBLISHED_SGS_CIFAR100.get(config.model, {}).get(config.method)
    if config.dataset != "cifar10" or config.arg("direction") not in (None, "output"):
        return None
    return PUBLISHED_TABLE2.get((config.model, config.optimizer, config.batch_size), {}).get(config.method)


# ----------------------------------------------------------------------------------------------- grouping


def setting_of(config: RunConfig) -> dict[str, Any]:
    """The identity fields that are not the method or its hyper-parameters."""
    return {k: v for k, v in identity_dict(config).items() if k not in config.method_args and k != "method"}


@dataclass
class Row:
    """One method's final test accuracies within one setting, with statistics against the baseline.

    `accs` holds the completed runs only; `diverged` counts the runs stored as diverged.
    """

    label: str
    config: RunConfig
    accs: list[float]  # the primary metric of each completed run (classification: test accuracy), by seed
    mean: float
    std: float
    ci: tuple[float, float]
    extra: dict[str, tuple[float, float]] = field(default_factory=dict)  # the task's `report` metrics: mean, std
    reduction: float | None = None
    p_value: float | None = None
    variance_p: float | None = None
    paper: float | None = None
    diverged: int = 0
    seconds: float = math.nan  # mean wall time of the completed runs (training and evaluation)


@dataclass
class Setting:
    setting: dict[str, Any]
    rows: list[Row]
    runs: dict[str, list[Run]]
    notes: list[str] = field(default_factory=list)

    @property
    def baseline(self) -> Row | None:
        return next((r for r in self.rows if r.config.method == "none"), None)


def status(run: Run) -> str:
    """'completed' or 'diverged' (runs stored before statuses existed are completed)."""
    return str(getattr(run, "status", "completed"))


def completed(runs: Sequence[Run]) -> list[Run]:
    """The runs that completed (not diverged)."""
    return [r for r in runs if status(r) != "diverged"]


def _settings(run: Run, key: str) -> list[str]:
    """The values of `key` ("kernel" or "threads") a run trained with: one per segment of its epochs where its
    environment records segments (a run resumed with other settings has several), else its one recorded value."""
    env = run.env if isinstance(run.env, dict) else {}
    segments = env.get("segments")
    if isinstance(segments, list) and segments and all(isinstance(s, dict) for s in segments):
        values = [s.get(key) for s in segments]
    else:
        values = [env.get(key)]
    return sorted({"not recorded" if v is None else str(v) for v in values})


def _environment_notes(runs: Sequence[Run]) -> list[str]:
    """Sentences saying which kernel paths and thread counts the runs of one setting mixed (if they do), between
    runs or within one run resumed with other settings (counted as `a+b`)."""
    notes = []
    for key, what in (("kernel", "kernel paths"), ("threads", "thread counts")):
        counts: dict[str, int] = {}
        for run in runs:
            name = "+".join(_settings(run, key))
            counts[name] = counts.get(name, 0) + 1
        recorded = any(k != "not recorded" for k in counts)
        if recorded and (len(counts) > 1 or any("+" in k for k in counts)):
            parts = ", ".join(f"{k}: {n} run{'s' if n != 1 else ''}" for k, n in sorted(counts.items()))
            within = " (a+b: a run resumed with other settings)" if any("+" in k for k in counts) else ""
            notes.append(
                f"the runs of this setting mix {what} ({parts}){within}; their numbers may differ at round-off"
            )
    return notes


def summarize(runs: Sequence[Run]) -> list[Setting]:
    """Group runs by setting and method; compute each row's statistics against its setting's baseline.

    Diverged runs are counted per row and left out of the statistics; a setting whose runs mix kernel paths
    or thread counts gets a note.
    """
    groups: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        skey = json.dumps(setting_of(run.config), sort_keys=True)
        groups.setdefault(skey, {}).setdefault(describe(run.config), []).append(run)
    out = []
    for skey, by_label in groups.items():
        rows = []
        for label, group in by_label.items():
            task = get_task(group[0].config.task)
            done = sorted(completed(group), key=lambda r: r.seed)
            accs = [r.final[task.primary.name] for r in done]
            m, s = mean_std(accs)
            times = [r.wall_s for r in completed(group)]
            rows.append(
                Row(
                    label,
                    group[0].config,
                    accs,
                    m,
                    s,
                    confidence_interval(accs),
                    extra={k: mean_std([r.final[k] for r in done]) for k in task.report},
                    paper=published(group[0].config),
                    diverged=len(group) - len(completed(group)),
                    seconds=sum(times) / len(times) if times else math.nan,
                )
            )
        rows.sort(key=lambda r: sort_key(r.config))
        every = [r for group in by_label.values() for r in group]
        setting = Setting(json.loads(skey), rows, by_label, _environment_notes(every))
        base = setting.baseline
        if base is not None:
            for r in rows:
                if r is not base:
                    r.reduction = error_reduction(base.mean, r.mean, get_task(r.config.task))
                    r.p_value = welch_test(r.accs, base.accs)[2]
                    r.variance_p = variance_test(r.accs, base.accs)
        out.append(setting)
    return out


# -------------------------------------------------------------------------------------------------- tables


def _fmt(x: float | None, spec: str = ".2f") -> str:
    """`x` formatted, or "-" for a statistic that could not be computed (None, nan or infinite)."""
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _time_ratio(row: Row, base: Row | None) -> str:
    """The row's mean wall time over the baseline's, e.g. `1.31x` (`-` without a baseline or times)."""
    if base is None or not (math.isfinite(base.seconds) and base.seconds > 0) or not math.isfinite(row.seconds):
        return "-"
    return f"{row.seconds / base.seconds:.2f}x"


def setting_title(setting: dict[str, Any], varying: Sequence[str] = ()) -> str:
    """A short description of a setting, e.g. `fashion-mnist, cnn2, sgd lr 0.01, batch 100, 8 epochs`."""
    s = setting
    parts = [
        s["dataset"] + (" (train on test split, evaluate on train split)" if s["swap_train_test"] else ""),
        s["model"],
        f"{s['optimizer']} lr {s['lr']:g}",
        f"batch {s['batch_size']}",
        f"{s['epochs']} epochs",
    ]
    if s["train_subset"]:
        parts.append(f"{s['train_subset']} training images")
    if s["test_subset"]:
        parts.append(f"{s['test_subset']} evaluation images")
    shown = {
        "dataset",
        "swap_train_test",
        "model",
        "optimizer",
        "lr",
        "batch_size",
        "epochs",
        "train_subset",
        "test_subset",
    }
    parts += [f"{k}={s[k]}" for k in varying if k not in shown]
    return ", ".join(parts)


def markdown(settings: Sequence[Setting], heading_level: int = 3) -> str:
    """One Markdown table per setting: mean +- std, 95% CI, n, error reduction, Welch p, equal-variance p
    (Brown-Forsythe), mean wall time per run
    relative to the baseline's (training and evaluation; on a shared machine only a rough cost), published number.

    A "diverged" column appears where some run diverged; notes on mixed kernel paths or thread counts follow
    the table.
    """
    varying = [k for k in FIELDS if len({json.dumps(s.setting.get(k)) for s in settings}) > 1]
    out = []
    for st in settings:
        base = st.baseline
        has_paper = any(r.paper is not None for r in st.rows)
        has_diverged = any(r.diverged for r in st.rows)
        task = get_task(st.setting.get("task", "classification"))
        out.append(f"{'#' * heading_level} {setting_title(st.setting, varying)}\n")
        head = (
            ["method", "seeds"]
            + (["diverged"] if has_diverged else [])
            + [f"{task.primary.column} (mean ± std)", "95% CI"]
            + [f"{task.metric(k).column} (mean ± std)" for k in task.report]
            + ["error reduction vs SGD" if task.primary.percent else "reduction vs SGD", "Welch p vs SGD"]
            + ["equal-variance p vs SGD", "wall time vs SGD"]
            + (["paper"] if has_paper else [])
        )
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in st.rows:
            red = (
                "baseline"
                if r is base
                else (
                    _fmt(100 * r.reduction, "+.1f") + " %"
                    if r.reduction is not None and not math.isnan(r.reduction)
                    else "-"
                )
            )
            cells = [
                r.label,
                str(len(r.accs)),
                *([str(r.diverged)] if has_diverged else []),
                f"{_fmt(r.mean)} ± {_fmt(r.std)}",
                f"[{_fmt(r.ci[0])}, {_fmt(r.ci[1])}]",
                *(f"{_fmt(r.extra[k][0])} ± {_fmt(r.extra[k][1])}" for k in task.report),
                red,
                "-" if r is base else _fmt(r.p_value, ".2g"),
                "-" if r is base else _fmt(r.variance_p, ".2g"),
                _time_ratio(r, base),
            ] + ([_fmt(r.paper)] if has_paper else [])
            out.append("| " + " | ".join(cells) + " |")
        if base is None:
            out.append("\n(no `method=none` run in this setting: no baseline to compare with)")
        if has_diverged:
            n = sum(r.diverged for r in st.rows)
            out.append(
                f"\n{n} run{'s' if n != 1 else ''} diverged (non-finite loss): counted in the diverged column, "
                "left out of every statistic."
            )
        for note in st.notes:
            out.append(f"\nNote: {note}.")
        out.append("")
    return "\n".join(out)
