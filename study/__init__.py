"""The MNIST activation study: configurations, data, model, training and comparison (no MLflow here)."""

import importlib.util
import os

# Keras runs this small MLP about twice as fast on JAX as on TensorFlow on a 2-core CPU
# (benchmarks/README.md). A user's own KERAS_BACKEND wins; models load on either backend.
if importlib.util.find_spec("jax") is not None:
    os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
