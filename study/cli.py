"""Command line: `python -m study main|train ...`, the same entry points as MLproject.

Inputs are validated here, before any run starts or any data is trained on: a user's mistake is one
line on stderr and exit code 2, never a traceback and never a run left RUNNING. (The tracking store is
checked while `main`'s workers start training: if it can't be reached they are stopped, with the same
one line and exit code, before any run is created.)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence

from study import interrupts, runtime
from study.config import (
    ACTIVATIONS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_SEED,
    LOSSES,
    MAX_SEED,
    ConfigError,
    TrainConfig,
    grid,
)
from study.data import DataError, load_raw
from study.runner import Workers, default_workers

log = logging.getLogger("study")

USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT; SIGTERM exits 143
MAX_SEEDS = 1000  # seeds per configuration
MAX_WORKERS = 64  # training processes (each holds its own copy of the data and the framework)
UNSYNCED = 3  # training finished, but the tracking store was unreachable: results kept for `python -m study sync`


class UsageError(Exception):
    """A bad command-line value; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def integer(name: str, minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(f"{name}: {value} is out of range; must be >= {minimum}{upper}")
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
    parser.add_argument("--seed", type=integer("seed", 0, MAX_SEED), default=DEFAULT_SEED, help="random seed (0)")
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
        "--seeds", type=integer("seeds", 1, MAX_SEEDS), default=1, help="seeds per configuration: seed, seed+1, ... (1)"
    )
    main.add_argument(
        "--workers",
        type=integer("workers", 0, MAX_WORKERS),
        default=0,
        help="processes training side by side (0 = one per core)",
    )
    add_registered_model_flag(main)
    main.add_argument(
        "--resume",
        type=choice("resume", ("true", "false")),
        default="false",
        help="true: reuse configurations that already have a FINISHED run with identical parameters (false)",
    )

    train = commands.add_parser("train", help="train one configuration")
    train.add_argument("--activation", type=choice("activation", ACTIVATIONS), required=True)
    train.add_argument("--loss", type=choice("loss", LOSSES), required=True)
    add_training_flags(train)

    report = commands.add_parser(
        "report", help="statistics, verdicts and plots from the finished runs in the tracking store (no training)"
    )
    report.add_argument("--experiment", default=None, help="MLflow experiment name (mnist-activation-study)")
    report.add_argument("--output", default="report", help="folder for statistics.csv, summary.md, plots (report)")
    add_registry_commands(commands)
    add_optimize_command(commands)
    add_sync_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("jax", "absl", "alembic", "mlflow.store.db.utils", "urllib3.connectionpool"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from tracking.keys import MLFLOW_HTTP_DEFAULTS  # constants only: mlflow is not imported yet

    for name, value in MLFLOW_HTTP_DEFAULTS.items():  # a dead tracking server costs seconds per call, not minutes
        os.environ.setdefault(name, value)
    interrupts.install()
    try:
        args = build_parser().parse_args(argv)
        return _dispatch(args)
    except (UsageError, ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt as interrupt:
        code = interrupt.exit_code if isinstance(interrupt, interrupts.Interrupted) else INTERRUPTED
        print(
            f"interrupted ({interrupt or 'SIGINT'}): runs in progress were marked KILLED. "
            "To resume, run the same command again (main: add --resume true to reuse finished configurations; "
            "optimize: the same storage continues its studies).",
            file=sys.stderr,
        )
        return code


def _dispatch(args: argparse.Namespace) -> int:
    runtime.skip_unused_imports()  # TensorFlow on the JAX backend, IPython (study/runtime.py)
    if args.command in ("predict", "models"):  # the model registry: no training data needed
        return _dispatch_registry(args)
    if args.command == "sync":  # uploads kept results: no training data needed
        return _dispatch_sync(args)
    from tracking import keys

    experiment = args.experiment or keys.DEFAULT_EXPERIMENT
    if args.command == "report":  # reads the tracking store only: no data, no training
        from pathlib import Path

        from tracking.report import build_report

        build_report(experiment, Path(args.output))
        return 0
    load_raw(args.data)  # validate the data before any run starts
    if args.command == "main":
        configs = [  # validated (e.g. the last seed's range) before the slow imports below
            config.with_seed(args.seed + offset)
            for config in grid(args.epochs, args.batch_size, args.learning_rate, args.seed)
            for offset in range(args.seeds)
        ]
        # The training processes start now and, unless finished runs may be reused (which needs the tracking
        # store), begin training at once: MLflow's import and set-up here overlap the training instead of
        # delaying it. A tracking store that can't be reached stops them within seconds, before any run exists.
        with Workers(args.workers or default_workers(len(configs)), args.data) as pool:
            if args.resume != "true":
                pool.start(configs)
            with runtime.frozen_imports():
                from tracking.pipeline import run_study

            run_study(
                configs,
                args.data,
                seeds=args.seeds,
                workers=args.workers,
                pool=pool,
                experiment=experiment,
                registered_model=args.registered_model,
                resume=args.resume == "true",
            )
    elif args.command == "train":
        with runtime.frozen_imports():
            from tracking.pipeline import run_single

        config = TrainConfig(args.activation, args.loss, args.epochs, args.batch_size, args.learning_rate, args.seed)
        run_single(config, args.data, experiment=experiment)
    elif args.command == "optimize":
        _dispatch_optimize(args, experiment)
    return _unsynced_exit_code()


# --- The model registry: `main --registered-model`, `predict`, `models` (tracking/registry.py, tracking/predict.py).

REGISTERED_MODEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def registered_model_name(allow_none: bool) -> Callable[[str], str | None]:
    """A registered model name usable in `models:/NAME@alias`; `none` -> None (no registration) if allowed."""
    from tracking import keys

    def parse(text: str) -> str | None:
        if allow_none and text == keys.NO_REGISTRATION:
            return None
        if not REGISTERED_MODEL_PATTERN.fullmatch(text):
            extra = ", or none to register nothing" if allow_none else ""
            raise argparse.ArgumentTypeError(
                f"registered_model: {text!r} is not allowed; use letters, digits, '_', '.', '-' "
                f"(up to 100, starting with a letter or digit){extra}"
            )
        return text

    return parse


def add_registered_model_flag(parser: argparse.ArgumentParser) -> None:
    from tracking import keys

    parser.add_argument(
        "--registered-model",
        type=registered_model_name(allow_none=True),
        default=keys.DEFAULT_REGISTERED_MODEL,
        help="register each configuration's model as a version of this registered model; none = off (mnist-mlp)",
    )


def add_registry_commands(commands) -> None:
    from tracking import keys

    predict = commands.add_parser("predict", help="classify digit images with a logged or registered model")
    predict.add_argument(
        "--model",
        default=keys.DEFAULT_PREDICT_MODEL,
        help="MLflow model URI, e.g. models:/mnist-mlp@relu-hinge, models:/mnist-mlp/3 (models:/mnist-mlp@champion)",
    )
    predict.add_argument(
        "--input",
        required=True,
        help="a PNG/JPEG image of a digit, a folder of them, or an .npz/.npy array of 28x28 images",
    )
    predict.add_argument("--output", default="", help="also write the predictions to this CSV file (none)")

    models = commands.add_parser("models", help="list the registered versions with aliases and accuracies")
    models.add_argument(
        "--registered-model",
        type=registered_model_name(allow_none=False),
        default=keys.DEFAULT_REGISTERED_MODEL,
        help="registered model to list (mnist-mlp)",
    )


def _dispatch_registry(args: argparse.Namespace) -> int:
    """`predict` and `models`: their lookup failures are usage errors (one line, exit code 2)."""
    if args.command == "predict":
        from tracking.predict import ModelNotFoundError, OutputPathError, run_predict

        if not args.model.strip():
            raise UsageError("model: is empty; pass an MLflow model URI such as models:/mnist-mlp@champion")
        try:
            return run_predict(args.model, args.input, args.output or None)
        except (ModelNotFoundError, OutputPathError) as error:
            raise UsageError(str(error)) from None
    from tracking.registry import RegistryError, version_rows, versions_table

    try:
        rows = version_rows(args.registered_model)
    except RegistryError as error:
        raise UsageError(str(error)) from None
    print(versions_table(args.registered_model, rows))
    return 0


# --- Tuning with Optuna: `optimize` (study/objective.py, tracking/optimize.py).


def checked(check: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from a validator that raises ConfigError (argparse would hide its message)."""

    def parse(text: str) -> object:
        try:
            return check(text)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def add_optimize_command(commands) -> None:
    from study import objective

    optimize = commands.add_parser(
        "optimize", help="tune learning rate and epochs per configuration with Optuna (resumable, many workers)"
    )
    optimize.add_argument(
        "--configs",
        type=checked(objective.parse_configs),
        default=objective.parse_configs("all"),
        help="all, or comma-separated {activation}-{loss} names, e.g. relu-crossentropy,tanh-hinge (all)",
    )
    optimize.add_argument(
        "--n-trials",
        type=integer("n_trials", 1),
        default=objective.DEFAULT_N_TRIALS,
        help="finished (complete + pruned) trials per configuration, over all workers and reruns (20)",
    )
    optimize.add_argument(
        "--max-epochs",
        type=integer("max_epochs", 1),
        default=objective.DEFAULT_MAX_EPOCHS,
        help="upper end of the epochs searched; the lower end is min(5, max_epochs) (40)",
    )
    optimize.add_argument(
        "--storage",
        type=checked(objective.check_storage),
        default=objective.DEFAULT_STORAGE,
        help="Optuna storage: sqlite:///file.db (one machine) or postgresql://user@host/db (sqlite:///optuna.db)",
    )
    optimize.add_argument(
        "--study-prefix",
        type=checked(objective.check_study_prefix),
        default=objective.DEFAULT_STUDY_PREFIX,
        help="study name = prefix + {activation}-{loss} (mnist-)",
    )
    optimize.add_argument(
        "--seed", type=integer("seed", 0, MAX_SEED), default=DEFAULT_SEED, help="sampler and weight seed (0)"
    )
    optimize.add_argument(
        "--batch-size", type=integer("batch_size", 1), default=DEFAULT_BATCH_SIZE, help="minibatch size (32)"
    )
    optimize.add_argument(
        "--data", default="auto", help="'auto' ($MNIST_NPZ if set, else Keras's download) or a path to an mnist.npz"
    )
    optimize.add_argument(
        "--timeout",
        type=integer("timeout", 0),
        default=objective.DEFAULT_TIMEOUT,
        help="seconds after which this worker starts no new trial; 0 = no limit (0)",
    )
    optimize.add_argument("--experiment", default=None, help="MLflow experiment name (mnist-activation-study)")


def _dispatch_optimize(args: argparse.Namespace, experiment: str) -> None:
    from study.objective import OptimizeSettings, hide_password, open_storage_or_explain

    settings = OptimizeSettings(
        configs=args.configs,
        n_trials=args.n_trials,
        max_epochs=args.max_epochs,
        storage=args.storage,
        study_prefix=args.study_prefix,
        seed=args.seed,
        batch_size=args.batch_size,
        data=args.data,
        timeout=args.timeout,
    )
    open_storage_or_explain(settings)  # an unreachable database is a usage error, before any run starts
    log.info("Optimizing %s in %s", ", ".join(settings.configs), hide_password(settings.storage))
    with runtime.frozen_imports():
        from tracking.optimize import run_optimize

    runtime.use_compile_cache()  # trials of a configuration share one compiled model (study/runtime.py)
    run_optimize(settings, experiment=experiment)


# --- Results kept while the tracking store was unreachable: `sync` (tracking/unsynced.py, tracking/sync.py).


def add_sync_command(commands) -> None:
    from tracking import keys

    sync = commands.add_parser(
        "sync", help="upload results kept locally while the tracking store was unreachable (then delete them)"
    )
    sync.add_argument(
        "--folder",
        default=None,
        help=f"folder of unsynced records (${keys.UNSYNCED_DIR_ENV}, else ./{keys.DEFAULT_UNSYNCED_DIR})",
    )


def _dispatch_sync(args: argparse.Namespace) -> int:
    """Exit code 0 when every record is in the store (or there was none), UNSYNCED when some are still kept."""
    from pathlib import Path

    from tracking import unsynced

    folder = Path(args.folder).resolve() if args.folder else unsynced.root()
    if args.folder and not folder.is_dir():
        raise UsageError(f"folder: {args.folder!r} is not a folder; pass the folder of unsynced records")
    from tracking.sync import sync_folder

    report = sync_folder(folder)
    for record, run_id in report.synced:
        print(f"synced {record.name} -> run {run_id}")
    for record, reason in report.failed:
        print(f"not synced {record.name}: {reason}", file=sys.stderr)
    if not report.synced and not report.failed:
        print(f"nothing to sync in {folder}")
    return UNSYNCED if report.failed else 0


def _unsynced_exit_code() -> int:
    """0, or UNSYNCED with one line on stderr when results had to be kept locally (CI must not pass then)."""
    from tracking import unsynced

    kept = unsynced.written()
    if not kept:
        return 0
    print(
        f"error: the tracking store was unreachable: {len(kept)} result record(s) kept in {kept[0].parent} "
        f"({', '.join(folder.name for folder in kept)}); upload them with `python -m study sync` once it is back",
        file=sys.stderr,
    )
    return UNSYNCED
