"""Benchmark: the six configurations, a notebook-style plain-Keras baseline vs the project's `main`, side by side.

One invocation on one machine measures (see benchmarks/README.md):
  (a) baseline: plain Keras on TensorFlow, `model.fit` with defaults, `mlflow.keras.autolog()`, six in a row;
  (b) study: `python -m study main` (JAX, steps_per_execution, one worker per core, explicit logging);
  the ratio (b)/(a), both sets of test accuracies, the study without MLflow (`--no-tracking`) for the
  tracking overhead, training throughput at batch 32 and 128 against numpy's float32 matmul peak, and the
  peak memory of each process tree. Results are printed and written as JSON.

Every measured part runs in its own subprocess, started and timed from here; this process imports only the
standard library and numpy while anything is being measured.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_study")

PROJECT = Path(__file__).resolve().parents[1]
BENCHMARKS = PROJECT / "benchmarks"

# The exercise's grid, written out here on purpose: the baseline must not depend on the project's code.
ACTIVATIONS = ("tanh", "sigmoid", "relu")
LOSSES = {"crossentropy": "categorical_crossentropy", "hinge": "categorical_hinge"}
HIDDEN_UNITS = (128, 64)
LEARNING_RATE = 0.001
BATCH_SIZE = 32
SEED = 0
VALIDATION_FRACTION = 10  # 6,000 of MNIST's 60,000 training images, as in the project

# Training FLOPs per image of the MLP: forward 2*weights, backward 4*weights (biases and activations ignored).
WEIGHTS = 784 * HIDDEN_UNITS[0] + HIDDEN_UNITS[0] * HIDDEN_UNITS[1] + HIDDEN_UNITS[1] * 10
FLOPS_PER_IMAGE = 6 * WEIGHTS

SMOKE_TRAIN_IMAGES = 3000
SMOKE_TEST_IMAGES = 1000
BASELINE_MODELS_SMOKE = 1  # models the smoke baseline logs (the full benchmark: all six)
THROUGHPUT_BATCH_SIZES = (32, 128)
THROUGHPUT_CONFIG = ("relu", "crossentropy")

# Targets of the issue (benchmarks/README.md).
TARGET_RATIO = 0.25
TARGET_TRACKING_OVERHEAD = 0.05
TARGET_PEAK_FRACTION = 0.25
TARGET_PEAK_RSS_MB = 2048

THREADPOOL_FIELDS = ("internal_api", "version", "num_threads", "architecture", "threading_layer")
SAMPLE_SECONDS = 0.2  # how often the process tree's memory is sampled
ENV_REPORTED = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "KERAS_BACKEND",
    "XLA_FLAGS",
)


def config_names() -> list[str]:
    return [f"{activation}-{loss}" for loss in LOSSES for activation in ACTIVATIONS]


def default_data() -> str:
    return os.environ.get("MNIST_NPZ") or str(PROJECT.parent / "shared" / "datasets" / "mnist.npz")


# --- Memory of a process tree, from /proc (psutil is not a dependency of this project).


def _children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, from every /proc/<pid>/stat (this kernel has no /proc/.../children)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children = _children_map()
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def memory_of(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; (0, 0) if it is gone. PSS shares common pages out fairly."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            rss = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        pss = 0
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
        return rss, pss
    except (OSError, ValueError, IndexError):
        return 0, 0


def command_of(pid: int) -> str:
    """A process's command line, shortened (a spawned worker's is `python -c from multiprocessing...`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            words = handle.read().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(word.decode(errors="replace") for word in words if word)
    return text[:100]


@dataclass
class Measured:
    """One subprocess: wall time from start to exit, exit code and the peak memory of its process tree."""

    seconds: float
    cpu_seconds: float  # user + system time of the process and its reaped descendants (load-independent)
    returncode: int
    peak_tree_rss_mb: float  # max over samples of the summed RSS of the process and all its descendants
    peak_tree_pss_mb: float  # the same with PSS (shared library pages counted once overall)
    peak_processes: int  # processes in the tree at the peak
    peak_breakdown: list[dict[str, object]]  # each process's RSS at the RSS peak: where the memory goes
    largest_process_rss_mb: float  # exact ru_maxrss: the largest single process (itself or a reaped descendant)


