"""Shared by test_registry.py and test_predict.py (loaded once as a pytest plugin, so its session fixtures are
built once): two real models trained on slices of MNIST, two tracking stores (a local SQLite file and a real
`mlflow server` with artifact proxying on a free loopback port) where `main`'s logging code registered them, and
helpers that start and stop servers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

import study  # noqa: F401  (chooses the Keras backend before keras is imported)
from study.config import TrainConfig
from study.runner import Outcome, train_one
from tracking import keys
from tracking.runs import ConfigRuns, top_run, use_experiment

REGISTERED_MODEL = keys.DEFAULT_REGISTERED_MODEL
EXPERIMENT = "registry-tests"
SERVER_START_SECONDS = 180  # a cold `mlflow server` (database migrations) on a busy 2-core machine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A background process in its own process group (so stopping it also stops its workers)."""

    process: subprocess.Popen
    url: str
    log_path: Path
    ready_path: str

    def wait_ready(self, timeout: float = SERVER_START_SECONDS) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as response:
                    if response.status == 200:
                        return self.url
            time.sleep(0.3)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:  # uvicorn waits for idle keep-alive connections; the stores are throwaway, so do not wait long
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_server(args: list[str], port: int, log_path: Path, ready_path: str, env: dict[str, str] | None = None):
    log_file = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", *args, "--host", "127.0.0.1", "--port", str(port)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    log_file.close()
    return Server(process, f"http://127.0.0.1:{port}", log_path, ready_path)


@contextlib.contextmanager
def tracking(uri: str) -> Iterator[None]:
    """Point this process (and its subprocesses) at `uri` for the block.

    MLFLOW_EXPERIMENT_ID (which mlflow.set_experiment exports, and use_experiment prefers) is cleared on the
    way in and out: an experiment id from another store means nothing here.
    """
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        mlflow.set_tracking_uri(None)  # (also removes MLFLOW_TRACKING_URI from the environment)
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
            mlflow.set_tracking_uri(previous)


def save_slice(mnist_path: Path, path: Path, train: int, test: int, offset: int = 0) -> Path:
    with np.load(mnist_path, allow_pickle=False) as full:
        np.savez(
            path,
            x_train=full["x_train"][offset : offset + train],
            y_train=full["y_train"][offset : offset + train],
            x_test=full["x_test"][:test],
            y_test=full["y_test"][:test],
        )
    return path


def save_pngs(folder: Path, images: np.ndarray, labels: np.ndarray) -> list[Path]:
    """MNIST digits as grayscale PNG files named `{index}-label{digit}.png`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = folder / f"{index:02d}-label{label}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def last_test_digits(mnist_path: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The last `count` MNIST test images (never in any training slice used here) and their labels."""
    with np.load(mnist_path, allow_pickle=False) as full:
        return full["x_test"][-count:], full["y_test"][-count:]


@dataclass
class TrainedModels:
    """Two real models of two configurations, clearly apart on validation accuracy: weaker < stronger."""

    weaker: Outcome
    stronger: Outcome


# What register_all logs, in order: a first model, a better one, then the first model's result again (as a
# second `main` run that got the same result would): the champion must move once and then stay.
LOG_ORDER = (("first", "weaker"), ("better", "stronger"), ("worse", "weaker"))


@dataclass
class RegisteredStore:
    """A tracking store where LOG_ORDER was logged and registered by `main`'s ConfigRuns."""

    kind: str
    uri: str
    models: TrainedModels
    versions: dict[str, str] = field(default_factory=dict)  # first/better/worse -> version
    champion_after: dict[str, str] = field(default_factory=dict)  # first/better/worse -> champion after it
    run_ids: dict[str, str] = field(default_factory=dict)

    def outcome(self, step: str) -> Outcome:
        return getattr(self.models, dict(LOG_ORDER)[step])


def final_val_accuracy(outcome: Outcome) -> float:
    """The registered model's validation accuracy: its best epoch's (the weights it holds)."""
    return outcome.best_val_accuracy


