"""Does pruning pay? The same seeded Optuna study with and without a pruner: epochs spent, best val accuracy.

    python benchmarks/pruning.py --data /work/shared/datasets/mnist.npz --train-size 10000 \
        --config relu-crossentropy --n-trials 20 --max-epochs 10 --pruners none,median,hyperband

Every arm uses `optimize`'s search space, objective and per-trial-number TPE seeds (study/objective.py), in
memory (no MLflow), on the first `--train-size` training images. The first 10 trials are TPE's random
start-up draws and identical across arms; later draws differ as the pruned trials' histories do.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402

from study.data import load_raw, prepare, subset  # noqa: E402
from study.objective import (  # noqa: E402
    DIVERGED_ATTR,
    EPOCHS_RUN_ATTR,
    OptimizeSettings,
    SearchSpace,
    TrialHooks,
    count_trials,
    epochs_spent,
    make_objective,
    make_pruner,
    make_sampler,
    run_trial,
)

log = logging.getLogger("benchmarks.pruning")


def pruner_named(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return make_pruner()  # what `optimize` uses
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs, reduction_factor=3)
    raise SystemExit(f"pruners: {name!r} is not one of none, median, hyperband")


def run_arm(pruner_name: str, config_name: str, data, n_trials: int, max_epochs: int, seed: int) -> dict:
    """One in-memory study, trial by trial exactly as `optimize` claims them (sampler seeded per trial)."""
    settings = OptimizeSettings(configs=(config_name,), max_epochs=max_epochs, seed=seed)
    study = optuna.create_study(direction="maximize", pruner=pruner_named(pruner_name, max_epochs))
    objective = make_objective(settings.base_config(config_name), data, SearchSpace(max_epochs), TrialHooks())
    started = time.perf_counter()
    for number in range(n_trials):
        study.sampler = make_sampler(seed, number)
        run_trial(study, study.ask(), objective, TrialHooks())
    seconds = time.perf_counter() - started
    trials = study.trials
    counts = count_trials(trials)
    best = study.best_trial if counts.complete else None
    return {
        "pruner": pruner_name,
        "seed": seed,
        "complete": counts.complete,
        "pruned": counts.pruned,
        "diverged": sum(bool(trial.user_attrs.get(DIVERGED_ATTR)) for trial in trials),
        "epochs_spent": epochs_spent(trials),
        "epochs_if_unpruned": sum(trial.params["epochs"] for trial in trials),
        "best_val_accuracy": best.value if best else float("nan"),
        "best_learning_rate": best.params["learning_rate"] if best else float("nan"),
        "best_epochs": best.params["epochs"] if best else 0,
        "seconds": seconds,
        "pruned_at": sorted(t.user_attrs.get(EPOCHS_RUN_ATTR, 0) for t in trials if t.state.name == "PRUNED"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="auto", help="'auto' or a path to mnist.npz")
    parser.add_argument("--train-size", type=int, default=10000, help="first N training images (10000)")
    parser.add_argument("--test-size", type=int, default=1000, help="first N test images (unused for choice)")
    parser.add_argument("--config", default="relu-crossentropy", help="{activation}-{loss} (relu-crossentropy)")
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--seeds", default="0", help="comma-separated sampler/weight seeds (0)")
    parser.add_argument("--pruners", default="none,median", help="comma-separated: none, median, hyperband")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    raw = subset(load_raw(args.data), args.train_size, args.test_size)
    rows = []
    for seed in (int(text) for text in args.seeds.split(",")):
        data = prepare(raw, seed=seed)
        for name in args.pruners.split(","):
            row = run_arm(name.strip(), args.config, data, args.n_trials, args.max_epochs, seed)
            log.info("%s", row)
            rows.append(row)

    print(
        f"\n{args.config}, {args.n_trials} trials, epochs {min(5, args.max_epochs)}..{args.max_epochs}, "
        f"{args.train_size} training images (a tenth for validation)\n"
    )
    print(
        "| pruner | seed | complete / pruned (diverged) | epochs spent (unpruned would be) | best val accuracy | "
        "best learning rate, epochs | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['pruner']} | {row['seed']} | {row['complete']} / {row['pruned']} ({row['diverged']}) | "
            f"{row['epochs_spent']} "
            f"({row['epochs_if_unpruned']}) | {row['best_val_accuracy']:.4f} | "
            f"{row['best_learning_rate']:.3g}, {row['best_epochs']} | {row['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
