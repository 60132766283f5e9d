"""MLflow runs: the experiment, the parent (study) run, and one run per configuration.

Everything that lands in MLflow is written here, explicitly (no autolog), with the keys from
`tracking.keys`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import mlflow
import numpy as np
from mlflow.entities import Metric, RunStatus
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from study import plots
from study.config import ConfigError, TrainConfig
from study.model import INPUT_SIZE
from study.runner import Outcome
from tracking import keys, unsynced
from tracking.registry import register_outcome
from tracking.reliability import RetryingClient, is_unreachable, outage, redact, store_reachable, with_retry

log = logging.getLogger(__name__)

# The logged model takes float32 rows of 784 pixels scaled to [0, 1] and returns 10 probabilities.
MODEL_SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, INPUT_SIZE))]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
)


def pip_requirements() -> list[str]:
    """What a logged model needs to load and serve, pinned to this environment (no slow inference)."""
    import importlib.metadata as metadata

    packages = ["mlflow", "keras", "numpy", "tensorflow"]
    if keras.backend.backend() == "jax":
        packages += ["jax", "jaxlib"]
    return [f"{name}=={metadata.version(name)}" for name in packages]


# Epochs of a configuration arrive every ~0.7 s on a laptop: writing them in one call every few seconds keeps
# the UI's curves live at a third of the store calls (benchmarks/README.md, tracking overhead).
EPOCH_FLUSH_SECONDS = 2.0


class StoreUnreachable(ConfigError):
    """The tracking server or store can't be reached: reported as one line, exit code 2."""