@pytest.fixture(scope="session")
def mlflow_tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`mlflow server` with a SQLite backend and proxied artifacts (--artifacts-destination), started now
    and waited for on first use, so it boots while the models train."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = start_server(
        [
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--workers",
            "1",
        ],
        port,
        folder / "server.log",
        "/health",
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def trained_models(
    tmp_path_factory: pytest.TempPathFactory, mnist_path: Path, mlflow_tracking_server: Server
) -> TrainedModels:
    """tanh-hinge on 1,500 images x 1 epoch (weaker) and relu-crossentropy on 10,000 x 2 epochs (stronger),
    each trained once by the project's own `train_one` and saved as .keras. (The tracking server is started
    first so that it boots while these train.)"""
    folder = tmp_path_factory.mktemp("registry-models")
    weaker_data = save_slice(mnist_path, folder / "weaker.npz", train=1500, test=500)
    stronger_data = save_slice(mnist_path, folder / "stronger.npz", train=10000, test=1000)
    ignore_epochs = lambda config, epoch, metrics: None  # noqa: E731
    models = TrainedModels(
        weaker=train_one(TrainConfig("tanh", "hinge", epochs=1), str(weaker_data), str(folder), ignore_epochs),
        stronger=train_one(
            TrainConfig("relu", "crossentropy", epochs=2, seed=1), str(stronger_data), str(folder), ignore_epochs
        ),
    )
    weaker, stronger = final_val_accuracy(models.weaker), final_val_accuracy(models.stronger)
    assert weaker < stronger, f"expected the weaker model below the stronger one: {weaker} vs {stronger}"
    return models


def register_all(kind: str, uri: str, models: TrainedModels, artifact_location: str | None) -> RegisteredStore:
    """Log LOG_ORDER through ConfigRuns(registered_model=...), as `main` does, noting the champion after each."""
    store = RegisteredStore(kind, uri, models)
    with tracking(uri):
        client = MlflowClient()
        if artifact_location is not None and client.get_experiment_by_name(EXPERIMENT) is None:
            client.create_experiment(EXPERIMENT, artifact_location=artifact_location)
        experiment_id = use_experiment(EXPERIMENT)
        with top_run("registry-test", {keys.ENTRY_POINT_TAG: "main"}) as parent:
            for step, which in LOG_ORDER:
                outcome: Outcome = getattr(models, which)
                config = outcome.config
                names = {config: f"{step}-{config.name}"}
                with ConfigRuns(experiment_id, parent.info.run_id, names, REGISTERED_MODEL) as runs:
                    for epoch, value in enumerate(outcome.history["val_accuracy"], start=1):
                        runs.log_epoch(config, epoch, {keys.VAL_ACCURACY: value})
                    store.run_ids[step] = runs.run_id(config)
                    runs.log_outcome(outcome)
                versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
                store.versions[step] = str(max(int(version.version) for version in versions))
                champion = client.get_model_version_by_alias(REGISTERED_MODEL, keys.CHAMPION_ALIAS)
                store.champion_after[step] = str(champion.version)
    return store


@pytest.fixture(scope="session")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory, trained_models: TrainedModels) -> RegisteredStore:
    folder = tmp_path_factory.mktemp("sqlite-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return register_all("sqlite", uri, trained_models, artifact_location=str(folder / "artifacts"))


@pytest.fixture(scope="session")
def server_store(mlflow_tracking_server: Server, trained_models: TrainedModels) -> RegisteredStore:
    uri = mlflow_tracking_server.wait_ready()
    return register_all("server", uri, trained_models, artifact_location=None)


@pytest.fixture(params=["sqlite", "server"])
def registered_store(request: pytest.FixtureRequest) -> Iterator[RegisteredStore]:
    """Each test that takes it runs against the SQLite store and against the tracking server."""
    store: RegisteredStore = request.getfixturevalue(f"{request.param}_store")
    with tracking(store.uri):
        yield store


def cli_in_process(*args: str) -> int:
    """`python -m study ARGS` in this process (fast: mlflow and keras are already imported)."""
    from study.cli import main

    handler = signal.getsignal(signal.SIGTERM)
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        return main(list(args))
    finally:
        signal.signal(signal.SIGTERM, handler)  # the CLI installs its own; give pytest back its handler
        for added in set(root.handlers) - set(handlers):  # basicConfig's, bound to this test's captured stderr
            root.removeHandler(added)
