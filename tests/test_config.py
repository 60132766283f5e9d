"""The configuration grid and its validation."""

import math

import pytest

from study.config import ACTIVATIONS, LOSSES, ConfigError, TrainConfig, config_names, grid, parse_config_name


def test_grid_is_every_activation_times_every_loss():
    configs = grid(epochs=3, batch_size=64, learning_rate=0.01, seed=7)
    assert len(configs) == len(ACTIVATIONS) * len(LOSSES) == 6
    assert {(c.activation, c.loss) for c in configs} == {
        (activation, loss) for activation in ACTIVATIONS for loss in LOSSES
    }
    assert all((c.epochs, c.batch_size, c.learning_rate, c.seed) == (3, 64, 0.01, 7) for c in configs)
    assert config_names() == [
        "tanh-crossentropy",
        "sigmoid-crossentropy",
        "relu-crossentropy",
        "tanh-hinge",
        "sigmoid-hinge",
        "relu-hinge",
    ]


def test_params_are_what_the_issue_names():
    params = TrainConfig("relu", "hinge").params()
    assert params == {
        "activation": "relu",
        "loss": "hinge",
        "epochs": 20,
        "batch_size": 32,
        "learning_rate": 0.001,
        "seed": 0,
        "optimizer": "adam",
        "hidden_units": "128,64",
    }
    assert TrainConfig("relu", "hinge").keras_loss == "categorical_hinge"
    assert TrainConfig("relu", "crossentropy").keras_loss == "categorical_crossentropy"


def test_config_is_frozen_and_hash_tracks_every_field():
    config = TrainConfig("tanh", "crossentropy")
    with pytest.raises(AttributeError):
        config.epochs = 3  # type: ignore[misc]
    assert config.config_hash() == TrainConfig("tanh", "crossentropy").config_hash()
    assert config.config_hash() != config.with_seed(1).config_hash()
    assert config.config_hash() != TrainConfig("tanh", "crossentropy", epochs=19).config_hash()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("activation", "softplus", "activation: 'softplus' is not allowed; choose one of tanh, sigmoid, relu"),
        ("loss", "mse", "loss: 'mse' is not allowed; choose one of crossentropy, hinge"),
        ("epochs", 0, "epochs: 0 is out of range; must be >= 1"),
        ("batch_size", -1, "batch_size: -1 is out of range; must be >= 1"),
        ("learning_rate", 0.0, "learning_rate: 0.0 is not allowed"),
        ("learning_rate", math.nan, "learning_rate: nan is not allowed"),
        ("learning_rate", math.inf, "learning_rate: inf is not allowed"),
        ("seed", -3, "seed: -3 is out of range"),
        ("epochs", 2.5, "epochs: 2.5 is not an integer"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(field, value, message):
    settings = {"activation": "relu", "loss": "hinge", field: value}
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**settings)


def test_config_names_parse_and_unknown_names_are_refused():
    assert parse_config_name("relu-hinge") == ("relu", "hinge")
    with pytest.raises(ConfigError, match="unknown configuration 'relu-mse'.*relu-hinge"):
        parse_config_name("relu-mse")
