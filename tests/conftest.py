"""Shared fixtures: the real MNIST (from ../shared/datasets), small slices of it, temporary stores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import study  # noqa: F401  (chooses the Keras backend before keras is imported)

PROJECT = Path(__file__).resolve().parents[1]
MNIST = Path(os.environ.get("MNIST_NPZ") or PROJECT.parent / "shared" / "datasets" / "mnist.npz").resolve()


@pytest.fixture(scope="session", autouse=True)
def _run_outside_the_repository(tmp_path_factory: pytest.TempPathFactory):
    """Tests run in a scratch folder, so MLflow's relative defaults (./mlruns, ./mlflow.db) never land in
    the repository; tests that need the project pass `cwd=PROJECT` or absolute paths."""
    before = Path.cwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


@pytest.fixture(scope="session")
def mnist_path() -> Path:
    assert MNIST.exists(), f"the real MNIST is expected at {MNIST} (or set MNIST_NPZ)"
    return MNIST


def write_mnist_slice(mnist_path: Path, path: Path, train: int, test: int) -> Path:
    """The first `train` training and `test` test images of the real MNIST, saved as an .npz at `path`."""
    with np.load(mnist_path, allow_pickle=False) as full:
        np.savez(
            path,
            x_train=full["x_train"][:train],
            y_train=full["y_train"][:train],
            x_test=full["x_test"][:test],
            y_test=full["y_test"][:test],
        )
    return path


@pytest.fixture(scope="session")
def small_mnist(tmp_path_factory: pytest.TempPathFactory, mnist_path: Path) -> Path:
    """The first 3,000 training and 1,000 test images of the real MNIST, as an .npz file."""
    return write_mnist_slice(mnist_path, tmp_path_factory.mktemp("data") / "mnist-small.npz", 3000, 1000)


@pytest.fixture
def postgres_databases():
    """`create(prefix)` -> the name of a new, empty database on the real PostgreSQL at 127.0.0.1:5432
    (user postgres, trust auth); every database created is dropped after the test."""
    import uuid

    import psycopg2

    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=5)
    except psycopg2.OperationalError as error:
        pytest.fail(f"no PostgreSQL at 127.0.0.1:5432 ({error}); .ci/run starts it")
    admin.autocommit = True
    created: list[str] = []

    def create(prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return name

    try:
        yield create
    finally:
        with admin.cursor() as cursor:
            for name in created:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite tracking store (artifacts beside it) for one test, set for this process too."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # default artifact root ./mlruns lands in tmp_path
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`python -m study ARGS` in a subprocess, as a user would run it."""
    full_env = {**os.environ, "PYTHONPATH": str(PROJECT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "study", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
