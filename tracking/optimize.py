"""`optimize`: Optuna studies tracked in MLflow, one nested run per trial, results on the parent run.

The Optuna side (search space, objective, pruning, the shared trial loop) is `study.objective`; this
module plugs MLflow into it through `TrialRuns` and, once the studies are done, evaluates each
configuration's best model on the test set (once per best trial, whoever asks) and logs
tuned_results.csv, Optuna's plots and summary.md on the parent run.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import mlflow
import optuna
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from study.config import ACTIVATIONS, LOSSES, TrainConfig, parse_config_name
from study.data import Dataset, load_raw, prepare
from study.objective import (
    DIVERGED_ATTR,
    EPOCHS_RUN_ATTR,
    LEARNING_RATE_HIGH,
    LEARNING_RATE_LOW,
    TRAIN_SECONDS_ATTR,
    OptimizeSettings,
    SearchSpace,
    StopSignal,
    StorageLock,
    TrialHooks,
    TrialOutcome,
    count_trials,
    epochs_spent,
    optimize_studies,
)
from study.training import evaluate
from tracking import keys
from tracking.runs import MODEL_SIGNATURE, pip_requirements, save_figure, top_run, use_experiment

log = logging.getLogger(__name__)

MLFLOW_RUN_ID_ATTR = "mlflow_run_id"  # trial user attr: the trial's MLflow run
TEST_EVALUATION_ATTR = "test_evaluation"  # study user attr: the best trial's one test evaluation

TUNED_COLUMNS = (
    "config",
    "activation",
    "loss",
    "best_trial",
    "learning_rate",
    "epochs",
    "best_val_accuracy",
    "test_accuracy",
    "test_loss",
    "trials_complete",
    "trials_pruned",
    "trials_failed",
    "epochs_spent",
)


@dataclass(frozen=True)
class TunedResult:
    """One configuration after tuning: its best trial, that model's test result and what it cost."""

    config: str
    activation: str
    loss: str
    best_trial: int | None
    learning_rate: float
    epochs: int | None
    best_val_accuracy: float
    test_accuracy: float
    test_loss: float
    trials_complete: int
    trials_pruned: int
    trials_failed: int
    epochs_spent: int


def run_optimize(settings: OptimizeSettings, experiment: str = keys.DEFAULT_EXPERIMENT) -> list[TunedResult]:
    """Tune every configuration in `settings` (resuming its study), then log the results on the parent run."""
    experiment_id = _use_experiment(experiment)
    run_name = f"optimize-{datetime.now():%Y%m%d-%H%M%S}"
    with StopSignal().installed() as stop, top_run(run_name, {keys.ENTRY_POINT_TAG: "optimize"}) as parent:
        # `mlflow run` has logged its entry-point parameters as given (e.g. configs=all); MLflow refuses
        # to change a param, so only add the ones it has not.
        logged = mlflow.get_run(parent.info.run_id).data.params
        mlflow.log_params({key: value for key, value in settings.params().items() if key not in logged})
        data = prepare(load_raw(settings.data), seed=settings.seed)
        with TrialRuns(experiment_id, parent.info.run_id) as runs:
            studies = optimize_studies(settings, data, runs, stop)
        lock = StorageLock(settings.storage)
        results = [_tuned_result(name, study, data, lock) for name, study in studies.items()]
        _log_parent_artifacts(settings, results, studies)
    print(results_table(results))
    return results


