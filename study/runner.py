"""Run several configurations, in this process or across worker processes (one per core).

Workers only train and evaluate; every epoch's metrics and every finished result come back to the
calling process through one queue, in order, so the caller alone talks to the tracking store.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue as queue_module
import signal
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from study import interrupts, runtime
from study.config import TrainConfig
from study.data import RawMnist, load_raw

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """A finished configuration, picklable: history, test evaluation and the saved model's path."""

    config: TrainConfig
    history: dict[str, list[float]]
    train_seconds: float
    diverged: bool
    stopped_reason: str
    test_loss: float
    test_accuracy: float
    model_path: str
    predictions: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    best_epoch: int = 0  # the epoch whose weights the model holds (best validation accuracy)
    reused_run_id: str = ""  # set when `main --resume true` took this result from an earlier run

    @property
    def best_val_accuracy(self) -> float:
        values = [value for value in self.history["val_accuracy"] if np.isfinite(value)]
        return max(values) if values else float("nan")

    @property
    def epochs_run(self) -> int:
        return len(self.history["val_accuracy"])


EpochSink = Callable[[TrainConfig, int, dict[str, float]], None]
DoneSink = Callable[[Outcome], None]

_preloaded: dict[str, RawMnist] = {}  # data a worker read while it waited for its first configuration


def _raw_data(data_source: str) -> RawMnist:
    """The data as stored: the preloaded copy once, then read again per configuration. Keeping it would cost
    each worker 55 MB for the whole study to save ~0.3 s per configuration (peak memory, benchmarks/README.md).
    """
    return _preloaded.pop(data_source, None) or load_raw(data_source)


def train_one(config: TrainConfig, data_source: str, model_dir: str, on_epoch: EpochSink) -> Outcome:
    """Load, train, evaluate on test once, save the model as native .keras."""
    from study.data import prepare
    from study.training import evaluate, train

    data = prepare(_raw_data(data_source), seed=config.seed)
    result = train(config, data, on_epoch=lambda epoch, metrics: on_epoch(config, epoch, metrics))
    data = data.test_only()  # the training arrays go before the test pass (peak memory per worker)
    evaluation = evaluate(result.model, data)
    model_path = str(Path(model_dir) / f"{config.name}-seed{config.seed}.keras")
    result.model.save(model_path)
    return Outcome(
        config=config,
        history=result.history,
        train_seconds=result.train_seconds,
        diverged=result.diverged,
        stopped_reason=result.stopped_reason,
        best_epoch=result.best_epoch,
        test_loss=evaluation.test_loss,
        test_accuracy=evaluation.test_accuracy,
        model_path=model_path,
        predictions=evaluation.predictions,
        labels=evaluation.labels,
    )


def default_workers(n_configs: int) -> int:
    """One worker per available core, never more than there are configurations."""
    return max(1, min(len(os.sched_getaffinity(0)), n_configs))


class Workers:
    """Training processes, one per core: started ahead of the work, so that each imports Keras and reads the
    data while the caller sets up tracking: the two overlap instead of following each other.

    `start` hands them the configurations at once (the caller may still be importing MLflow); `run` starts
    them if that was not done and collects their epochs and results. Saved models live in a temporary folder
    until the processes stop. `count` 1 means no processes: configurations train in the calling process,
    in `run`. Use as a context manager; leaving it stops the processes.
    """

    def __init__(self, count: int, data_source: str):
        self.data_source = data_source
        self.pool = None
        self.models = tempfile.TemporaryDirectory(prefix="mnist-models-")  # each Outcome.model_path is in here
        self.started: list[TrainConfig] = []
        self.tasks: list = []
        if count > 1:
            context = multiprocessing.get_context("spawn")
            self.messages = context.Queue()
            cores = context.Queue()
            available = sorted(os.sched_getaffinity(0))
            for index in range(count):
                cores.put(available[index % len(available)])
            self.pool = context.Pool(count, initializer=_init_worker, initargs=(cores, self.messages, data_source))

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *error) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
        self.models.cleanup()

    def start(self, configs: Sequence[TrainConfig]) -> None:
        """Queue the configurations for the worker processes now; `run` collects them (no-op without workers)."""
        if self.pool is None or self.started:
            return
        self.started = list(configs)
        self.tasks = [self.pool.apply_async(_work, (config, self.data_source, self.models.name)) for config in configs]

    def run(self, configs: Sequence[TrainConfig], on_epoch: EpochSink, on_done: DoneSink) -> None:
        """Train every configuration; call `on_epoch` per epoch and `on_done` per result, in this process."""
        if self.pool is None:
            runtime.use_compile_cache()
            for config in configs:
                interrupts.check()
                on_done(train_one(config, self.data_source, self.models.name, on_epoch))
            return
        if not self.started:
            self.start(configs)
        elif self.started != list(configs):
            raise ValueError("Workers.run: not the configurations given to start()")
        remaining = len(configs)
        while remaining:
            interrupts.check()
            try:
                kind, payload = self.messages.get(timeout=0.2)
            except queue_module.Empty:
                for task in self.tasks:
                    if task.ready() and not task.successful():
                        task.get()  # re-raises the worker's exception here
                continue
            if kind == "epoch":
                on_epoch(*payload)
            else:
                remaining -= 1
                on_done(payload)


def run_configs(
    configs: Sequence[TrainConfig],
    data_source: str,
    on_epoch: EpochSink,
    on_done: DoneSink,
    workers: int = 0,
) -> None:
    """Train every configuration with `workers` processes (0 = one per core; 1 = in this process).
    The saved models are deleted on return: `on_done` is the place to use them."""
    with Workers(workers or default_workers(len(configs)), data_source) as pool:
        pool.run(configs, on_epoch, on_done)


_messages = None


def _init_worker(cores, messages, data_source: str) -> None:
    """Pin this worker to one core, set it up for training only (study/runtime.py), then import Keras and
    read the data now rather than when the first configuration arrives."""
    global _messages
    _messages = messages
    # Ctrl-C reaches the whole process group: the parent handles it (runs end KILLED) and terminates
    # the pool. SIGTERM keeps its default here, since that is how the pool stops its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.sched_setaffinity(0, {cores.get()})
    with runtime.frozen_imports():
        runtime.prepare_worker()  # imports JAX (its compile cache)
        import study.training  # noqa: F401  (Keras)

    with contextlib.suppress(Exception):  # a bad file is reported by the first configuration, not here
        _preloaded[data_source] = load_raw(data_source)


def _work(config: TrainConfig, data_source: str, model_dir: str) -> None:
    def send_epoch(config: TrainConfig, epoch: int, metrics: dict[str, float]) -> None:
        _messages.put(("epoch", (config, epoch, metrics)))

    outcome = train_one(config, data_source, model_dir, send_epoch)
    _messages.put(("done", outcome))
    runtime.release_memory()  # before the next configuration's data and compilation
