"""`optimize`: Optuna studies per configuration, tracked in MLflow, resumable, shared by many workers.

Unit tests need no training; the rest train on small slices of the real MNIST for 1-2 epochs.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import PROJECT, run_cli
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState

from study.config import ConfigError, TrainConfig, config_names
from study.objective import (
    DIVERGED_ATTR,
    EPOCHS_RUN_ATTR,
    LEARNING_RATE_HIGH,
    LEARNING_RATE_LOW,
    REASON_ATTR,
    OptimizeSettings,
    SearchSpace,
    make_objective,
    make_pruner,
    make_sampler,
    parse_configs,
    report_and_check,
    run_trial,
)

EPOCHS_DISTRIBUTION = IntDistribution(5, 40)
LEARNING_RATE_DISTRIBUTION = FloatDistribution(LEARNING_RATE_LOW, LEARNING_RATE_HIGH, log=True)


# --- Unit: search space, sampler, pruning, settings ----------------------------------------------


@pytest.mark.parametrize(("max_epochs", "low"), [(40, 5), (5, 5), (3, 3), (1, 1)])
def test_search_space_bounds(max_epochs, low):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    space = SearchSpace(max_epochs)
    drawn = []
    for _ in range(60):
        trial = study.ask()
        drawn.append(space.suggest(trial))
        study.tell(trial, 0.5)
    assert trial.distributions == {
        "learning_rate": LEARNING_RATE_DISTRIBUTION,
        "epochs": IntDistribution(low, max_epochs),
    }
    rates = np.array([params["learning_rate"] for params in drawn])
    epochs = {params["epochs"] for params in drawn}
    assert rates.min() >= 1e-4 and rates.max() <= 1e-1
    assert (rates < 1e-3).any() and (rates > 1e-2).any(), "log-uniform: every decade is drawn"
    assert min(epochs) >= low and max(epochs) <= max_epochs


def test_sampler_is_seeded_per_trial_number():
    """Same (seed, trial number) -> same draw in any process; a resumed study never replays trial 0's draw."""

    def first_draw(seed: int, number: int) -> dict:
        study = optuna.create_study(direction="maximize", sampler=make_sampler(seed, number))
        return SearchSpace(40).suggest(study.ask())

    assert first_draw(0, 3) == first_draw(0, 3)
    draws = [first_draw(0, number) for number in range(5)]
    assert len({draw["learning_rate"] for draw in draws}) == 5
    assert first_draw(1, 0) != first_draw(0, 0)


def _completed(values_by_epoch: dict[int, float]) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        params={"learning_rate": 1e-3, "epochs": 10},
        distributions={"learning_rate": LEARNING_RATE_DISTRIBUTION, "epochs": EPOCHS_DISTRIBUTION},
        value=values_by_epoch[max(values_by_epoch)],
        intermediate_values=values_by_epoch,
    )


def test_median_pruning_decision_on_a_synthetic_history():
    study = optuna.create_study(direction="maximize", pruner=make_pruner())
    # Five complete trials: at epoch 2 their validation accuracies are 0.90, 0.91, ... 0.94 (median 0.92).
    for offset in range(5):
        study.add_trial(_completed({1: 0.80 + offset / 100, 2: 0.90 + offset / 100, 3: 0.95}))

    weak = study.ask()
    assert report_and_check(weak, 1, 0.50) is False, "epoch 1 is warm-up: never pruned"
    assert report_and_check(weak, 2, 0.60) is True, "below the median at epoch 2: pruned"

    strong = study.ask()
    assert report_and_check(strong, 1, 0.50) is False
    assert report_and_check(strong, 2, 0.93) is False, "above the median: goes on"

    early = optuna.create_study(direction="maximize", pruner=make_pruner())
    for _ in range(4):  # fewer than 5 complete trials: nothing is pruned yet
        early.add_trial(_completed({1: 0.9, 2: 0.95}))
    assert report_and_check(early.ask(), 2, 0.10) is False


