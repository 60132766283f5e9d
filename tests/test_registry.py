"""The model registry: `main` registers each configuration's model, aliases follow validation accuracy,
`models:/mnist-mlp@champion` loads, `python -m study models` lists the versions; against a SQLite store and
against a real `mlflow server` with proxied artifacts."""

from __future__ import annotations

import math
import re
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from registry_support import (
    EXPERIMENT,
    REGISTERED_MODEL,
    RegisteredStore,
    cli_in_process,
    final_val_accuracy,
    last_test_digits,
    save_slice,
)

from study.cli import build_parser
from study.config import TrainConfig
from tracking import keys
from tracking.pipeline import run_study
from tracking.registry import register_version, version_rows
from tracking.runs import ConfigRuns, top_run, use_experiment

pytest_plugins = ["registry_support"]


def test_each_configuration_model_is_a_version_with_its_tags(registered_store: RegisteredStore):
    client = MlflowClient()
    for step, version_number in registered_store.versions.items():
        outcome = registered_store.outcome(step)
        version = client.get_model_version(REGISTERED_MODEL, version_number)
        assert version.tags[keys.VERSION_ACTIVATION_TAG] == outcome.config.activation
        assert version.tags[keys.VERSION_LOSS_TAG] == outcome.config.loss
        assert version.tags[keys.VERSION_SEED_TAG] == str(outcome.config.seed)
        assert version.tags[keys.VERSION_SOURCE_TAG] == "main"
        val_accuracy = float(version.tags[keys.VERSION_VAL_ACCURACY_TAG])
        assert val_accuracy == pytest.approx(final_val_accuracy(outcome), abs=1e-6)
        assert float(version.tags[keys.VERSION_TEST_ACCURACY_TAG]) == pytest.approx(outcome.test_accuracy, abs=1e-6)
        assert outcome.config.name in version.description and "\n" not in version.description
        # Registered from the logged model of the configuration's run, and the run says so.
        run_id = registered_store.run_ids[step]
        assert version.run_id == run_id
        assert version.source.startswith("models:/m-")
        logged = mlflow.get_logged_model(version.source.removeprefix("models:/"))
        assert logged.source_run_id == run_id
        assert client.get_run(run_id).data.tags[keys.REGISTERED_VERSION_TAG] == f"{REGISTERED_MODEL}/{version_number}"
    assert registered_store.versions == {"first": "1", "better": "2", "worse": "3"}


def test_champion_moves_for_a_better_model_and_not_for_a_worse_one(registered_store: RegisteredStore):
    assert registered_store.champion_after == {
        "first": "1",  # the first version becomes champion
        "better": "2",  # a better one takes it
        "worse": "2",  # a worse one does not
    }
    client = MlflowClient()
    first_accuracy = final_val_accuracy(registered_store.outcome("first"))
    better_accuracy = final_val_accuracy(registered_store.outcome("better"))
    decisions = {
        step: client.get_model_version(REGISTERED_MODEL, version).tags[keys.CHAMPION_DECISION_TAG]
        for step, version in registered_store.versions.items()
    }
    assert decisions["first"].startswith("champion: set to version 1")
    assert decisions["better"] == (
        f"champion: moved from version 1 (val_accuracy {first_accuracy:.4f}) "
        f"to version 2 (val_accuracy {better_accuracy:.4f})"
    )
    assert decisions["worse"] == (
        f"champion: stays at version 2 (val_accuracy {better_accuracy:.4f}); "
        f"version 3 has val_accuracy {first_accuracy:.4f}"
    )
    aliases = client.get_registered_model(REGISTERED_MODEL).aliases
    assert {alias: str(version) for alias, version in aliases.items()} == {
        "champion": "2",
        "relu-crossentropy": "2",
        "tanh-hinge": "1",  # version 3 only ties it: the alias stays with the older version
    }


def test_registration_can_be_turned_off(registered_store: RegisteredStore):
    """ConfigRuns(registered_model=None), what `--registered-model none` passes: logged, not registered."""
    outcome = registered_store.models.weaker
    experiment_id = use_experiment(EXPERIMENT)
    with top_run("off", {}) as parent:
        with ConfigRuns(experiment_id, parent.info.run_id, {outcome.config: "off"}, None) as runs:
            run_id = runs.run_id(outcome.config)
            runs.log_outcome(outcome)
    client = MlflowClient()
    assert [output.model_id for output in client.get_run(run_id).outputs.model_outputs]  # the model is logged
    assert keys.REGISTERED_VERSION_TAG not in client.get_run(run_id).data.tags
    assert len(client.search_model_versions(f"name = '{REGISTERED_MODEL}'")) == 3