class TrialRuns(TrialHooks):
    """One nested MLflow run per trial: params, per-epoch metrics, Optuna tags, and the kept model.

    A COMPLETE trial's run ends FINISHED; PRUNED ends KILLED; FAIL ends FAILED (KILLED when
    interrupted). Runs still open when the context exits end KILLED (Ctrl-C) or FAILED.
    """

    def __init__(self, experiment_id: str, parent_run_id: str):
        self.client = MlflowClient()
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.open: dict[tuple[str, int], str] = {}

    def __enter__(self) -> TrialRuns:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        interrupted = error_type is not None and issubclass(error_type, KeyboardInterrupt)
        status = RunStatus.KILLED if interrupted else RunStatus.FAILED
        for (study_name, number), run_id in self.open.items():
            log.warning("Marking %s trial %d's run %s as %s", study_name, number, run_id, RunStatus.to_string(status))
            self.client.set_terminated(run_id, RunStatus.to_string(status))
        self.open.clear()

    def trial_started(self, trial: optuna.Trial, config: TrainConfig) -> None:
        study_name = trial.study.study_name
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_run_id,
            keys.OPTUNA_STUDY_TAG: study_name,
            keys.OPTUNA_TRIAL_NUMBER_TAG: str(trial.number),
            keys.OPTUNA_TRIAL_STATE_TAG: TrialState.RUNNING.name,
            keys.CONFIG_TAG: config.name,
            keys.CONFIG_HASH_TAG: config.config_hash(),
            "seed": str(config.seed),
        }
        run_name = f"{config.name}-trial-{trial.number}"
        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        params = [Param(key, str(value)) for key, value in config.params().items()]
        self.client.log_batch(run_id, params=params)
        trial.set_user_attr(MLFLOW_RUN_ID_ATTR, run_id)
        self.open[(study_name, trial.number)] = run_id

    def epoch_finished(self, trial: optuna.Trial, epoch: int, metrics: Mapping[str, float]) -> None:
        run_id = self.open[(trial.study.study_name, trial.number)]
        timestamp = int(time.time() * 1000)
        batch = [Metric(key, float(value), timestamp, epoch) for key, value in metrics.items()]
        self.client.log_batch(run_id, metrics=batch)

    def keep_model(self, trial: optuna.Trial, model: keras.Model) -> None:
        """The native .keras file as an artifact of the trial's run: any worker can load it back."""
        run_id = self.open[(trial.study.study_name, trial.number)]
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / keys.TRIAL_MODEL_FILE
            model.save(path)
            self.client.log_artifact(run_id, str(path), keys.TRIAL_MODEL_DIR)

    def trial_finished(self, trial: optuna.Trial, outcome: TrialOutcome) -> None:
        key = (trial.study.study_name, trial.number)
        run_id = self.open.get(key)
        if run_id is None:  # interrupted before its run was created
            return
        tags = {keys.OPTUNA_TRIAL_STATE_TAG: outcome.state.name}
        if outcome.reason:
            tags[keys.OPTUNA_REASON_TAG] = outcome.reason
        attributes = trial.user_attrs
        tags[keys.DIVERGED_TAG] = str(bool(attributes.get(DIVERGED_ATTR, False))).lower()
        timestamp = int(time.time() * 1000)
        final = {keys.EPOCHS_RUN: attributes.get(EPOCHS_RUN_ATTR, 0)}
        if TRAIN_SECONDS_ATTR in attributes:
            final[keys.TRAIN_SECONDS] = attributes[TRAIN_SECONDS_ATTR]
        self.client.log_batch(
            run_id,
            metrics=[Metric(key, float(value), timestamp, 0) for key, value in final.items()],
            tags=[RunTag(key, value) for key, value in tags.items()],
        )
        self.client.set_terminated(run_id, RunStatus.to_string(_run_status(outcome)))
        del self.open[key]  # only now: if logging failed, __exit__ still closes the run

    def trial_abandoned(self, trial: FrozenTrial) -> None:
        """Close the run of a trial whose worker died (it was left RUNNING)."""
        run_id = trial.user_attrs.get(MLFLOW_RUN_ID_ATTR)
        if not run_id:
            return
        if self.client.get_run(run_id).info.status != RunStatus.to_string(RunStatus.RUNNING):
            return
        self.client.set_tag(run_id, keys.OPTUNA_TRIAL_STATE_TAG, TrialState.FAIL.name)
        self.client.set_tag(run_id, keys.OPTUNA_REASON_TAG, "its worker stopped sending heartbeats")
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


def _run_status(outcome: TrialOutcome) -> RunStatus:
    """COMPLETE -> FINISHED; PRUNED -> KILLED (stopped on purpose, not a success); FAIL -> FAILED or KILLED."""
    if outcome.state == TrialState.COMPLETE:
        return RunStatus.FINISHED
    if outcome.state == TrialState.PRUNED or outcome.interrupted:
        return RunStatus.KILLED
    return RunStatus.FAILED


# --- After the trials: best models, results, plots, summary --------------------------------------


def _tuned_result(name: str, study: optuna.Study, data: Dataset, lock: StorageLock) -> TunedResult:
    trials = study.get_trials(deepcopy=False)
    counts = count_trials(trials)
    activation, loss = parse_config_name(name)
    evaluation = _evaluate_best(study, data, lock) if counts.complete else None
    best = study.best_trial if counts.complete else None
    if counts.active:
        log.warning("%s: %d trial(s) still running elsewhere are not in these results", study.study_name, counts.active)
    return TunedResult(
        config=name,
        activation=activation,
        loss=loss,
        best_trial=best.number if best else None,
        learning_rate=best.params["learning_rate"] if best else math.nan,
        epochs=best.params["epochs"] if best else None,
        best_val_accuracy=best.value if best else math.nan,
        test_accuracy=evaluation["test_accuracy"] if evaluation else math.nan,
        test_loss=evaluation["test_loss"] if evaluation else math.nan,
        trials_complete=counts.complete,
        trials_pruned=counts.pruned,
        trials_failed=counts.failed,
        epochs_spent=epochs_spent(trials),
    )


