"""Digits from image files or arrays, prepared the MNIST way for the model (no MLflow here).

The model takes float32 rows of 784 pixels in [0, 1], a white digit on a black background. An image
file is turned into that by:
1. grayscale via Pillow (transparent areas count as white paper, EXIF rotation applied);
2. inversion when it is dark ink on light paper (the mean of its border pixels is bright);
3. for anything that is not already 28x28, MNIST's own normalisation: remove the background level,
   crop to the digit, fit it in a 20x20 box (aspect kept) and centre its centre of mass in 28x28;
4. scaling to [0, 1].
Arrays (.npy, .npz) are taken as MNIST images as they are: (N, 28, 28), (28, 28) or (N, 784).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from study.data import IMAGE_SHAPE, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
ARRAY_EXTENSIONS = (".npz", ".npy")
NPZ_KEY = "x_test"  # an .npz like mnist.npz: its test images; else its only (or first) array
DIGIT_BOX = 20  # MNIST fits each digit in 20x20 and centres it by mass in 28x28
INK_THRESHOLD = 0.2  # a pixel is ink (for cropping) above this fraction of the brightest one
INPUT_SIZE = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]


class InputError(DataError):
    """The input is missing or unusable as a whole; the message names it and what is accepted."""


class ImageReadError(ValueError):
    """One file could not be read as an image; the others can still be classified."""


@dataclass
class Digits:
    """What was read from an input: one name and one 784-pixel row per image, and the files that failed."""

    names: list[str] = field(default_factory=list)
    pixels: np.ndarray = field(default_factory=lambda: np.zeros((0, INPUT_SIZE), np.float32))
    problems: list[str] = field(default_factory=list)


def read_input(path: str | Path) -> Digits:
    """An image file, a folder of images, or an .npz/.npy array of 28x28 images -> model-ready rows.

    Raises InputError when the input is missing or holds nothing usable; a folder's unreadable files
    are listed in `problems` while the rest are read.
    """
    source = Path(path)
    if not source.exists():
        raise InputError(f"input: {str(path)!r} does not exist; {_accepted()}")
    if source.is_dir():
        return _read_folder(source)
    suffix = source.suffix.lower()
    if suffix in ARRAY_EXTENSIONS:
        images = read_array_file(source)
        names = [f"{source.name}[{index}]" for index in range(len(images))]
        return Digits(names=names, pixels=to_rows(images))
    if suffix not in IMAGE_EXTENSIONS:
        raise InputError(f"input: {str(path)!r} has an unsupported extension {source.suffix!r}; {_accepted()}")
    try:
        image = read_image_file(source)
    except ImageReadError as error:
        raise InputError(f"input: {error}") from None
    return Digits(names=[source.name], pixels=to_rows(image[None]))


def _accepted() -> str:
    kinds = "/".join(extension.lstrip(".").upper() for extension in IMAGE_EXTENSIONS)
    return f"pass a {kinds} image of a digit, a folder of them, or an .npz/.npy array of 28x28 images"


def _read_folder(folder: Path) -> Digits:
    files = sorted(
        file
        for file in folder.iterdir()
        if file.is_file() and not file.name.startswith(".") and file.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise InputError(f"input: folder {str(folder)!r} has no image files; {_accepted()}")
    digits = Digits()
    images = []
    for file in files:
        try:
            images.append(read_image_file(file))
        except ImageReadError as error:
            digits.problems.append(str(error))
            continue
        digits.names.append(file.name)
    if not images:
        raise InputError(f"input: none of the {len(files)} image file(s) in {str(folder)!r} could be read")
    digits.pixels = to_rows(np.stack(images))
    return digits


def read_image_file(path: Path) -> np.ndarray:
    """One image file -> uint8 (28, 28), white digit on black; ImageReadError if it is not a readable image."""
    try:
        with Image.open(path) as image:
            image.load()
            return prepare_image(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = str(error).split("\n")[0] or error.__class__.__name__
        raise ImageReadError(f"{path.name}: not a readable image ({reason})") from None


def prepare_image(image: Image.Image) -> np.ndarray:
    """A Pillow image -> uint8 (28, 28) the MNIST way (see the module docstring)."""
    gray = _grayscale(image)
    if _border(gray).mean() > 127:  # dark digit on light paper: MNIST is the other way round
        gray = 255 - gray
    if gray.shape == IMAGE_SHAPE:
        return gray
    return _normalize_like_mnist(gray)


def _grayscale(image: Image.Image) -> np.ndarray:
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        return (np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, image.convert("RGBA"))
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _border(gray: np.ndarray) -> np.ndarray:
    """The pixels of a frame about 1/14 of the image wide (2 pixels on 28x28)."""
    width = max(1, min(gray.shape) // 14)
    return np.concatenate(
        [gray[:width].ravel(), gray[-width:].ravel(), gray[:, :width].ravel(), gray[:, -width:].ravel()]
    )


def _normalize_like_mnist(gray: np.ndarray) -> np.ndarray:
    """Remove the background, crop to the ink, fit in 20x20, centre the mass in 28x28."""
    ink = np.clip(gray.astype(np.float32) - float(np.median(_border(gray))), 0, None)
    if ink.max() <= 0:
        return np.zeros(IMAGE_SHAPE, np.uint8)  # a blank page
    ink *= 255.0 / ink.max()
    rows = np.flatnonzero((ink > INK_THRESHOLD * 255).any(axis=1))
    columns = np.flatnonzero((ink > INK_THRESHOLD * 255).any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    scale = DIGIT_BOX / max(crop.shape)
    height, width = (max(1, round(size * scale)) for size in crop.shape)
    resized = Image.fromarray(crop.astype(np.uint8)).resize((width, height), Image.Resampling.LANCZOS)
    box = np.asarray(resized, dtype=np.float32)
    total = box.sum() or 1.0
    centre_row = (box.sum(axis=1) * np.arange(height)).sum() / total
    centre_column = (box.sum(axis=0) * np.arange(width)).sum() / total
    top = int(np.clip(round(IMAGE_SHAPE[0] / 2 - centre_row), 0, IMAGE_SHAPE[0] - height))
    left = int(np.clip(round(IMAGE_SHAPE[1] / 2 - centre_column), 0, IMAGE_SHAPE[1] - width))
    canvas = np.zeros(IMAGE_SHAPE, np.float32)
    canvas[top : top + height, left : left + width] = box
    return np.clip(canvas, 0, 255).round().astype(np.uint8)


def read_array_file(path: Path) -> np.ndarray:
    """An .npy, or an .npz's `x_test` (else its only/first array) -> (N, 28, 28); never unpickles."""
    label = f"input {str(path)!r}"
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                if not loaded.files:
                    raise InputError(f"{label}: the .npz archive holds no arrays")
                key = NPZ_KEY if NPZ_KEY in loaded.files else loaded.files[0]
                images = loaded[key]
        else:
            images = np.asarray(loaded)
    except InputError:
        raise
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise InputError(
                f"{label}: not a plain .npy/.npz array (reading it would need unpickling, which is not allowed)"
            ) from None
        raise InputError(f"{label}: not a readable .npy/.npz file ({error})") from None
    except (OSError, EOFError) as error:
        raise InputError(f"{label}: not a readable .npy/.npz file ({error.__class__.__name__}: {error})") from None
    return check_images(images, label)


