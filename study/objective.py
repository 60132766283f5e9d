"""Tuning with Optuna: the search space, the objective, pruning, and the trial loop many workers share.

One study per configuration maximizes the final epoch's validation accuracy over the learning rate and
the number of epochs. Trials are claimed under a lock held in the storage itself (a PostgreSQL advisory
lock, or a file lock beside the SQLite file), so any number of worker processes on the same storage
finish exactly `n_trials` trials per study between them, and a rerun only tops a study up.

Nothing here knows about MLflow: tracking plugs in through `TrialHooks`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import re
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled  # as Study.optimize (optuna 5.1)
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import URL, make_url

from study.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LEARNING_RATE,
    DEFAULT_SEED,
    ConfigError,
    TrainConfig,
    check_int,
    config_names,
    parse_config_name,
)

if TYPE_CHECKING:  # keras is slow to import; the CLI validates input before it is needed
    import keras

    from study.data import Dataset

log = logging.getLogger(__name__)

LEARNING_RATE_LOW = 1e-4
LEARNING_RATE_HIGH = 1e-1
MIN_EPOCHS = 5  # the epochs range is min(MIN_EPOCHS, max_epochs)..max_epochs

DEFAULT_N_TRIALS = 20
DEFAULT_MAX_EPOCHS = 40
DEFAULT_STORAGE = "sqlite:///optuna.db"
DEFAULT_STUDY_PREFIX = "mnist-"
DEFAULT_TIMEOUT = 0

# Median pruning: once 5 trials are complete, stop a trial whose best validation accuracy so far is
# below the median of complete trials at the same epoch, judged from epoch 2 on (benchmarks/pruning.py).
PRUNER_STARTUP_TRIALS = 5
PRUNER_WARMUP_EPOCHS = 2

# A trial whose worker died (kill -9, lost machine) stops sending heartbeats; after the grace period
# the next claim marks it FAIL so its slot is tried again.
HEARTBEAT_SECONDS = 15
GRACE_SECONDS = 60
POLL_SECONDS = 2.0  # how often an idle worker looks whether trials running elsewhere have finished

# Finished trials count toward n_trials and are never redone; FAIL (interrupted, crashed) does not count.
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
ACTIVE_STATES = (TrialState.RUNNING, TrialState.WAITING)

# Trial user attributes.
EPOCHS_RUN_ATTR = "epochs_run"
TRAIN_SECONDS_ATTR = "train_seconds"
REASON_ATTR = "reason"  # why a trial was pruned or failed
DIVERGED_ATTR = "diverged"

STUDY_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9._-]*")
STORAGE_BACKENDS = ("sqlite", "postgresql")


class DivergedError(optuna.TrialPruned):
    """The loss turned NaN or infinite: the trial ends PRUNED, so TPE learns to avoid that region."""


# --- Settings and validation -------------------------------------------------------------------


def parse_configs(text: str) -> tuple[str, ...]:
    """`all` -> every configuration; else comma-separated `{activation}-{loss}` names, duplicates dropped."""
    if text.strip() == "all":
        return tuple(config_names())
    names = [name.strip() for name in text.split(",")]
    if not any(names):
        raise ConfigError(f"configs: {text!r} names no configuration; use all or e.g. relu-crossentropy")
    parsed = [parse_config_name(name) for name in names]
    return tuple(dict.fromkeys(f"{activation}-{loss}" for activation, loss in parsed))


def check_storage(url: str) -> str:
    """An Optuna storage URL that every worker can share: SQLite (one machine) or PostgreSQL."""
    allowed = "use sqlite:///path/to/optuna.db or postgresql://user@host:port/database"
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError(f"storage: {url!r} is not a database URL; {allowed}") from None
    backend = parsed.get_backend_name()
    if backend not in STORAGE_BACKENDS:
        raise ConfigError(f"storage: {backend!r} is not supported; {allowed}")
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigError(f"storage: {url!r} is in memory and would be lost; {allowed}")
        folder = Path(parsed.database).expanduser().parent
        if not folder.is_dir():
            raise ConfigError(f"storage: folder {str(folder)!r} of {url!r} does not exist")
    elif not parsed.database:
        raise ConfigError(f"storage: {hide_password(url)!r} names no database; {allowed}")
    return url


def check_study_prefix(prefix: str) -> str:
    if not STUDY_PREFIX_PATTERN.fullmatch(prefix) or len(prefix) > 100:
        raise ConfigError(f"study_prefix: {prefix!r} is not allowed; use up to 100 letters, digits, '.', '_' or '-'")
    return prefix


def database_url(storage: str) -> URL:
    """The URL SQLAlchemy opens: plain `postgresql://` uses psycopg2, the driver requirements.txt pins
    (SQLAlchemy 2.1 would otherwise look for psycopg 3)."""
    url = make_url(storage)
    return url.set(drivername="postgresql+psycopg2") if url.drivername == "postgresql" else url


def hide_password(url: str) -> str:
    """The storage URL as it may be logged: any password replaced by ***."""
    return make_url(url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class OptimizeSettings:
    """Everything `optimize` was asked to do; validated on construction."""

    configs: tuple[str, ...] = field(default_factory=lambda: tuple(config_names()))
    n_trials: int = DEFAULT_N_TRIALS
    max_epochs: int = DEFAULT_MAX_EPOCHS
    storage: str = DEFAULT_STORAGE
    study_prefix: str = DEFAULT_STUDY_PREFIX
    seed: int = DEFAULT_SEED
    batch_size: int = DEFAULT_BATCH_SIZE
    data: str = "auto"
    timeout: int = DEFAULT_TIMEOUT  # seconds after which this worker starts no new trial; 0 = no limit

    def __post_init__(self) -> None:
        if not self.configs:
            raise ConfigError("configs: no configuration given; use all or e.g. relu-crossentropy")
        for name in self.configs:
            parse_config_name(name)
        check_int("n_trials", self.n_trials, minimum=1)
        check_int("max_epochs", self.max_epochs, minimum=1)
        check_int("seed", self.seed, minimum=0)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("timeout", self.timeout, minimum=0)
        check_storage(self.storage)
        check_study_prefix(self.study_prefix)

    def study_name(self, config_name: str) -> str:
        return f"{self.study_prefix}{config_name}"

    def base_config(self, config_name: str) -> TrainConfig:
        """The configuration every trial starts from; a trial replaces learning_rate and epochs."""
        activation, loss = parse_config_name(config_name)
        return TrainConfig(activation, loss, self.max_epochs, self.batch_size, DEFAULT_LEARNING_RATE, self.seed)

    def params(self) -> dict[str, object]:
        """As logged on the parent run (the storage without its password)."""
        return {
            "configs": ",".join(self.configs),
            "n_trials": self.n_trials,
            "max_epochs": self.max_epochs,
            "storage": hide_password(self.storage),
            "study_prefix": self.study_prefix,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "data": self.data,
            "timeout": self.timeout,
        }


# --- Search space, sampler, pruner -------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """learning_rate log-uniform in [1e-4, 1e-1]; epochs an integer in [min(5, max_epochs), max_epochs]."""

    max_epochs: int

    @property
    def min_epochs(self) -> int:
        return min(MIN_EPOCHS, self.max_epochs)

    def suggest(self, trial: optuna.Trial) -> dict[str, float | int]:
        return {
            "learning_rate": trial.suggest_float("learning_rate", LEARNING_RATE_LOW, LEARNING_RATE_HIGH, log=True),
            "epochs": trial.suggest_int("epochs", self.min_epochs, self.max_epochs),
        }


def trial_seed(seed: int, trial_number: int) -> int:
    """The sampler's seed for one trial: fixed by (seed, trial number), whoever runs the trial."""
    return int(np.random.SeedSequence([seed, trial_number]).generate_state(1)[0])


