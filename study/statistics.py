"""How sure are the answers? Means with confidence intervals, paired tests and verdicts in words.

Every configuration is trained with one or more seeds. Per configuration: the mean test (and best
validation) accuracy with a 95% Student-t interval. Between configurations, the comparisons the exercise
asks about (for each loss the activations against each other; for each activation crossentropy vs
hinge), each *chosen on validation* (the first named has the higher validation accuracy) and *reported
on test*:

- several shared seeds: a paired t-test over the seeds (and a Wilcoxon signed-rank test when there are
  enough seeds for it to reach p < 0.05 at all, i.e. at least 6), with the t interval of the mean paired
  difference;
- one shared seed: McNemar's exact test on the two models' test-set predictions (a binomial test on the
  discordant images), with Newcombe's hybrid-score interval for the paired difference in proportions
  (Newcombe 1998, method 10: Wilson intervals of each accuracy, combined with their correlation).

The p-values of the whole family of comparisons are Holm-adjusted (step-down), and the verdict uses the
adjusted p-value. All distributions come from scipy; this module never touches MLflow.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations

import numpy as np
from scipy import stats

from study.config import ACTIVATIONS, LOSSES, parse_config_name

CONFIDENCE = 0.95
ALPHA = 0.05
# The exact two-sided Wilcoxon signed-rank p-value is at least 2 / 2**n: below 6 pairs it cannot go under 0.05.
WILCOXON_MIN_PAIRS = 6

STATISTICS_COLUMNS = (
    "config",
    "activation",
    "loss",
    "n",
    "seeds",
    "test_accuracy_mean",
    "test_accuracy_std",
    "ci_low",
    "ci_high",
    "best_val_accuracy_mean",
    "best_val_accuracy_std",
    "best_val_ci_low",
    "best_val_ci_high",
)

COMPARISON_COLUMNS = (
    "question",
    "within",
    "first",
    "second",
    "method",
    "n_seeds",
    "shared_seeds",
    "first_val_accuracy",
    "second_val_accuracy",
    "difference",
    "ci_low",
    "ci_high",
    "p_value",
    "p_holm",
    "wilcoxon_p",
    "discordant_first",
    "discordant_second",
    "verdict",
)

PAIRED_T = "paired t-test"
MCNEMAR = "McNemar exact"
NOT_TESTED = "none"


@dataclass(frozen=True, eq=False)
class SeedRun:
    """One finished training run of one configuration with one seed: what the statistics need."""

    config: str
    seed: int
    test_accuracy: float
    best_val_accuracy: float
    val_accuracy: tuple[float, ...] = ()
    predictions: np.ndarray | None = field(default=None, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_outcome(cls, outcome) -> SeedRun:
        """From a `study.runner.Outcome` (a finished run of `main`)."""
        return cls(
            config=outcome.config.name,
            seed=outcome.config.seed,
            test_accuracy=outcome.test_accuracy,
            best_val_accuracy=outcome.best_val_accuracy,
            val_accuracy=tuple(outcome.history["val_accuracy"]),
            predictions=outcome.predictions,
            labels=outcome.labels,
        )


@dataclass(frozen=True)
class Interval:
    """Mean, sample standard deviation (ddof=1) and the 95% Student-t interval of the mean."""

    n: int
    mean: float
    std: float
    low: float
    high: float


@dataclass(frozen=True)
class ConfigStatistics:
    """One configuration's row of statistics.csv."""

    config: str
    activation: str
    loss: str
    seeds: tuple[int, ...]
    test_accuracy: Interval
    best_val_accuracy: Interval

    @property
    def n(self) -> int:
        return len(self.seeds)

    def row(self) -> dict[str, object]:
        return {
            "config": self.config,
            "activation": self.activation,
            "loss": self.loss,
            "n": self.n,
            "seeds": ";".join(str(seed) for seed in self.seeds),
            "test_accuracy_mean": self.test_accuracy.mean,
            "test_accuracy_std": self.test_accuracy.std,
            "ci_low": self.test_accuracy.low,
            "ci_high": self.test_accuracy.high,
            "best_val_accuracy_mean": self.best_val_accuracy.mean,
            "best_val_accuracy_std": self.best_val_accuracy.std,
            "best_val_ci_low": self.best_val_accuracy.low,
            "best_val_ci_high": self.best_val_accuracy.high,
        }


