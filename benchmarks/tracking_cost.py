"""Where the tracking overhead goes: CPU time of `python -m study main`'s own process, by part.

The workers train; the study's own process (the parent) does everything MLflow: it imports MLflow, creates the
store and the runs, writes epoch metrics, draws the figures, logs and registers each model, and writes the
comparison. On a machine whose cores the workers keep busy, each CPU-second it spends there delays training
by about half a second (2 cores). This wraps the parent's functions with a CPU clock (this thread's time, so
the waiting for workers is left out) and prints a table.

    python benchmarks/tracking_cost.py --epochs 5 --data ../shared/datasets/mnist.npz

It runs the study into a temporary SQLite store and a cold compile cache, as bench_study.py does.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]

# (module, attribute) -> the part of the work it is counted in. Nested parts are shown separately and
# also included in their callers (log_outcome includes figures, model logging and registration).
PARTS = {
    ("study.cli", "load_raw"): "data check before any run starts",
    ("study.runner", "Workers.__init__"): "starting the worker processes",
    ("tracking.pipeline", "use_experiment"): "store and experiment set-up",
    ("tracking.runs", "ConfigRuns.log_epoch"): "epoch metrics",
    ("tracking.runs", "ConfigRuns.log_outcome"): "per configuration: results (total of the next four)",
    ("study.plots", "learning_curves"): "  figures: learning curves (drawing)",
    ("study.plots", "confusion_matrix"): "  figures: confusion matrix (drawing)",
    ("tracking.runs", "save_figure"): "  figures: PNG files",
    ("tracking.runs", "ConfigRuns.log_model"): "  model: mlflow.keras.log_model of the saved file",
    ("tracking.runs", "register_outcome"): "  registry: version, tags, aliases",
    ("tracking.pipeline", "_log_comparison"): "comparison, statistics, report",
}

cpu: collections.Counter[str] = collections.Counter()
calls: collections.Counter[str] = collections.Counter()


def wrap(module_name: str, attribute: str, part: str) -> None:
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for step in path:
        owner = getattr(owner, step)
    function = getattr(owner, name)

    @functools.wraps(function)
    def timed(*args, **kwargs):
        started = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            cpu[part] += time.thread_time() - started
            calls[part] += 1

    setattr(owner, name, timed)


def thread_cpu() -> list[tuple[str, float]]:
    """CPU seconds (user + system) of each thread of this process, from /proc, largest first."""
    ticks = os.sysconf("SC_CLK_TCK")
    rows = []
    for task in Path("/proc/self/task").iterdir():
        stat = (task / "stat").read_text()
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        rows.append((name, (int(fields[11]) + int(fields[12])) / ticks))  # utime, stime
    return sorted(rows, key=lambda row: -row[1])[:8]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", default="5")
    parser.add_argument(
        "--data", default=os.environ.get("MNIST_NPZ", str(PROJECT.parent / "shared/datasets/mnist.npz"))
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="tracking-cost-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MNIST_STUDY_CACHE"] = str(folder / "compile-cache")
    os.chdir(folder)
    sys.path.insert(0, str(PROJECT))

    started_wall, started_cpu = time.perf_counter(), time.thread_time()
    import study.cli
    from study import runtime

    runtime.skip_unused_imports()  # as the CLI does before it imports MLflow
    before_imports = time.thread_time()
    with runtime.frozen_imports():  # as the CLI imports them
        import tracking.pipeline  # noqa: F401  (MLflow, Keras, matplotlib, scipy: what `main` imports)

    cpu["imports (MLflow, Keras, matplotlib, scipy)"] = time.thread_time() - before_imports
    for (module_name, attribute), part in PARTS.items():
        wrap(module_name, attribute, part)
    code = study.cli.main(["main", "--epochs", args.epochs, "--data", args.data])
    total_cpu, wall = time.thread_time() - started_cpu, time.perf_counter() - started_wall

    print(f"\nstudy main --epochs {args.epochs}: {wall:.1f} s wall")
    print(f"the parent's main thread: {total_cpu:.1f} s CPU; all its threads: {time.process_time():.1f} s CPU")
    for name, seconds in thread_cpu():
        print(f"  thread {name:<20} {seconds:6.2f} s CPU")
    print(f"{'part of the main thread':<55}{'calls':>6}{'CPU s':>8}")
    for part in ["imports (MLflow, Keras, matplotlib, scipy)", *PARTS.values()]:
        print(f"{part:<55}{calls[part] or '':>6}{cpu[part]:>8.2f}")
    counted = sum(seconds for part, seconds in cpu.items() if not part.startswith("  "))
    print(f"{'the rest (receiving epochs, progress bar, runs, params)':<55}{'':>6}{total_cpu - counted:>8.2f}")
    return code


if __name__ == "__main__":  # spawned workers import this file as __mp_main__: only the parent runs the study
    sys.exit(main())
