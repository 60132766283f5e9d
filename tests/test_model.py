"""The network's shape and a short real training run on a slice of MNIST."""

import keras
import numpy as np
import pytest

from study.config import TrainConfig
from study.data import load_npz, prepare, subset
from study.model import build_model
from study.training import divergence, evaluate, train


@pytest.fixture(scope="module")
def small_data(mnist_path):
    return prepare(subset(load_npz(mnist_path), 3000, 1000), seed=0)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_architecture_is_128_64_10_softmax(activation):
    model = build_model(TrainConfig(activation, "hinge"))
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [128, 64, 10]
    assert [layer.activation.__name__ for layer in dense] == [activation, activation, "softmax"]
    assert model.input_shape == (None, 784)
    assert model.count_params() == 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    probabilities = model.predict(np.random.default_rng(0).random((5, 784), dtype=np.float32), verbose=0)
    assert probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_training_learns_reports_every_epoch_and_is_seeded(small_data):
    config = TrainConfig("relu", "crossentropy", epochs=2, batch_size=32, seed=3)
    seen = []
    result = train(config, small_data, on_epoch=lambda epoch, metrics: seen.append((epoch, metrics)))
    assert [epoch for epoch, _ in seen] == [1, 2]
    assert set(seen[0][1]) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}
    assert result.history["val_accuracy"] == [metrics["val_accuracy"] for _, metrics in seen]
    assert result.best_val_accuracy == max(result.history["val_accuracy"]) > 0.8
    assert not result.diverged
    evaluation = evaluate(result.model, small_data)
    assert evaluation.test_accuracy > 0.8  # chance is 0.1
    assert evaluation.predictions.shape == (1000,)
    again = train(config, small_data)
    np.testing.assert_allclose(again.history["val_loss"], result.history["val_loss"], rtol=1e-5)


@pytest.mark.parametrize("loss", ["crossentropy", "hinge"])
def test_learning_rate_10_is_recorded_as_diverged_and_stops(small_data, loss):
    result = train(TrainConfig("tanh", loss, epochs=5, learning_rate=10.0), small_data)
    assert result.diverged
    assert result.epochs_run == 2
    assert "worse than guessing" in result.stopped_reason


def test_divergence_rules():
    finite = {"train_loss": 0.5, "val_loss": 0.4}
    assert divergence(1, finite, 1.0) == ""
    assert "loss became nan" in divergence(3, {"train_loss": float("nan"), "val_loss": 0.4}, 1.0)
    assert "loss became inf" in divergence(1, {"train_loss": float("inf"), "val_loss": 1.0}, 1.0)
    assert divergence(1, {"train_loss": 3.0, "val_loss": 3.0}, 2.3) == ""  # a slow first epoch is allowed
    assert "worse than guessing" in divergence(2, {"train_loss": 3.0, "val_loss": 3.0}, 2.3)


def test_early_stop_hook_ends_training(small_data):
    config = TrainConfig("tanh", "hinge", epochs=4)
    result = train(config, small_data, should_stop=lambda epoch, metrics: epoch >= 2)
    assert result.epochs_run == 2 and result.stopped_reason == "stopped early after epoch 2"


@pytest.mark.parametrize("restore_best", [True, False])
def test_the_model_holds_the_best_epochs_weights_unless_asked_for_the_last(small_data, restore_best):
    config = TrainConfig("sigmoid", "hinge", epochs=3, learning_rate=0.02, seed=1)
    result = train(config, small_data, restore_best=restore_best)
    predictions = result.model.predict(small_data.x_val, verbose=0).argmax(axis=1)
    val_accuracy = (predictions == small_data.y_val.argmax(axis=1)).mean()
    expected = result.best_val_accuracy if restore_best else result.history["val_accuracy"][-1]
    assert val_accuracy == pytest.approx(expected, abs=1e-6)
    assert result.history["val_accuracy"][result.best_epoch - 1] == result.best_val_accuracy