def test_settings_and_config_names_are_validated(tmp_path):
    assert parse_configs("all") == tuple(config_names())
    assert parse_configs(" relu-hinge,tanh-crossentropy,relu-hinge") == ("relu-hinge", "tanh-crossentropy")
    for bad in ("relu", "relu-mse", "softplus-hinge", ",", "relu-hinge,,x"):
        with pytest.raises(ConfigError, match="configs: "):
            parse_configs(bad)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    OptimizeSettings(configs=("relu-hinge",), storage=storage)
    bad_settings = [
        ({"n_trials": 0}, "n_trials: 0 is out of range"),
        ({"max_epochs": 0}, "max_epochs: 0 is out of range"),
        ({"batch_size": 0}, "batch_size: 0 is out of range"),
        ({"timeout": -1}, "timeout: -1 is out of range"),
        ({"seed": -1}, "seed: -1 is out of range"),
        ({"storage": "mysql://host/db"}, "storage: 'mysql' is not supported"),
        ({"storage": "sqlite://"}, "storage: 'sqlite://' is in memory"),
        ({"storage": "postgresql://host"}, "names no database"),
        ({"study_prefix": "a b"}, "study_prefix: 'a b' is not allowed"),
        ({"configs": ()}, "configs: no configuration"),
    ]
    for changes, message in bad_settings:
        with pytest.raises(ConfigError, match=message):
            OptimizeSettings(**{"configs": ("relu-hinge",), "storage": storage, **changes})


