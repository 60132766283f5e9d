"""The exercise's network: Dense(128, act) -> Dense(64, act) -> Dense(10, softmax), trained with Adam."""

from __future__ import annotations

import keras

from study.config import HIDDEN_UNITS, TrainConfig
from study.data import IMAGE_SHAPE, NUM_CLASSES

INPUT_SIZE = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]  # models take flattened 784-pixel rows in [0, 1]


def build_model(config: TrainConfig, steps_per_execution: int = 1) -> keras.Model:
    """A compiled model for `config` (weights drawn from Keras's global seed, see `set_random_seed`).

    `steps_per_execution` > 1 runs several optimizer steps per compiled call: the same arithmetic,
    far less per-batch Python overhead.
    """
    layers = [keras.Input(shape=(INPUT_SIZE,), name="pixels")]
    layers += [
        keras.layers.Dense(units, activation=config.activation, name=f"hidden_{index}")
        for index, units in enumerate(HIDDEN_UNITS, start=1)
    ]
    layers.append(keras.layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities"))
    model = keras.Sequential(layers, name=f"mlp_{config.activation}_{config.loss}")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=float(config.learning_rate)),
        loss=config.keras_loss,
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model