def run_measured(command: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> Measured:
    """Run `command` with output to `log_path`, timing it and sampling its process tree's memory."""
    stop = threading.Event()
    peak: dict[str, object] = {"rss": 0, "pss": 0, "processes": 0, "breakdown": []}
    with open(log_path, "w") as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)

        def sample() -> None:
            while not stop.is_set():
                tree = process_tree(process.pid)
                commands = [command_of(pid) for pid in tree]  # read first: a process may exit meanwhile
                usage = [memory_of(pid) for pid in tree]
                rss, pss = sum(u[0] for u in usage), sum(u[1] for u in usage)
                if rss > peak["rss"]:
                    breakdown = [
                        {"command": command, "rss_mb": round(u[0] / 2**20, 1), "pss_mb": round(u[1] / 2**20, 1)}
                        for command, u in zip(commands, usage, strict=True)
                        if u[0]
                    ]
                    peak.update(rss=rss, processes=len(breakdown), breakdown=breakdown)
                peak["pss"] = max(peak["pss"], pss)
                stop.wait(SAMPLE_SECONDS)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)  # its rusage: ru_maxrss in KiB on Linux
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
            process.wait()
            raise
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, tell Popen
        stop.set()
        sampler.join()
    return Measured(
        seconds=round(seconds, 2),
        cpu_seconds=round(usage.ru_utime + usage.ru_stime, 2),
        returncode=process.returncode,
        peak_tree_rss_mb=round(peak["rss"] / 2**20, 1),
        peak_tree_pss_mb=round(peak["pss"] / 2**20, 1),
        peak_processes=peak["processes"],
        peak_breakdown=peak["breakdown"],
        largest_process_rss_mb=round(usage.ru_maxrss / 1024, 1),
    )


def check_finished(name: str, measured: Measured, log_path: Path, workdir: Path) -> None:
    if measured.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(
            f"{name} failed with exit code {measured.returncode}; last lines of {log_path}:\n{tail}\n"
            f"(work folder kept: {workdir})"
        )


# --- numpy's float32 matmul peak.


def numpy_config() -> dict[str, object]:
    """numpy's BLAS as built and as loaded (threadpoolctl), and the environment variables that steer it."""
    from threadpoolctl import threadpool_info

    build = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return {
        "numpy": np.__version__,
        "blas": {key: build.get(key) for key in ("name", "version", "openblas configuration")},
        "threadpools": [{key: pool.get(key) for key in THREADPOOL_FIELDS} for pool in threadpool_info()],
        "environment": {name: os.environ.get(name) for name in ENV_REPORTED},
    }


def matmul_peak(size: int, repeats: int = 5) -> float:
    """Best GFLOP/s of numpy's float32 (size x size) @ (size x size), after one warm-up."""
    rng = np.random.default_rng(0)
    left = rng.standard_normal((size, size), dtype=np.float32)
    right = rng.standard_normal((size, size), dtype=np.float32)
    left @ right
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        left @ right
        best = min(best, time.perf_counter() - started)
    return round(2 * size**3 / best / 1e9, 1)


# --- Children: each runs in its own process, started by `measure` below.


