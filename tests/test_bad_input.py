"""Bad input, one table: every case is exit code 2, one line on stderr naming the parameter or file and what
is allowed, no traceback, and no MLflow run left RUNNING (for main/train/optimize: no store even created).

Each command line runs as `python -m study` would, in a forked child of one driver process
(tests/cli_driver.py), so the table costs seconds, not a Python start per case.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT

SECRET = "s3cret-pw"
DATA = ["--data", "{bad}/good.npz"]
TRAIN = ["train", "--activation", "relu", "--loss", "hinge", *DATA]
OPTIMIZE = ["optimize", "--n-trials", "1", "--max-epochs", "1", *DATA]
PREDICT = ["predict", "--input", "{bad}/digits.npy"]

# (arguments, text the one line must contain)
CASES: list[tuple[list[str], str]] = [
    # Data files: every malformed kind, through main, train and optimize.
    (["main", "--data", "{bad}/missing-key.npz"], "missing key(s) y_test; required: x_train, y_train, x_test, y_test"),
    (["main", "--data", "{bad}/flat-images.npz"], "x_train has shape (100, 784); expected (N, 28, 28)"),
    (["train", "--activation", "relu", "--loss", "hinge", "--data", "{bad}/label-shape.npz"], "y_train has shape"),
    (["main", "--data", "{bad}/float-pixels.npz"], "x_train has dtype float32; expected uint8 (pixels 0..255)"),
    (["main", "--data", "{bad}/float-labels.npz"], "y_train has dtype float64; expected integer labels 0..9"),
    (["main", "--data", "{bad}/length-mismatch.npz"], "x_train has 100 images but y_train has 99 labels"),
    (["main", "--data", "{bad}/labels-out-of-range.npz"], "y_test has labels in 10..19; expected 0..9"),
    (["optimize", "--data", "{bad}/negative-labels.npz"], "y_train has labels in -1..8; expected 0..9"),
    (["main", "--data", "{bad}/nan-pixels.npz"], "x_train holds NaN or infinite pixels; expected uint8 pixels 0..255"),
    (["main", "--data", "{bad}/empty-arrays.npz"], "x_train is empty; expected at least one image"),
    (["main", "--data", "{bad}/too-few.npz"], "x_train has 10 images; need at least 20"),
    (["main", "--data", "{bad}/truncated.npz"], "truncated.npz': not a readable .npz file (not a zip archive)"),
    (["main", "--data", "{bad}/corrupted.npz"], "corrupted.npz': not a readable .npz file (x_train.npy is damaged"),
    (["main", "--data", "{bad}/not-a-zip.npz"], "not-a-zip.npz': not a readable .npz file (not a zip archive)"),
    (["main", "--data", "{bad}/empty.npz"], "empty.npz': is empty; expected an .npz file with keys x_train"),
    (["main", "--data", "{bad}/folder.npz"], "folder.npz': is a directory; pass a path to an .npz file"),
    (["main", "--data", "{bad}/object-array.npz"], "holds an object array that would need unpickling"),
    (["main", "--data", "{bad}/array.npy"], "array.npy': is a single .npy array, expected an .npz archive"),
    (["main", "--data", "/no/such/mnist.npz"], "data file '/no/such/mnist.npz': no such file"),
    # Numeric parameters of main and train: out of range, NaN, inf, not a number.
    (["main", "--epochs", "0", *DATA], "epochs: 0 is out of range; must be >= 1"),
    (["main", "--epochs", "-5", *DATA], "epochs: -5 is out of range; must be >= 1"),
    (["main", "--epochs", "ten", *DATA], "epochs: 'ten' is not an integer"),
    (["main", "--epochs", "2.5", *DATA], "epochs: '2.5' is not an integer"),
    (["main", "--epochs", "nan", *DATA], "epochs: 'nan' is not an integer"),
    ([*TRAIN, "--epochs", "inf"], "epochs: 'inf' is not an integer"),
    (["main", "--batch-size", "0", *DATA], "batch_size: 0 is out of range; must be >= 1"),
    (["main", "--batch-size", "abc", *DATA], "batch_size: 'abc' is not an integer"),
    ([*TRAIN, "--batch-size", "1e3"], "batch_size: '1e3' is not an integer"),
    (["main", "--learning-rate", "0", *DATA], "learning_rate: 0 is not allowed; must be a finite number > 0"),
    (["main", "--learning-rate", "-0.1", *DATA], "learning_rate: -0.1 is not allowed; must be a finite number > 0"),
    (["main", "--learning-rate", "nan", *DATA], "learning_rate: nan is not allowed; must be a finite number > 0"),
    (["main", "--learning-rate", "inf", *DATA], "learning_rate: inf is not allowed; must be a finite number > 0"),
    ([*TRAIN, "--learning-rate=-inf"], "learning_rate: -inf is not allowed; must be a finite number > 0"),
    (["main", "--learning-rate", "fast", *DATA], "learning_rate: 'fast' is not a number"),
    (["main", "--seed", "-1", *DATA], "seed: -1 is out of range; must be >= 0 and <= 4294967295"),
    (["main", "--seed", "4294967296", *DATA], "seed: 4294967296 is out of range; must be >= 0 and <= 4294967295"),
    (["main", "--seed", "4294967295", "--seeds", "2", *DATA], "seed: 4294967296 is out of range"),
    ([*TRAIN, "--seed", "x"], "seed: 'x' is not an integer"),
    (["main", "--seeds", "0", *DATA], "seeds: 0 is out of range; must be >= 1 and <= 1000"),
    (["main", "--seeds", "1001", *DATA], "seeds: 1001 is out of range; must be >= 1 and <= 1000"),
    (["main", "--workers", "-1", *DATA], "workers: -1 is out of range; must be >= 0 and <= 64"),
    (["main", "--workers", "65", *DATA], "workers: 65 is out of range; must be >= 0 and <= 64"),
    (["main", "--workers", "two", *DATA], "workers: 'two' is not an integer"),
    # Numeric parameters of optimize.
    ([*OPTIMIZE, "--n-trials", "0"], "n_trials: 0 is out of range; must be >= 1"),
    ([*OPTIMIZE, "--n-trials", "nan"], "n_trials: 'nan' is not an integer"),
    ([*OPTIMIZE, "--max-epochs", "0"], "max_epochs: 0 is out of range; must be >= 1"),
    ([*OPTIMIZE, "--max-epochs", "1.5"], "max_epochs: '1.5' is not an integer"),
    ([*OPTIMIZE, "--seed", "-3"], "seed: -3 is out of range"),
    ([*OPTIMIZE, "--seed", "99999999999"], "seed: 99999999999 is out of range; must be >= 0 and <= 4294967295"),
    ([*OPTIMIZE, "--batch-size", "0"], "batch_size: 0 is out of range; must be >= 1"),
    ([*OPTIMIZE, "--timeout", "-1"], "timeout: -1 is out of range; must be >= 0"),
    ([*OPTIMIZE, "--timeout", "inf"], "timeout: 'inf' is not an integer"),
    # Names: activations, losses, configurations, storage URLs, registered models, choices.
    (["train", "--activation", "softplus", "--loss", "hinge", *DATA], "activation: 'softplus' is not allowed"),
    (["train", "--activation", "relu", "--loss", "mse", *DATA], "loss: 'mse' is not allowed; choose one of"),
    ([*OPTIMIZE, "--configs", "relu-mse"], "configs: unknown configuration 'relu-mse'; allowed: all, or"),
    ([*OPTIMIZE, "--configs", "relu,tanh-hinge"], "configs: unknown configuration 'relu'"),
    ([*OPTIMIZE, "--configs", " , "], "names no configuration; use all or e.g. relu-crossentropy"),
    ([*OPTIMIZE, "--storage", "not a url"], "storage: 'not a url' is not a database URL; use sqlite:///"),
    ([*OPTIMIZE, "--storage", "mysql://user@localhost/optuna"], "storage: 'mysql' is not supported; use sqlite:///"),
    ([*OPTIMIZE, "--storage", "sqlite:///no/such/folder/optuna.db"], "storage: folder 'no/such/folder' of"),
    ([*OPTIMIZE, "--storage", "sqlite://"], "is in memory and would be lost"),
    ([*OPTIMIZE, "--storage", f"postgresql://user:{SECRET}@127.0.0.1:5432"], "postgresql://user:***@127.0.0.1:5432"),
    ([*OPTIMIZE, "--study-prefix", "a b"], "study_prefix: 'a b' is not allowed"),
    (["main", "--registered-model", "bad name!", *DATA], "registered_model: 'bad name!' is not allowed"),
    (["main", "--resume", "maybe", *DATA], "resume: 'maybe' is not allowed; choose one of true, false"),
    # predict, sync, and the command line itself.
    ([*PREDICT, "--model", "{bad}/no-such-model"], "is neither an MLflow model URI nor an existing path"),
    ([*PREDICT, "--model", "runs:/0123456789abcdef0123456789abcdef/model"], "model: could not load 'runs:/0123"),
    ([*PREDICT, "--model", " "], "model: is empty; pass an MLflow model URI"),
    (["predict", "--model", "runs:/x/model", "--input", "/no/such/digit.png"], "input: '/no/such/digit.png' does"),
    (["predict", "--model", "runs:/x/model", "--input", "{bad}/empty.npz"], "not a readable .npy/.npz file"),
    (["sync", "--folder", "/no/such/unsynced"], "folder: '/no/such/unsynced' is not a folder"),
    (["main", "--epohcs", "3", *DATA], "unrecognized arguments: --epohcs 3"),
    (["train", "--loss", "hinge", *DATA], "the following arguments are required: --activation"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


def write_bad_files(folder: Path, mnist: Path) -> None:
    """One valid small .npz and one file per way an input can be malformed."""
    with np.load(mnist, allow_pickle=False) as full:
        good = {
            "x_train": full["x_train"][:100],
            "y_train": full["y_train"][:100],
            "x_test": full["x_test"][:20],
            "y_test": full["y_test"][:20],
        }

    def save(name: str, **changes: np.ndarray | None) -> None:
        arrays = {key: value for key, value in {**good, **changes}.items() if value is not None}
        np.savez(folder / name, **arrays)

    save("good.npz")
    save("missing-key.npz", y_test=None)
    save("flat-images.npz", x_train=good["x_train"].reshape(100, 784))
    save("label-shape.npz", y_train=good["y_train"][:, None])
    save("float-pixels.npz", x_train=good["x_train"].astype(np.float32) / 255)
    save("float-labels.npz", y_train=good["y_train"].astype(np.float64))
    save("length-mismatch.npz", y_train=good["y_train"][:-1])
    save("labels-out-of-range.npz", y_test=good["y_test"] + 10)
    save("negative-labels.npz", y_train=good["y_train"].astype(np.int16) - 1)
    nan_pixels = good["x_train"].astype(np.float32)
    nan_pixels[0, 14, 14] = np.nan
    save("nan-pixels.npz", x_train=nan_pixels)
    save("empty-arrays.npz", x_train=np.zeros((0, 28, 28), np.uint8), y_train=np.zeros(0, np.uint8))
    save("too-few.npz", x_train=good["x_train"][:10], y_train=good["y_train"][:10])
    save("object-array.npz", x_train=np.array([good["x_train"][0], "not pixels"], dtype=object))
    whole = (folder / "good.npz").read_bytes()
    (folder / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    corrupted = bytearray(whole)
    corrupted[len(whole) // 4 : len(whole) // 4 + 64] = b"\xff" * 64  # inside x_train's pixels: a CRC mismatch
    (folder / "corrupted.npz").write_bytes(bytes(corrupted))
    (folder / "not-a-zip.npz").write_text("x_train,y_train\n0,7\n")
    (folder / "empty.npz").write_bytes(b"")
    (folder / "folder.npz").mkdir()
    np.save(folder / "array.npy", good["x_train"])
    np.save(folder / "digits.npy", good["x_test"][:3])


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, mnist_path: Path) -> Path:
    folder = tmp_path_factory.mktemp("bad-input")
    write_bad_files(folder, mnist_path)
    return folder


@pytest.fixture(scope="module")
def run_command(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """`run_command(args, cwd, env)` -> (exit code, stdout, stderr), through one driver process."""
    driver = subprocess.Popen(
        [sys.executable, str(PROJECT / "tests" / "cli_driver.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
        cwd=tmp_path_factory.mktemp("driver"),
    )

    def run(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
        stdout, stderr = cwd / "stdout.txt", cwd / "stderr.txt"
        request = {"args": args, "cwd": str(cwd), "env": env, "stdout": str(stdout), "stderr": str(stderr)}
        driver.stdin.write(json.dumps(request) + "\n")
        driver.stdin.flush()
        answer = json.loads(driver.stdout.readline())
        return answer["code"], stdout.read_text(), stderr.read_text()

    try:
        yield run
    finally:
        driver.stdin.close()
        try:
            driver.wait(timeout=30)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()


def running_runs(store: Path) -> int:
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as connection:
        tables = {row[0] for row in connection.execute("select name from sqlite_master where type = 'table'")}
        if "runs" not in tables:
            return 0
        return connection.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]


def test_the_table_covers_the_issue():
    assert len(CASES) >= 30
    commands = {arguments[0] for arguments, _ in CASES}
    assert {"main", "train", "optimize", "predict", "sync"} <= commands


@pytest.mark.parametrize(("arguments", "message"), CASES, ids=[" ".join(arguments) for arguments, _ in CASES])
def test_bad_input_is_exit_2_with_one_clear_line(arguments, message, bad_files, run_command, tmp_path):
    arguments = [argument.replace("{bad}", str(bad_files)) for argument in arguments]
    store = tmp_path / "mlflow.db"
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
        "MNIST_UNSYNCED_DIR": str(tmp_path / "unsynced"),
        "MLFLOW_TRACKING_PASSWORD": SECRET,
    }
    code, stdout, stderr = run_command(arguments, cwd=tmp_path, env=env)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert SECRET not in stdout + stderr
    if arguments[0] in ("main", "train", "optimize"):
        assert not store.exists(), "validation must happen before any run (or store) is created"
    elif store.exists():
        assert running_runs(store) == 0
