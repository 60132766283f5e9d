"""Statistics over seeds: intervals and tests against scipy, Holm by hand, verdicts, `report`, and `main`."""

from __future__ import annotations

import csv
import math
import re
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import run_cli
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from scipy import stats

from study import statistics
from study.config import config_names
from study.statistics import SeedRun
from tracking import keys

# ---------------------------------------------------------------------------------------------------------
# Building blocks against scipy and by hand


def test_mean_interval_matches_scipy_t() -> None:
    values = [0.9712, 0.9698, 0.9731, 0.9705, 0.9689]
    interval = statistics.mean_interval(values)
    low, high = stats.t.interval(0.95, df=4, loc=np.mean(values), scale=stats.sem(values))
    assert interval.n == 5
    assert interval.mean == pytest.approx(np.mean(values))
    assert interval.std == pytest.approx(np.std(values, ddof=1))
    assert (interval.low, interval.high) == pytest.approx((low, high))
    # By hand: t_{0.975, 4} = 2.776.
    half_width = 2.776 * np.std(values, ddof=1) / math.sqrt(5)
    assert interval.high - interval.mean == pytest.approx(half_width, rel=1e-3)


def test_one_seed_has_no_spread_or_interval() -> None:
    interval = statistics.mean_interval([0.97])
    assert interval.mean == 0.97
    assert math.isnan(interval.std) and math.isnan(interval.low) and math.isnan(interval.high)


def test_paired_t_matches_scipy_ttest_rel() -> None:
    first = [0.975, 0.971, 0.978, 0.973]
    second = [0.970, 0.969, 0.971, 0.972]
    difference, low, high, p_value = statistics.paired_t(first, second)
    expected = stats.ttest_rel(first, second)
    ci = expected.confidence_interval(0.95)
    assert difference == pytest.approx(np.mean(np.subtract(first, second)))
    assert p_value == pytest.approx(expected.pvalue)
    assert (low, high) == pytest.approx((ci.low, ci.high))


def test_paired_t_with_identical_runs_is_p_one() -> None:
    assert statistics.paired_t([0.97, 0.96], [0.97, 0.96]) == (0.0, 0.0, 0.0, 1.0)


def test_wilcoxon_only_from_six_pairs() -> None:
    first = [0.975, 0.971, 0.978, 0.973, 0.976, 0.979]
    second = [0.970, 0.969, 0.971, 0.972, 0.9705, 0.9712]
    assert statistics.wilcoxon(first, second) == pytest.approx(stats.wilcoxon(np.subtract(first, second)).pvalue)
    assert statistics.wilcoxon(first, second) == pytest.approx(2 / 2**6)  # all six differences positive
    assert math.isnan(statistics.wilcoxon(first[:5], second[:5]))  # 2 / 2**5 > 0.05: not run


def test_mcnemar_is_the_exact_binomial_test_on_discordant_images() -> None:
    # 100 images: both right on 80, only the first on 10, only the second on 2, neither on 8.
    first = np.array([True] * 80 + [True] * 10 + [False] * 2 + [False] * 8)
    second = np.array([True] * 80 + [False] * 10 + [True] * 2 + [False] * 8)
    difference, low, high, p_value, only_first, only_second = statistics.mcnemar(first, second)
    assert (only_first, only_second) == (10, 2)
    assert difference == pytest.approx(0.08)
    assert p_value == pytest.approx(stats.binomtest(10, 12, 0.5).pvalue)
    assert p_value == pytest.approx(2 * (1 + 12 + 66) / 4096)  # by hand: 2 P(X <= 2), X ~ Bin(12, 1/2)
    assert low < difference < high


def test_newcombe_interval_covers_95_percent() -> None:
    """Newcombe's hybrid-score interval keeps close to its nominal coverage on paired binary data."""
    rng = np.random.default_rng(0)
    n, true_difference, covered, trials = 300, 0.03, 0, 1500
    probabilities = [0.85, 0.06, 0.03, 0.06]  # both, only first, only second, neither
    for counts in rng.multinomial(n, probabilities, size=trials):
        _, low, high = statistics.newcombe_paired_interval(*map(int, counts))
        covered += low <= true_difference <= high
    assert 0.93 <= covered / trials <= 0.97
    # Newcombe's (1998) worked example a=36, b=12, c=2, d=0, as this implementation computes it.
    difference, low, high = statistics.newcombe_paired_interval(36, 12, 2, 0)
    assert (difference, low, high) == pytest.approx((0.2, 0.0569, 0.3404), abs=1e-4)


def test_holm_against_a_hand_computed_example() -> None:
    # Sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> kept monotone at 0.06.
    assert statistics.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert statistics.holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    adjusted = statistics.holm([0.01, math.nan, 0.04])  # a comparison not made does not count
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)