def baseline_child(data_path: str, epochs: int, models: int) -> dict[str, object]:
    """(a) What a notebook does: plain Keras on TensorFlow, fit with defaults, mlflow.keras.autolog().

    Autolog logs the model of the first `models` configurations (all six in the real benchmark; the
    smoke run logs one, to check it works without spending a minute of CI on requirement inference).
    """
    started = time.perf_counter()
    import keras
    import mlflow
    import mlflow.keras

    if keras.backend.backend() != "tensorflow":
        raise SystemExit(f"baseline: expected the TensorFlow backend, got {keras.backend.backend()}")
    imported = time.perf_counter()

    with np.load(data_path) as mnist:
        x_all, y_all = mnist["x_train"], mnist["y_train"]
        x_test, y_test = mnist["x_test"], mnist["y_test"]
    order = np.random.default_rng(SEED).permutation(len(x_all))
    validation = len(x_all) // VALIDATION_FRACTION
    val_index, train_index = order[:validation], order[validation:]
    x_train = x_all[train_index].reshape(-1, 784).astype("float32") / 255.0
    x_val = x_all[val_index].reshape(-1, 784).astype("float32") / 255.0
    x_test = x_test.reshape(-1, 784).astype("float32") / 255.0
    y_train = keras.utils.to_categorical(y_all[train_index], 10)
    y_val = keras.utils.to_categorical(y_all[val_index], 10)
    y_test = keras.utils.to_categorical(y_test, 10)

    mlflow.set_experiment("notebook-baseline")
    mlflow.keras.autolog()  # mlflow.tensorflow.autolog() crashes fit with TF 2.21; this one works (README)
    accuracies: dict[str, float] = {}
    run_ids: dict[str, str] = {}
    for index, (activation, loss) in enumerate((activation, loss) for loss in LOSSES for activation in ACTIVATIONS):
        name = f"{activation}-{loss}"
        if index == models:
            mlflow.keras.autolog(log_models=False)
        keras.utils.set_random_seed(SEED)
        model = keras.Sequential(
            [
                keras.Input(shape=(784,)),
                keras.layers.Dense(HIDDEN_UNITS[0], activation=activation),
                keras.layers.Dense(HIDDEN_UNITS[1], activation=activation),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss=LOSSES[loss], metrics=["accuracy"])
        with mlflow.start_run(run_name=name) as run:
            model.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs, validation_data=(x_val, y_val))
            _, test_accuracy = model.evaluate(x_test, y_test)
            mlflow.log_metric("test_accuracy", test_accuracy)
        accuracies[name] = float(test_accuracy)
        run_ids[name] = run.info.run_id
    finished = time.perf_counter()

    # What autolog recorded, to check it did its job (not timed).
    client = mlflow.MlflowClient()
    experiment_id = mlflow.get_experiment_by_name("notebook-baseline").experiment_id
    logged_models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
    epochs_logged = {name: len(client.get_metric_history(run_id, "val_accuracy")) for name, run_id in run_ids.items()}
    result = {
        "backend": keras.backend.backend(),
        "logging": "mlflow.keras.autolog()",
        "test_accuracy": accuracies,
        "import_seconds": round(imported - started, 2),
        "after_import_seconds": round(finished - imported, 2),
        "models_requested": min(models, len(run_ids)),
        "models_logged": len(logged_models),
        "epochs_logged": epochs_logged,
        "train_images": len(x_train),
        "val_images": len(x_val),
        "test_images": len(x_test),
    }
    return result


def untracked_child(data_path: str, epochs: int) -> dict[str, object]:
    """The project's study exactly as `main` trains it (run_configs, one worker per core), MLflow left out."""
    sys.path.insert(0, str(PROJECT))
    import study  # noqa: F401  (the project's Keras backend)
    from study.config import grid
    from study.runner import run_configs

    accuracies: dict[str, float] = {}

    def on_done(outcome) -> None:
        accuracies[outcome.config.name] = float(outcome.test_accuracy)

    run_configs(
        grid(epochs, BATCH_SIZE, LEARNING_RATE, SEED),
        data_path,
        on_epoch=lambda config, epoch, metrics: None,
        on_done=on_done,
    )
    return {"test_accuracy": accuracies}


