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


@pytest.fixture(scope="session")
def small_mnist(tmp_path_factory: pytest.TempPathFactory, mnist_path: Path) -> Path:
    """The first 3,000 training and 1,000 test images of the real MNIST, as an .npz file."""
    with np.load(mnist_path, allow_pickle=False) as full:
        arrays = {
            "x_train": full["x_train"][:3000],
            "y_train": full["y_train"][:3000],
            "x_test": full["x_test"][:1000],
            "y_test": full["y_test"][:1000],
        }
    path = tmp_path_factory.mktemp("data") / "mnist-small.npz"
    np.savez(path, **arrays)
    return path


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
