"""`predict`: load a logged or registered model and classify digit images, one line per image.

The model is loaded with `mlflow.pyfunc.load_model` (any MLflow model URI: `models:/mnist-mlp@champion`,
`models:/mnist-mlp/3`, `runs:/<run id>/model`, a local path); images are prepared by `study.images`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from study.images import Digits, read_input

log = logging.getLogger(__name__)

PARTIAL_FAILURE = 1  # exit code when some files could not be read (the others were classified)
CSV_COLUMNS = ("file", "digit", "probability")


class ModelNotFoundError(LookupError):
    """The model URI names nothing that can be loaded; the message says which and why."""


class OutputPathError(ValueError):
    """The CSV output cannot be written where asked; the message says why."""


@dataclass(frozen=True)
class Prediction:
    file: str
    digit: int
    probability: float


def check_output(output: str | None) -> Path | None:
    """The CSV path to write (None for none); OutputPathError if it cannot be written there."""
    if not output:
        return None
    path = Path(output)
    if path.is_dir():
        raise OutputPathError(f"output: {output!r} is a folder; pass a CSV file path (or nothing for none)")
    if not path.parent.exists():
        raise OutputPathError(f"output: folder {str(path.parent)!r} does not exist; create it or pass another path")
    return path


def load_model(model_uri: str):
    """`mlflow.pyfunc.load_model(model_uri)`, with ModelNotFoundError for a model that is not there."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    from mlflow.exceptions import MlflowException

    if "://" not in model_uri and ":/" not in model_uri and not Path(model_uri).exists():
        raise ModelNotFoundError(f"model: {model_uri!r} is neither an MLflow model URI nor an existing path")
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as error:
        reason = str(error).strip().split("\n")[0]
        raise ModelNotFoundError(
            f"model: could not load {model_uri!r} ({reason}); see `python -m study models` for registered versions"
        ) from None
    except ValueError as error:  # Keras's safe_mode (its default) refuses a model that would run code on loading
        if "safe_mode" not in str(error):
            raise
        raise ModelNotFoundError(
            f"model: {model_uri!r} was refused: loading it would run code stored in it (e.g. a Lambda layer); "
            "only plain Keras models are accepted"
        ) from None


def classify(model, digits: Digits) -> list[Prediction]:
    """Run the model on the prepared rows: the most probable digit of each image and its probability."""
    with contextlib.redirect_stdout(io.StringIO()):  # Keras's progress bar: not among the prediction lines
        probabilities = np.asarray(model.predict(digits.pixels), dtype=np.float64)
    if probabilities.shape != (len(digits.names), 10):
        raise ValueError(f"the model returned shape {probabilities.shape}; expected ({len(digits.names)}, 10)")
    digits_found = probabilities.argmax(axis=1)
    return [
        Prediction(name, int(digit), float(row[digit]))
        for name, digit, row in zip(digits.names, digits_found, probabilities, strict=True)
    ]


def print_predictions(predictions: list[Prediction], stream: TextIO | None = None) -> None:
    """One line per image: file name, predicted digit, probability (to stdout unless `stream`)."""
    stream = stream or sys.stdout
    width = max(len(prediction.file) for prediction in predictions)
    for prediction in predictions:
        print(f"{prediction.file:<{width}}  {prediction.digit}  {prediction.probability:.4f}", file=stream)


def write_csv(predictions: list[Prediction], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        for prediction in predictions:
            writer.writerow([prediction.file, prediction.digit, f"{prediction.probability:.6f}"])


def run_predict(model_uri: str, input_path: str, output: str | None = None) -> int:
    """Read the input, load the model, print (and maybe write) predictions; the process's exit code.

    Bad output path, missing input, and a model that cannot be loaded raise (OutputPathError, InputError,
    ModelNotFoundError) before anything is printed; unreadable files in a folder are reported on stderr
    and give exit code 1 after the readable ones were classified.
    """
    output_path = check_output(output)
    digits = read_input(input_path)
    for problem in digits.problems:
        print(f"skipped {problem}", file=sys.stderr)
    model = load_model(model_uri)
    predictions = classify(model, digits)
    print_predictions(predictions)
    if output_path is not None:
        write_csv(predictions, output_path)
        log.info("Wrote %d prediction(s) to %s", len(predictions), output_path)
    return PARTIAL_FAILURE if digits.problems else 0