# ---------------------------------------------------------------------------------------------------------
# Verdicts on synthetic runs


def synthetic_accuracies(seeds: int = 3) -> dict[str, list[float]]:
    """relu-crossentropy clearly best; tanh-hinge and sigmoid-hinge identical, seed by seed."""
    rng = np.random.default_rng(1)
    means = {
        "tanh-crossentropy": 0.955,
        "sigmoid-crossentropy": 0.950,
        "relu-crossentropy": 0.975,
        "tanh-hinge": 0.940,
        "relu-hinge": 0.945,
    }
    values = {config: list(mean + rng.normal(0, 0.001, seeds)) for config, mean in means.items()}
    values["sigmoid-hinge"] = list(values["tanh-hinge"])
    return values


def test_verdicts_on_synthetic_runs() -> None:
    runs = [
        SeedRun(config, seed, accuracy, accuracy + 0.002, (accuracy - 0.01, accuracy))
        for config, accuracies in synthetic_accuracies().items()
        for seed, accuracy in enumerate(accuracies)
    ]
    analysis = statistics.analyze(runs)
    verdicts = {(c.first, c.second): c for c in analysis.comparisons}
    assert len(analysis.comparisons) == 9
    better = verdicts[("relu-crossentropy", "tanh-crossentropy")]
    assert better.method == statistics.PAIRED_T and better.p_holm < 0.05 and better.difference > 0
    pattern = r"relu vs tanh \(crossentropy\): \+\d\.\d\d points, 95% CI \[\d\.\d\d, \d\.\d\d\], p "
    assert re.match(pattern, better.verdict())
    assert better.difference == pytest.approx(0.02, abs=0.003)
    assert "— relu is better" in better.verdict()
    same = verdicts[("tanh-hinge", "sigmoid-hinge")]
    assert same.verdict().startswith(
        "tanh vs sigmoid (hinge): +0.00 points, 95% CI [0.00, 0.00], p = 1.000 — no measurable difference"
    )
    assert "Wilcoxon not run" in same.verdict()
    assert [row.n for row in analysis.statistics] == [3] * 6


def test_first_named_is_chosen_on_validation_even_when_test_disagrees() -> None:
    # tanh wins on validation in every seed but loses on test: the verdict says so.
    runs = [SeedRun("relu-hinge", seed, 0.96 + seed / 1000, 0.95) for seed in range(4)]
    runs += [SeedRun("tanh-hinge", seed, 0.94 + seed / 1000 + (seed % 2) / 2000, 0.97) for seed in range(4)]
    (comparison,) = statistics.analyze(runs).comparisons
    assert (comparison.first, comparison.second) == ("tanh-hinge", "relu-hinge")
    assert comparison.difference < 0
    assert "relu is better on test, although validation chose tanh" in comparison.verdict()
    assert comparison.verdict().startswith("tanh vs relu (hinge): −1.98 points, 95% CI [−2.02, −1.93], p < 0.001")


def test_one_seed_uses_mcnemar_on_predictions() -> None:
    labels = np.arange(1000) % 10
    good = labels.copy()
    good[:20] = (good[:20] + 1) % 10  # 98% right
    weak = labels.copy()
    weak[:100] = (weak[:100] + 1) % 10  # 90% right, wrong on every image `good` got wrong
    runs = [
        SeedRun("relu-crossentropy", 0, 0.98, 0.981, (0.981,), good, labels),
        SeedRun("sigmoid-crossentropy", 0, 0.90, 0.90, (0.90,), weak, labels),
        SeedRun("tanh-crossentropy", 0, 0.95, 0.95, (0.95,)),  # no predictions recorded
    ]
    comparisons = {(c.first, c.second): c for c in statistics.analyze(runs).comparisons}
    mcnemar = comparisons[("relu-crossentropy", "sigmoid-crossentropy")]
    assert mcnemar.method == statistics.MCNEMAR
    assert (mcnemar.discordant_first, mcnemar.discordant_second) == (80, 0)
    assert mcnemar.p_value == pytest.approx(stats.binomtest(80, 80).pvalue)
    assert "relu is better" in mcnemar.verdict() and "McNemar exact on seed 0" in mcnemar.verdict()
    untested = comparisons[("relu-crossentropy", "tanh-crossentropy")]
    assert untested.method == statistics.NOT_TESTED and "not tested" in untested.verdict()


def test_repeated_seeds_count_once() -> None:
    runs = [
        SeedRun("relu-hinge", 0, 0.90, 0.9),
        SeedRun("relu-hinge", 0, 0.92, 0.9),
        SeedRun("relu-hinge", 1, 0.94, 0.9),
    ]
    analysis = statistics.analyze(runs)
    assert analysis.statistics[0].n == 2
    assert analysis.statistics[0].test_accuracy.mean == pytest.approx(0.93)  # the latest seed-0 run counts
    assert "left out" in analysis.notes[0]