def _evaluate_best(study: optuna.Study, data: Dataset, lock: StorageLock) -> dict | None:
    """The best trial's model on the test set, once: later calls (other workers, reruns) reuse the
    result stored on the study. The model is loaded back from the trial's run, evaluated, and logged
    there as an MLflow model with test_loss / test_accuracy."""
    best = study.best_trial
    with lock.hold(study.study_name):
        cached = study.user_attrs.get(TEST_EVALUATION_ATTR)
        if cached and cached.get("trial") == best.number:
            return cached
        run_id = best.user_attrs.get(MLFLOW_RUN_ID_ATTR)
        if not run_id:
            log.warning("%s trial %d has no MLflow run: its model cannot be evaluated", study.study_name, best.number)
            return None
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=f"{keys.TRIAL_MODEL_DIR}/{keys.TRIAL_MODEL_FILE}", dst_path=folder
                )
            except MlflowException as error:
                log.warning("%s trial %d: no saved model (%s)", study.study_name, best.number, error)
                return None
            model = keras.saving.load_model(path, safe_mode=True)
        evaluation = evaluate(model, data)
        with mlflow.start_run(run_id=run_id, nested=True):
            info = mlflow.keras.log_model(
                model, name=keys.MODEL_NAME, signature=MODEL_SIGNATURE, pip_requirements=pip_requirements()
            )
            mlflow.log_metrics({keys.TEST_LOSS: evaluation.test_loss, keys.TEST_ACCURACY: evaluation.test_accuracy})
        record = {
            "trial": best.number,
            "test_accuracy": evaluation.test_accuracy,
            "test_loss": evaluation.test_loss,
            "run_id": run_id,
            "model_uri": info.model_uri,
        }
        study.set_user_attr(TEST_EVALUATION_ATTR, record)
        log.info(
            "%s best trial %d: val_accuracy %.4f, test_accuracy %.4f (model %s)",
            study.study_name,
            best.number,
            best.value,
            evaluation.test_accuracy,
            info.model_uri,
        )
        return record


def _log_parent_artifacts(
    settings: OptimizeSettings, results: Sequence[TunedResult], studies: Mapping[str, optuna.Study]
) -> None:
    """tuned_results.csv, summary.md, Optuna's plots per configuration; tag best_config."""
    tuned = [row for row in results if row.best_trial is not None]
    if tuned:
        winner = _best(tuned)
        mlflow.set_tag(keys.BEST_CONFIG_TAG, winner.config)
        if math.isfinite(winner.test_accuracy):
            mlflow.log_metric(keys.BEST_TEST_ACCURACY, winner.test_accuracy)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / keys.TUNED_RESULTS_CSV).write_text(tuned_results_csv(results))
        (root / keys.SUMMARY_MD).write_text(tuned_summary_markdown(results, settings))
        for name, study in studies.items():
            _save_plots(study, root / keys.OPTUNA_PLOTS_DIR / name, settings.seed)
        mlflow.log_artifacts(folder)


def _save_plots(study: optuna.Study, folder: Path, seed: int) -> None:
    """Optimization history, parameter importances (>= 2 complete trials) and parallel coordinates."""
    import optuna.visualization.matplotlib as optuna_plots

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        log.info("%s: no complete trial, so no Optuna plots", study.study_name)
        return
    folder.mkdir(parents=True, exist_ok=True)
    plots = {
        keys.OPTIMIZATION_HISTORY_PNG: lambda: optuna_plots.plot_optimization_history(study),
        keys.PARALLEL_COORDINATE_PNG: lambda: optuna_plots.plot_parallel_coordinate(study),
    }
    if len(complete) >= 2:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        plots[keys.PARAM_IMPORTANCES_PNG] = lambda: optuna_plots.plot_param_importances(study, evaluator=evaluator)
    else:
        log.info("%s: parameter importances need 2 complete trials, found 1: skipped", study.study_name)
    for file_name, plot in plots.items():
        with warnings.catch_warnings():  # "experimental" notices; flat axes when a parameter never varied
            warnings.simplefilter("ignore", ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)
            axes = plot()
        axes.set_title(f"{axes.get_title()}: {study.study_name}")
        figure = axes.figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        save_figure(figure, folder / file_name)
    plt.close("all")


