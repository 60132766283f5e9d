"""`report`: rebuild the statistics, verdicts and plots from runs already in the tracking store.

No training. Every FINISHED child run with a `config` tag is pooled, so several `main` runs (say, seeds
0-2 and then seeds 3-5) combine into one answer. Runs are grouped by the settings that change results
(epochs, batch size, learning rate); the largest group is reported and the others are named in the
summary. One run counts per (configuration, seed): the latest.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study import plots, statistics
from study.config import ConfigError, parse_config_name
from tracking import keys

log = logging.getLogger(__name__)

GROUP_PARAMS = ("epochs", "batch_size", "learning_rate")


@dataclass(frozen=True)
class RunGroup:
    """Finished child runs that share epochs, batch size and learning rate (oldest first)."""

    settings: tuple[str, str, str]
    runs: list[Run]

    def describe(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in zip(GROUP_PARAMS, self.settings, strict=True))


def write_outputs(folder: Path, analysis: statistics.Analysis, settings: str, source: str = "") -> None:
    """statistics.csv, comparisons.csv, summary.md, test_accuracy_ci.png and val_accuracy_band.png into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / keys.STATISTICS_CSV).write_text(statistics.statistics_csv(analysis.statistics))
    (folder / keys.COMPARISONS_CSV).write_text(statistics.comparisons_csv(analysis.comparisons))
    (folder / keys.SUMMARY_MD).write_text(statistics.summary_markdown(analysis, settings, source))
    rows = analysis.statistics
    seed_values = [[run.test_accuracy for run in analysis.runs if run.config == row.config] for row in rows]
    figure = plots.test_accuracy_intervals(
        [row.config for row in rows],
        [row.test_accuracy.mean for row in rows],
        [row.test_accuracy.low for row in rows],
        [row.test_accuracy.high for row in rows],
        seed_values,
    )
    save_figure(figure, folder / keys.TEST_ACCURACY_CI_PNG)
    bands = statistics.validation_bands(analysis.runs)
    figure = plots.validation_bands(
        list(bands),
        [mean for mean, _, _ in bands.values()],
        [low for _, low, _ in bands.values()],
        [high for _, _, high in bands.values()],
    )
    save_figure(figure, folder / keys.VAL_ACCURACY_BAND_PNG)


