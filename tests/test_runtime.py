"""The training processes' set-up (study/runtime.py) and the batched epoch logging: lean workers, the compiled-code
cache, the test-only dataset and fewer store calls, with nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import PROJECT
from mlflow.tracking import MlflowClient

from study import runtime
from study.config import TrainConfig
from study.data import load_npz, prepare, subset
from study.model import build_model
from study.runner import Outcome
from tracking import keys

# Trains one configuration in a fresh process set up as a study worker, then reports what that process
# imported, what JAX's compilation cache did, and the outcome.
WORKER_SCRIPT = """
import json, sys
from study import runtime
runtime.prepare_worker()
import jax
events = []
jax.monitoring.register_event_listener(lambda event, **kwargs: events.append(event))
from study.config import TrainConfig
from study.runner import train_one
config = TrainConfig("relu", "crossentropy", epochs=1, seed=0)
outcome = train_one(config, sys.argv[1], sys.argv[2], lambda *args: None)
loaded = {name: sys.modules.get(name) is not None for name in ("tensorflow", "pandas", "sklearn", "IPython")}
print(json.dumps({
    "loaded": loaded,
    "cache_hits": events.count("/jax/compilation_cache/cache_hits"),
    "cache_misses": events.count("/jax/compilation_cache/cache_misses"),
    "test_accuracy": outcome.test_accuracy,
    "model_path": outcome.model_path,
}))
"""


def run_worker(data: Path, folder: Path, cache: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(PROJECT), runtime.CACHE_ENV: cache}
    env.pop("KERAS_BACKEND", None)  # the project's choice (JAX), as in `python -m study`
    done = subprocess.run(
        [sys.executable, "-c", WORKER_SCRIPT, str(data), str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_worker_trains_without_tensorflow_and_reuses_compiled_code(small_mnist, tmp_path):
    cache = tmp_path / "cache"
    first = run_worker(small_mnist, tmp_path, str(cache))
    assert first["loaded"] == {"tensorflow": False, "pandas": False, "sklearn": False, "IPython": False}
    assert first["test_accuracy"] > 0.5  # chance is 0.1: a real model, trained without TensorFlow loaded
    assert first["cache_misses"] > 0 and first["cache_hits"] == 0
    (machine_folder,) = cache.iterdir()  # one folder per machine: entries are native code for this CPU
    assert any(machine_folder.iterdir())

    again = run_worker(small_mnist, tmp_path, str(cache))
    assert again["cache_hits"] >= first["cache_misses"] // 2, again  # the same model is not compiled again
    assert again["test_accuracy"] == pytest.approx(first["test_accuracy"], abs=1e-9)  # and it is the same model

    # The model saved without TensorFlow loads (here, where TensorFlow may be loaded) and predicts.
    model = keras.saving.load_model(first["model_path"], safe_mode=True)
    assert model.predict(np.zeros((2, 784), dtype=np.float32), verbose=0).shape == (2, 10)


def test_the_cache_can_be_turned_off(small_mnist, tmp_path, monkeypatch):
    result = run_worker(small_mnist, tmp_path, "off")
    assert result["cache_hits"] == 0 and result["test_accuracy"] > 0.5
    monkeypatch.setenv(runtime.CACHE_ENV, "OFF")
    assert runtime.cache_folder() is None


def test_cache_folder_defaults_to_the_user_cache_per_machine(monkeypatch, tmp_path):
    monkeypatch.delenv(runtime.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = runtime.cache_folder()
    assert folder.parent == tmp_path / "mnist-activation-study" / "jax"
    assert folder.name.endswith(os.uname().machine)
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "mine"))
    assert runtime.cache_folder().parent == tmp_path / "mine"


def test_a_cache_folder_that_cannot_be_made_is_a_warning_not_an_error(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(runtime.CACHE_ENV, str(blocker / "cache"))
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    runtime.use_compile_cache()
    assert "Compiled-code cache off" in caplog.text and runtime.CACHE_ENV in caplog.text


def test_a_blocked_package_is_absent_not_a_none_entry(tmp_path):
    """Blocked TensorFlow can't be imported, and MLflow, which asks sys.modules whether TensorFlow is in use,
    still logs a NumPy metric value (with a None entry in sys.modules it tried to import TensorFlow and failed)."""
    script = f"""