def make_sampler(seed: int, trial_number: int) -> optuna.samplers.TPESampler:
    """TPE seeded per trial number, so a resumed or shared study never replays an earlier trial's draw.

    One sampler seeded once would restart its random sequence in every process and suggest the same
    first learning rates again; `constant_liar` keeps parallel workers from piling onto one point.
    """
    return optuna.samplers.TPESampler(seed=trial_seed(seed, trial_number), constant_liar=True)


def make_pruner() -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS)


def report_and_check(trial: optuna.Trial, epoch: int, val_accuracy: float) -> bool:
    """Report one epoch's validation accuracy (step = epoch); True when the pruner says stop here."""
    trial.report(val_accuracy, step=epoch)
    return bool(trial.should_prune())


# --- Tracking hooks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialOutcome:
    """How a trial ended: its Optuna state, value (COMPLETE only) and, if not COMPLETE, why."""

    state: TrialState
    value: float | None
    reason: str
    interrupted: bool = False


class TrialHooks:
    """What a tracker sees of each trial; every method does nothing here (benchmarks, tests)."""

    def trial_started(self, trial: optuna.Trial, config: TrainConfig) -> None:
        """The trial's parameters are drawn and training is about to start."""

    def epoch_finished(self, trial: optuna.Trial, epoch: int, metrics: Mapping[str, float]) -> None:
        """One epoch's train/val loss and accuracy (epoch from 1)."""

    def keep_model(self, trial: optuna.Trial, model: keras.Model) -> None:
        """A COMPLETE trial at least as good as every earlier one: keep its model (it may be the best)."""

    def trial_finished(self, trial: optuna.Trial, outcome: TrialOutcome) -> None:
        """Called just before the outcome is told to Optuna."""

    def trial_abandoned(self, trial: FrozenTrial) -> None:
        """A trial whose worker stopped sending heartbeats was marked FAIL."""


