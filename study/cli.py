"""Command line: `python -m study main|train ...`, the same entry points as MLproject.

Inputs are validated here, before any run starts or any data is trained on: a user's mistake is one
line on stderr and exit code 2, never a traceback and never a run left RUNNING.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence

from study.config import (
    ACTIVATIONS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_SEED,
    LOSSES,
    ConfigError,
    TrainConfig,
    grid,
)
from study.data import DataError, load_raw

log = logging.getLogger("study")

USAGE_ERROR = 2
INTERRUPTED = 130


class UsageError(Exception):
    """A bad command-line value; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def integer(name: str, minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name}: {value} is out of range; must be >= {minimum}")
        return value

    return parse


def positive_float(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{name}: {text} is not allowed; must be a finite number > 0")
        return value

    return parse


def choice(name: str, allowed: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not allowed; choose one of {', '.join(allowed)}")
        return text

    return parse


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=integer("epochs", 1), default=DEFAULT_EPOCHS, help="epochs per model (20)")
    parser.add_argument(
        "--batch-size", type=integer("batch_size", 1), default=DEFAULT_BATCH_SIZE, help="minibatch size (32)"
    )
    parser.add_argument(
        "--learning-rate", type=positive_float("learning_rate"), default=DEFAULT_LEARNING_RATE, help="Adam (0.001)"
    )
    parser.add_argument("--seed", type=integer("seed", 0), default=DEFAULT_SEED, help="random seed (0)")
    parser.add_argument(
        "--data",
        default="auto",
        help="'auto' ($MNIST_NPZ if set, else Keras's download) or a path to an mnist.npz",
    )
    parser.add_argument("--experiment", default=None, help="MLflow experiment name (mnist-activation-study)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m study", description="MNIST: activations x losses, tracked in MLflow.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    main = commands.add_parser("main", help="train the six configurations (3 activations x 2 losses)")
    add_training_flags(main)
    main.add_argument(
        "--seeds", type=integer("seeds", 1), default=1, help="seeds per configuration: seed, seed+1, ... (1)"
    )
    main.add_argument(
        "--workers", type=integer("workers", 0), default=0, help="processes training side by side (0 = one per core)"
    )

    train = commands.add_parser("train", help="train one configuration")
    train.add_argument("--activation", type=choice("activation", ACTIVATIONS), required=True)
    train.add_argument("--loss", type=choice("loss", LOSSES), required=True)
    add_training_flags(train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("jax", "absl", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args = build_parser().parse_args(argv)
        return _dispatch(args)
    except (UsageError, ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted: runs in progress were marked KILLED; run the same command again", file=sys.stderr)
        return INTERRUPTED


def _dispatch(args: argparse.Namespace) -> int:
    from tracking import keys

    experiment = args.experiment or keys.DEFAULT_EXPERIMENT
    load_raw(args.data)  # validate the data before any run starts
    if args.command == "main":
        from tracking.pipeline import run_study

        configs = [
            config.with_seed(args.seed + offset)
            for config in grid(args.epochs, args.batch_size, args.learning_rate, args.seed)
            for offset in range(args.seeds)
        ]
        run_study(configs, args.data, seeds=args.seeds, workers=args.workers, experiment=experiment)
    elif args.command == "train":
        from tracking.pipeline import run_single

        config = TrainConfig(args.activation, args.loss, args.epochs, args.batch_size, args.learning_rate, args.seed)
        run_single(config, args.data, experiment=experiment)
    return 0