def tuned_results_csv(results: Sequence[TunedResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TUNED_COLUMNS)
    for row in results:
        values = asdict(row)
        writer.writerow(["" if values[column] is None else values[column] for column in TUNED_COLUMNS])
    return buffer.getvalue()


def results_table(results: Sequence[TunedResult]) -> str:
    """A fixed-width table for the console."""
    header = (
        f"{'config':<22}{'learning rate':>14}{'epochs':>8}{'val acc':>9}{'test acc':>10}"
        f"{'complete/pruned/failed':>24}{'epochs spent':>14}"
    )
    lines = [header, "-" * len(header)]
    for row in results:
        trials = f"{row.trials_complete}/{row.trials_pruned}/{row.trials_failed}"
        epochs = "-" if row.epochs is None else str(row.epochs)
        lines.append(
            f"{row.config:<22}{row.learning_rate:>14.3g}{epochs:>8}{row.best_val_accuracy:>9.4f}"
            f"{row.test_accuracy:>10.4f}{trials:>24}{row.epochs_spent:>14}"
        )
    return "\n".join(lines)


def tuned_summary_markdown(results: Sequence[TunedResult], settings: OptimizeSettings) -> str:
    """Which activation and which loss are best once each configuration is tuned."""
    space = SearchSpace(settings.max_epochs)
    lines = [
        "# MNIST activation study, tuned with Optuna: summary",
        "",
        f"Each configuration's learning rate (log-uniform {LEARNING_RATE_LOW:g}..{LEARNING_RATE_HIGH:g}) and "
        f"epochs ({space.min_epochs}..{space.max_epochs}) were tuned over {settings.n_trials} finished trials "
        f"(TPE seed {settings.seed}, median pruning), batch size {settings.batch_size}. Winners are chosen on "
        "the best trial's validation accuracy (last epoch); test accuracy is measured once, on that trial's model.",
        "",
    ]
    by_name = {row.config: row for row in results if row.best_trial is not None}
    if not by_name:
        return "\n".join([*lines, "No configuration has a complete trial yet.", ""])
    lines += ["## Which activation is best once tuned", ""]
    for loss in LOSSES:
        rows = [by_name[f"{activation}-{loss}"] for activation in ACTIVATIONS if f"{activation}-{loss}" in by_name]
        if rows:
            lines.append(f"- with **{loss}**: " + _ranking(rows, "activation"))
    lines += ["", "## Which loss is best once tuned", ""]
    for activation in ACTIVATIONS:
        rows = [by_name[f"{activation}-{loss}"] for loss in LOSSES if f"{activation}-{loss}" in by_name]
        if rows:
            lines.append(f"- with **{activation}**: " + _ranking(rows, "loss"))
    winner = _best(list(by_name.values()))
    lines += [
        "",
        "## Overall",
        "",
        f"Best tuned configuration: **{winner.config}**, so activation **{winner.activation}** and loss "
        f"**{winner.loss}** (learning rate {winner.learning_rate:.3g}, {winner.epochs} epochs; validation "
        f"{winner.best_val_accuracy:.4f}, test {_format(winner.test_accuracy)}).",
        "",
        "## Results",
        "",
        "| config | learning rate | epochs | best val accuracy | test accuracy | trials complete / pruned / failed "
        "| epochs spent |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results:
        epochs = "-" if row.epochs is None else str(row.epochs)
        lines.append(
            f"| {row.config} | {row.learning_rate:.3g} | {epochs} | {_format(row.best_val_accuracy)} | "
            f"{_format(row.test_accuracy)} | {row.trials_complete} / {row.trials_pruned} / {row.trials_failed} | "
            f"{row.epochs_spent} |"
        )
    return "\n".join(lines) + "\n"


def _ranking(rows: Sequence[TunedResult], field: str) -> str:
    """`**winner** (validation, test); then the others`, best validation accuracy first."""
    ordered = sorted(rows, key=lambda row: -row.best_val_accuracy)
    described = [
        f"{getattr(row, field)} (validation {row.best_val_accuracy:.4f}, test {_format(row.test_accuracy)})"
        for row in ordered
    ]
    text = f"**{described[0].replace(' (', '** (', 1)}"
    return text + ("; then " + ", ".join(described[1:]) if described[1:] else "")


def _best(rows: Sequence[TunedResult]) -> TunedResult:
    return max(rows, key=lambda row: row.best_val_accuracy)


def _format(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "n/a"


# --- Process plumbing ----------------------------------------------------------------------------


def _use_experiment(name: str) -> str:
    """`use_experiment`, tolerating another worker creating the same experiment at the same moment."""
    try:
        return use_experiment(name)
    except MlflowException as error:
        if "already exists" not in str(error).lower() and error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return use_experiment(name)