@dataclass(frozen=True)
class Comparison:
    """Two configurations, `first` chosen on validation; the test-accuracy difference first - second."""

    question: str  # "activation" (within a loss) or "loss" (within an activation)
    within: str  # the loss or activation held fixed
    first: str  # configuration names
    second: str
    method: str  # PAIRED_T, MCNEMAR or NOT_TESTED
    n_seeds: int
    shared_seeds: tuple[int, ...]
    first_val_accuracy: float
    second_val_accuracy: float
    difference: float = math.nan  # fraction of the test set (0.0012 = 0.12 points)
    ci_low: float = math.nan
    ci_high: float = math.nan
    p_value: float = math.nan
    p_holm: float = math.nan
    wilcoxon_p: float = math.nan
    discordant_first: int | None = None  # McNemar: test images only `first` got right
    discordant_second: int | None = None  # McNemar: test images only `second` got right
    note: str = ""

    @property
    def first_label(self) -> str:
        return self._label(self.first)

    @property
    def second_label(self) -> str:
        return self._label(self.second)

    def _label(self, config: str) -> str:
        activation, loss = parse_config_name(config)
        return activation if self.question == "activation" else loss

    @property
    def conclusion(self) -> str:
        """The verdict's last words, decided by the Holm-adjusted p-value."""
        if self.method == NOT_TESTED or math.isnan(self.p_holm):
            return "not tested"
        if self.p_holm >= ALPHA:
            if self.ci_low > 0 or self.ci_high < 0:  # underpowered: significant alone, not within the family
                return "no measurable difference after Holm's correction (the uncorrected 95% CI excludes 0)"
            return "no measurable difference"
        if self.difference > 0:
            return f"{self.first_label} is better"
        return f"{self.second_label} is better on test, although validation chose {self.first_label}"

    def verdict(self) -> str:
        """E.g. `relu vs tanh (crossentropy): +0.12 points, 95% CI [−0.10, 0.34], p = 0.41 — no measurable ...`."""
        head = f"{self.first_label} vs {self.second_label} ({self.within})"
        if self.method == NOT_TESTED:
            return f"{head}: not tested — {self.note}"
        text = (
            f"{head}: {_points(self.difference, signed=True)} points, "
            f"95% CI [{_points(self.ci_low)}, {_points(self.ci_high)}], p {_p(self.p_value)} — "
            f"{self.conclusion} (Holm-adjusted p {_p(self.p_holm)}; {self.method}"
        )
        if self.method == PAIRED_T:
            text += f" over {self.n_seeds} seeds; "
            if math.isnan(self.wilcoxon_p):
                text += f"Wilcoxon not run: it needs at least {WILCOXON_MIN_PAIRS} seeds to reach p < 0.05"
            else:
                text += f"Wilcoxon signed-rank p {_p(self.wilcoxon_p)}"
        else:
            text += (
                f" on seed {self.shared_seeds[0]}: {self.discordant_first} test images only {self.first_label} "
                f"got right, {self.discordant_second} only {self.second_label}"
            )
        return text + ")"

    def row(self) -> dict[str, object]:
        values = {column: getattr(self, column) for column in COMPARISON_COLUMNS if column != "verdict"}
        values["shared_seeds"] = ";".join(str(seed) for seed in self.shared_seeds)
        return {**values, "verdict": self.conclusion}


@dataclass(frozen=True)
class Analysis:
    """Everything the report needs: per-configuration statistics, the comparisons, and caveats."""

    statistics: list[ConfigStatistics]
    comparisons: list[Comparison]
    runs: list[SeedRun]
    notes: list[str]