BAD_OPTIMIZE_INPUT = [
    (["--configs", "relu-mse"], "argument --configs: configs: unknown configuration 'relu-mse'"),
    (["--n-trials", "0"], "n_trials: 0 is out of range; must be >= 1"),
    (["--max-epochs", "two"], "max_epochs: 'two' is not an integer"),
    (["--timeout", "-5"], "timeout: -5 is out of range; must be >= 0"),
    (["--storage", "mongodb://host/db"], "storage: 'mongodb' is not supported"),
    (["--storage", "not a url"], "storage: 'not a url' is not a database URL"),
    (["--storage", "sqlite:////no/such/folder/optuna.db"], "storage: folder '/no/such/folder' of"),
    (["--storage", "postgresql://postgres@127.0.0.1:1/none"], "storage: could not open postgresql://"),
    (["--study-prefix", "x/y"], "study_prefix: 'x/y' is not allowed"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_OPTIMIZE_INPUT, ids=[" ".join(a) for a, _ in BAD_OPTIMIZE_INPUT])
def test_bad_optimize_input_is_exit_2_with_one_line(arguments, message, small_mnist, tracking_uri, capsys):
    from study.cli import main

    code = main(["optimize", "--data", str(small_mnist), *arguments])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr, stderr
    assert not Path(tracking_uri.removeprefix("sqlite:///")).exists(), "no run may start on bad input"


# --- NaN handling and interruption (in this process, real training) -----------------------------


def _nan_data(small_mnist: Path):
    from study.data import load_raw, prepare, subset

    data = prepare(subset(load_raw(str(small_mnist)), 600, 100), seed=0)
    data.x_train[:] = np.nan  # every forward pass is NaN: the loss is NaN from the first batch
    return data


def test_nan_loss_ends_the_trial_pruned_with_the_reason_and_the_study_goes_on(small_mnist, tracking_uri):
    import mlflow

    from tracking import keys
    from tracking.optimize import TrialRuns

    study = optuna.create_study(direction="maximize", study_name="nan", pruner=make_pruner())
    experiment_id = mlflow.create_experiment("nan-test")
    with mlflow.start_run(experiment_id=experiment_id) as parent, TrialRuns(experiment_id, parent.info.run_id) as runs:
        objective = make_objective(TrainConfig("relu", "crossentropy"), _nan_data(small_mnist), SearchSpace(3), runs)
        outcome = run_trial(study, study.ask(), objective, runs)  # returns: the study goes on

    trial = study.trials[0]
    assert outcome.state == trial.state == TrialState.PRUNED
    assert trial.user_attrs[DIVERGED_ATTR] is True
    assert trial.user_attrs[EPOCHS_RUN_ATTR] == 1
    assert trial.user_attrs[REASON_ATTR].startswith("diverged: loss became nan at epoch 1")
    assert 1 in trial.intermediate_values, "reported, so TPE ranks it at the epoch it broke"
    (run,) = mlflow.search_runs([experiment_id], f"tags.`{keys.OPTUNA_STUDY_TAG}` = 'nan'", output_format="list")
    assert run.info.status == "KILLED", "a pruned trial's run must not look like a success"
    assert run.data.tags[keys.OPTUNA_TRIAL_STATE_TAG] == "PRUNED"
    assert run.data.tags[keys.OPTUNA_REASON_TAG] == trial.user_attrs[REASON_ATTR]
    assert run.data.tags[keys.DIVERGED_TAG] == "true"
    assert math.isnan(run.data.metrics["train_loss"])


def test_sigterm_ends_the_current_trial_as_fail_and_its_run_killed(small_mnist, tracking_uri, tmp_path):
    """A real SIGTERM to this process mid-trial: the epoch ends, then Optuna FAIL, trial and parent runs KILLED."""
    import mlflow

    from tracking import keys
    from tracking.optimize import MLFLOW_RUN_ID_ATTR, run_optimize

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    settings = OptimizeSettings(
        configs=("relu-crossentropy",), n_trials=1, max_epochs=40, storage=storage, data=str(small_mnist)
    )
    inside = threading.Event()
    stop_polling = threading.Event()

    def terminate_after_first_epoch() -> None:
        client = mlflow.MlflowClient()
        while not stop_polling.wait(0.2):
            for experiment in client.search_experiments():
                for run in client.search_runs([experiment.experiment_id], "metrics.val_accuracy >= 0"):
                    if run.info.status == "RUNNING" and keys.OPTUNA_TRIAL_NUMBER_TAG in run.data.tags:
                        if inside.is_set():
                            os.kill(os.getpid(), signal.SIGTERM)
                        return

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # safety net if the signal came late
    previous_interrupt = signal.getsignal(signal.SIGINT)
    poller = threading.Thread(target=terminate_after_first_epoch, daemon=True)
    try:
        inside.set()
        poller.start()
        with pytest.raises(KeyboardInterrupt):
            run_optimize(settings, experiment="sigterm-test")
    finally:
        inside.clear()
        stop_polling.set()
        poller.join()
        signal.signal(signal.SIGTERM, previous)

    (trial,) = optuna.load_study(study_name="mnist-relu-crossentropy", storage=storage).trials
    assert trial.state == TrialState.FAIL
    epochs_run = trial.user_attrs[EPOCHS_RUN_ATTR]
    assert 1 <= epochs_run < trial.params["epochs"], "stopped at the end of the epoch the signal came in"
    assert trial.user_attrs[REASON_ATTR] == (
        f"interrupted (Ctrl-C or SIGTERM): stopped after epoch {epochs_run} of {trial.params['epochs']}"
    )
    client = mlflow.MlflowClient()
    run = client.get_run(trial.user_attrs[MLFLOW_RUN_ID_ATTR])
    assert run.info.status == "KILLED"
    assert run.data.tags[keys.OPTUNA_TRIAL_STATE_TAG] == "FAIL"
    assert run.data.tags[keys.OPTUNA_REASON_TAG] == trial.user_attrs[REASON_ATTR]
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == epochs_run
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is previous and signal.getsignal(signal.SIGINT) is previous_interrupt


# --- The command end to end: trials, runs, tags, artifacts, resume ------------------------------


def _runs(client, experiment_name: str) -> tuple[list, list]:
    """(parent optimize runs, trial runs) of the experiment."""
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [run for run in runs if run.data.tags.get("entry_point") == "optimize"]
    trials = [run for run in runs if "optuna.trial_number" in run.data.tags]
    return parents, trials


def test_optimize_cli_tracks_every_trial_and_a_rerun_adds_none(small_mnist, tracking_uri, tmp_path):
    import mlflow

    from study.data import load_raw, prepare
    from tracking import keys
    from tracking.optimize import MLFLOW_RUN_ID_ATTR, TEST_EVALUATION_ATTR, TUNED_COLUMNS

    storage = f"sqlite:///{tmp_path / 'studies' / 'optuna.db'}"
    (tmp_path / "studies").mkdir()
    arguments = ["optimize", "--configs", "relu-crossentropy", "--n-trials", "4", "--max-epochs", "2"]
    arguments += ["--data", str(small_mnist), "--storage", storage]
    first = run_cli(*arguments, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": tracking_uri})
    assert first.returncode == 0, first.stderr[-3000:]

    study = optuna.load_study(study_name="mnist-relu-crossentropy", storage=storage)
    trials = study.trials
    assert len(trials) == 4 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert {t.params["epochs"] for t in trials} == {2}

    client = mlflow.MlflowClient()
    (parent,), trial_runs = _runs(client, keys.DEFAULT_EXPERIMENT)
    assert parent.info.status == "FINISHED"
    assert len(trial_runs) == 4, "exactly one MLflow run per trial"
    expected_status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}
    for trial in trials:
        run = client.get_run(trial.user_attrs[MLFLOW_RUN_ID_ATTR])
        tags = run.data.tags
        assert run.info.run_name == f"relu-crossentropy-trial-{trial.number}"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags[keys.OPTUNA_STUDY_TAG] == "mnist-relu-crossentropy"
        assert tags[keys.OPTUNA_TRIAL_NUMBER_TAG] == str(trial.number)
        assert tags[keys.OPTUNA_TRIAL_STATE_TAG] == trial.state.name
        assert run.info.status == expected_status[trial.state.name]
        if trial.state == TrialState.PRUNED:
            assert tags[keys.OPTUNA_REASON_TAG] == trial.user_attrs[REASON_ATTR]
        assert float(run.data.params["learning_rate"]) == pytest.approx(trial.params["learning_rate"])
        assert run.data.params["epochs"] == "2" and run.data.params["activation"] == "relu"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [metric.step for metric in history] == list(range(1, trial.user_attrs[EPOCHS_RUN_ATTR] + 1))
        assert set(keys.EPOCH_METRICS) <= set(run.data.metrics)
        if trial.state == TrialState.COMPLETE:
            assert history[-1].value == pytest.approx(trial.value)

    # The best trial's model was loaded back, evaluated once on the test set and logged as an MLflow model.
    evaluation = study.user_attrs[TEST_EVALUATION_ATTR]
    assert evaluation["trial"] == study.best_trial.number
    best_run = client.get_run(study.best_trial.user_attrs[MLFLOW_RUN_ID_ATTR])
    assert best_run.data.metrics[keys.TEST_ACCURACY] == pytest.approx(evaluation["test_accuracy"])
    data = prepare(load_raw(str(small_mnist)), seed=0)
    probabilities = mlflow.pyfunc.load_model(evaluation["model_uri"]).predict(data.x_test)
    accuracy = float((np.asarray(probabilities).argmax(axis=1) == data.test_labels).mean())
    assert accuracy == pytest.approx(evaluation["test_accuracy"]) and accuracy > 0.5

    # Parent artifacts: tuned_results.csv, summary.md, Optuna's plots.
    folder = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, dst_path=str(tmp_path / "parent")))
    rows = (folder / keys.TUNED_RESULTS_CSV).read_text().splitlines()
    assert rows[0].split(",") == list(TUNED_COLUMNS)
    row = dict(zip(TUNED_COLUMNS, rows[1].split(","), strict=True))
    counts = [sum(t.state == state for t in trials) for state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert row["config"] == "relu-crossentropy" and row["best_trial"] == str(study.best_trial.number)
    assert float(row["best_val_accuracy"]) == pytest.approx(study.best_value)
    assert float(row["test_accuracy"]) == pytest.approx(evaluation["test_accuracy"])
    assert [int(row["trials_complete"]), int(row["trials_pruned"]), int(row["trials_failed"])] == [*counts, 0]
    assert int(row["epochs_spent"]) == sum(t.user_attrs[EPOCHS_RUN_ATTR] for t in trials)
    summary = (folder / keys.SUMMARY_MD).read_text()
    assert "Which activation is best" in summary and "Which loss is best" in summary and "relu-crossentropy" in summary
    plots = folder / keys.OPTUNA_PLOTS_DIR / "relu-crossentropy"
    expected_plots = {keys.OPTIMIZATION_HISTORY_PNG, keys.PARALLEL_COORDINATE_PNG}
    if counts[0] >= 2:
        expected_plots.add(keys.PARAM_IMPORTANCES_PNG)
    assert {path.name for path in plots.iterdir()} == expected_plots
    assert all((plots / name).read_bytes()[:4] == b"\x89PNG" for name in expected_plots)
    assert parent.data.tags[keys.BEST_CONFIG_TAG] == "relu-crossentropy"

    # The same command again: the study is finished, so no trial, no trial run, no second evaluation.
    second = run_cli(*arguments, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": tracking_uri})
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(optuna.load_study(study_name="mnist-relu-crossentropy", storage=storage).trials) == 4
    parents, trial_runs_after = _runs(client, keys.DEFAULT_EXPERIMENT)
    assert len(parents) == 2 and all(run.info.status == "FINISHED" for run in parents)
    assert len(trial_runs_after) == 4
    assert (
        optuna.load_study(study_name="mnist-relu-crossentropy", storage=storage).user_attrs[TEST_EVALUATION_ATTR]
        == evaluation
    )


# --- Many workers on one PostgreSQL storage --------------------------------------------------------

POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432"


@pytest.fixture
def scratch_databases(postgres_databases) -> list[str]:
    """Two throwaway PostgreSQL databases (Optuna's and MLflow's), dropped after the test."""
    return [f"{POSTGRES}/{postgres_databases(f'optimize_test_{kind}')}" for kind in ("optuna", "mlflow")]


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(scratch_databases, mnist_path, tmp_path, monkeypatch):
    import mlflow

    from study.data import load_raw, subset
    from tracking import keys
    from tracking.optimize import MLFLOW_RUN_ID_ATTR

    optuna_url, mlflow_url = scratch_databases
    tiny = tmp_path / "tiny.npz"
    raw = subset(load_raw(str(mnist_path)), 600, 200)
    np.savez(tiny, x_train=raw.x_train, y_train=raw.y_train, x_test=raw.x_test, y_test=raw.y_test)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    mlflow.set_tracking_uri(mlflow_url)
    client = mlflow.MlflowClient()
    client.create_experiment(keys.DEFAULT_EXPERIMENT, artifact_location=str(tmp_path / "artifacts"))

    command = [sys.executable, "-m", "study", "optimize", "--configs", "relu-crossentropy", "--n-trials", "6"]
    command += ["--max-epochs", "1", "--data", str(tiny), "--storage", optuna_url]
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "MLFLOW_TRACKING_URI": mlflow_url}
    workers = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    mlflow.set_tracking_uri(None)
    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-3000:]

    mlflow.set_tracking_uri(mlflow_url)
    try:
        trials = optuna.load_study(study_name="mnist-relu-crossentropy", storage=optuna_url).trials
        assert sorted(t.number for t in trials) == list(range(6)), "exactly n_trials trials, none twice"
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        parents, trial_runs = _runs(client, keys.DEFAULT_EXPERIMENT)
        assert len(parents) == 2 and all(run.info.status == "FINISHED" for run in parents)
        assert sorted(int(run.data.tags[keys.OPTUNA_TRIAL_NUMBER_TAG]) for run in trial_runs) == list(range(6))
        assert {t.user_attrs[MLFLOW_RUN_ID_ATTR] for t in trials} == {run.info.run_id for run in trial_runs}
        by_parent = {parent.info.run_id: 0 for parent in parents}
        for run in trial_runs:
            by_parent[run.data.tags["mlflow.parentRunId"]] += 1
        assert sum(by_parent.values()) == 6 and min(by_parent.values()) >= 1, "both workers ran trials"
        params = [(t.params["learning_rate"], t.params["epochs"]) for t in trials]
        assert len(set(params)) == 6, "no two trials drew the same parameters"
    finally:
        mlflow.set_tracking_uri(None)