# ---------------------------------------------------------------------------------------------------------
# `report` on runs logged into a temporary store


def log_child(
    client: MlflowClient,
    experiment_id: str,
    parent_id: str,
    config: str,
    seed: int,
    test_accuracy: float,
    epochs: int = 3,
    status: str = "FINISHED",
    predictions: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    folder: Path | None = None,
) -> str:
    """A child run as `main` logs it: tags, params, per-epoch val_accuracy, final metrics (and predictions)."""
    tags = {MLFLOW_PARENT_RUN_ID: parent_id, keys.CONFIG_TAG: config, "seed": str(seed)}
    run_id = client.create_run(experiment_id, run_name=f"{config}-seed{seed}", tags=tags).info.run_id
    timestamp = int(time.time() * 1000)
    curve = [test_accuracy - 0.02 + 0.01 * epoch for epoch in range(epochs)]
    metrics = [Metric(keys.VAL_ACCURACY, value, timestamp, epoch + 1) for epoch, value in enumerate(curve)]
    metrics += [
        Metric(keys.TEST_ACCURACY, test_accuracy, timestamp, 0),
        Metric(keys.BEST_VAL_ACCURACY, max(curve), timestamp, 0),
    ]
    params = {"epochs": epochs, "batch_size": 32, "learning_rate": 0.001, "seed": seed}
    client.log_batch(run_id, metrics=metrics, params=[Param(key, str(value)) for key, value in params.items()])
    if predictions is not None:
        folder = folder / run_id
        folder.mkdir()
        np.save(folder / keys.TEST_PREDICTIONS, predictions.astype(np.int8))
        np.save(folder / keys.TEST_LABELS, labels.astype(np.int8))
        client.log_artifacts(run_id, str(folder))
    client.set_terminated(run_id, status)
    return run_id


def new_parent(client: MlflowClient, experiment_id: str) -> str:
    run_id = client.create_run(experiment_id, run_name="study", tags={keys.ENTRY_POINT_TAG: "main"}).info.run_id
    client.set_terminated(run_id, "FINISHED")
    return run_id


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def verdict_lines(summary: str) -> list[str]:
    return [line for line in summary.splitlines() if line.startswith("- ") and " vs " in line]


