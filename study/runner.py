"""Run several configurations, in this process or across worker processes (one per core).

Workers only train and evaluate; every epoch's metrics and every finished result come back to the
calling process through one queue, in order, so the caller alone talks to the tracking store.
"""

from __future__ import annotations

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

from study import interrupts
from study.config import TrainConfig

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

_raw_cache: dict[str, object] = {}


def train_one(config: TrainConfig, data_source: str, model_dir: str, on_epoch: EpochSink) -> Outcome:
    """Load (cached per process), train, evaluate on test once, save the model as native .keras."""
    from study.data import load_raw, prepare
    from study.training import evaluate, train

    if data_source not in _raw_cache:
        _raw_cache[data_source] = load_raw(data_source)
    data = prepare(_raw_cache[data_source], seed=config.seed)
    result = train(config, data, on_epoch=lambda epoch, metrics: on_epoch(config, epoch, metrics))
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


def run_configs(
    configs: Sequence[TrainConfig],
    data_source: str,
    on_epoch: EpochSink,
    on_done: DoneSink,
    workers: int = 0,
    model_dir: str | None = None,
) -> None:
    """Train every configuration; call `on_epoch` per epoch and `on_done` per result, in this process.

    `workers` 0 = one per core; 1 = train here, in this process.
    """
    workers = workers or default_workers(len(configs))
    model_dir = model_dir or tempfile.mkdtemp(prefix="mnist-models-")
    if workers == 1:
        for config in configs:
            interrupts.check()
            on_done(train_one(config, data_source, model_dir, on_epoch))
        return

    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    cores = context.Queue()
    available = sorted(os.sched_getaffinity(0))
    for index in range(workers):
        cores.put(available[index % len(available)])
    with context.Pool(workers, initializer=_init_worker, initargs=(cores, messages)) as pool:
        pending = [pool.apply_async(_work, (config, data_source, model_dir)) for config in configs]
        remaining = len(configs)
        while remaining:
            interrupts.check()
            try:
                kind, payload = messages.get(timeout=0.2)
            except queue_module.Empty:
                for task in pending:
                    if task.ready() and not task.successful():
                        task.get()  # re-raises the worker's exception here
                continue
            if kind == "epoch":
                on_epoch(*payload)
            else:
                remaining -= 1
                on_done(payload)


_messages = None


def _init_worker(cores, messages) -> None:
    """Pin this worker to one core and make the numeric backends single-threaded (measured faster)."""
    global _messages
    _messages = messages
    # Ctrl-C reaches the whole process group: the parent handles it (runs end KILLED) and terminates
    # the pool. SIGTERM keeps its default here, since that is how the pool stops its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    core = cores.get()
    os.sched_setaffinity(0, {core})
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["TF_NUM_INTRAOP_THREADS"] = "1"
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"


def _work(config: TrainConfig, data_source: str, model_dir: str) -> None:
    def send_epoch(config: TrainConfig, epoch: int, metrics: dict[str, float]) -> None:
        _messages.put(("epoch", (config, epoch, metrics)))

    outcome = train_one(config, data_source, model_dir, send_epoch)
    _messages.put(("done", outcome))