def check_images(images: np.ndarray, label: str) -> np.ndarray:
    """Accept (N, 28, 28), (28, 28) or (N, 784) pixels, 0..255 (or floats already in [0, 1])."""
    if images.shape == IMAGE_SHAPE:
        images = images[None]
    elif images.ndim == 2 and images.shape[1] == INPUT_SIZE:
        images = images.reshape(-1, *IMAGE_SHAPE)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE or len(images) == 0:
        raise InputError(f"{label}: array has shape {images.shape}; expected (N, 28, 28), (28, 28) or (N, 784)")
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise InputError(f"{label}: array has dtype {images.dtype}; expected integer or float pixels")
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise InputError(f"{label}: array holds NaN or infinite pixels")
    if images.min() < 0 or images.max() > 255:
        raise InputError(f"{label}: pixels range {images.min()}..{images.max()}; expected 0..255 (or 0..1)")
    if np.issubdtype(images.dtype, np.floating) and images.max() <= 1.0:
        return (images * 255.0).astype(np.float32)  # already scaled: keep the precision
    return images.astype(np.float32)


def to_rows(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) pixels 0..255 -> float32 (N, 784) in [0, 1]: the model's input signature."""
    return (np.asarray(images, dtype=np.float32).reshape(len(images), INPUT_SIZE) / 255.0).astype(np.float32)