def build_report(experiment: str, output: Path) -> statistics.Analysis:
    """Pool the experiment's finished child runs, analyse the largest settings group, write `output`."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output: {str(output)!r} is a file; give a folder (created if missing)")
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(
            f"experiment: no experiment named {experiment!r} in the tracking store {mlflow.get_tracking_uri()}"
        )
    groups = group_runs(finished_child_runs(client, found.experiment_id))
    if not groups:
        raise ConfigError(
            f"experiment: {experiment!r} has no FINISHED child runs with a {keys.CONFIG_TAG!r} tag; run `main` first"
        )
    chosen, others = groups[0], groups[1:]
    parents = {run.data.tags.get(MLFLOW_PARENT_RUN_ID) for run in chosen.runs}
    analysis = statistics.analyze(load_seed_runs(client, chosen.runs))
    sources = _data_sources(client, parents)
    if len(sources) > 1:
        analysis.notes.append(
            "The pooled runs' parents name different data sources (" + ", ".join(sorted(sources)) + "): "
            "check they are the same data before trusting the pooled numbers."
        )
    settings = f"Settings: {chosen.describe()}, optimizer=adam."
    source = (
        f"Rebuilt by `report` from experiment {experiment!r}: {len(chosen.runs)} finished child runs of "
        f"{len(parents)} parent run(s) with {chosen.describe()} (the largest group of runs sharing "
        "epochs, batch size and learning rate)."
    )
    if others:
        source += " Not included, other settings: " + "; ".join(
            f"{group.describe()} ({len(group.runs)} runs)" for group in others
        )
        source += "."
    write_outputs(output, analysis, settings, source)
    log.info("Report on %d runs (%s) written to %s", len(chosen.runs), chosen.describe(), output)
    print((output / keys.SUMMARY_MD).read_text())
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:  # under `mlflow run -e report`: keep the report with that run too
        client.set_tag(run_id, keys.ENTRY_POINT_TAG, "report")
        client.log_artifacts(run_id, str(output))
    return analysis


def finished_child_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    """FINISHED runs with a parent, a valid `config` tag and a test accuracy, oldest first."""
    runs: list[Run] = []
    page_token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string="attributes.status = 'FINISHED'",
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=page_token,
        )
        runs.extend(page)
        page_token = page.token
        if not page_token:
            break
    return [run for run in runs if _is_config_run(run)]


def group_runs(runs: Sequence[Run]) -> list[RunGroup]:
    """Runs grouped by (epochs, batch_size, learning_rate): largest first, ties to the most recent."""
    grouped: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        settings = tuple(_normalized(run.data.params.get(name, "?")) for name in GROUP_PARAMS)
        grouped.setdefault(settings, []).append(run)
    order = sorted(grouped.items(), key=lambda item: (len(item[1]), max(run.info.start_time for run in item[1])))
    return [RunGroup(settings, members) for settings, members in reversed(order)]


def load_seed_runs(client: MlflowClient, runs: Sequence[Run]) -> list[statistics.SeedRun]:
    """Each run's accuracies and validation history; predictions only where McNemar's test needs them."""
    seed_runs = []
    for run in runs:
        history = sorted(client.get_metric_history(run.info.run_id, keys.VAL_ACCURACY), key=lambda m: m.step)
        seed_runs.append(
            statistics.SeedRun(
                config=run.data.tags[keys.CONFIG_TAG],
                seed=int(run.data.tags.get("seed", run.data.params.get("seed", "0"))),
                test_accuracy=run.data.metrics[keys.TEST_ACCURACY],
                best_val_accuracy=run.data.metrics.get(keys.BEST_VAL_ACCURACY, float("nan")),
                val_accuracy=tuple(metric.value for metric in history),
            )
        )
    # analyze() keeps the latest run per (config, seed): that is the one whose predictions count.
    latest = {(seed_run.config, seed_run.seed): index for index, seed_run in enumerate(seed_runs)}
    kept, _ = statistics.deduplicate(seed_runs)
    for key in _needs_predictions(kept):
        index = latest[key]
        predictions, labels = _load_predictions(runs[index].info.run_id)
        seed_runs[index] = replace(seed_runs[index], predictions=predictions, labels=labels)
    return seed_runs


def _needs_predictions(runs: Sequence[statistics.SeedRun]) -> set[tuple[str, int]]:
    """(config, seed) of the runs in comparisons that share exactly one seed (McNemar's test)."""
    seeds: dict[str, set[int]] = {}
    for run in runs:
        seeds.setdefault(run.config, set()).add(run.seed)
    needed = set()
    for _, _, first, second in statistics.comparison_pairs(seeds):
        shared = seeds[first] & seeds[second]
        if len(shared) == 1:
            (seed,) = shared
            needed |= {(first, seed), (second, seed)}
    return needed


def _load_predictions(run_id: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The run's test_predictions.npy and test_labels.npy, or (None, None) if it has none (older runs)."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            arrays = [
                np.load(
                    mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=folder),
                    allow_pickle=False,
                )
                for name in (keys.TEST_PREDICTIONS, keys.TEST_LABELS)
            ]
        except (MlflowException, OSError, ValueError) as error:
            log.warning("Run %s has no usable %s (%s): no McNemar test for it", run_id, keys.TEST_PREDICTIONS, error)
            return None, None
    return arrays[0], arrays[1]


def _data_sources(client: MlflowClient, parent_ids: set[str]) -> set[str]:
    """The `data` parameter of each parent run (`main` logs it there, not on the children)."""
    sources = set()
    for parent_id in parent_ids:
        try:
            sources.add(client.get_run(parent_id).data.params.get("data", "unknown"))
        except MlflowException:
            sources.add("unknown")
    return sources


def _is_config_run(run: Run) -> bool:
    tags = run.data.tags
    if MLFLOW_PARENT_RUN_ID not in tags or keys.TEST_ACCURACY not in run.data.metrics:
        return False
    try:
        parse_config_name(tags.get(keys.CONFIG_TAG, ""))
    except ConfigError:
        return False
    return True


def save_figure(figure, path: Path) -> None:
    """As tracking.runs.save_figure, without importing Keras (which tracking.runs needs): `report` starts fast."""
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _normalized(value: str) -> str:
    """`0.001` and `0.0010` are the same learning rate."""
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number.is_integer() and "." not in value else repr(number)