# OpenBLAS's kernel choice can be overridden from the environment (this machine sets OPENBLAS_CORETYPE=Haswell,
# which leaves AVX-512 unused and halves the matmul peak): the peak is also measured without these.
OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def matmul_child(matmul_size: int) -> dict[str, object]:
    """numpy's one-core, one-thread matmul peak in a process started without OPENBLAS_OVERRIDES."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return {"gflops_one_core": matmul_peak(matmul_size), "numpy_config": numpy_config()}


def throughput_child(data_path: str, epochs: int, matmul_size: int) -> dict[str, object]:
    """Images/s of the project's `train` on one configuration, in a process set up like a study worker
    (pinned to one core, single-threaded backends), and numpy's one-thread matmul peak in the same process."""
    core = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {core})
    sys.path.insert(0, str(PROJECT))
    from study import runtime  # the `study` package chooses the Keras backend: import it first

    runtime.prepare_worker()  # as study.runner's workers do, before JAX is imported
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):  # one core, one BLAS thread: the resources of one study worker
        peak_one_core = matmul_peak(matmul_size)
        config_report = numpy_config()

    from study.config import TrainConfig
    from study.data import load_raw, prepare
    from study.training import STEPS_PER_EXECUTION, train

    data = prepare(load_raw(data_path), seed=SEED)
    images = len(data.x_train)
    split = {"train": images, "val": len(data.x_val), "test": len(data.x_test)}
    rows = {}
    for batch_size in THROUGHPUT_BATCH_SIZES:
        config = TrainConfig(*THROUGHPUT_CONFIG, epochs=epochs, batch_size=batch_size, seed=SEED)
        ends: list[float] = []  # when each epoch ended
        train(config, data, on_epoch=lambda epoch, metrics, ends=ends: ends.append(time.perf_counter()))
        seconds = ends[-1] - ends[0]  # epochs 2..n: compilation happens in epoch 1
        images_per_second = images * (len(ends) - 1) / seconds
        gflops = images_per_second * FLOPS_PER_IMAGE / 1e9
        rows[str(batch_size)] = {
            "images_per_second": round(images_per_second),
            "gflops": round(gflops, 2),
            "timed_epochs": f"2..{len(ends)}",
            "seconds_per_epoch": round(seconds / (len(ends) - 1), 3),
        }
    import keras  # already loaded, on the backend `study` chose

    result = {
        "backend": keras.backend.backend(),
        "config": "-".join(THROUGHPUT_CONFIG),
        "steps_per_execution": STEPS_PER_EXECUTION,
        "core": core,
        "split": split,
        "matmul_gflops_one_core": peak_one_core,
        "numpy_config": config_report,
        "batch": rows,
    }
    return result


# --- The benchmark itself.


@dataclass
class Settings:
    epochs: int
    data: str
    smoke: bool
    skip_baseline: bool
    throughput_epochs: int
    matmul_size: int
    output: Path
    overhead_pairs: int = 1  # study/untracked pairs behind the tracking overhead (their medians)


def child_env(**extra: str) -> dict[str, str]:
    """This environment (OPENBLAS_* and all), with the project importable and no outer MLflow run."""
    env = dict(os.environ)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    env.pop("KERAS_BACKEND", None)  # the project's own choice (JAX) unless a child sets one
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def smoke_slice(data: str, folder: Path) -> str:
    """The first 3,000 training and 1,000 test images of the real MNIST, as an .npz file."""
    path = folder / "mnist-smoke.npz"
    with np.load(data, allow_pickle=False) as full:
        np.savez(
            path,
            x_train=full["x_train"][:SMOKE_TRAIN_IMAGES],
            y_train=full["y_train"][:SMOKE_TRAIN_IMAGES],
            x_test=full["x_test"][:SMOKE_TEST_IMAGES],
            y_test=full["y_test"][:SMOKE_TEST_IMAGES],
        )
    return str(path)


