"""Resume `main`: reuse configurations that already have a FINISHED run with identical parameters.

Runs are matched on the `config_hash` tag (a fingerprint of every parameter, see TrainConfig.config_hash),
so a changed epoch count, learning rate or seed never matches.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from study.config import TrainConfig
from study.runner import Outcome
from tracking import keys

log = logging.getLogger(__name__)


def find_finished(client: MlflowClient, experiment_id: str, config: TrainConfig) -> Run | None:
    """The newest FINISHED run of exactly this configuration in the experiment, if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{keys.CONFIG_HASH_TAG} = '{config.config_hash()}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def outcome_from_run(run: Run, config: TrainConfig) -> Outcome:
    """Rebuild a finished configuration's Outcome from what its run logged (no training)."""
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as folder:

        def fetch(name: str) -> Path:
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=folder))

        history = json.loads(fetch(keys.HISTORY).read_text())
        predictions = np.load(fetch(keys.TEST_PREDICTIONS), allow_pickle=False)
        labels = np.load(fetch(keys.TEST_LABELS), allow_pickle=False)
    metrics = run.data.metrics
    return Outcome(
        config=config,
        history=history,
        train_seconds=metrics[keys.TRAIN_SECONDS],
        diverged=run.data.tags.get(keys.DIVERGED_TAG) == "true",
        stopped_reason=run.data.tags.get(keys.STOPPED_REASON_TAG, ""),
        test_loss=metrics[keys.TEST_LOSS],
        test_accuracy=metrics[keys.TEST_ACCURACY],
        model_path="",
        predictions=predictions,
        labels=labels,
        reused_run_id=run_id,
    )


def reusable(experiment_id: str, configs: list[TrainConfig]) -> dict[TrainConfig, Outcome]:
    """The configurations that need no training, with their outcomes rebuilt from their runs."""
    client = MlflowClient()
    found: dict[TrainConfig, Outcome] = {}
    for config in configs:
        run = find_finished(client, experiment_id, config)
        if run is None:
            continue
        try:
            found[config] = outcome_from_run(run, config)
        except (OSError, KeyError, ValueError, mlflow.exceptions.MlflowException) as error:
            log.warning("Run %s of %s can't be reused (%s); training it again", run.info.run_id, config.name, error)
            continue
        log.info("Reusing %s (seed %d) from run %s", config.name, config.seed, run.info.run_id)
    return found