# --- Ctrl-C and SIGTERM ------------------------------------------------------------------------


class StopSignal:
    """Ctrl-C or SIGTERM while a model trains: finish the epoch, then end the trial as FAIL (interrupted).

    Raising KeyboardInterrupt in the middle of a training step or a database write can be swallowed or
    leave a connection half-way; stopping at the epoch boundary is always clean. A second signal, or one
    that arrives while no model trains, interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.training = False

    def handle(self, signum: int, frame) -> None:
        if self.training and not self.requested:
            self.requested = True
            log.warning("%s: stopping at the end of this epoch; send it again to stop now", signal.strsignal(signum))
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignal]:
        """Handle SIGINT and SIGTERM here (main thread only); the previous handlers come back afterwards."""
        previous = {number: signal.signal(number, self.handle) for number in self.SIGNALS}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


class Interrupted(KeyboardInterrupt):
    """Training stopped at an epoch boundary because of Ctrl-C or SIGTERM."""


# --- The objective -----------------------------------------------------------------------------


def make_objective(
    base: TrainConfig,
    data: Dataset,
    space: SearchSpace,
    hooks: TrialHooks | None = None,
    stop: StopSignal | None = None,
) -> Callable[[optuna.Trial], float]:
    """An Optuna objective: train `base` with the trial's learning rate and epochs, return the last
    epoch's validation accuracy (the model those settings produce). Raises TrialPruned when pruned or
    when training diverges (`DivergedError`: NaN/inf loss, or worse than guessing); records epochs run."""
    from study.training import train  # keras loads here, not when the CLI validates its input

    hooks = hooks or TrialHooks()
    stop = stop or StopSignal()

    def objective(trial: optuna.Trial) -> float:
        config = replace(base, **space.suggest(trial))
        hooks.trial_started(trial, config)
        epochs_run = 0
        reported: set[int] = set()
        pruned: tuple[int, float] | None = None

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            nonlocal epochs_run
            epochs_run = epoch
            hooks.epoch_finished(trial, epoch, metrics)

        def should_stop(epoch: int, metrics: dict[str, float]) -> bool:
            nonlocal pruned
            if stop.requested:
                return True
            reported.add(epoch)
            if report_and_check(trial, epoch, metrics["val_accuracy"]):
                pruned = (epoch, metrics["val_accuracy"])
            return pruned is not None

        stop.training = True
        try:
            # last-epoch weights: the trial's value is its last epoch's validation accuracy
            result = train(config, data, on_epoch=on_epoch, should_stop=should_stop, restore_best=False)
        finally:
            stop.training = False
            trial.set_user_attr(EPOCHS_RUN_ATTR, epochs_run)
        if stop.requested:
            raise Interrupted(f"stopped after epoch {epochs_run} of {config.epochs}")
        trial.set_user_attr(TRAIN_SECONDS_ATTR, round(result.train_seconds, 2))
        last_val_accuracy = result.history["val_accuracy"][-1]
        if result.diverged or not math.isfinite(last_val_accuracy):
            trial.set_user_attr(DIVERGED_ATTR, True)
            if result.epochs_run not in reported:  # rank it (as TPE does pruned trials) at the epoch it broke
                trial.report(last_val_accuracy, step=result.epochs_run)
            raise DivergedError(f"diverged: {result.stopped_reason or 'validation accuracy is not finite'}")
        if pruned is not None:
            raise optuna.TrialPruned(
                f"pruned after epoch {pruned[0]} of {config.epochs}: val_accuracy {pruned[1]:.4f} "
                "is below the median of complete trials"
            )
        if is_best_so_far(trial.study, last_val_accuracy):
            hooks.keep_model(trial, result.model)
        return last_val_accuracy

    return objective


def is_best_so_far(study: optuna.Study, value: float) -> bool:
    """At least as good as every COMPLETE trial: the only trials that may end up as the study's best."""
    values = [trial.value for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return all(value >= other for other in values if other is not None)


# --- Storage, the shared lock, and the trial loop ----------------------------------------------


class StorageLock:
    """A lock every worker on the same storage sees: a PostgreSQL advisory lock, or for SQLite an
    exclusive `flock` on `<database>.lock` (SQLite is only shared by processes on one machine)."""

    def __init__(self, storage_url: str):
        self.url: URL = database_url(storage_url)
        self._engine = None

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        if self.url.get_backend_name() == "postgresql":
            with self._postgres_lock(name):
                yield
        else:
            path = Path(self.url.database).expanduser().with_name(Path(self.url.database).name + ".lock")
            with open(path, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _postgres_lock(self, name: str) -> Iterator[None]:
        import sqlalchemy

        if self._engine is None:
            self._engine = sqlalchemy.create_engine(
                self.url, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT"
            )
        key = int.from_bytes(hashlib.sha256(f"mnist-optuna:{name}".encode()).digest()[:8], "big", signed=True)
        with self._engine.connect() as connection:  # the lock dies with the connection if we do
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})


