"""`python -m study sync`: upload the unsynced records (tracking/unsynced.py) to the tracking store.

For each record: create its run if it had none (name, parent, params, tags), log every epoch metric with
its step, the final metrics, params and tags, the artifacts, the model (the native .keras file, loaded with
safe_mode, logged with the project's signature and pip requirements), register it if `main` would have, and
set the final status. What is done is written back into run.json as it goes and the folder is deleted only
after the whole record is in the store, so a sync that fails or is interrupted is simply run again:
metrics are logged with their original timestamps (the store ignores exact duplicates), and the run and
model are created once.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study.config import ConfigError, TrainConfig
from study.runner import Outcome
from tracking import keys, unsynced
from tracking.registry import register_outcome
from tracking.reliability import RetryingClient, is_unreachable, redact, scrub, short
from tracking.runs import check_tracking_store, log_keras_file, pip_requirements

log = logging.getLogger(__name__)


class RecordMismatch(ValueError):
    """A record made for another tracking store than the current one: it is left alone."""


@dataclass
class SyncReport:
    """Which records were uploaded (and deleted) and which are still waiting, with why."""

    synced: list[tuple[Path, str]] = field(default_factory=list)  # (folder, run id)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (folder, reason)


def sync_folder(base: Path) -> SyncReport:
    """Upload every complete record under `base`; each one independently (one failure does not stop the rest)."""
    if base.exists() and not base.is_dir():
        raise ConfigError(f"folder: {str(base)!r} is not a folder; pass the folder of unsynced records")
    report = SyncReport()
    folders = unsynced.list_records(base)
    if not folders:
        return report
    check_tracking_store()
    for folder in folders:
        try:
            run_id = upload(folder)
        except (MlflowException, OSError, ValueError, KeyError) as error:
            if isinstance(error, MlflowException) and not is_unreachable(error):
                log.warning("%s: the store refused it: %s", folder, scrub(str(error)))
            reason = short(error, 300)
            report.failed.append((folder, reason[:300]))
            continue
        report.synced.append((folder, run_id))
    return report


def upload(folder: Path) -> str:
    """Log one record into the current tracking store, then delete its folder; returns the run id."""
    record = unsynced.read(folder)
    current = redact(mlflow.get_tracking_uri())
    if record.tracking_uri != current:
        raise RecordMismatch(
            f"recorded for tracking store {record.tracking_uri}, but MLFLOW_TRACKING_URI is {current}; "
            "set it to the recorded store to sync this record"
        )
    client = RetryingClient(MlflowClient())
    if record.run_id is None:
        tags = {MLFLOW_PARENT_RUN_ID: record.parent_run_id} if record.parent_run_id else {}
        run = client.create_run(record.experiment_id, run_name=record.run_name, tags=tags)
        record.run_id = run.info.run_id
        unsynced.update(folder, record)  # from now on a rerun reuses this run
        log.info("Created run %s for %s", record.run_id, record.run_name)
    run_id = record.run_id

    def mark(part: str) -> None:
        record.done.append(part)
        unsynced.update(folder, record)

    if record.params or record.tags:
        params = [Param(key, value) for key, value in record.params.items()]
        client.log_batch(run_id, params=params, tags=[RunTag(key, value) for key, value in record.tags.items()])
    if unsynced.EPOCHS not in record.done and record.epoch_metrics:
        client.log_batch(run_id, metrics=unsynced.metrics_of(record.epoch_metrics))
        mark(unsynced.EPOCHS)
    if unsynced.FINAL not in record.done and record.final_metrics:
        client.log_batch(run_id, metrics=unsynced.metrics_of(record.final_metrics))
        mark(unsynced.FINAL)
    artifacts = folder / keys.UNSYNCED_ARTIFACTS_DIR
    if unsynced.ARTIFACTS not in record.done and artifacts.is_dir():
        client.log_artifacts(run_id, str(artifacts))
        mark(unsynced.ARTIFACTS)
    model_file = folder / keys.UNSYNCED_MODEL_FILE
    if unsynced.MODEL not in record.done and model_file.is_file():
        record.model_id = _log_model(run_id, model_file)
        mark(unsynced.MODEL)
    if record.registered_model and record.model_id and unsynced.REGISTERED not in record.done:
        _register(record, folder)
        mark(unsynced.REGISTERED)
    client.set_terminated(run_id, record.status)
    shutil.rmtree(folder)
    log.info("Synced %s (run %s, %s) from %s", record.run_name, run_id, record.status, folder)
    return run_id


def _log_model(run_id: str, model_file: Path) -> str:
    """The native .keras file as the run's MLflow model, exactly as `main` logs it; returns the model id."""
    with mlflow.start_run(run_id=run_id):
        return log_keras_file(model_file, pip_requirements()).model_id


def _register(record: unsynced.Record, folder: Path) -> None:
    """Register the logged model as `main` would have (aliases decided on the same numbers)."""
    outcome = _outcome(record, folder)
    model_info = SimpleNamespace(model_uri=f"models:/{record.model_id}", model_id=record.model_id)
    register_outcome(record.registered_model, model_info, outcome, record.run_id)


def _outcome(record: unsynced.Record, folder: Path) -> Outcome:
    """The configuration's Outcome, rebuilt from the record (what registration looks at)."""
    if not record.config:
        raise ValueError(f"{folder}: the record has no configuration to register its model with")
    artifacts = folder / keys.UNSYNCED_ARTIFACTS_DIR
    final = {row["key"]: row["value"] for row in record.final_metrics}
    values = {
        "config": TrainConfig(**record.config),
        "history": json.loads((artifacts / keys.HISTORY).read_text()),
        "train_seconds": final.get(keys.TRAIN_SECONDS, float("nan")),
        "diverged": record.tags.get(keys.DIVERGED_TAG) == "true",
        "stopped_reason": record.tags.get(keys.STOPPED_REASON_TAG, ""),
        "test_loss": final.get(keys.TEST_LOSS, float("nan")),
        "test_accuracy": final.get(keys.TEST_ACCURACY, float("nan")),
        "model_path": str(folder / keys.UNSYNCED_MODEL_FILE),
        "predictions": np.load(artifacts / keys.TEST_PREDICTIONS, allow_pickle=False),
        "labels": np.load(artifacts / keys.TEST_LABELS, allow_pickle=False),
        "best_epoch": int(final.get(keys.BEST_EPOCH, 0)),
    }
    names = {item.name for item in fields(Outcome)}
    return Outcome(**{key: value for key, value in values.items() if key in names})