def check_tracking_store(timeout: float = 10.0) -> None:
    """Fail fast, before any training, when the tracking store can't be reached."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                response.read()
        except (OSError, urllib.error.URLError) as error:
            raise StoreUnreachable(
                f"tracking server {redact(uri)} is unreachable ({error}); start it, or set MLFLOW_TRACKING_URI "
                "to a reachable server or to sqlite:///mlflow.db"
            ) from None
        _check_credentials(uri)
    elif uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        if not database.parent.is_dir():
            raise StoreUnreachable(f"tracking store {uri}: folder {database.parent} does not exist")
        _open_sqlite_store(database)


def _check_credentials(uri: str) -> None:
    """A server with authentication (`mlflow server --app-name basic-auth`) answers /health to anyone: ask it
    something that needs credentials, so that missing or wrong ones are one line, not a traceback later."""
    try:
        MlflowClient().search_experiments(max_results=1)
    except mlflow.exceptions.MlflowException as error:
        if error.get_http_status_code() not in (401, 403):
            raise
        raise StoreUnreachable(
            f"tracking server {redact(uri)} refused the request (HTTP {error.get_http_status_code()}, "
            f"{error.error_code}); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN) for a user allowed to use it"
        ) from None


def _open_sqlite_store(database: Path) -> None:
    """Open (create or migrate) a SQLite store under a file lock beside it: two studies started at the same
    moment on a new store would otherwise both create its tables ("table ... already exists")."""
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with_retry(MlflowClient().search_experiments, max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def use_experiment(name: str) -> str:
    """The experiment to log into (mlflow run's, else `name`), tagged for MLflow 3's training-runs UI."""
    check_tracking_store()
    run_id = os.environ.get("MLFLOW_RUN_ID")  # set by `mlflow run`: its run decides the experiment
    if run_id:
        experiment_id = with_retry(MlflowClient().get_run, run_id).info.experiment_id
        mlflow.set_experiment(experiment_id=experiment_id)
    else:
        experiment_id = _set_experiment(name)
    _tag_experiment(experiment_id)
    return experiment_id


def _tag_experiment(experiment_id: str) -> None:
    """Tag the experiment for the training-runs UI. Two studies starting at the same moment may both set the
    tag; a store can then refuse the second insert (UNIQUE constraint): fine if the tag is there."""
    client = MlflowClient()
    try:
        with_retry(client.set_experiment_tag, experiment_id, keys.EXPERIMENT_KIND_TAG, keys.EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException:
        tags = with_retry(client.get_experiment, experiment_id).tags
        if tags.get(keys.EXPERIMENT_KIND_TAG) != keys.EXPERIMENT_KIND:
            raise


def _set_experiment(name: str) -> str:
    """`mlflow.set_experiment(name)`, tolerating another study creating the same experiment at the same moment."""
    for attempt in range(3):
        try:
            return with_retry(mlflow.set_experiment, name).experiment_id
        except mlflow.exceptions.MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(error).lower():
                raise
            if attempt == 2:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def top_run(run_name: str, tags: Mapping[str, str], experiment_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """The run `mlflow run` created (MLFLOW_RUN_ID), or a new one named `run_name`.

    Ends FINISHED on success, KILLED on Ctrl-C, FAILED on any other error (if the store can't be reached
    by then, the status is kept in an unsynced record for `python -m study sync`).
    """
    run_id = os.environ.get("MLFLOW_RUN_ID")
    # The experiment is named explicitly (not left to set_experiment's process-wide state): two studies creating
    # the same experiment at the same moment must both put their parent runs in it.
    run = (
        mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=run_name, experiment_id=experiment_id)
    )
    mlflow.set_tags(dict(tags))
    if run_id:  # mlflow run gives its run a random name; say what this one is
        mlflow.set_tag(MLFLOW_RUN_NAME, run_name)
    try:
        yield run
    except KeyboardInterrupt:
        _end_top_run(run, RunStatus.KILLED, run_name)
        raise
    except BaseException:
        _end_top_run(run, RunStatus.FAILED, run_name)
        raise
    else:
        _end_top_run(run, RunStatus.FINISHED, run_name)


def _end_top_run(run: mlflow.ActiveRun, status: int, run_name: str) -> None:
    try:
        mlflow.end_run(RunStatus.to_string(status))
    except Exception as error:
        if not is_unreachable(error):
            raise
        # end_run took the run off the active-run stack before it failed: finish it here, or keep its status
        end_or_keep(RetryingClient(MlflowClient()), run.info.run_id, status, run_name, run.info.experiment_id)


def end_or_keep(
    client: RetryingClient,
    run_id: str,
    status: int,
    run_name: str,
    experiment_id: str,
    parent_run_id: str | None = None,
) -> None:
    """Set the run's final status; if the store can't be reached, keep it in an unsynced record (unless this
    process already keeps a record for that run, which carries the status with it)."""
    try:
        client.set_terminated(run_id, RunStatus.to_string(status))
    except Exception as error:
        if not is_unreachable(error):
            raise
        outage.failed(error, f"ending run {run_name}")
        if not unsynced.has_record(run_id):
            record = unsynced.Record(
                kind=unsynced.STATUS,
                tracking_uri=mlflow.get_tracking_uri(),
                experiment_id=experiment_id,
                run_name=run_name,
                run_id=run_id,
                parent_run_id=parent_run_id,
                status=RunStatus.to_string(status),
                reason=str(error),
            )
            unsynced.write(record)


Step = tuple[str, Callable[[], object]]


def attempt(steps: Sequence[Step], what: str) -> tuple[list[str], str]:
    """Run the logging steps in order; on an unreachable store wait for it (see `Outage.wait`) and go on.

    Returns the names of the steps done and, if some could not be done, why ('' when all were).
    """
    done: list[str] = []
    for name, step in steps:
        for tries in range(1, 4):
            try:
                step()
                break
            except Exception as error:
                if not is_unreachable(error):
                    raise
                outage.failed(error, what)
                if tries == 3 or not outage.wait(mlflow.get_tracking_uri()):
                    return done, str(error)
        done.append(name)
    outage.recovered(f"{what}: done")
    return done, ""


def log_run_results(
    run_id: str,
    experiment_id: str,
    run_name: str,
    tags: Mapping[str, str],
    metrics: Mapping[str, float],
    artifacts: Path,
) -> Path | None:
    """Tags, metrics (step 0) and a folder of artifacts for a run that is already created (the parent's
    results); kept in an unsynced record if the store can't be reached. Returns the record's folder."""
    client = RetryingClient(MlflowClient())
    timestamp = int(time.time() * 1000)
    final = [Metric(key, float(value), timestamp, 0) for key, value in metrics.items()]
    run_tags = [mlflow.entities.RunTag(key, value) for key, value in tags.items()]
    steps: list[Step] = [
        (unsynced.FINAL, lambda: client.log_batch(run_id, metrics=final, tags=run_tags)),
        (unsynced.ARTIFACTS, lambda: client.log_artifacts(run_id, str(artifacts))),
    ]
    done, reason = attempt(steps, f"logging {run_name}'s results")
    if not reason:
        return None
    record = unsynced.Record(
        kind=unsynced.PARENT,
        tracking_uri=mlflow.get_tracking_uri(),
        experiment_id=experiment_id,
        run_name=run_name,
        run_id=run_id,
        tags=dict(tags),
        final_metrics=unsynced.metric_rows(final),
        status=RunStatus.to_string(RunStatus.FINISHED),
        done=done,
        reason=reason,
    )
    return unsynced.write(record, artifacts=artifacts)


class ConfigRuns:
    """One MLflow run per configuration, opened at its first epoch and closed with its results.

    With a parent, they are nested children; without (`train`), the configuration's run is the
    top-level run itself. Runs still open when the context exits end KILLED or FAILED.

    The store may go away while training goes on (a server restarting, or lost): run creation and epoch
    metrics are buffered per configuration and flushed on each later call (one warning per outage). A
    configuration that ends while the store is still unreachable, after a bounded wait, keeps its results
    in an unsynced record (tracking/unsynced.py) that `python -m study sync` uploads later.
    """

    def __init__(
        self,
        experiment_id: str,
        parent_run_id: str | None,
        run_names: Mapping[TrainConfig, str],
        registered_model: str | None = None,
    ):
        self.client = RetryingClient(MlflowClient())
        self.registered_model = registered_model  # register each logged model as a version of it (None: don't)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.run_names = run_names
        self.open: dict[TrainConfig, str] = {}
        self.unlogged: set[TrainConfig] = set()  # runs created whose params and tags are not in the store yet
        self.pending: dict[TrainConfig, list[Metric]] = {}  # epoch metrics not in the store yet
        self.epochs: dict[TrainConfig, list[Metric]] = {}  # every epoch metric, for an unsynced record
        self.flushed_at: dict[TrainConfig, float] = {}  # when each configuration's epochs were last written
        self.requirements = pip_requirements()

    def __enter__(self) -> ConfigRuns:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        status = RunStatus.KILLED if error_type and issubclass(error_type, KeyboardInterrupt) else RunStatus.FAILED
        for config, run_id in self.open.items():
            if not outage.down:  # the epochs still buffered, if the store takes them
                with contextlib.suppress(Exception):
                    self._flush(config)
            log.warning("Marking run %s (%s) as %s", run_id, config.name, RunStatus.to_string(status))
            end_or_keep(self.client, run_id, status, self.run_names[config], self.experiment_id, self.parent_run_id)
        self.open.clear()

    def run_id(self, config: TrainConfig) -> str:
        """The configuration's run, created (with params and tags) the first time it is asked for."""
        if config not in self.open:
            if self.parent_run_id is None:
                run_id = mlflow.active_run().info.run_id
            else:
                tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id}
                run_id = self.client.create_run(
                    self.experiment_id, run_name=self.run_names[config], tags=tags
                ).info.run_id
            self.open[config] = run_id
            self.unlogged.add(config)
        run_id = self.open[config]
        if config in self.unlogged:
            self.client.log_batch(run_id, params=_params(config), tags=_tags(config))
            self.unlogged.discard(config)
        return run_id

    def _flush(self, config: TrainConfig) -> None:
        """Create the configuration's run if needed and log its buffered epochs; raises if the store can't."""
        run_id = self.run_id(config)
        pending = self.pending.get(config)
        if pending:
            self.client.log_batch(run_id, metrics=list(pending))
            pending.clear()
        self.flushed_at[config] = time.monotonic()

    def _flush_all(self, first: TrainConfig) -> None:
        """`first`, then every other configuration that has something buffered (they catch up together)."""
        self._flush(first)
        for config in list(self.pending):
            if config != first and (self.pending[config] or config in self.unlogged):
                self._flush(config)

    def log_epoch(self, config: TrainConfig, epoch: int, metrics: Mapping[str, float]) -> None:
        """One epoch's train/val loss and accuracy, step = epoch (from 1). The first epoch is written at once
        (the run appears in the UI); later ones at most every EPOCH_FLUSH_SECONDS, several in one call, and
        all of them before the run ends. Buffered while the store can't be reached."""
        timestamp = int(time.time() * 1000)
        # Keras reports float32: round off the float64 noise (0.94416666...) the UI would show.
        batch = [Metric(key, round(float(value), 6), timestamp, epoch) for key, value in metrics.items()]
        self.epochs.setdefault(config, []).extend(batch)
        self.pending.setdefault(config, []).extend(batch)
        if epoch > 1 and time.monotonic() - self.flushed_at.get(config, 0.0) < EPOCH_FLUSH_SECONDS:
            return  # written with a later epoch or with the results: one call per configuration every few seconds
        if outage.down and not store_reachable(mlflow.get_tracking_uri()):
            return  # a quick probe, not a call that would spend its retries on a store known to be away
        try:
            self._flush_all(config)
        except Exception as error:
            if not is_unreachable(error):
                raise
            outage.failed(error, f"logging {self.run_names[config]} epoch {epoch}")
        else:
            outage.recovered("buffered epoch metrics logged")

    def log_outcome(self, outcome: Outcome) -> None:
        """Final metrics, plots, history and the model; then the run ends FINISHED (or, if the store can't
        be reached, all of it goes to an unsynced record)."""
        config = outcome.config
        final = {
            keys.TEST_LOSS: outcome.test_loss,
            keys.TEST_ACCURACY: outcome.test_accuracy,
            keys.BEST_VAL_ACCURACY: outcome.best_val_accuracy,
            keys.TRAIN_SECONDS: outcome.train_seconds,
            keys.EPOCHS_RUN: outcome.epochs_run,
            keys.BEST_EPOCH: outcome.best_epoch,
        }
        timestamp = int(time.time() * 1000)
        final_metrics = [Metric(key, float(value), timestamp, 0) for key, value in final.items()]
        tags = {keys.DIVERGED_TAG: str(outcome.diverged).lower()}
        if outcome.stopped_reason:
            tags[keys.STOPPED_REASON_TAG] = outcome.stopped_reason
        run_tags = [mlflow.entities.RunTag(key, value) for key, value in tags.items()]
        title = self.run_names[config]
        models: list[mlflow.models.model.ModelInfo] = []
        with tempfile.TemporaryDirectory() as temporary:
            folder = Path(temporary) / keys.UNSYNCED_ARTIFACTS_DIR
            folder.mkdir()
            save_figure(plots.learning_curves(outcome.history, title), folder / keys.LEARNING_CURVES)
            save_figure(
                plots.confusion_matrix(outcome.labels, outcome.predictions, title),
                folder / keys.CONFUSION_MATRIX,
            )
            (folder / keys.HISTORY).write_text(json.dumps(outcome.history, indent=2))
            # Per-image test predictions (and labels): McNemar's test in `report` pairs two runs on them.
            np.save(folder / keys.TEST_PREDICTIONS, np.asarray(outcome.predictions, dtype=np.int8))
            np.save(folder / keys.TEST_LABELS, np.asarray(outcome.labels, dtype=np.int8))
            steps: list[Step] = [
                (unsynced.EPOCHS, lambda: self._flush_all(config)),
                (unsynced.FINAL, lambda: self.client.log_batch(self.open[config], final_metrics, [], run_tags)),
                (unsynced.ARTIFACTS, lambda: self.client.log_artifacts(self.open[config], str(folder))),
                (unsynced.MODEL, lambda: models.append(self.log_model(self.open[config], outcome.model_path))),
            ]
            if self.registered_model:
                steps.append(
                    (
                        unsynced.REGISTERED,
                        lambda: register_outcome(self.registered_model, models[-1], outcome, self.open[config]),
                    )
                )
            finished = RunStatus.to_string(RunStatus.FINISHED)
            steps.append(("finished", lambda: self.client.set_terminated(self.open[config], finished)))
            done, reason = attempt(steps, f"logging {title}'s results")
            if reason:
                self._keep_unsynced(outcome, final_metrics, tags, folder, done, models, reason)
        self.open.pop(config, None)
        self.unlogged.discard(config)
        self.pending.pop(config, None)
        self.epochs.pop(config, None)

    def _keep_unsynced(
        self,
        outcome: Outcome,
        final_metrics: list[Metric],
        tags: Mapping[str, str],
        artifacts: Path,
        done: list[str],
        models: list[mlflow.models.model.ModelInfo],
        reason: str,
    ) -> Path:
        """The configuration's whole result as an unsynced record: what `sync` needs to log it later."""
        config = outcome.config
        run_tags = {tag.key: tag.value for tag in _tags(config)} | dict(tags)
        record = unsynced.Record(
            kind=unsynced.CONFIGURATION,
            tracking_uri=mlflow.get_tracking_uri(),
            experiment_id=self.experiment_id,
            run_name=self.run_names[config],
            run_id=self.open.get(config),
            parent_run_id=self.parent_run_id,
            params={param.key: param.value for param in _params(config)},
            tags=run_tags,
            epoch_metrics=unsynced.metric_rows(self.epochs.get(config, [])),
            final_metrics=unsynced.metric_rows(final_metrics),
            status=RunStatus.to_string(RunStatus.FINISHED),
            config=asdict(config),
            registered_model=self.registered_model,
            done=done,
            model_id=models[-1].model_id if models else None,
            reason=reason,
        )
        return unsynced.write(record, artifacts=artifacts, model_path=outcome.model_path)

    def log_model(self, run_id: str, model_path: str) -> mlflow.models.model.ModelInfo:
        nested = self.parent_run_id is not None
        with mlflow.start_run(run_id=run_id, nested=nested) if nested else contextlib.nullcontext():
            return log_keras_file(model_path, self.requirements)


