"""The experiment's configurations, as data.

One frozen dataclass describes one training run; the six fixed configurations of the exercise are
built from the two lists below (every activation x every loss), never written out by hand.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from itertools import product

ACTIVATIONS: tuple[str, ...] = ("tanh", "sigmoid", "relu")
LOSSES: tuple[str, ...] = ("crossentropy", "hinge")

# Our loss names -> the Keras loss that implements them. `categorical_hinge` is the multi-class
# (Crammer-Singer) hinge on one-hot targets; Keras's plain `hinge` is the binary hinge for -1/+1 labels.
KERAS_LOSSES: dict[str, str] = {
    "crossentropy": "categorical_crossentropy",
    "hinge": "categorical_hinge",
}

# The loss of a model that guesses uniformly (p = 0.1 per digit): ln 10 for crossentropy, 1 for the
# multi-class hinge. A training loss still above it after two epochs means training diverged.
CHANCE_LOSS: dict[str, float] = {"crossentropy": math.log(10), "hinge": 1.0}

HIDDEN_UNITS: tuple[int, ...] = (128, 64)
OPTIMIZER = "adam"

DEFAULT_EPOCHS = 20
DEFAULT_BATCH_SIZE = 32
DEFAULT_LEARNING_RATE = 0.001
DEFAULT_SEED = 0
MAX_SEED = 2**32 - 1  # NumPy's and Optuna's seeds are 32-bit: a larger one fails deep inside training


class ConfigError(ValueError):
    """A user-supplied setting is not allowed; the message says what is."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines one training run (and so its result, up to hardware noise)."""

    activation: str
    loss: str
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    learning_rate: float = DEFAULT_LEARNING_RATE
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("loss", self.loss, LOSSES)
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        check_positive_float("learning_rate", self.learning_rate)

    @property
    def name(self) -> str:
        """`{activation}-{loss}`, e.g. `relu-hinge`: the run name and the `config` tag."""
        return f"{self.activation}-{self.loss}"

    @property
    def keras_loss(self) -> str:
        return KERAS_LOSSES[self.loss]

    def params(self) -> dict[str, object]:
        """The parameters as they are logged: the fields plus the fixed architecture."""
        return {
            **asdict(self),
            "optimizer": OPTIMIZER,
            "hidden_units": ",".join(str(units) for units in HIDDEN_UNITS),
        }

    def config_hash(self) -> str:
        """A short, stable fingerprint of everything that determines the result (for resume)."""
        text = json.dumps(self.params(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_seed(self, seed: int) -> TrainConfig:
        return replace(self, seed=seed)


def grid(
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    seed: int = DEFAULT_SEED,
) -> list[TrainConfig]:
    """The six fixed configurations: every activation x every loss, with shared settings."""
    return [
        TrainConfig(activation, loss, epochs, batch_size, learning_rate, seed)
        for loss, activation in product(LOSSES, ACTIVATIONS)
    ]


def config_names() -> list[str]:
    """All `{activation}-{loss}` names, in the study's order."""
    return [config.name for config in grid()]


def parse_config_name(name: str) -> tuple[str, str]:
    """`relu-hinge` -> (`relu`, `hinge`), with a clear error for anything else."""
    activation, _, loss = name.strip().partition("-")
    if activation not in ACTIVATIONS or loss not in LOSSES:
        raise ConfigError(
            f"configs: unknown configuration {name!r}; allowed: all, or a comma-separated list of "
            f"{', '.join(config_names())}"
        )
    return activation, loss


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not allowed; choose one of {', '.join(allowed)}")


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: {value!r} is not an integer")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ConfigError(f"{name}: {value} is out of range; must be >= {minimum}{upper}")


def check_positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: {value!r} is not a number")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: {value} is not allowed; must be a finite number > 0")