# ---------------------------------------------------------------------------------------------------------
# Building blocks


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean, sample std (ddof=1) and Student-t interval of the mean; std and interval NaN for n = 1."""
    data = np.asarray(values, dtype=float)
    n = len(data)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(data.mean())
    if n == 1:
        return Interval(1, mean, math.nan, math.nan, math.nan)
    std = float(data.std(ddof=1))
    if std == 0.0:
        return Interval(n, mean, 0.0, mean, mean)
    low, high = stats.t.interval(confidence, df=n - 1, loc=mean, scale=std / math.sqrt(n))
    return Interval(n, mean, std, float(low), float(high))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment; NaN entries (comparisons not made) stay NaN and are not counted.

    Sorted ascending, the i-th smallest (from 0) becomes max over j <= i of min(1, (m - j) p_(j)).
    """
    indexed = sorted((p, index) for index, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    m = len(indexed)
    running = 0.0
    for rank, (p, index) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = running
    return adjusted


def paired_t(first: Sequence[float], second: Sequence[float]) -> tuple[float, float, float, float]:
    """Mean difference first - second, its 95% t interval and the two-sided paired t-test p-value."""
    differences = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    interval = mean_interval(differences)
    if not np.isfinite(differences).all():
        return interval.mean, interval.low, interval.high, math.nan
    if interval.std == 0.0:  # every seed gave the same difference: t is 0 (p = 1) or infinite (p = 0)
        return interval.mean, interval.low, interval.high, 1.0 if interval.mean == 0.0 else 0.0
    p_value = float(stats.ttest_rel(first, second).pvalue)
    return interval.mean, interval.low, interval.high, p_value


def wilcoxon(first: Sequence[float], second: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value; NaN below WILCOXON_MIN_PAIRS pairs (it could not reach 0.05)."""
    differences = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    if len(differences) < WILCOXON_MIN_PAIRS or not np.isfinite(differences).all():
        return math.nan
    if not differences.any():
        return 1.0
    return float(stats.wilcoxon(differences).pvalue)


def newcombe_paired_interval(
    both: int, only_first: int, only_second: int, neither: int, confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """Difference p1 - p2 of paired proportions and Newcombe's hybrid-score interval (1998, method 10).

    p1 = (both + only_first) / n, p2 = (both + only_second) / n. Wilson intervals for p1 and p2
    (scipy.stats.binomtest) are combined with the estimated correlation phi of the 2x2 table
    (with Newcombe's correction: ad - bc shrunk towards 0 by n/2 when positive).
    """
    n = both + only_first + only_second + neither
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    difference = p1 - p2
    first = stats.binomtest(both + only_first, n).proportion_ci(confidence, method="wilson")
    second = stats.binomtest(both + only_second, n).proportion_ci(confidence, method="wilson")
    margins = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    cross = both * neither - only_first * only_second
    if margins == 0 or 0 <= cross <= n / 2:
        phi = 0.0
    elif cross > n / 2:
        phi = (cross - n / 2) / math.sqrt(margins)
    else:
        phi = cross / math.sqrt(margins)
    below_1, above_1 = p1 - first.low, first.high - p1
    below_2, above_2 = p2 - second.low, second.high - p2
    delta = math.sqrt(max(0.0, below_1**2 - 2 * phi * below_1 * above_2 + above_2**2))
    epsilon = math.sqrt(max(0.0, above_1**2 - 2 * phi * above_1 * below_2 + below_2**2))
    return difference, max(-1.0, difference - delta), min(1.0, difference + epsilon)


def mcnemar(correct_first: np.ndarray, correct_second: np.ndarray) -> tuple[float, float, float, float, int, int]:
    """McNemar's exact test on per-image correctness of two models on the same test set.

    Returns the accuracy difference first - second, its Newcombe 95% interval, the exact two-sided
    p-value (binomial test of the discordant counts against 1/2) and the two discordant counts.
    """
    first = np.asarray(correct_first, dtype=bool)
    second = np.asarray(correct_second, dtype=bool)
    both = int(np.sum(first & second))
    only_first = int(np.sum(first & ~second))
    only_second = int(np.sum(~first & second))
    neither = int(np.sum(~first & ~second))
    discordant = only_first + only_second
    p_value = 1.0 if discordant == 0 else float(stats.binomtest(only_first, discordant, 0.5).pvalue)
    difference, low, high = newcombe_paired_interval(both, only_first, only_second, neither)
    return difference, low, high, p_value, only_first, only_second


# ---------------------------------------------------------------------------------------------------------
# The analysis


def deduplicate(runs: Iterable[SeedRun]) -> tuple[list[SeedRun], int]:
    """One run per (configuration, seed): the last one given. A seed fixes the result up to hardware noise,
    so counting a repeated seed twice would fake precision. Returns the runs kept and how many were dropped."""
    kept: dict[tuple[str, int], SeedRun] = {}
    total = 0
    for run in runs:
        kept[(run.config, run.seed)] = run
        total += 1
    return list(kept.values()), total - len(kept)


def config_statistics(runs: Sequence[SeedRun]) -> list[ConfigStatistics]:
    """Per configuration (in the study's order), the mean and 95% interval of test and best validation accuracy."""
    rows = []
    for config in _ordered_configs(runs):
        mine = sorted((run for run in runs if run.config == config), key=lambda run: run.seed)
        activation, loss = parse_config_name(config)
        rows.append(
            ConfigStatistics(
                config=config,
                activation=activation,
                loss=loss,
                seeds=tuple(run.seed for run in mine),
                test_accuracy=mean_interval([run.test_accuracy for run in mine]),
                best_val_accuracy=mean_interval([run.best_val_accuracy for run in mine]),
            )
        )
    return rows


def comparison_pairs(configs: Iterable[str]) -> list[tuple[str, str, str, str]]:
    """(question, within, config a, config b): activations per loss, then losses per activation."""
    present = set(configs)
    pairs = []
    for loss in LOSSES:
        for first, second in combinations(ACTIVATIONS, 2):
            a, b = f"{first}-{loss}", f"{second}-{loss}"
            if a in present and b in present:
                pairs.append(("activation", loss, a, b))
    for activation in ACTIVATIONS:
        for first, second in combinations(LOSSES, 2):
            a, b = f"{activation}-{first}", f"{activation}-{second}"
            if a in present and b in present:
                pairs.append(("loss", activation, a, b))
    return pairs


def compare(question: str, within: str, a: str, b: str, runs: Sequence[SeedRun]) -> Comparison:
    """One comparison on the seeds both configurations share, first = higher mean validation accuracy."""
    by_seed_a = {run.seed: run for run in runs if run.config == a}
    by_seed_b = {run.seed: run for run in runs if run.config == b}
    shared = sorted(set(by_seed_a) & set(by_seed_b))
    val_a = _mean([by_seed_a[seed].best_val_accuracy for seed in shared])
    val_b = _mean([by_seed_b[seed].best_val_accuracy for seed in shared])
    if _finite(val_b) > _finite(val_a):  # chosen on validation; a tie keeps the study's order
        a, b, by_seed_a, by_seed_b, val_a, val_b = b, a, by_seed_b, by_seed_a, val_b, val_a
    base = {
        "question": question,
        "within": within,
        "first": a,
        "second": b,
        "n_seeds": len(shared),
        "shared_seeds": tuple(shared),
        "first_val_accuracy": val_a,
        "second_val_accuracy": val_b,
    }
    if not shared:
        return Comparison(**base, method=NOT_TESTED, note="the two configurations share no seed")
    if len(shared) >= 2:
        first = [by_seed_a[seed].test_accuracy for seed in shared]
        second = [by_seed_b[seed].test_accuracy for seed in shared]
        difference, low, high, p_value = paired_t(first, second)
        return Comparison(
            **base,
            method=PAIRED_T,
            difference=difference,
            ci_low=low,
            ci_high=high,
            p_value=p_value,
            wilcoxon_p=wilcoxon(first, second),
        )
    seed = shared[0]
    run_a, run_b = by_seed_a[seed], by_seed_b[seed]
    problem = _prediction_problem(run_a, run_b)
    if problem:
        return Comparison(**base, method=NOT_TESTED, note=f"one shared seed ({seed}) and {problem}")
    difference, low, high, p_value, only_a, only_b = mcnemar(
        run_a.predictions == run_a.labels, run_b.predictions == run_b.labels
    )
    return Comparison(
        **base,
        method=MCNEMAR,
        difference=difference,
        ci_low=low,
        ci_high=high,
        p_value=p_value,
        discordant_first=only_a,
        discordant_second=only_b,
    )


def analyze(runs: Iterable[SeedRun]) -> Analysis:
    """Statistics per configuration and every comparison, Holm-adjusted over the whole family."""
    kept, dropped = deduplicate(runs)
    notes = []
    if dropped:
        notes.append(
            f"{dropped} run(s) repeated a (configuration, seed) already present and were left out: "
            "a seed fixes the result up to hardware noise, so only the latest run per seed counts."
        )
    comparisons = [compare(*pair, kept) for pair in comparison_pairs(run.config for run in kept)]
    adjusted = holm([comparison.p_value for comparison in comparisons])
    comparisons = [_with_holm(comparison, p) for comparison, p in zip(comparisons, adjusted, strict=True)]
    return Analysis(config_statistics(kept), comparisons, kept, notes)


def _with_holm(comparison: Comparison, p_holm: float) -> Comparison:
    return replace(comparison, p_holm=p_holm)


def validation_bands(runs: Sequence[SeedRun]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per configuration and epoch: mean validation accuracy over the seeds and its 95% t interval.

    An epoch counts the runs that reached it (a diverged run stops early); the interval is NaN where
    fewer than two runs did.
    """
    bands = {}
    for config in _ordered_configs(runs):
        curves = [run.val_accuracy for run in runs if run.config == config]
        intervals = [
            mean_interval([curve[epoch] for curve in curves if len(curve) > epoch and math.isfinite(curve[epoch])])
            for epoch in range(max(len(curve) for curve in curves))
        ]
        bands[config] = tuple(np.array([getattr(item, name) for item in intervals]) for name in ("mean", "low", "high"))
    return bands


# ---------------------------------------------------------------------------------------------------------
# Text: statistics.csv, comparisons.csv, summary.md


def statistics_csv(rows: Sequence[ConfigStatistics]) -> str:
    return _csv(STATISTICS_COLUMNS, [row.row() for row in rows])


def comparisons_csv(comparisons: Sequence[Comparison]) -> str:
    return _csv(COMPARISON_COLUMNS, [comparison.row() for comparison in comparisons])


def summary_markdown(analysis: Analysis, settings: str, source: str = "") -> str:
    """Answers with their uncertainty: the verdicts per question, the overall choice and the table."""
    by_question = {"activation": [], "loss": []}
    for comparison in analysis.comparisons:
        by_question[comparison.question].append(comparison)
    seeds = sorted({row.n for row in analysis.statistics})
    lines = ["# MNIST activation study: summary", "", settings, ""]
    if source:
        lines += [source, ""]
    lines += [
        "Choices are made on validation accuracy (the first named in each comparison had the higher mean best "
        "validation accuracy); the differences are test-accuracy points (first minus second) with their 95% "
        "confidence interval. p-values are Holm-adjusted over all "
        f"{sum(not math.isnan(c.p_value) for c in analysis.comparisons)} comparisons; "
        f"a difference is called measurable when the adjusted p < {ALPHA}.",
        "",
        f"Seeds per configuration: {', '.join(str(n) for n in seeds)}. " + _method_sentence(seeds),
        "",
        "## Which activation did best (per loss)",
        "",
    ]
    lines += [f"- {comparison.verdict()}" for comparison in by_question["activation"]] or ["- (nothing to compare)"]
    lines += ["", "## Which loss did best (per activation)", ""]
    lines += [f"- {comparison.verdict()}" for comparison in by_question["loss"]] or ["- (nothing to compare)"]
    best = max(analysis.statistics, key=lambda row: _finite(row.best_val_accuracy.mean))
    lines += [
        "",
        "## Overall",
        "",
        f"Best configuration on validation: **{best.config}** (mean best validation accuracy "
        f"{best.best_val_accuracy.mean:.4f}; test accuracy {_accuracy_with_interval(best.test_accuracy)}, "
        f"n = {best.n}).",
        "",
        "## Per configuration",
        "",
        "| config | n | test accuracy (mean) | 95% CI | std | best val accuracy (mean) | 95% CI |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in analysis.statistics:
        lines.append(
            f"| {row.config} | {row.n} | {row.test_accuracy.mean:.4f} | {_interval(row.test_accuracy)} | "
            f"{_number(row.test_accuracy.std)} | {row.best_val_accuracy.mean:.4f} | "
            f"{_interval(row.best_val_accuracy)} |"
        )
    if analysis.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in analysis.notes]
    return "\n".join(lines) + "\n"


def _method_sentence(seeds: Sequence[int]) -> str:
    parts = []
    if any(n >= 2 for n in seeds):
        parts.append(
            "With several seeds the comparison is a paired t-test over the seeds both configurations share "
            "(it measures seed-to-seed variation on the fixed test set), with a Wilcoxon signed-rank test "
            f"as a check when there are at least {WILCOXON_MIN_PAIRS} seeds (below that its smallest "
            "possible p-value is above 0.05)."
        )
    if any(n == 1 for n in seeds):
        parts.append(
            "With one seed the comparison is McNemar's exact test on the test images the two models "
            "classify differently, with Newcombe's hybrid-score interval (1998, method 10) for the paired "
            "difference; it measures test-set sampling noise only, not how much another seed would change "
            "the result."
        )
    return " ".join(parts)


def _ordered_configs(runs: Iterable[SeedRun]) -> list[str]:
    present = {run.config for run in runs}
    order = [f"{activation}-{loss}" for loss in LOSSES for activation in ACTIVATIONS]
    return [config for config in order if config in present]


def _prediction_problem(run_a: SeedRun, run_b: SeedRun) -> str:
    if run_a.predictions is None or run_b.predictions is None:
        return "no test predictions recorded for McNemar's test"
    if run_a.labels is None or run_b.labels is None or not np.array_equal(run_a.labels, run_b.labels):
        return "the two runs were not tested on the same test images"
    if len(run_a.predictions) != len(run_a.labels) or len(run_b.predictions) != len(run_b.labels):
        return "the recorded predictions do not match the test labels"
    return ""


def _csv(columns: Sequence[str], rows: Sequence[dict[str, object]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def _points(fraction: float, signed: bool = False) -> str:
    """A fraction as percentage points, two decimals, with a real minus sign (and + if `signed`)."""
    if math.isnan(fraction):
        return "n/a"
    text = f"{abs(fraction) * 100:.2f}"
    if fraction < 0 and text != "0.00":
        return f"−{text}"
    return f"+{text}" if signed else text


def _p(value: float) -> str:
    """`= 0.412` or `< 0.001`, to follow a `p`."""
    if math.isnan(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"= {value:.3f}"


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _interval(interval: Interval) -> str:
    if math.isnan(interval.low):
        return "n/a (n = 1)" if interval.n == 1 else "n/a"
    return f"[{interval.low:.4f}, {interval.high:.4f}]"


def _accuracy_with_interval(interval: Interval) -> str:
    if math.isnan(interval.low):
        return f"{interval.mean:.4f}"
    return f"{interval.mean:.4f}, 95% CI [{interval.low:.4f}, {interval.high:.4f}]"
