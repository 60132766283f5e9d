"""Training is a function: a configuration and data in, a result out.

Tracking plugs in from outside through `on_epoch` (called once per finished epoch with that epoch's
metrics); nothing here knows about MLflow.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np

from study import interrupts
from study.config import CHANCE_LOSS, TrainConfig
from study.data import Dataset
from study.model import build_model

log = logging.getLogger(__name__)

# Keras's history keys -> our metric keys (see tracking.keys for the full list).
HISTORY_KEYS = {
    "loss": "train_loss",
    "accuracy": "train_accuracy",
    "val_loss": "val_loss",
    "val_accuracy": "val_accuracy",
}

# Run this many optimizer steps per compiled call: the per-batch Python dispatch is what makes plain
# `fit` slow on small models (benchmarks/README.md). Results are the same as one step per call.
STEPS_PER_EXECUTION = 64

EpochHook = Callable[[int, dict[str, float]], None]  # (epoch starting at 1, {metric key: value})


@dataclass
class TrainResult:
    """What one training run produced: the fitted model, its per-epoch history and timing."""

    config: TrainConfig
    model: keras.Model
    history: dict[str, list[float]]
    train_seconds: float
    diverged: bool = False
    stopped_reason: str = ""
    best_epoch: int = 0  # the epoch whose weights the model holds (best validation accuracy)

    @property
    def epochs_run(self) -> int:
        return len(self.history["val_accuracy"])

    @property
    def best_val_accuracy(self) -> float:
        values = [value for value in self.history["val_accuracy"] if math.isfinite(value)]
        return max(values) if values else float("nan")


@dataclass
class Evaluation:
    """The one look at the test set: loss, accuracy and each image's predicted digit."""

    test_loss: float
    test_accuracy: float
    predictions: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)


class _EpochCallback(keras.callbacks.Callback):
    """Turns Keras's epoch logs into our metric keys, passes them on, stops a diverging run, and keeps
    the weights of the epoch with the best validation accuracy (restored when training ends)."""

    def __init__(
        self,
        on_epoch: EpochHook | None,
        should_stop: Callable[[int, dict], bool] | None,
        chance_loss: float,
        restore_best: bool,
    ):
        super().__init__()
        self.chance_loss = chance_loss
        self.on_epoch = on_epoch
        self.should_stop = should_stop
        self.history: dict[str, list[float]] = {key: [] for key in HISTORY_KEYS.values()}
        self.diverged = False
        self.stopped_reason = ""
        self.best_val_accuracy = -math.inf
        self.best_epoch = 0
        self.best_weights: list | None = None
        self.restore_best = restore_best

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        interrupts.check()  # Ctrl-C / SIGTERM stop training here, between batches

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {ours: float((logs or {}).get(theirs, float("nan"))) for theirs, ours in HISTORY_KEYS.items()}
        for key, value in metrics.items():
            self.history[key].append(value)
        interrupts.check()
        if metrics["val_accuracy"] > self.best_val_accuracy:  # NaN never compares greater
            self.best_val_accuracy, self.best_epoch = metrics["val_accuracy"], epoch + 1
            self.best_weights = self.model.get_weights()
        if self.on_epoch is not None:
            self.on_epoch(epoch + 1, metrics)
        reason = divergence(epoch + 1, metrics, self.chance_loss)
        if reason:
            self.diverged = True
            self.stopped_reason = reason
            log.warning("Stopping: %s", reason)
            self.model.stop_training = True
        elif self.should_stop is not None and self.should_stop(epoch + 1, metrics):
            self.stopped_reason = f"stopped early after epoch {epoch + 1}"
            self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.restore_best and self.best_weights is not None:
            self.model.set_weights(self.best_weights)


def divergence(epoch: int, metrics: dict[str, float], chance_loss: float) -> str:
    """Why training diverged ('' if it did not): a NaN/inf loss, or from epoch 2 on a training loss
    still worse than guessing uniformly (Keras clips probabilities, so a blown-up softmax stays finite).
    """
    loss = metrics["train_loss"]
    if not (math.isfinite(loss) and math.isfinite(metrics["val_loss"])):
        return f"loss became {loss} at epoch {epoch}"
    if epoch >= 2 and loss > chance_loss:
        return f"training loss {loss:.3f} is worse than guessing ({chance_loss:.3f}) at epoch {epoch}"
    return ""


def train(
    config: TrainConfig,
    data: Dataset,
    on_epoch: EpochHook | None = None,
    should_stop: Callable[[int, dict], bool] | None = None,
    restore_best: bool = True,
) -> TrainResult:
    """Train one configuration on data.x_train, validating every epoch on data.x_val.

    `on_epoch(epoch, metrics)` sees each epoch's train/val loss and accuracy as they finish;
    `should_stop(epoch, metrics)` may end training early (used by Optuna's pruning).
    Training also stops by itself when it diverges (`divergence`), and says why.
    The returned model holds the weights of the epoch with the best validation accuracy (`best_epoch`):
    the checkpoint is chosen on validation data, so the test set is only looked at afterwards.
    `restore_best=False` keeps the last epoch's weights (Optuna scores a trial by its last epoch).
    """
    keras.utils.set_random_seed(config.seed)
    model = build_model(config, steps_per_execution=STEPS_PER_EXECUTION)
    callback = _EpochCallback(on_epoch, should_stop, CHANCE_LOSS[config.loss], restore_best)
    started = time.perf_counter()
    model.fit(
        data.x_train,
        data.y_train,
        batch_size=config.batch_size,
        epochs=config.epochs,
        validation_data=(data.x_val, data.y_val),
        shuffle=True,
        verbose=0,
        callbacks=[callback],
    )
    return TrainResult(
        config=config,
        model=model,
        history=callback.history,
        train_seconds=time.perf_counter() - started,
        diverged=callback.diverged,
        stopped_reason=callback.stopped_reason,
        best_epoch=callback.best_epoch,
    )


def evaluate(model: keras.Model, data: Dataset, batch_size: int = 1024) -> Evaluation:
    """Evaluate on the test set: called once per final model, never for selection."""
    probabilities = model.predict(data.x_test, batch_size=batch_size, verbose=0)
    labels = data.test_labels
    loss_fn = keras.losses.get(model.loss)
    test_loss = float(keras.ops.convert_to_numpy(keras.ops.mean(loss_fn(data.y_test, probabilities))))
    predictions = probabilities.argmax(axis=1)
    return Evaluation(
        test_loss=test_loss,
        test_accuracy=float((predictions == labels).mean()),
        predictions=predictions,
        labels=labels,
    )
