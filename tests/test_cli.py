"""Bad input through the command line: exit code 2, one line naming what was wrong, nothing started."""

import numpy as np
import pytest

from conftest import run_cli

# (arguments, text the one-line message must contain)
BAD_INPUT = [
    (["train", "--activation", "softplus", "--loss", "hinge"], "activation: 'softplus' is not allowed; choose one of"),
    (["train", "--activation", "relu", "--loss", "mse"], "loss: 'mse' is not allowed; choose one of crossentropy"),
    (["main", "--epochs", "0"], "epochs: 0 is out of range; must be >= 1"),
    (["main", "--epochs", "-5"], "epochs: -5 is out of range"),
    (["main", "--epochs", "ten"], "epochs: 'ten' is not an integer"),
    (["main", "--epochs", "2.5"], "epochs: '2.5' is not an integer"),
    (["main", "--batch-size", "0"], "batch_size: 0 is out of range; must be >= 1"),
    (["main", "--batch-size", "abc"], "batch_size: 'abc' is not an integer"),
    (["main", "--learning-rate", "0"], "learning_rate: 0 is not allowed; must be a finite number > 0"),
    (["main", "--learning-rate", "-0.1"], "learning_rate: -0.1 is not allowed"),
    (["main", "--learning-rate", "nan"], "learning_rate: nan is not allowed"),
    (["main", "--learning-rate", "inf"], "learning_rate: inf is not allowed"),
    (["main", "--learning-rate", "fast"], "learning_rate: 'fast' is not a number"),
    (["main", "--seed", "-1"], "seed: -1 is out of range"),
    (["main", "--seeds", "0"], "seeds: 0 is out of range"),
    (["main", "--data", "/no/such/mnist.npz"], "data file '/no/such/mnist.npz': no such file"),
    (["main", "--data", "{tmp}"], "is a directory"),
    (["main", "--data", "{tmp}/empty.npz"], "is empty"),
    (["main", "--data", "{tmp}/labels.npz"], "expected 0..9"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_INPUT, ids=[" ".join(args) for args, _ in BAD_INPUT])
def test_bad_input_is_exit_2_with_one_clear_line(arguments, message, tmp_path, small_mnist):
    (tmp_path / "empty.npz").write_bytes(b"")
    with np.load(small_mnist) as good:
        arrays = dict(good)
    arrays["y_test"] = arrays["y_test"] + 10
    np.savez(tmp_path / "labels.npz", **arrays)
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    store = tmp_path / "mlflow.db"
    result = run_cli(*arguments, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.stderr
    assert not store.exists(), "validation must happen before any run is created"