import sys
import numpy as np
from study import runtime
runtime.skip_unused_imports()
try:
    import tensorflow
except ModuleNotFoundError as error:
    print("blocked:", error.name)
assert "tensorflow" not in sys.modules
from mlflow.tracking import MlflowClient
client = MlflowClient("sqlite:///{tmp_path / "mlflow.db"}")
run = client.create_run(client.create_experiment("numpy-metric"))
client.log_metric(run.info.run_id, "test_accuracy", np.float64(0.975))
print("logged:", client.get_run(run.info.run_id).data.metrics["test_accuracy"])
"""
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    env.pop("KERAS_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["blocked:", "tensorflow", "logged:", "0.975"]


def test_tensorflow_stays_importable_when_it_is_the_backend():
    script = "from study import runtime; runtime.skip_unused_imports(); import keras; print(keras.backend.backend())"
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "KERAS_BACKEND": "tensorflow"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "tensorflow", done.stderr[-2000:]


def test_test_only_keeps_the_test_set_and_drops_the_rest(mnist_path):
    data = prepare(subset(load_npz(mnist_path), 300, 100), seed=0)
    test_only = data.test_only()
    assert test_only.x_test is data.x_test and test_only.y_test is data.y_test
    assert test_only.x_train.shape == (0, 784) and test_only.y_val.shape == (0, 10)
    assert np.array_equal(test_only.test_labels, data.test_labels)


# --- Epoch metrics: written in batches, every one of them in the store when the run ends.


def fake_outcome(config: TrainConfig, history: dict[str, list[float]], folder: Path) -> Outcome:
    keras.utils.set_random_seed(0)
    build_model(config).save(folder / "model.keras")
    return Outcome(
        config=config, history=history, train_seconds=1.0, diverged=False, stopped_reason="", test_loss=0.4,
        test_accuracy=0.9, model_path=str(folder / "model.keras"), predictions=np.arange(10) % 10,
        labels=np.arange(10) % 10,
    )  # fmt: skip


def test_epochs_are_written_in_batches_and_all_land(tracking_uri, tmp_path):
    from tracking.runs import EPOCH_FLUSH_SECONDS, ConfigRuns

    client = MlflowClient()
    experiment_id = client.create_experiment("batched")
    parent = client.create_run(experiment_id, run_name="study")
    config = TrainConfig("tanh", "hinge", epochs=5)
    epochs = 5
    history = {key: [0.1 * epoch for epoch in range(1, epochs + 1)] for key in keys.EPOCH_METRICS}
    with ConfigRuns(experiment_id, parent.info.run_id, {config: "tanh-hinge"}) as runs:
        started = time.monotonic()
        for epoch in range(1, epochs + 1):
            runs.log_epoch(config, epoch, {key: values[epoch - 1] for key, values in history.items()})
        run_id = runs.run_id(config)
        written = client.get_metric_history(run_id, keys.VAL_ACCURACY)
        if time.monotonic() - started < EPOCH_FLUSH_SECONDS:  # epochs 2..5 came within the flush interval
            assert [metric.step for metric in written] == [1]  # the first at once: the run shows in the UI
        runs.log_outcome(fake_outcome(config, history, tmp_path))
    for key in keys.EPOCH_METRICS:
        steps = [(metric.step, metric.value) for metric in client.get_metric_history(run_id, key)]
        assert sorted(steps) == [(epoch, pytest.approx(0.1 * epoch)) for epoch in range(1, epochs + 1)], key
    assert client.get_run(run_id).info.status == "FINISHED"


def test_an_interrupted_run_keeps_its_buffered_epochs(tracking_uri):
    from tracking.runs import ConfigRuns

    client = MlflowClient()
    experiment_id = client.create_experiment("interrupted")
    parent = client.create_run(experiment_id, run_name="study")
    config = TrainConfig("relu", "crossentropy", epochs=3)
    with pytest.raises(KeyboardInterrupt):
        with ConfigRuns(experiment_id, parent.info.run_id, {config: "relu-crossentropy"}) as runs:
            for epoch in (1, 2, 3):
                runs.log_epoch(config, epoch, {keys.VAL_ACCURACY: 0.5 + epoch / 10})
            run_id = runs.run_id(config)
            raise KeyboardInterrupt
    assert [metric.step for metric in client.get_metric_history(run_id, keys.VAL_ACCURACY)] == [1, 2, 3]
    assert client.get_run(run_id).info.status == "KILLED"


# --- Training starts before MLflow is set up; the logging process stays lean (study/runner.py, tracking/runs.py).


def test_workers_train_from_start_without_waiting_for_run(small_mnist):
    from study.runner import Workers

    configs = [TrainConfig("relu", "hinge", epochs=1), TrainConfig("tanh", "crossentropy", epochs=1)]
    epochs, outcomes = [], []
    with Workers(2, str(small_mnist)) as workers:
        workers.start(configs)
        models = Path(workers.models.name)
        deadline = time.monotonic() + 240
        while len(list(models.glob("*.keras"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)  # nobody collects yet: the workers train on their own
        assert sorted(path.name for path in models.glob("*.keras")) == [
            "relu-hinge-seed0.keras",
            "tanh-crossentropy-seed0.keras",
        ]
        with pytest.raises(ValueError, match="not the configurations given to start"):
            workers.run(configs[:1], lambda *args: None, outcomes.append)

        def on_done(outcome: Outcome) -> None:
            model = keras.saving.load_model(outcome.model_path, safe_mode=True)  # usable while the pool is open
            assert model.predict(np.zeros((1, 784), dtype=np.float32), verbose=0).shape == (1, 10)
            outcomes.append(outcome)

        workers.run(configs, lambda config, epoch, metrics: epochs.append((config.name, epoch)), on_done)
    assert sorted(epochs) == [("relu-hinge", 1), ("tanh-crossentropy", 1)]  # queued epochs are delivered late
    assert {outcome.config for outcome in outcomes} == set(configs)
    assert all(outcome.test_accuracy > 0.5 for outcome in outcomes)
    assert not models.exists()  # the saved models go with the pool


def test_main_stops_its_workers_when_the_tracking_server_is_unreachable(small_mnist, tmp_path):
    """`main` starts training before it checks the store: a dead server still ends in one line and exit code
    2, and no worker process outlives the command."""
    from conftest import run_cli

    marker = f"workers-of-{tmp_path.name}"
    started = time.monotonic()
    result = run_cli(
        "main", "--epochs", "1", "--data", str(small_mnist),
        cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "TEST_MARKER": marker}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        "error: tracking server http://127.0.0.1:9 is unreachable (<urlopen error [Errno 111] Connection refused>); "
        "start it, or set MLFLOW_TRACKING_URI to a reachable server or to sqlite:///mlflow.db"
    )
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60

    def marked(pid: str) -> bool:
        try:
            return marker.encode() in Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone, or not ours
            return False

    def left() -> list[str]:
        return [pid for pid in os.listdir("/proc") if pid.isdigit() and marked(pid)]

    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left() == []


def test_a_saved_keras_file_is_logged_as_the_same_model(tracking_uri, tmp_path):
    import mlflow

    from tracking.runs import SavedKerasModel, log_keras_file, pip_requirements

    keras.utils.set_random_seed(3)
    path = tmp_path / "worker.keras"
    build_model(TrainConfig("sigmoid", "hinge")).save(path)
    pixels = np.random.default_rng(0).random((5, 784), dtype=np.float32)
    expected = keras.saving.load_model(path, safe_mode=True).predict(pixels, verbose=0)
    experiment_id = MlflowClient().create_experiment("saved-file")  # not the process's last set_experiment
    with mlflow.start_run(experiment_id=experiment_id):
        info = log_keras_file(path, pip_requirements())
    assert info.flavors["keras"]["keras_backend"] == keras.backend.backend()
    assert np.allclose(mlflow.keras.load_model(info.model_uri).predict(pixels, verbose=0), expected)
    assert np.allclose(mlflow.pyfunc.load_model(info.model_uri).predict(pixels), expected)
    with pytest.raises(TypeError, match="saved already"):
        SavedKerasModel(path).save(str(tmp_path / "copy.keras"), zipped=False)


def test_frozen_imports_pause_the_collector_and_freeze_what_was_loaded():
    import gc

    assert gc.isenabled()
    gc.unfreeze()  # an earlier in-process command may have frozen this heap already
    assert gc.get_freeze_count() == 0
    try:
        with runtime.frozen_imports():
            assert not gc.isenabled()
            import fractions  # noqa: F401  (anything)
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
