"""End to end: `mlflow run . --env-manager local` into a temporary SQLite store, then read it back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import PROJECT
from mlflow.tracking import MlflowClient

from study.config import config_names
from tracking import keys

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, small_mnist):
    """One tiny `main` study (2 epochs, 3,000 images) through MLflow Projects."""
    folder = tmp_path_factory.mktemp("mlflow-run")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    command = [
        sys.executable, "-m", "mlflow", "run", str(PROJECT), "--env-manager", "local",
        "-P", "epochs=2", "-P", f"data={small_mnist}", "-P", "workers=2",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    # `mlflow run` without --experiment-name logs into MLflow's "Default" experiment
    (experiment,) = client.search_experiments()
    runs = client.search_runs([experiment.experiment_id])
    yield client, experiment, runs, result
    mlflow.set_tracking_uri(None)


def children_and_parent(runs):
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def test_one_parent_and_six_finished_children(study_run):
    client, experiment, runs, _ = study_run
    assert experiment.tags[keys.EXPERIMENT_KIND_TAG] == "custom_model_development"
    parent, children = children_and_parent(runs)
    assert len(runs) == 7
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("study-")
    assert sorted(child.info.run_name for child in children) == sorted(config_names())
    for child in children:
        assert child.info.status == "FINISHED"
        activation, loss = child.info.run_name.split("-")
        assert child.data.tags[keys.CONFIG_TAG] == child.info.run_name
        assert child.data.params == {
            "activation": activation,
            "loss": loss,
            "epochs": "2",
            "batch_size": "32",
            "learning_rate": "0.001",
            "seed": "0",
            "optimizer": "adam",
            "hidden_units": "128,64",
        }


def test_per_epoch_curves_final_metrics_and_artifacts(study_run):
    client, _, runs, _ = study_run
    _, children = children_and_parent(runs)
    for child in children:
        run_id = child.info.run_id
        for key in keys.EPOCH_METRICS:
            history = client.get_metric_history(run_id, key)
            assert [point.step for point in sorted(history, key=lambda p: p.step)] == [1, 2], key
        metrics = child.data.metrics
        assert set(metrics) >= {"test_loss", "test_accuracy", "best_val_accuracy", "train_seconds"}
        assert metrics["best_val_accuracy"] == pytest.approx(
            max(point.value for point in client.get_metric_history(run_id, "val_accuracy"))
        )
        artifacts = {item.path for item in client.list_artifacts(run_id)}
        assert {"learning_curves.png", "confusion_matrix.png", "history.json"} <= artifacts
        history = json.loads(Path(client.download_artifacts(run_id, "history.json")).read_text())
        assert len(history["val_accuracy"]) == 2
        assert client.download_artifacts(run_id, "learning_curves.png").endswith(".png")


def test_parent_has_results_comparison_summary_and_best(study_run):
    client, _, runs, result = study_run
    parent, children = children_and_parent(runs)
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "comparison.png", "summary.md"} <= artifacts
    table = Path(client.download_artifacts(parent.info.run_id, "results.csv")).read_text().splitlines()
    assert table[0].startswith("config,activation,loss")
    assert len(table) == 7
    top = max(run.data.metrics["best_val_accuracy"] for run in children)
    (best,) = [run for run in children if run.info.run_name == parent.data.tags["best_config"]]
    assert best.data.metrics["best_val_accuracy"] == top  # chosen on validation (ties: any of them)
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(best.data.metrics["test_accuracy"])
    summary = Path(client.download_artifacts(parent.info.run_id, "summary.md")).read_text()
    assert "Which activation did best" in summary and "Which loss did best" in summary
    assert best.info.run_name in summary
    assert "relu-hinge" in result.stdout  # the results table printed at the end


def test_every_logged_model_loads_and_beats_chance(study_run, mnist_path):
    client, _, runs, _ = study_run
    _, children = children_and_parent(runs)
    with np.load(mnist_path) as full:  # test digits the models never saw
        images = full["x_test"][-500:].reshape(500, 784).astype(np.float32) / 255.0
        labels = full["y_test"][-500:]
    for child in children:
        model = mlflow.pyfunc.load_model(f"runs:/{child.info.run_id}/model")
        probabilities = np.asarray(model.predict(images))
        assert probabilities.shape == (500, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
        assert (probabilities.argmax(axis=1) == labels).mean() > 0.5, child.info.run_name
