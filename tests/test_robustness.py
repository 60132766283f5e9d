"""Interrupted, resumed, unreachable: nothing lost, nothing left RUNNING."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import PROJECT, run_cli
from mlflow.tracking import MlflowClient

from study.config import TrainConfig
from tracking import keys
from tracking.resume import find_finished

pytestmark = pytest.mark.slow


def all_runs(uri: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(keys.DEFAULT_EXPERIMENT)
    return client, (client.search_runs([experiment.experiment_id]) if experiment else [])


def epochs_logged(database) -> int:
    """Read-only peek at the store the study is writing (MlflowClient would race its table creation)."""
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as connection:
            return connection.execute("select count(*) from metrics where key = 'val_accuracy'").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_process_group_ends_every_run_killed(tmp_path, small_mnist, signum, exit_code):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "MLFLOW_TRACKING_URI": uri}
    # Enough epochs that no configuration can finish before the signal: the workers start training while the
    # parent still sets up MLflow, and 3,000 images take ~0.03 s an epoch.
    command = [sys.executable, "-m", "study", "main", "--epochs", "5000", "--data", str(small_mnist)]
    process = subprocess.Popen(
        [*command, "--workers", "2", "--registered-model", "none"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal or `mlflow run` gives it
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # wait until a child run is training (has an epoch logged)
            if epochs_logged(tmp_path / "mlflow.db"):
                break
            time.sleep(1)
        else:
            pytest.fail("no epoch was logged within 240 s")
        os.killpg(process.pid, signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == exit_code, stderr[-2000:]
    assert "run the same command again" in stderr and "--resume true" in stderr
    assert "Traceback" not in stderr
    _, runs = all_runs(uri)
    assert runs and all(run.info.status == "KILLED" for run in runs), [(r.info.run_name, r.info.status) for r in runs]


def test_resume_reuses_finished_configurations(tmp_path, small_mnist):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri}
    common = ["--data", str(small_mnist), "--registered-model", "none", "--workers", "2", "--resume", "true"]
    first = run_cli(
        "train", "--activation", "relu", "--loss", "hinge", "--epochs", "1", *common[:2], cwd=tmp_path, env=env
    )
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli("main", "--epochs", "1", *common, cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    client, runs = all_runs(uri)
    single = [run for run in runs if run.data.tags.get(keys.ENTRY_POINT_TAG) == "train"]
    (parent,) = [run for run in runs if run.data.tags.get(keys.ENTRY_POINT_TAG) == "main"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.tags[keys.REUSED_RUNS_TAG] == single[0].info.run_id
    assert sorted(run.info.run_name for run in children) == sorted(
        ["tanh-crossentropy", "sigmoid-crossentropy", "relu-crossentropy", "tanh-hinge", "sigmoid-hinge"]
    )  # relu-hinge was not trained again
    results = client.download_artifacts(parent.info.run_id, "results.csv")
    rows = {line.split(",")[0]: line for line in open(results).read().splitlines()[1:]}
    assert len(rows) == 6
    assert f"{single[0].data.metrics['test_accuracy']}" in rows["relu-hinge"]
    # a different setting (here: epochs) never matches
    assert find_finished(client, parent.info.experiment_id, TrainConfig("relu", "hinge", epochs=1)) is not None
    assert find_finished(client, parent.info.experiment_id, TrainConfig("relu", "hinge", epochs=2)) is None


def test_unreachable_tracking_server_fails_fast_before_training(tmp_path, small_mnist):
    started = time.monotonic()
    result = run_cli(
        "train", "--activation", "relu", "--loss", "hinge", "--epochs", "1", "--data", str(small_mnist),
        cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "http://user:s3cret@127.0.0.1:9"}, timeout=60,
    )  # fmt: skip
    assert time.monotonic() - started < 30
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tracking server http://user:***@127.0.0.1:9 is unreachable" in lines[0]
    assert "s3cret" not in result.stderr + result.stdout
