"""MLflow runs: the experiment, the parent (study) run, and one run per configuration.

Everything that lands in MLflow is written here, explicitly (no autolog), with the keys from
`tracking.keys`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
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
from tracking import keys
from tracking.registry import register_outcome

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


class StoreUnreachable(ConfigError):
    """The tracking server or store can't be reached: reported as one line, exit code 2."""


def redact(uri: str) -> str:
    """`scheme://user:secret@host/...` -> `scheme://user:***@host/...`: never print or log a password."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


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
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise StoreUnreachable(f"tracking store {uri}: folder {folder} does not exist")


def use_experiment(name: str) -> str:
    """The experiment to log into (mlflow run's, else `name`), tagged for MLflow 3's training-runs UI."""
    check_tracking_store()
    experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if experiment_id:
        mlflow.set_experiment(experiment_id=experiment_id)
    else:
        experiment_id = mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or name).experiment_id
    MlflowClient().set_experiment_tag(experiment_id, keys.EXPERIMENT_KIND_TAG, keys.EXPERIMENT_KIND)
    return experiment_id


@contextlib.contextmanager
def top_run(run_name: str, tags: Mapping[str, str]) -> Iterator[mlflow.ActiveRun]:
    """The run `mlflow run` created (MLFLOW_RUN_ID), or a new one named `run_name`.

    Ends FINISHED on success, KILLED on Ctrl-C, FAILED on any other error.
    """
    run_id = os.environ.get("MLFLOW_RUN_ID")
    run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=run_name)
    mlflow.set_tags(dict(tags))
    if run_id:  # mlflow run gives its run a random name; say what this one is
        mlflow.set_tag(MLFLOW_RUN_NAME, run_name)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run()


class ConfigRuns:
    """One MLflow run per configuration, opened at its first epoch and closed with its results.

    With a parent, they are nested children; without (`train`), the configuration's run is the
    top-level run itself. Runs still open when the context exits end KILLED or FAILED.
    """

    def __init__(
        self,
        experiment_id: str,
        parent_run_id: str | None,
        run_names: Mapping[TrainConfig, str],
        registered_model: str | None = None,
    ):
        self.client = MlflowClient()
        self.registered_model = registered_model  # register each logged model as a version of it (None: don't)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.run_names = run_names
        self.open: dict[TrainConfig, str] = {}
        self.requirements = pip_requirements()

    def __enter__(self) -> ConfigRuns:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        status = RunStatus.KILLED if error_type and issubclass(error_type, KeyboardInterrupt) else RunStatus.FAILED
        for config, run_id in self.open.items():
            log.warning("Marking run %s (%s) as %s", run_id, config.name, RunStatus.to_string(status))
            self.client.set_terminated(run_id, RunStatus.to_string(status))
        self.open.clear()

    def run_id(self, config: TrainConfig) -> str:
        """The configuration's run, created (with params and tags) the first time it is asked for."""
        if config in self.open:
            return self.open[config]
        if self.parent_run_id is None:
            run_id = mlflow.active_run().info.run_id
        else:
            tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id}
            run_id = self.client.create_run(self.experiment_id, run_name=self.run_names[config], tags=tags).info.run_id
        self.client.log_batch(run_id, params=_params(config), tags=_tags(config))
        self.open[config] = run_id
        return run_id

    def log_epoch(self, config: TrainConfig, epoch: int, metrics: Mapping[str, float]) -> None:
        """One epoch's train/val loss and accuracy, in one call, step = epoch (from 1)."""
        timestamp = int(time.time() * 1000)
        batch = [Metric(key, float(value), timestamp, epoch) for key, value in metrics.items()]
        self.client.log_batch(self.run_id(config), metrics=batch)

    def log_outcome(self, outcome: Outcome) -> None:
        """Final metrics, plots, history and the model; then the run ends FINISHED."""
        config = outcome.config
        run_id = self.run_id(config)
        final = {
            keys.TEST_LOSS: outcome.test_loss,
            keys.TEST_ACCURACY: outcome.test_accuracy,
            keys.BEST_VAL_ACCURACY: outcome.best_val_accuracy,
            keys.TRAIN_SECONDS: outcome.train_seconds,
            keys.EPOCHS_RUN: outcome.epochs_run,
        }
        timestamp = int(time.time() * 1000)
        tags = {keys.DIVERGED_TAG: str(outcome.diverged).lower()}
        if outcome.stopped_reason:
            tags[keys.STOPPED_REASON_TAG] = outcome.stopped_reason
        self.client.log_batch(
            run_id,
            metrics=[Metric(key, float(value), timestamp, 0) for key, value in final.items()],
            tags=[mlflow.entities.RunTag(key, value) for key, value in tags.items()],
        )
        title = self.run_names[config]
        with tempfile.TemporaryDirectory() as folder:
            save_figure(plots.learning_curves(outcome.history, title), Path(folder) / keys.LEARNING_CURVES)
            save_figure(
                plots.confusion_matrix(outcome.labels, outcome.predictions, title),
                Path(folder) / keys.CONFUSION_MATRIX,
            )
            (Path(folder) / keys.HISTORY).write_text(json.dumps(outcome.history, indent=2))
            # Per-image test predictions (and labels): McNemar's test in `report` pairs two runs on them.
            np.save(Path(folder) / keys.TEST_PREDICTIONS, np.asarray(outcome.predictions, dtype=np.int8))
            np.save(Path(folder) / keys.TEST_LABELS, np.asarray(outcome.labels, dtype=np.int8))
            self.client.log_artifacts(run_id, folder)
        model_info = self.log_model(run_id, outcome.model_path)
        if self.registered_model:
            register_outcome(self.registered_model, model_info, outcome, run_id)
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        del self.open[config]

    def log_model(self, run_id: str, model_path: str) -> mlflow.models.model.ModelInfo:
        model = keras.saving.load_model(model_path, safe_mode=True)
        nested = self.parent_run_id is not None
        with mlflow.start_run(run_id=run_id, nested=nested) if nested else contextlib.nullcontext():
            return mlflow.keras.log_model(
                model,
                name=keys.MODEL_NAME,
                signature=MODEL_SIGNATURE,
                pip_requirements=self.requirements,
            )


def _params(config: TrainConfig) -> list[mlflow.entities.Param]:
    return [mlflow.entities.Param(key, str(value)) for key, value in config.params().items()]


def _tags(config: TrainConfig) -> list[mlflow.entities.RunTag]:
    tags = {keys.CONFIG_TAG: config.name, keys.CONFIG_HASH_TAG: config.config_hash(), "seed": str(config.seed)}
    return [mlflow.entities.RunTag(key, value) for key, value in tags.items()]


def save_figure(figure, path: Path) -> None:
    figure.savefig(path, dpi=100)
    plt.close(figure)