def open_storage(
    settings: OptimizeSettings, lock: StorageLock, on_abandoned: Callable[[FrozenTrial], None] | None = None
) -> optuna.storages.RDBStorage:
    """The RDB storage with heartbeats on; created under the lock so workers never race on its tables."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if lock.url.get_backend_name() == "sqlite" else {}

    def stale(study: optuna.Study, trial: FrozenTrial) -> None:
        log.warning("%s trial %d: its worker stopped; marked FAIL", study.study_name, trial.number)
        if on_abandoned is not None:
            on_abandoned(trial)

    with lock.hold("storage"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.storages.RDBStorage(
            database_url(settings.storage).render_as_string(hide_password=False),
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=stale,
        )


def open_storage_or_explain(settings: OptimizeSettings) -> None:
    """Open (and if new, set up) the storage once, turning a database error into a ConfigError."""
    try:
        open_storage(settings, StorageLock(settings.storage))
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"storage: could not open {hide_password(settings.storage)}: {first_line}") from None


def open_studies(
    settings: OptimizeSettings, storage: optuna.storages.BaseStorage, lock: StorageLock
) -> dict[str, optuna.Study]:
    """Each configuration's study, created or (load_if_exists) continued: {config name: study}."""
    studies = {}
    for name in settings.configs:
        with lock.hold(settings.study_name(name)):
            studies[name] = optuna.create_study(
                storage=storage,
                study_name=settings.study_name(name),
                direction="maximize",
                load_if_exists=True,
                sampler=make_sampler(settings.seed, 0),
                pruner=make_pruner(),
            )
    return studies


@dataclass(frozen=True)
class TrialCounts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    active: int = 0  # RUNNING or WAITING, here or in another worker

    @property
    def finished(self) -> int:
        """COMPLETE + PRUNED: what counts toward n_trials (a FAIL is tried again)."""
        return self.complete + self.pruned


def count_trials(trials: Sequence[FrozenTrial]) -> TrialCounts:
    states = [trial.state for trial in trials]
    return TrialCounts(
        complete=states.count(TrialState.COMPLETE),
        pruned=states.count(TrialState.PRUNED),
        failed=states.count(TrialState.FAIL),
        active=sum(state in ACTIVE_STATES for state in states),
    )


def epochs_spent(trials: Sequence[FrozenTrial]) -> int:
    """Epochs trained over all trials, pruned and failed ones included."""
    return sum(int(trial.user_attrs.get(EPOCHS_RUN_ATTR, len(trial.intermediate_values))) for trial in trials)