def test_champion_loads_with_pyfunc_and_keras(registered_store: RegisteredStore, mnist_path: Path):
    images, _ = last_test_digits(mnist_path, 8)
    rows = images.reshape(len(images), -1).astype(np.float32) / 255.0
    expected = keras.saving.load_model(registered_store.models.stronger.model_path).predict(rows, verbose=0)
    uri = f"models:/{REGISTERED_MODEL}@champion"
    through_pyfunc = mlflow.pyfunc.load_model(uri).predict(rows)
    through_keras = mlflow.keras.load_model(uri).predict(rows, verbose=0)
    assert np.asarray(through_pyfunc).shape == (8, 10)
    np.testing.assert_allclose(through_pyfunc, expected, atol=1e-5)
    np.testing.assert_allclose(through_keras, expected, atol=1e-5)


def test_models_command_lists_versions_aliases_and_accuracies(registered_store: RegisteredStore, capsys):
    assert cli_in_process("models") == 0
    lines = capsys.readouterr().out.splitlines()
    by_version = {line.split()[0]: line for line in lines if line.strip() and line.split()[0].isdigit()}
    assert set(by_version) == {"1", "2", "3"}
    assert by_version["2"].rstrip().endswith("champion, relu-crossentropy")
    assert f"{final_val_accuracy(registered_store.models.stronger):.4f}" in by_version["2"]
    assert by_version["1"].rstrip().endswith("tanh-hinge") and "tanh-hinge" in by_version["3"]
    assert re.fullmatch(r"\d\d:\d\d", by_version["3"].split()[-1])  # ends with its time: no alias

    assert cli_in_process("models", "--registered-model", "no-such-model") == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "no registered model named 'no-such-model'" in error and REGISTERED_MODEL in error


def test_register_version_for_optimize_ties_and_diverged_models_never_move_aliases(registered_store: RegisteredStore):
    """`optimize` calls register_version; an equal accuracy keeps the older version, NaN never gets an alias."""
    client = MlflowClient()
    source = client.get_model_version(REGISTERED_MODEL, "2").source
    config = TrainConfig("relu", "crossentropy", epochs=2, seed=1)
    name = "tie-test"
    first = register_version(name, source, config, val_accuracy=0.95, test_accuracy=0.94, source="optimize")
    tie = register_version(name, source, config, val_accuracy=0.95, test_accuracy=0.96, source="optimize")
    diverged = register_version(name, source, config, math.nan, 0.1, source="optimize")
    aliases = client.get_registered_model(name).aliases
    assert {alias: str(version) for alias, version in aliases.items()} == {
        "champion": str(first.version),
        "relu-crossentropy": str(first.version),
    }
    assert "stays at version" in client.get_model_version(name, tie.version).tags[keys.CHAMPION_DECISION_TAG]
    rows = {str(row.version): row for row in version_rows(name)}
    assert rows[str(diverged.version)].source == "optimize" and math.isnan(rows[str(diverged.version)].val_accuracy)
    with pytest.raises(ValueError, match="source"):
        register_version(name, source, config, 0.99, 0.99, source="elsewhere")


def test_run_study_registers_each_configuration(
    tracking_uri: str, tmp_path: Path, mnist_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The `main` pipeline itself, in this process (workers=1) on a tiny slice: one version per configuration."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # another test's experiment, in another store
    data = str(save_slice(mnist_path, tmp_path / "tiny.npz", train=200, test=100))
    config = TrainConfig("tanh", "hinge", epochs=1)
    run_study([config], data, workers=1, experiment="wiring", registered_model="wiring-model")
    client = MlflowClient()
    (version,) = client.search_model_versions("name = 'wiring-model'")
    assert version.tags[keys.VERSION_SOURCE_TAG] == "main" and version.tags[keys.VERSION_ACTIVATION_TAG] == "tanh"
    assert client.get_model_version_by_alias("wiring-model", "champion").version == version.version
    assert client.get_model_version_by_alias("wiring-model", "tanh-hinge").version == version.version
    parent_id = client.get_run(version.run_id).data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).data.params["registered_model"] == "wiring-model"


def test_registered_model_flag(capsys):
    parser = build_parser()
    assert parser.parse_args(["main"]).registered_model == "mnist-mlp"
    assert parser.parse_args(["main", "--registered-model", "none"]).registered_model is None
    assert parser.parse_args(["main", "--registered-model", "digits.v2"]).registered_model == "digits.v2"
    for bad in ("a/b", "x@champion", "", "_lead"):
        assert cli_in_process("main", "--registered-model", bad, "--data", "/nowhere.npz") == 2
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and "registered_model" in error and "none" in error