class SavedKerasModel:
    """A model a worker already saved as a native .keras file, for `mlflow.keras.log_model` to log as it is.

    MLflow's Keras flavor writes the model with `model.save(path)` and asks nothing else of it
    (mlflow/keras/save.py, MLflow 3.17). Copying the worker's file gives the same model as loading it and saving
    it again, without starting JAX and rebuilding the model in the logging process: ~1.7 s of CPU for the first
    model and ~0.1 s for each next one, taken from the workers (benchmarks/README.md, tracking overhead).
    Tests load every logged model back with `mlflow.keras.load_model` and `mlflow.pyfunc.load_model`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def save(self, target: str, **options: object) -> None:
        if options:
            raise TypeError(f"SavedKerasModel.save: the file is saved already; options {sorted(options)} can't apply")
        shutil.copyfile(self.path, target)


def log_keras_file(model_path: str | Path, requirements: list[str]) -> mlflow.models.model.ModelInfo:
    """The native .keras file as the active run's MLflow model (Keras flavor, signature, pinned requirements)."""
    return mlflow.keras.log_model(
        SavedKerasModel(model_path),
        name=keys.MODEL_NAME,
        signature=MODEL_SIGNATURE,
        pip_requirements=requirements,
    )


def _params(config: TrainConfig) -> list[mlflow.entities.Param]:
    return [mlflow.entities.Param(key, str(value)) for key, value in config.params().items()]


def _tags(config: TrainConfig) -> list[mlflow.entities.RunTag]:
    tags = {keys.CONFIG_TAG: config.name, keys.CONFIG_HASH_TAG: config.config_hash(), "seed": str(config.seed)}
    return [mlflow.entities.RunTag(key, value) for key, value in tags.items()]


def save_figure(figure, path: Path) -> None:
    figure.savefig(path, dpi=100)
    plt.close(figure)