def claim_trial(study: optuna.Study, n_trials: int, seed: int, lock: StorageLock) -> optuna.Trial | None:
    """A new trial if finished + running trials are fewer than n_trials, else None.

    Count and creation happen under the storage lock, so two workers never both take the last slot.
    """
    with lock.hold(study.study_name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        counts = count_trials(trials)
        if counts.finished + counts.active >= n_trials:
            return None
        study.sampler = make_sampler(seed, len(trials))  # len(trials) is the number this trial gets
        with warnings.catch_warnings():  # heartbeats are recorded by `run_trial`, as Study.optimize would
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            trial = study.ask()
        storage = study._storage
        if is_heartbeat_enabled(storage):
            storage.record_heartbeat(trial._trial_id)  # from birth, so a worker killed now is noticed too
        return trial


def run_trial(
    study: optuna.Study, trial: optuna.Trial, objective: Callable[[optuna.Trial], float], hooks: TrialHooks
) -> TrialOutcome:
    """Run one claimed trial to its end and tell Optuna how it ended.

    Pruned or diverged -> PRUNED; Ctrl-C/SIGTERM or an error -> FAIL, and the interrupt or error is
    raised again once recorded (a FAIL frees the slot for the next run to try again).
    """
    error: BaseException | None = None
    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            outcome = TrialOutcome(TrialState.COMPLETE, objective(trial), "")
        except optuna.TrialPruned as pruned:
            outcome = TrialOutcome(TrialState.PRUNED, None, str(pruned) or "pruned")
        except KeyboardInterrupt as interrupt:
            error = interrupt
            detail = f": {interrupt}" if str(interrupt) else ""
            outcome = TrialOutcome(TrialState.FAIL, None, f"interrupted (Ctrl-C or SIGTERM){detail}", interrupted=True)
        except Exception as exception:
            error = exception
            outcome = TrialOutcome(TrialState.FAIL, None, f"{type(exception).__name__}: {exception}")
    try:
        if outcome.reason:
            trial.set_user_attr(REASON_ATTR, outcome.reason)
        hooks.trial_finished(trial, outcome)
    finally:
        study.tell(trial, outcome.value, state=outcome.state)
    _log_outcome(study.study_name, trial, outcome)
    if error is not None:
        raise error
    return outcome


def _log_outcome(study_name: str, trial: optuna.Trial, outcome: TrialOutcome) -> None:
    params = ", ".join(
        f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}" for key, value in trial.params.items()
    )
    if outcome.state == TrialState.COMPLETE:
        log.info("%s trial %d COMPLETE: val_accuracy %.4f (%s)", study_name, trial.number, outcome.value, params)
    else:
        log.info("%s trial %d %s: %s (%s)", study_name, trial.number, outcome.state.name, outcome.reason, params)


def optimize_studies(
    settings: OptimizeSettings, data: Dataset, hooks: TrialHooks | None = None, stop: StopSignal | None = None
) -> dict[str, optuna.Study]:
    """Run trials until every study has n_trials finished ones (or the timeout passes).

    Each round takes a free slot in the first study that has one. With none free but trials still
    running in other workers, wait: one of those may fail and free its slot again. Returns the studies
    in `settings.configs` order, each finished unless interrupted or out of time.
    """
    hooks = hooks or TrialHooks()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own log lines say what happened
    lock = StorageLock(settings.storage)
    storage = open_storage(settings, lock, hooks.trial_abandoned)
    studies = open_studies(settings, storage, lock)
    space = SearchSpace(settings.max_epochs)
    objectives = {name: make_objective(settings.base_config(name), data, space, hooks, stop) for name in studies}
    deadline = time.monotonic() + settings.timeout if settings.timeout else math.inf
    announced_wait = False
    while time.monotonic() < deadline:
        claimed = None
        for name, study in studies.items():
            trial = claim_trial(study, settings.n_trials, settings.seed, lock)
            if trial is not None:
                claimed = (name, study, trial)
                break
        if claimed is not None:
            name, study, trial = claimed
            run_trial(study, trial, objectives[name], hooks)
            announced_wait = False
            continue
        unfinished = [
            study.study_name
            for study in studies.values()
            if count_trials(study.get_trials(deepcopy=False)).finished < settings.n_trials
        ]
        if not unfinished:
            log.info("Every study has %d finished trials", settings.n_trials)
            break
        if not announced_wait:
            log.info("Waiting for trials running in other workers: %s", ", ".join(unfinished))
            announced_wait = True
        time.sleep(POLL_SECONDS)
    else:
        log.info("Timeout of %d s reached: no new trials", settings.timeout)
    return studies
