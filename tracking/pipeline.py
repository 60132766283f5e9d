"""The `main` and `train` entry points: train configurations and record everything in MLflow."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import mlflow
from tqdm import tqdm

from study import comparison, plots, runtime, statistics
from study.config import TrainConfig
from study.runner import Outcome, Workers, default_workers
from tracking import keys
from tracking.report import write_outputs
from tracking.resume import reusable
from tracking.runs import ConfigRuns, log_run_results, save_figure, top_run, use_experiment

log = logging.getLogger(__name__)


def run_study(
    configs: Sequence[TrainConfig],
    data: str,
    seeds: int = 1,
    workers: int = 0,
    experiment: str = keys.DEFAULT_EXPERIMENT,
    registered_model: str | None = keys.DEFAULT_REGISTERED_MODEL,
    resume: bool = False,
    pool: Workers | None = None,
) -> list[comparison.ConfigResult]:
    """`main`: every configuration (x seed) as a child of one parent run, then the comparison.

    With `resume`, configurations that already have a FINISHED run with identical parameters in the
    experiment are taken from that run instead of being trained again (tag `reused_runs` on the parent).

    With one seed a child run is named `{activation}-{loss}`; with several, `{activation}-{loss}-seed{k}`.
    Each model is registered as a version of `registered_model` (None: not registered).
    `pool`: training processes already started (the CLI starts them, and hands them the configurations, before
    importing MLflow); else `workers` of them (0 = one per core) are started here.
    """
    first = configs[0]
    settings = (
        f"Settings: epochs={first.epochs}, batch_size={first.batch_size}, "
        f"learning_rate={first.learning_rate}, seed={first.seed}, optimizer=adam."
    )
    experiment_id = use_experiment(experiment)
    run_name = f"study-{datetime.now():%Y%m%d-%H%M%S}"
    with top_run(run_name, {keys.ENTRY_POINT_TAG: "main"}, experiment_id) as parent:
        mlflow.log_params(
            {
                "epochs": first.epochs,
                "batch_size": first.batch_size,
                "learning_rate": first.learning_rate,
                "seed": first.seed,
                "seeds": seeds,
                "data": data,
                "workers": workers,
                "registered_model": registered_model or keys.NO_REGISTRATION,
            }
        )
        names = {config: config.name if seeds == 1 else f"{config.name}-seed{config.seed}" for config in configs}
        reused = reusable(experiment_id, list(configs)) if resume else {}
        if reused:
            mlflow.set_tag(keys.REUSED_RUNS_TAG, ",".join(outcome.reused_run_id for outcome in reused.values()))
        to_train = [config for config in configs if config not in reused]
        with pool or Workers(workers or default_workers(len(to_train)), data) as training:
            trained = _train_and_log(
                to_train, training, experiment_id, parent.info.run_id, names, registered_model=registered_model
            )
        by_config = {**reused, **{outcome.config: outcome for outcome in trained}}
        outcomes = [by_config[config] for config in configs]
        results = [_result_row(outcome) for outcome in outcomes]
        _log_comparison(results, outcomes, settings)
    print(comparison.results_table(results))
    return results


def run_single(config: TrainConfig, data: str, experiment: str = keys.DEFAULT_EXPERIMENT) -> comparison.ConfigResult:
    """`train`: one configuration, logged into the top-level run itself (no parent)."""
    experiment_id = use_experiment(experiment)
    with top_run(config.name, {keys.ENTRY_POINT_TAG: "train"}, experiment_id), Workers(1, data) as training:
        outcomes = _train_and_log([config], training, experiment_id, None, {config: config.name})
    result = _result_row(outcomes[0])
    print(comparison.results_table([result]))
    return result


def _train_and_log(
    configs: Sequence[TrainConfig],
    workers: Workers,
    experiment_id: str,
    parent_run_id: str | None,
    names: dict[TrainConfig, str],
    registered_model: str | None = None,
) -> list[Outcome]:
    """Train the configurations (maybe in parallel), logging epochs as they come; study order kept."""
    finished: dict[TrainConfig, Outcome] = {}
    if not configs:
        return []
    progress = tqdm(total=sum(config.epochs for config in configs), unit="epoch", desc="study")
    with ConfigRuns(experiment_id, parent_run_id, names, registered_model=registered_model) as runs, progress:

        def on_epoch(config: TrainConfig, epoch: int, metrics: dict[str, float]) -> None:
            runs.log_epoch(config, epoch, metrics)
            progress.update(1)
            progress.set_postfix_str(f"{names[config]} epoch {epoch} val_accuracy {metrics['val_accuracy']:.4f}")

        def on_done(outcome: Outcome) -> None:
            progress.update(outcome.config.epochs - outcome.epochs_run)  # epochs skipped by a stop
            runs.log_outcome(outcome)
            runtime.release_memory(collect=False)  # the loaded model, the figures: stay small beside the workers
            finished[outcome.config] = outcome
            log.info(
                "%s: best val_accuracy %.4f, test_accuracy %.4f",
                names[outcome.config],
                outcome.best_val_accuracy,
                outcome.test_accuracy,
            )

        workers.run(configs, on_epoch, on_done)
    return [finished[config] for config in configs]


def _result_row(outcome: Outcome) -> comparison.ConfigResult:
    return comparison.ConfigResult(
        config=outcome.config.name,
        activation=outcome.config.activation,
        loss=outcome.config.loss,
        seed=outcome.config.seed,
        best_val_accuracy=outcome.best_val_accuracy,
        test_accuracy=outcome.test_accuracy,
        test_loss=outcome.test_loss,
        train_seconds=round(outcome.train_seconds, 2),
        diverged=outcome.diverged,
    )


def _log_comparison(results: list[comparison.ConfigResult], outcomes: list[Outcome], settings: str) -> None:
    """results.csv, comparison.png, tag best_config and metric best_test_accuracy; the statistics over seeds:
    statistics.csv, comparisons.csv, summary.md (verdicts), the CI plots and test_accuracy_mean/{config}."""
    winner = comparison.best(results)
    analysis = statistics.analyze(statistics.SeedRun.from_outcome(outcome) for outcome in outcomes)
    metrics = {keys.BEST_TEST_ACCURACY: winner.test_accuracy}
    metrics |= {f"{keys.TEST_ACCURACY_MEAN_PREFIX}{row.config}": row.test_accuracy.mean for row in analysis.statistics}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / keys.RESULTS_CSV).write_text(comparison.results_csv(results))
        write_outputs(Path(folder), analysis, settings)
        figure = plots.comparison(
            [row.config for row in results],
            [row.test_accuracy for row in results],
            [outcome.history["val_accuracy"] for outcome in outcomes],
        )
        save_figure(figure, Path(folder) / keys.COMPARISON_PNG)
        # If the tracking store is unreachable by now, these go to an unsynced record for `python -m study sync`.
        parent = mlflow.active_run()
        log_run_results(
            parent.info.run_id,
            parent.info.experiment_id,
            parent.info.run_name,
            {keys.BEST_CONFIG_TAG: winner.config},
            metrics,
            Path(folder),
        )
