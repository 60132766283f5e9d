"""Reliability end to end: a tracking server lost mid-training (back, or not back), a diverging learning
rate, two studies at once on one store, and no credential anywhere it could leak.

Real processes throughout: `python -m study ...` subprocesses, a real `mlflow server` (SQLite backend,
proxied artifacts) killed with SIGKILL and restarted on the same port and store, a real PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import PROJECT, run_cli, write_mnist_slice
from mlflow.tracking import MlflowClient

from tracking import keys
from tracking.runs import StoreUnreachable
from tracking.sync import sync_folder

pytestmark = pytest.mark.slow

EPOCH_METRICS = keys.EPOCH_METRICS
CONFIGS = 6  # activations x losses


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory: pytest.TempPathFactory, mnist_path: Path) -> Path:
    """600 training and 200 test images of the real MNIST: enough to train, quick to train."""
    return write_mnist_slice(mnist_path, tmp_path_factory.mktemp("data") / "mnist-tiny.npz", 600, 200)


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """This process logs to `uri` for the block."""
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TrackingServer:
    """`mlflow server` on a loopback port with a SQLite store and proxied artifacts, in its own process group,
    so that it can be killed (SIGKILL, workers and all) and started again on the same port and store."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.database = folder / "mlflow.db"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.database}",
            "--artifacts-destination", str(self.folder / "artifacts"), "--workers", "1",
        ]  # fmt: skip
        with open(self.folder / "server.log", "a") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True
            )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            time.sleep(0.3)
        raise AssertionError(f"mlflow server not ready after {timeout} s")

    def ensure_running(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.start()
        self.wait_ready()

    def kill(self) -> None:
        """SIGKILL the whole process group: the server is gone, as after a crash or a lost machine."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:  # uvicorn waits for idle keep-alive connections: the store is throwaway, don't wait long
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """One server for the module (each test uses its own experiment), stopped whatever happens."""
    tracking_server = TrackingServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        tracking_server.start()
        yield tracking_server
    finally:
        tracking_server.stop()


def study_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "study", *args]


def study_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(PROJECT), **extra}


def stop_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def epochs_logged(database: Path) -> int:
    """Read-only peek at the server's store (how many validation accuracies have been logged)."""
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as connection:
            return connection.execute("select count(*) from metrics where key = 'val_accuracy'").fetchone()[0]
    except sqlite3.Error:
        return 0


def lose_server_after_first_epoch(server: TrackingServer, trainer: subprocess.Popen) -> None:
    """Wait for the trainer's first logged epoch, then kill the server while the trainer is held still, so the
    outage starts between two epochs (a stopped process can't race past the kill)."""
    already = epochs_logged(server.database)
    deadline = time.monotonic() + 240
    while epochs_logged(server.database) == already:
        assert trainer.poll() is None, "the trainer ended before its first epoch was logged"
        assert time.monotonic() < deadline, "no epoch was logged within 240 s"
        time.sleep(0.02)
    os.kill(trainer.pid, signal.SIGSTOP)
    try:
        server.kill()
    finally:
        os.kill(trainer.pid, signal.SIGCONT)


def the_run(url: str, experiment: str):
    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [(run.info.run_name, run.info.status) for run in runs]
    return client, runs[0]


def assert_every_epoch(client: MlflowClient, run_id: str, epochs: int) -> None:
    for key in EPOCH_METRICS:
        steps = sorted(metric.step for metric in client.get_metric_history(run_id, key))
        assert steps == list(range(1, epochs + 1)), (key, steps)


def test_server_lost_and_back_mid_training_loses_nothing(server, tiny_mnist, tmp_path):
    server.ensure_running()
    epochs, experiment = 10, "server-restarted"
    env = study_env(
        MLFLOW_TRACKING_URI=server.url, MNIST_TRACKING_GRACE_SECONDS="180", MNIST_UNSYNCED_DIR=str(tmp_path / "kept")
    )
    trainer = subprocess.Popen(
        study_command("train", "--activation", "relu", "--loss", "hinge", "--epochs", str(epochs),
                      "--data", str(tiny_mnist), "--experiment", experiment),
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        lose_server_after_first_epoch(server, trainer)
        time.sleep(3)  # down for a few seconds, then back on the same port and store
        server.start()
        _, stderr = trainer.communicate(timeout=400)
    finally:
        stop_group(trainer)
    assert trainer.returncode == 0, stderr[-3000:]
    # The outage hit the run: noticed at an epoch's metrics or, as epochs are written every 2 s, at the results.
    assert "Tracking store unreachable while logging relu-hinge" in stderr
    assert stderr.count("Tracking store unreachable") == 1  # one warning per outage, not one per call
    assert "Tracking store reachable again" in stderr
    assert not (tmp_path / "kept").exists()  # nothing had to be kept locally
    server.wait_ready()
    client, run = the_run(server.url, experiment)
    assert run.info.status == "FINISHED"
    assert_every_epoch(client, run.info.run_id, epochs)
    assert run.data.metrics[keys.EPOCHS_RUN] == epochs and keys.TEST_ACCURACY in run.data.metrics
    assert {artifact.path for artifact in client.list_artifacts(run.info.run_id)} >= {keys.HISTORY, keys.TEST_LABELS}


def test_server_lost_for_good_keeps_results_until_sync(server, tiny_mnist, tmp_path):
    server.ensure_running()
    epochs, experiment = 8, "server-lost"
    kept = tmp_path / "kept"
    env = {"MLFLOW_TRACKING_URI": server.url, "MNIST_TRACKING_GRACE_SECONDS": "1", "MNIST_UNSYNCED_DIR": str(kept)}
    trainer = subprocess.Popen(
        study_command("train", "--activation", "tanh", "--loss", "crossentropy", "--epochs", str(epochs),
                      "--data", str(tiny_mnist), "--experiment", experiment),
        cwd=tmp_path, env=study_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        lose_server_after_first_epoch(server, trainer)
        stdout, stderr = trainer.communicate(timeout=400)
    finally:
        stop_group(trainer)

    # Training finished, the results are kept, and the command says so: exit code 3, not a silent 0.
    assert trainer.returncode == 3, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "tanh-crossentropy" in stdout  # the results table is still printed
    (record,) = [path for path in kept.iterdir()]
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("error: the tracking store was unreachable") and "python -m study sync" in message
    assert record.name in message and str(kept) in message
    saved = json.loads((record / keys.UNSYNCED_RECORD_FILE).read_text())
    assert saved["tracking_uri"] == server.url and saved["status"] == "FINISHED" and saved["run_id"]
    assert sorted({row["step"] for row in saved["epoch_metrics"]}) == list(range(1, epochs + 1))
    assert (record / keys.UNSYNCED_MODEL_FILE).is_file()
    assert (record / keys.UNSYNCED_ARTIFACTS_DIR / keys.HISTORY).is_file()

    # Nothing uploads while the server is still away (the CLI's exit code 2 naming it), the record untouched.
    with (
        tracking_uri(server.url),
        pytest.raises(StoreUnreachable, match=f"tracking server {server.url} is unreachable"),
    ):
        sync_folder(kept)
    assert record.is_dir()

    server.start()
    server.wait_ready()
    synced = run_cli("sync", cwd=tmp_path, env=env, timeout=300)
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert f"synced {record.name} -> run {saved['run_id']}" in synced.stdout
    assert not record.exists()
    with tracking_uri(server.url):  # idempotent: nothing left, nothing done twice
        again = sync_folder(kept)
    assert not again.synced and not again.failed

    client, run = the_run(server.url, experiment)
    assert run.info.run_id == saved["run_id"] and run.info.status == "FINISHED"
    assert_every_epoch(client, run.info.run_id, epochs)
    assert len(client.get_metric_history(run.info.run_id, keys.VAL_ACCURACY)) == epochs  # no duplicates
    assert run.data.params["activation"] == "tanh" and run.data.tags[keys.DIVERGED_TAG] == "false"
    # The model is loadable and is the trained one: it predicts the test digits the run logged.
    with np.load(tiny_mnist) as data:
        rows = (data["x_test"].reshape(-1, 784) / 255.0).astype(np.float32)
    with tracking_uri(server.url):
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/{keys.MODEL_NAME}")
        logged = np.load(client.download_artifacts(run.info.run_id, keys.TEST_PREDICTIONS, str(tmp_path)))
    assert np.array_equal(np.asarray(model.predict(rows)).argmax(axis=1), logged)


def test_sync_creates_the_runs_a_lost_server_never_saw(tmp_path, monkeypatch):
    """`main`'s children are created at their first epoch: with the server gone by then, the record has no
    run id, and sync creates the run (name, parent, params, tags), logs everything and registers the model."""
    import keras

    from study.config import TrainConfig
    from study.model import build_model
    from study.runner import Outcome
    from tracking import runs as tracking_runs
    from tracking.reliability import Outage

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MNIST_TRACKING_GRACE_SECONDS", "0")
    monkeypatch.setenv(keys.UNSYNCED_DIR_ENV, str(tmp_path / "kept"))
    monkeypatch.setattr(tracking_runs, "outage", Outage())
    config = TrainConfig("relu", "hinge", epochs=2)
    keras.utils.set_random_seed(0)
    build_model(config).save(tmp_path / "model.keras")
    history = {key: [0.5, 0.6] for key in EPOCH_METRICS}
    outcome = Outcome(
        config=config, history=history, train_seconds=1.0, diverged=False, stopped_reason="", test_loss=0.4,
        test_accuracy=0.9, model_path=str(tmp_path / "model.keras"), predictions=np.arange(10) % 10,
        labels=np.arange(10) % 10,
    )  # fmt: skip
    with tracking_uri(f"http://127.0.0.1:{free_port()}"):  # nothing listens there
        with tracking_runs.ConfigRuns("0", "f" * 32, {config: "relu-hinge"}, registered_model="mnist-sync") as runs:
            for epoch in (1, 2):
                runs.log_epoch(config, epoch, {key: values[epoch - 1] for key, values in history.items()})
            runs.log_outcome(outcome)
    (record,) = (tmp_path / "kept").iterdir()
    saved = json.loads((record / keys.UNSYNCED_RECORD_FILE).read_text())
    assert saved["run_id"] is None and saved["parent_run_id"] == "f" * 32 and len(saved["epoch_metrics"]) == 8

    # The store is back (a SQLite store stands in for it here: the record is pointed at it, with its parent).
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("synced")
    parent = client.create_run(experiment_id, run_name="study")
    saved |= {"tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent.info.run_id}
    (record / keys.UNSYNCED_RECORD_FILE).write_text(json.dumps(saved))
    with tracking_uri(uri):
        report = sync_folder(tmp_path / "kept")
    assert not report.failed and not record.exists()
    (child,) = client.search_runs([experiment_id], filter_string="tags.config = 'relu-hinge'")
    assert child.info.status == "FINISHED" and child.info.run_name == "relu-hinge"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.params["activation"] == "relu" and child.data.metrics[keys.TEST_ACCURACY] == 0.9
    assert_every_epoch(client, child.info.run_id, 2)
    assert keys.HISTORY in {artifact.path for artifact in client.list_artifacts(child.info.run_id)}
    (version,) = client.search_model_versions("name = 'mnist-sync'")
    assert version.run_id == child.info.run_id and version.tags["activation"] == "relu"


def start_study(tmp_path: Path, tiny_mnist: Path, uri: str, experiment: str, *settings: str) -> subprocess.Popen:
    return subprocess.Popen(
        study_command("main", "--data", str(tiny_mnist), "--workers", "1", "--registered-model", "none",
                      "--experiment", experiment, *settings),
        cwd=tmp_path, env=study_env(MLFLOW_TRACKING_URI=uri), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("store", "settings"),
    [
        ("sqlite", ("--learning-rate", "10", "--epochs", "3")),
        ("server", ("--learning-rate", "0.001", "--epochs", "1")),
    ],
    ids=["sqlite-diverging", "server"],
)
def test_two_studies_at_the_same_moment_on_one_store(store, settings, server, tiny_mnist, tmp_path):
    """Both complete, all 12 children FINISHED, no "database is locked".

    The SQLite pair starts on a new store (both processes also race to create it) and trains with
    learning_rate=10, which diverges: that must not crash a study either. Every child ends FINISHED with
    diverged=true and a stopped_reason, and the parent's results and summary are still written.
    """
    if store == "server":
        server.ensure_running()
        uri = server.url
    else:
        uri = f"sqlite:///{tmp_path / 'shared.db'}"
    diverging = settings[1] == "10"
    experiment = f"concurrent-{store}"
    studies = [start_study(tmp_path, tiny_mnist, uri, experiment, *settings) for _ in range(2)]
    try:
        outputs = [study.communicate(timeout=600) for study in studies]
    finally:
        for study in studies:
            stop_group(study)
    for study, (_, stderr) in zip(studies, outputs, strict=True):
        assert study.returncode == 0, stderr[-3000:]
        assert "database is locked" not in stderr and "Traceback" not in stderr
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 2 * (CONFIGS + 1)
    parents = [run for run in runs if run.data.tags.get(keys.ENTRY_POINT_TAG) == "main"]
    assert len(parents) == 2
    for parent in parents:
        assert parent.info.status == "FINISHED"
        artifacts = {artifact.path for artifact in client.list_artifacts(parent.info.run_id)}
        assert {keys.RESULTS_CSV, keys.SUMMARY_MD, keys.COMPARISON_PNG} <= artifacts
        children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == CONFIGS
        for child in children:
            name, epochs_run = child.info.run_name, child.data.metrics[keys.EPOCHS_RUN]
            assert child.info.status == "FINISHED", name
            assert len(client.get_metric_history(child.info.run_id, keys.VAL_ACCURACY)) == epochs_run, name
            if diverging:
                assert child.data.tags[keys.DIVERGED_TAG] == "true", name
                assert child.data.tags[keys.STOPPED_REASON_TAG], name
                assert epochs_run < 3, name  # stopped as soon as it diverged
            else:
                assert child.data.tags[keys.DIVERGED_TAG] == "false" and epochs_run == 1, name


@pytest.fixture
def scratch_database(postgres_databases) -> str:
    """A throwaway PostgreSQL database (dropped after the test)."""
    return postgres_databases("reliability")


def test_no_credential_is_logged_stored_or_printed(scratch_database, tiny_mnist, tmp_path):
    secret = f"pw-{uuid.uuid4().hex}"  # trust auth accepts any password: this one must never show up
    token = f"tok-{uuid.uuid4().hex}"
    storage = f"postgresql://postgres:{secret}@127.0.0.1:5432/{scratch_database}"
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_TRACKING_PASSWORD": secret,
        "MLFLOW_TRACKING_TOKEN": token,
    }
    result = run_cli(
        "optimize", "--configs", "relu-hinge", "--n-trials", "1", "--max-epochs", "1", "--storage", storage,
        "--data", str(tiny_mnist), cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "postgres:***@127.0.0.1" in result.stderr  # the storage is named, without its password
    leaks = [name for name, text in (("stdout", result.stdout), ("stderr", result.stderr)) if secret in text]
    files = [path for path in tmp_path.rglob("*") if path.is_file() and path != tiny_mnist]
    assert any(path.name == "mlflow.db" for path in files) and any(path.name == "MLmodel" for path in files)
    for path in files:  # the tracking store, every artifact and model file
        content = path.read_bytes()
        if secret.encode() in content or token.encode() in content:
            leaks.append(str(path.relative_to(tmp_path)))
    import psycopg2

    with contextlib.closing(psycopg2.connect(storage.replace(secret, "x"))) as connection:  # Optuna's tables
        with connection.cursor() as cursor:
            cursor.execute("select table_name from information_schema.tables where table_schema = 'public'")
            for (table,) in cursor.fetchall():
                cursor.execute(f'select * from "{table}"')
                if secret in repr(cursor.fetchall()):
                    leaks.append(f"optuna table {table}")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (parent,) = client.search_runs(
        [client.get_experiment_by_name(keys.DEFAULT_EXPERIMENT).experiment_id],
        filter_string=f"tags.{keys.ENTRY_POINT_TAG} = 'optimize'",
    )
    assert parent.data.params["storage"] == f"postgresql://postgres:***@127.0.0.1:5432/{scratch_database}"
    assert not leaks, leaks


def test_models_are_loaded_safely(tmp_path):
    """Keras native files everywhere; a model that would run code on loading (a Lambda) is refused."""
    import keras

    import study  # noqa: F401
    from tracking.predict import ModelNotFoundError, load_model

    inputs = keras.Input(shape=(784,))
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Lambda(lambda rows: rows * 2.0)(inputs))
    mlflow.keras.save_model(keras.Model(inputs, outputs), str(tmp_path / "lambda-model"))
    with pytest.raises(ValueError, match="safe_mode"):
        keras.saving.load_model(tmp_path / "lambda-model" / "data" / "model.keras", safe_mode=True)
    with pytest.raises(ModelNotFoundError, match="was refused: loading it would run code stored in it"):
        load_model(str(tmp_path / "lambda-model"))  # `predict`'s loader: the CLI turns this into exit code 2
    # Every place this project loads a Keras model passes safe_mode=True (predict goes through MLflow's pyfunc
    # flavor, which calls keras.saving.load_model with Keras's default, safe_mode=True).
    sources = [path for folder in ("study", "tracking") for path in (PROJECT / folder).glob("*.py")]
    calls = [line.strip() for path in sources for line in path.read_text().splitlines() if "load_model(" in line]
    keras_calls = [line for line in calls if "keras.saving.load_model(" in line or "keras.load_model(" in line]
    assert keras_calls and all("safe_mode=True" in line for line in keras_calls), keras_calls
