"""Process set-up for training: what to import, where compiled code is cached, how many threads.

Measured on a 2-core machine (benchmarks/README.md):
- Keras 3 imports TensorFlow whenever it is installed, even on the JAX backend: to seed it
  (`keras.utils.set_random_seed`) and for a type check when saving (`Model.save`). That costs each process
  ~450 MB and ~3 s, and nothing here uses it, so a process on another backend blocks the import.
- Keras also imports scikit-learn, pandas, pyarrow, IPython and matplotlib when they are installed (MLflow
  brings them). The study never uses IPython (blocking it saves the logging process ~0.5 s of CPU; Optuna's
  parameter importances need scikit-learn), and a training worker uses none of them: it stays at ~230 MB
  before data.
- JAX compiles each new model's functions (~4 s per configuration). Its persistent cache keeps the
  compiled code on disk, so later seeds, reruns and Optuna trials of a configuration skip that.
- MLflow, Keras and JAX leave millions of objects that live until the process ends. Python's garbage collector
  scanned them again and again while they loaded (~1.1 s of CPU in the logging process) and once more at exit
  (~1.7 s after the study was done). Imports run with the collector paused and their objects frozen out of its
  sight (`gc.freeze`); at exit the heap is frozen instead of collected.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.abc
import logging
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "MNIST_STUDY_CACHE"  # folder for JAX's compiled-code cache; "off" turns the cache off
OFF = "off"
# Libraries Keras imports when they are installed: nothing in the study uses IPython; MLflow, the figures and
# Optuna's importances use the others, a process that only trains doesn't.
NEVER_USED = ("IPython",)
UNUSED_BY_TRAINING = ("sklearn", "pandas", "pyarrow", "matplotlib")


def backend() -> str:
    """The Keras backend this process will use (study/__init__.py sets it before Keras is imported)."""
    return os.environ.get("KERAS_BACKEND", "tensorflow")


class _Blocker(importlib.abc.MetaPathFinder):
    """First on `sys.meta_path`: for a blocked package, `import` raises ModuleNotFoundError."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname.partition(".")[0] in self.names:
            message = f"No module named {fullname!r} (not loaded in this process: study/runtime.py)"
            raise ModuleNotFoundError(message, name=fullname)
        return None


_BLOCKER = _Blocker()


def block_imports(names: tuple[str, ...]) -> None:
    """Make `import name` raise ModuleNotFoundError in this process, as if the package were not installed.

    Keras treats these packages as optional. A finder, not a None entry in sys.modules: libraries ask
    `name in sys.modules` to learn whether a package is in use (MLflow does for TensorFlow on every metric
    value that is not a float), and a None entry would answer yes. A package already imported is left alone.
    """
    _BLOCKER.names.update(name for name in names if name not in sys.modules)
    if _BLOCKER not in sys.meta_path:
        sys.meta_path.insert(0, _BLOCKER)


def skip_unused_imports() -> None:
    """Don't let Keras import TensorFlow (unless it is the backend) or IPython in this process."""
    if backend() != "tensorflow":
        block_imports(("tensorflow",))
    block_imports(NEVER_USED)


def prepare_worker() -> None:
    """A process that only trains: single-threaded numeric libraries, no unused imports, compile cache.

    Call before Keras is imported. One single-threaded worker per core was measured faster than one
    process using both cores for this small model.
    """
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["TF_NUM_INTRAOP_THREADS"] = "1"
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    skip_unused_imports()
    block_imports(UNUSED_BY_TRAINING)
    use_compile_cache()


@contextlib.contextmanager
def frozen_imports() -> Iterator[None]:
    """Import heavy, long-lived modules inside this: no garbage collection while they load, and what they
    created is frozen afterwards, so later collections scan only the objects made after it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def exit_without_collection() -> None:
    """Called just before the process exits: freeze the heap so that the interpreter's last collection has
    nothing to scan. Files, runs and temporary folders are closed by then; nothing waits on a finalizer."""
    gc.freeze()


def cache_folder() -> Path | None:
    """JAX's compiled-code cache: $MNIST_STUDY_CACHE, else ~/.cache/mnist-activation-study/jax (None: off).

    One subfolder per machine: cached entries are native code for this CPU, and a home folder may be shared.
    """
    setting = os.environ.get(CACHE_ENV, "")
    if setting.lower() == OFF:
        return None
    root = Path(setting) if setting else _user_cache() / "mnist-activation-study" / "jax"
    return root / f"{platform.node() or 'host'}-{platform.machine()}"


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def use_compile_cache() -> None:
    """Turn on JAX's persistent compilation cache (JAX backend only; a folder that can't be made: skipped)."""
    folder = cache_folder()
    if folder is None or backend() != "jax":
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.warning("Compiled-code cache off: cannot create %s (%s); set %s to a folder", folder, error, CACHE_ENV)
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # this model's compiles are small
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def release_memory(collect: bool = True) -> None:
    """Give freed memory back to the system between configurations.

    Compiling a model leaves ~80 MB of freed blocks in glibc's heap that the next configuration's arrays
    would not reuse; `malloc_trim` returns them (measured per worker). A no-op where glibc is absent.
    `collect=False` skips the garbage collection first: in the process that imported MLflow it costs ~0.2 s
    of CPU each time, more than it gives back.
    """
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