def test_report_pools_finished_runs_of_several_parents(tracking_uri: str, tmp_path: Path) -> None:
    client = MlflowClient()
    experiment_id = client.create_experiment("synthetic")
    first_parent, second_parent = new_parent(client, experiment_id), new_parent(client, experiment_id)
    for config, accuracies in synthetic_accuracies().items():
        for seed, accuracy in enumerate(accuracies):
            log_child(client, experiment_id, first_parent if seed < 2 else second_parent, config, seed, accuracy)
    log_child(client, experiment_id, second_parent, "relu-crossentropy", 7, 0.10, status="FAILED")  # ignored
    log_child(client, experiment_id, second_parent, "relu-hinge", 0, 0.5, epochs=5)  # other settings: ignored

    result = run_cli("report", "--experiment", "synthetic", "--output", "out", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    output = tmp_path / "out"
    rows = read_csv(output / keys.STATISTICS_CSV)
    assert list(rows[0]) == list(statistics.STATISTICS_COLUMNS)
    assert [row["config"] for row in rows] == config_names()
    assert all(row["n"] == "3" and row["seeds"] == "0;1;2" for row in rows)
    relu = next(row for row in rows if row["config"] == "relu-crossentropy")
    expected = statistics.mean_interval(synthetic_accuracies()["relu-crossentropy"])
    assert float(relu["test_accuracy_mean"]) == pytest.approx(expected.mean)
    assert float(relu["ci_low"]) == pytest.approx(expected.low)
    summary = (output / keys.SUMMARY_MD).read_text()
    lines = verdict_lines(summary)
    assert len(lines) == 9
    assert any(line.startswith("- relu vs tanh (crossentropy): +") and "— relu is better" in line for line in lines)
    assert any(
        line.startswith("- tanh vs sigmoid (hinge): +0.00 points") and "— no measurable difference" in line
        for line in lines
    )
    assert "of 2 parent run(s)" in summary
    assert "epochs=3, batch_size=32, learning_rate=0.001" in summary
    assert "Not included, other settings: epochs=5, batch_size=32, learning_rate=0.001 (1 runs)" in summary
    assert len(read_csv(output / keys.COMPARISONS_CSV)) == 9
    for name in (keys.TEST_ACCURACY_CI_PNG, keys.VAL_ACCURACY_BAND_PNG):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_one_seed_reads_predictions_and_rejects_unknown_experiment(tracking_uri: str, tmp_path: Path) -> None:
    client = MlflowClient()
    experiment_id = client.create_experiment("one-seed")
    parent = new_parent(client, experiment_id)
    labels = np.arange(1000) % 10
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for config, wrong in (("relu-crossentropy", 20), ("tanh-crossentropy", 100), ("sigmoid-crossentropy", 21)):
        predictions = labels.copy()
        predictions[:wrong] = (predictions[:wrong] + 1) % 10
        accuracy = 1 - wrong / 1000
        arrays = {"predictions": predictions, "labels": labels, "folder": artifacts}
        log_child(client, experiment_id, parent, config, 0, accuracy, **arrays)
    log_child(client, experiment_id, parent, "relu-hinge", 0, 0.95)  # an older run: no predictions

    result = run_cli("report", "--experiment", "one-seed", "--output", "out", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    lines = verdict_lines((tmp_path / "out" / keys.SUMMARY_MD).read_text())
    by_pair = {line.split(":")[0]: line for line in lines}
    relu_tanh = by_pair["- relu vs tanh (crossentropy)"]
    assert relu_tanh.startswith("- relu vs tanh (crossentropy): +8.00 points") and "— relu is better" in relu_tanh
    assert "McNemar exact on seed 0: 80 test images only relu got right, 0 only tanh" in relu_tanh
    relu_sigmoid = by_pair["- relu vs sigmoid (crossentropy)"]
    assert relu_sigmoid.startswith("- relu vs sigmoid (crossentropy): +0.10 points")
    assert "— no measurable difference" in relu_sigmoid
    assert any("crossentropy vs hinge (relu): not tested" in line for line in lines)
    assert all(row["n"] == "1" for row in read_csv(tmp_path / "out" / keys.STATISTICS_CSV))

    unknown = run_cli("report", "--experiment", "no-such-experiment", cwd=tmp_path)  # a user's typo
    assert unknown.returncode == 2
    assert unknown.stderr.strip().count("\n") == 0
    assert "experiment: no experiment named 'no-such-experiment'" in unknown.stderr


# ---------------------------------------------------------------------------------------------------------
# `main` with two seeds, end to end


def test_main_with_two_seeds_logs_statistics(tracking_uri: str, tmp_path: Path, small_mnist: Path) -> None:
    result = run_cli(
        "main", "--epochs", "1", "--seeds", "2", "--data", str(small_mnist), "--workers", "2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]

    experiment = mlflow.get_experiment_by_name(keys.DEFAULT_EXPERIMENT)
    client = MlflowClient()
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [run for run in runs if MLFLOW_PARENT_RUN_ID not in run.data.tags]
    children = [run for run in runs if run.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent.info.run_id]
    assert len(children) == 12
    folder = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, dst_path=str(tmp_path / "parent")))
    rows = read_csv(folder / keys.STATISTICS_CSV)
    assert list(rows[0]) == list(statistics.STATISTICS_COLUMNS)
    assert [row["config"] for row in rows] == config_names()
    assert all(row["n"] == "2" and row["seeds"] == "0;1" for row in rows)
    for row in rows:
        seeds = [run for run in children if run.data.tags[keys.CONFIG_TAG] == row["config"]]
        accuracies = [run.data.metrics[keys.TEST_ACCURACY] for run in seeds]
        assert float(row["test_accuracy_mean"]) == pytest.approx(np.mean(accuracies))
        assert float(row["test_accuracy_std"]) == pytest.approx(np.std(accuracies, ddof=1))
        assert float(row["ci_low"]) <= float(row["test_accuracy_mean"]) <= float(row["ci_high"])
        metric = parent.data.metrics[f"{keys.TEST_ACCURACY_MEAN_PREFIX}{row['config']}"]
        assert metric == pytest.approx(np.mean(accuracies))
    summary = (folder / keys.SUMMARY_MD).read_text()
    lines = verdict_lines(summary)
    assert len(lines) == 9
    assert all("paired t-test over 2 seeds" in line and "95% CI [" in line and ", p " in line for line in lines)
    for name in (keys.RESULTS_CSV, keys.COMPARISON_PNG, keys.TEST_ACCURACY_CI_PNG, keys.VAL_ACCURACY_BAND_PNG):
        assert (folder / name).exists(), name
    assert keys.BEST_CONFIG_TAG in parent.data.tags and keys.BEST_TEST_ACCURACY in parent.data.metrics
    predictions = np.load(
        mlflow.artifacts.download_artifacts(
            run_id=children[0].info.run_id, artifact_path=keys.TEST_PREDICTIONS, dst_path=str(tmp_path / "child")
        )
    )
    assert predictions.dtype == np.int8 and predictions.shape == (1000,)

    # `report` rebuilds the same statistics from the store.
    rebuilt = run_cli("report", "--output", "rebuilt", cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert read_csv(tmp_path / "rebuilt" / keys.STATISTICS_CSV) == rows