def study_accuracies(tracking_uri: str) -> tuple[dict[str, float], int]:
    """Each configuration's test accuracy as `main` logged it, and how many of its runs FINISHED."""
    from mlflow import MlflowClient

    sys.path.insert(0, str(PROJECT))
    from tracking import keys

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(keys.DEFAULT_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.{keys.CONFIG_TAG} != ''")
    accuracies = {run.data.tags[keys.CONFIG_TAG]: run.data.metrics[keys.TEST_ACCURACY] for run in runs}
    finished = sum(run.info.status == "FINISHED" for run in client.search_runs([experiment.experiment_id]))
    return accuracies, finished


def versions() -> dict[str, str]:
    found = {}
    for package in ("mlflow", "keras", "tensorflow", "jax", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def memory_row(result: Measured) -> dict[str, object]:
    row = asdict(result)
    del row["seconds"], row["cpu_seconds"], row["returncode"]
    return row


def target(value: float | None, limit: float, at_most: bool) -> dict[str, object]:
    met = None if value is None else (value <= limit if at_most else value >= limit)
    return {"value": value, "limit": limit, "at_most" if at_most else "at_least": True, "met": met}


def run_benchmark(settings: Settings) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-study-"))
    data = smoke_slice(settings.data, workdir) if settings.smoke else str(Path(settings.data).resolve())
    script = str(Path(__file__).resolve())
    load_before = os.getloadavg()
    measured: dict[str, Measured] = {}
    children: dict[str, dict] = {}

    def measure(name: str, command: list[str], env: dict[str, str]) -> None:
        folder = workdir / name
        folder.mkdir()
        log_path = folder / "output.log"
        log.info("Running %s: %s", name, " ".join(command[1:]))
        child_output = folder / "child.json"
        if command[1] == script:
            command = [*command, "--child-output", str(child_output)]
        # Each child compiles from scratch (a new, empty JAX cache) unless it is given a cache folder.
        env = {"MNIST_STUDY_CACHE": str(folder / "compile-cache"), **env}
        result = run_measured(command, env, folder, log_path)
        check_finished(name, result, log_path, workdir)
        log.info("%s: %.1f s, peak tree RSS %.0f MB", name, result.seconds, result.peak_tree_rss_mb)
        measured[name] = result
        if child_output.exists():
            children[name] = json.loads(child_output.read_text())

    log.info("numpy float32 matmul peak (%d x %d, all cores)", settings.matmul_size, settings.matmul_size)
    peak_all_cores = matmul_peak(settings.matmul_size)
    epochs = str(settings.epochs)
    if not settings.skip_baseline:
        store = f"sqlite:///{workdir / 'baseline' / 'mlflow.db'}"
        measure(
            "baseline",
            [
                *[sys.executable, script, "--child", "baseline", "--data", data, "--epochs", epochs],
                *["--baseline-models", str(BASELINE_MODELS_SMOKE if settings.smoke else len(config_names()))],
            ],
            child_env(KERAS_BACKEND="tensorflow", MLFLOW_TRACKING_URI=store),
        )
    study_store = f"sqlite:///{workdir / 'study' / 'mlflow.db'}"
    study_command = [sys.executable, "-m", "study", "main", "--epochs", epochs, "--batch-size", str(BATCH_SIZE)]
    measure(
        "study",
        [*study_command, "--data", data],
        child_env(MLFLOW_TRACKING_URI=study_store),
    )
    if not settings.smoke:  # the same study again with the first one's compiled code: a rerun, another seed
        measure(
            "study_rerun",
            [*study_command, "--data", data],
            child_env(
                MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'study_rerun' / 'mlflow.db'}",
                MNIST_STUDY_CACHE=str(workdir / "study" / "compile-cache"),
            ),
        )
    untracked_command = [sys.executable, script, "--no-tracking", "--data", data, "--epochs", epochs]
    measure("untracked", untracked_command, child_env())
    # The overhead is a small difference between two noisy wall times: more pairs, alternating, and their medians.
    for pair in range(2, settings.overhead_pairs + 1):
        measure(f"untracked_{pair}", untracked_command, child_env())
        store = f"sqlite:///{workdir / f'study_{pair}' / 'mlflow.db'}"
        measure(f"study_{pair}", [*study_command, "--data", data], child_env(MLFLOW_TRACKING_URI=store))
    measure(
        "matmul",
        [sys.executable, script, "--child", "matmul", "--matmul-size", str(settings.matmul_size)],
        {name: value for name, value in child_env().items() if name not in OPENBLAS_OVERRIDES},
    )
    measure(
        "throughput",
        [
            sys.executable,
            script,
            "--child",
            "throughput",
            "--data",
            data,
            "--throughput-epochs",
            str(settings.throughput_epochs),
            "--matmul-size",
            str(settings.matmul_size),
        ],
        child_env(),
    )
    load_after = os.getloadavg()

    study_accuracy, study_finished_runs = study_accuracies(study_store)
    baseline = measured.get("baseline")
    study = measured["study"]
    untracked = measured["untracked"]
    throughput = children["throughput"]
    ratio = round(study.seconds / baseline.seconds, 4) if baseline else None
    pairs = [(study.seconds, untracked.seconds)] + [
        (measured[f"study_{pair}"].seconds, measured[f"untracked_{pair}"].seconds)
        for pair in range(2, settings.overhead_pairs + 1)
    ]
    with_tracking = round(float(np.median([pair[0] for pair in pairs])), 2)
    without_tracking = round(float(np.median([pair[1] for pair in pairs])), 2)
    overhead = round((with_tracking - without_tracking) / with_tracking, 4)
    # The larger of the two one-core peaks: a fraction of peak is never flattered by a handicapped BLAS.
    peak_one_core = max(throughput["matmul_gflops_one_core"], children["matmul"]["gflops_one_core"])
    for row in throughput["batch"].values():
        row["fraction_of_peak"] = round(row["gflops"] / peak_one_core, 4)
    batch_128 = throughput["batch"]["128"]["fraction_of_peak"]
    names = config_names()
    results = {
        "epochs": settings.epochs,
        "batch_size": BATCH_SIZE,
        "smoke": settings.smoke,
        "data": settings.data,
        "split": throughput["split"],
        "wall_seconds": {
            "baseline": baseline.seconds if baseline else None,
            "study": study.seconds,
            "study_without_tracking": untracked.seconds,
            "study_rerun": measured["study_rerun"].seconds if "study_rerun" in measured else None,
        },
        "ratio_study_to_baseline": ratio,
        "cpu_seconds": {name: result.cpu_seconds for name, result in measured.items()},
        "test_accuracy": {
            name: {
                "baseline": children["baseline"]["test_accuracy"][name] if baseline else None,
                "study": study_accuracy.get(name),
                "study_without_tracking": children["untracked"]["test_accuracy"].get(name),
            }
            for name in names
        },
        "tracking_overhead": {
            "with_tracking_seconds": with_tracking,
            "without_tracking_seconds": without_tracking,
            "overhead": overhead,
            "pairs": [{"with_tracking_seconds": pair[0], "without_tracking_seconds": pair[1]} for pair in pairs],
            "how": (
                "(with - without) / with, from the medians of the pairs' wall times (the first pair is `study` and "
                "`untracked`; the others alternate untracked, study); without = study.runner.run_configs with "
                "no-op sinks (--no-tracking)"
            ),
        },
        "throughput": {
            "flops_per_image": FLOPS_PER_IMAGE,
            "backend": throughput["backend"],
            "config": throughput["config"],
            "steps_per_execution": throughput["steps_per_execution"],
            "process": "one process pinned to one core with single-threaded backends, like a study worker",
            "batch": throughput["batch"],
        },
        "matmul_peak": {
            "size": settings.matmul_size,
            "gflops_one_core": peak_one_core,
            "gflops_one_core_this_environment": throughput["matmul_gflops_one_core"],
            "gflops_one_core_openblas_default": children["matmul"]["gflops_one_core"],
            "numpy_config_openblas_default_process": children["matmul"]["numpy_config"],
            "gflops_all_cores": peak_all_cores,
            "numpy_config_one_core_process": throughput["numpy_config"],
            "numpy_config_benchmark_process": numpy_config(),
        },
        # (not the matmul child's: it runs for a second, too short to be sampled)
        "peak_rss_mb": {name: memory_row(result) for name, result in measured.items() if name != "matmul"},
        "peak_rss_how": (
            "sampled every 0.2 s from /proc: summed RSS (and PSS) of the subprocess and all its descendants "
            "(workers, resource tracker); largest_process_rss_mb is the exact ru_maxrss from wait4 "
            "(the largest single process); psutil is not installed"
        ),
        "checks": {
            "study_finished_runs": study_finished_runs,
            "baseline_models_logged": children["baseline"]["models_logged"] if baseline else None,
            "baseline_epochs_logged": children["baseline"]["epochs_logged"] if baseline else None,
            "baseline_logging": children["baseline"]["logging"] if baseline else None,
            "baseline_models_requested": children["baseline"]["models_requested"] if baseline else None,
            "baseline_import_seconds": children["baseline"]["import_seconds"] if baseline else None,
        },
        "targets": {
            "ratio_study_to_baseline": target(ratio, TARGET_RATIO, at_most=True),
            "tracking_overhead": target(overhead, TARGET_TRACKING_OVERHEAD, at_most=True),
            "fraction_of_peak_batch_128": target(batch_128, TARGET_PEAK_FRACTION, at_most=False),
            "study_peak_rss_mb": target(study.peak_tree_rss_mb, TARGET_PEAK_RSS_MB, at_most=True),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "load_average_before": [round(value, 2) for value in load_before],
            "load_average_after": [round(value, 2) for value in load_after],
            "versions": versions(),
        },
    }
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def summary(results: dict) -> str:
    wall = results["wall_seconds"]
    cpu = results["cpu_seconds"]
    overhead = results["tracking_overhead"]
    pairs = [f"{pair['with_tracking_seconds']} / {pair['without_tracking_seconds']}" for pair in overhead["pairs"]]
    lines = [
        f"Six configurations x {results['epochs']} epochs, batch {results['batch_size']}"
        + (" (smoke: 3,000-image slice)" if results["smoke"] else ""),
        f"  baseline (plain Keras/TF, autolog): {wall['baseline']} s wall, {cpu.get('baseline')} s CPU",
        f"  study (python -m study main):       {wall['study']} s wall, {cpu['study']} s CPU",
        f"  ratio study/baseline:               {results['ratio_study_to_baseline']}",
        f"  study without tracking:             {wall['study_without_tracking']} s wall, {cpu['untracked']} s CPU",
        f"  tracking overhead:                  {overhead['overhead']:.1%} (medians of {len(pairs)} pairs, "
        f"with / without: {', '.join(pairs)})",
        f"  study rerun (compiled code cached): {wall['study_rerun']} s wall, {cpu.get('study_rerun')} s CPU",
        f"  load average before/after:          {results['machine']['load_average_before']} / "
        f"{results['machine']['load_average_after']}",
        "  test accuracy    baseline  study",
    ]
    for name, row in results["test_accuracy"].items():
        baseline = "-" if row["baseline"] is None else f"{row['baseline']:.4f}"
        lines.append(f"    {name:<22}{baseline:>8}  {row['study']:.4f}")
    peak = results["matmul_peak"]
    lines.append(
        f"  matmul peak: {peak['gflops_one_core']} GFLOP/s one core (this environment "
        f"{peak['gflops_one_core_this_environment']}, OpenBLAS's own kernels "
        f"{peak['gflops_one_core_openblas_default']}), {peak['gflops_all_cores']} GFLOP/s all cores"
    )
    for batch, row in results["throughput"]["batch"].items():
        lines.append(
            f"  throughput batch {batch:>3}: {row['images_per_second']} images/s = {row['gflops']} GFLOP/s "
            f"({row['fraction_of_peak']:.1%} of one-core peak)"
        )
    for name, row in results["peak_rss_mb"].items():
        lines.append(
            f"  peak memory {name:<11} tree RSS {row['peak_tree_rss_mb']:.0f} MB, PSS {row['peak_tree_pss_mb']:.0f} MB "
            f"({row['peak_processes']} processes); largest process {row['largest_process_rss_mb']:.0f} MB"
        )
    for name, row in results["targets"].items():
        state = {True: "met", False: "MISSED", None: "not measured"}[row["met"]]
        bound = "<=" if "at_most" in row else ">="
        lines.append(f"  target {name} {bound} {row['limit']}: {row['value']} {state}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs per configuration (20)")
    parser.add_argument("--data", default=default_data(), help="mnist.npz ($MNIST_NPZ or ../shared/datasets)")
    parser.add_argument("--smoke", action="store_true", help="1 epoch on a 3,000-image slice, for CI (~1-2 min)")
    parser.add_argument("--skip-baseline", action="store_true", help="leave out the plain-Keras baseline")
    parser.add_argument(
        "--no-tracking", action="store_true", help="only train the six configurations without MLflow and exit"
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON file (benchmarks/results-<epochs>.json)")
    parser.add_argument("--throughput-epochs", type=int, default=None, help="epochs per throughput run (3)")
    parser.add_argument("--matmul-size", type=int, default=None, help="matrix size for the matmul peak (2048)")
    parser.add_argument(
        "--overhead-pairs", type=int, default=None, help="study/untracked pairs for the tracking overhead (3; smoke 1)"
    )
    parser.add_argument("--child", choices=("baseline", "throughput", "matmul"), help=argparse.SUPPRESS)
    parser.add_argument("--child-output", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--baseline-models", type=int, default=len(config_names()), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"epochs: {args.epochs} is out of range; must be >= 1")
    if not Path(args.data).is_file():
        parser.error(f"data: {args.data!r} is not a file; pass --data PATH or set MNIST_NPZ")
    if args.smoke:
        args.epochs = 1
    if args.throughput_epochs is None:
        args.throughput_epochs = 2 if args.smoke else 3
    if args.throughput_epochs < 2:
        parser.error("throughput_epochs: must be >= 2 (epoch 1 includes compilation and is not timed)")
    if args.matmul_size is None:
        args.matmul_size = 1024 if args.smoke else 2048
    if args.overhead_pairs is None:
        args.overhead_pairs = 1 if args.smoke else 3
    if args.overhead_pairs < 1:
        parser.error(f"overhead_pairs: {args.overhead_pairs} is out of range; must be >= 1")
    return args


def write_child_output(args: argparse.Namespace, result: dict[str, object]) -> None:
    """A child's JSON: into the file the benchmark asked for, else on stdout."""
    text = json.dumps(result, indent=2)
    if args.child_output:
        args.child_output.write_text(text)
    else:
        print(text)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.child == "baseline":
        write_child_output(args, baseline_child(args.data, args.epochs, args.baseline_models))
        return 0
    if args.child == "matmul":
        write_child_output(args, matmul_child(args.matmul_size))
        return 0
    if args.child == "throughput":
        write_child_output(args, throughput_child(args.data, args.throughput_epochs, args.matmul_size))
        return 0
    if args.no_tracking:
        started = time.perf_counter()
        result = untracked_child(args.data, args.epochs)
        log.info("Six configurations without tracking: %.1f s", time.perf_counter() - started)
        write_child_output(args, result)
        return 0
    settings = Settings(
        epochs=args.epochs,
        data=str(Path(args.data).resolve()),
        smoke=args.smoke,
        skip_baseline=args.skip_baseline,
        throughput_epochs=args.throughput_epochs,
        matmul_size=args.matmul_size,
        overhead_pairs=args.overhead_pairs,
        output=args.output or BENCHMARKS / ("results-smoke.json" if args.smoke else f"results-{args.epochs}.json"),
    )
    results = run_benchmark(settings)
    settings.output.parent.mkdir(parents=True, exist_ok=True)
    settings.output.write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))
    print(f"Written: {settings.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
