"""MNIST: load from a file or Keras's downloader, validate it, split off validation, scale.

Validation is a fixed, seeded tenth of the training set (6,000 of MNIST's 60,000 images; a tenth of a
smaller file's); the test set is kept apart and only used for each model's final evaluation.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MNIST_ENV = "MNIST_NPZ"
VALIDATION_FRACTION = 10  # one image in ten: 6,000 of 60,000
MIN_TRAIN_IMAGES = 20
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """The data source is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class RawMnist:
    """The four arrays as stored: uint8 images (N, 28, 28) and uint8/int labels (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class Dataset:
    """Model-ready arrays: float32 pixels in [0, 1] flattened to 784, one-hot float32 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def test_labels(self) -> np.ndarray:
        return self.y_test.argmax(axis=1)

    def test_only(self) -> Dataset:
        """The same test set with empty training and validation arrays: lets ~190 MB go before the test pass."""
        empty = {name: getattr(self, name)[:0].copy() for name in ("x_train", "y_train", "x_val", "y_val")}
        return Dataset(**empty, x_test=self.x_test, y_test=self.y_test)


def resolve_source(data: str) -> str:
    """`auto` -> $MNIST_NPZ if set, else `keras`; anything else is a path to an .npz file."""
    if data == "auto":
        return os.environ.get(MNIST_ENV) or "keras"
    return data


def load_raw(data: str = "auto") -> RawMnist:
    """Load and validate MNIST from `data` (see `resolve_source`)."""
    source = resolve_source(data)
    if source == "keras":
        log.info("Loading MNIST with Keras's downloader (set %s to use a local file)", MNIST_ENV)
        try:
            import keras

            (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        except Exception as error:  # network down, no cache: say what to do instead
            raise DataError(
                f"data: could not download MNIST with Keras ({error.__class__.__name__}: {error}); "
                f"pass data=<path to mnist.npz> or set {MNIST_ENV}"
            ) from None
        raw = RawMnist(x_train, y_train, x_test, y_test)
        validate(raw, "keras download")
        return raw
    return load_npz(source)


def load_npz(path: str | os.PathLike[str]) -> RawMnist:
    """Read an .npz with keys x_train, y_train, x_test, y_test; never unpickles anything."""
    file = Path(path)
    label = f"data file {str(path)!r}"
    if not file.exists():
        raise DataError(f"{label}: no such file; pass a path to an .npz file or data=auto")
    if file.is_dir():
        raise DataError(f"{label}: is a directory; pass a path to an .npz file")
    if file.stat().st_size == 0:
        raise DataError(f"{label}: is empty; expected an .npz file with keys {', '.join(REQUIRED_KEYS)}")
    with open(file, "rb") as handle:
        magic = handle.read(6)
    if magic == b"\x93NUMPY":
        raise DataError(f"{label}: is a single .npy array, expected an .npz archive")
    if not zipfile.is_zipfile(file):
        raise DataError(f"{label}: not a readable .npz file (not a zip archive)")
    try:  # NumPy reads a member's bytes without checking its CRC: damaged pixels would load as valid ones
        with zipfile.ZipFile(file) as archive:
            damaged = archive.testzip()
    except (OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as error:
        raise DataError(f"{label}: not a readable .npz file ({error.__class__.__name__}: {error})") from None
    if damaged:
        raise DataError(f"{label}: not a readable .npz file ({damaged} is damaged: its checksum does not match)")
    try:
        with np.load(file, allow_pickle=False) as archive:
            missing = [key for key in REQUIRED_KEYS if key not in archive.files]
            if missing:
                raise DataError(f"{label}: missing key(s) {', '.join(missing)}; required: {', '.join(REQUIRED_KEYS)}")
            arrays = {key: archive[key] for key in REQUIRED_KEYS}
    except DataError:
        raise
    except ValueError as error:
        if "allow_pickle" in str(error) or "pickle" in str(error).lower():
            raise DataError(
                f"{label}: holds an object array that would need unpickling; only plain numeric arrays are accepted"
            ) from None
        raise DataError(f"{label}: not a readable .npz file ({error})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{label}: not a readable .npz file ({error.__class__.__name__}: {error})") from None
    raw = RawMnist(**arrays)
    validate(raw, label)
    return raw


def validate(raw: RawMnist, label: str) -> None:
    """Check shapes, dtypes, lengths, label range and pixel range; raise DataError on the first fault."""
    for split in ("train", "test"):
        images: np.ndarray = getattr(raw, f"x_{split}")
        labels: np.ndarray = getattr(raw, f"y_{split}")
        if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
            raise DataError(f"{label}: x_{split} has shape {images.shape}; expected (N, 28, 28)")
        if labels.ndim != 1:
            raise DataError(f"{label}: y_{split} has shape {labels.shape}; expected (N,)")
        if len(images) == 0:
            raise DataError(f"{label}: x_{split} is empty; expected at least one image")
        if len(images) != len(labels):
            raise DataError(f"{label}: x_{split} has {len(images)} images but y_{split} has {len(labels)} labels")
        if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
            raise DataError(f"{label}: x_{split} holds NaN or infinite pixels; expected uint8 pixels 0..255")
        if images.dtype != np.uint8:
            raise DataError(f"{label}: x_{split} has dtype {images.dtype}; expected uint8 (pixels 0..255)")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{label}: y_{split} has dtype {labels.dtype}; expected integer labels 0..9")
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise DataError(f"{label}: y_{split} has labels in {labels.min()}..{labels.max()}; expected 0..9")
    if len(raw.x_train) < MIN_TRAIN_IMAGES:
        raise DataError(
            f"{label}: x_train has {len(raw.x_train)} images; need at least {MIN_TRAIN_IMAGES} "
            "(a tenth is split off for validation)"
        )


def prepare(raw: RawMnist, seed: int) -> Dataset:
    """Split a seeded validation tenth off the training set, scale pixels, one-hot the labels."""
    validation_size = len(raw.x_train) // VALIDATION_FRACTION
    order = np.random.default_rng(seed).permutation(len(raw.x_train))
    val_index, train_index = order[:validation_size], order[validation_size:]
    return Dataset(
        x_train=scale(raw.x_train[train_index]),
        y_train=one_hot(raw.y_train[train_index]),
        x_val=scale(raw.x_train[val_index]),
        y_val=one_hot(raw.y_train[val_index]),
        x_test=scale(raw.x_test),
        y_test=one_hot(raw.y_test),
    )


def scale(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 784) in [0, 1], divided in place (no second float copy)."""
    scaled = images.reshape(len(images), -1).astype(np.float32)
    scaled /= 255.0
    return scaled


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype=np.float32)[labels.astype(np.int64)]


def subset(raw: RawMnist, train: int, test: int) -> RawMnist:
    """The first `train` / `test` examples: small slices of the real data for tests and smoke runs."""
    return RawMnist(raw.x_train[:train], raw.y_train[:train], raw.x_test[:test], raw.y_test[:test])
