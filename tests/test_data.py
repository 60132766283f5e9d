"""Loading, validating and splitting MNIST: every malformation is a clear DataError."""

from pathlib import Path

import numpy as np
import pytest

from study.data import DataError, load_npz, load_raw, prepare, subset


@pytest.fixture(scope="module")
def good(mnist_path):
    raw = load_npz(mnist_path)
    return subset(raw, 200, 50)


def save(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


def arrays_of(raw, **changes):
    arrays = {"x_train": raw.x_train, "y_train": raw.y_train, "x_test": raw.x_test, "y_test": raw.y_test}
    arrays.update(changes)
    return {key: value for key, value in arrays.items() if value is not None}


def test_real_mnist_loads_and_splits(mnist_path):
    raw = load_npz(mnist_path)
    assert raw.x_train.shape == (60000, 28, 28) and raw.x_test.shape == (10000, 28, 28)
    assert list(raw.y_train[:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    data = prepare(raw, seed=0)
    assert data.x_train.shape == (54000, 784) and data.x_val.shape == (6000, 784)
    assert data.x_test.shape == (10000, 784) and data.y_test.shape == (10000, 10)
    assert data.x_train.dtype == np.float32 and 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert np.array_equal(data.y_val.sum(axis=1), np.ones(6000))


def test_validation_split_is_seeded_and_disjoint(good):
    first, again, other = prepare(good, seed=0), prepare(good, seed=0), prepare(good, seed=1)
    assert np.array_equal(first.x_val, again.x_val)
    assert not np.array_equal(first.x_val, other.x_val)
    train_rows = {row.tobytes() for row in first.x_train}
    assert not any(row.tobytes() in train_rows for row in first.x_val)
    assert len(first.x_train) + len(first.x_val) == 200


def test_auto_uses_the_environment_variable(monkeypatch, mnist_path):
    monkeypatch.setenv("MNIST_NPZ", str(mnist_path))
    assert load_raw("auto").x_test.shape == (10000, 28, 28)


MALFORMED = {
    "missing key": (lambda raw: arrays_of(raw, y_test=None), "missing key(s) y_test"),
    "wrong image shape": (lambda raw: arrays_of(raw, x_train=raw.x_train.reshape(200, 784)), "expected (N, 28, 28)"),
    "wrong label shape": (lambda raw: arrays_of(raw, y_test=raw.y_test.reshape(50, 1)), "expected (N,)"),
    "wrong image dtype": (lambda raw: arrays_of(raw, x_train=raw.x_train.astype(np.float32)), "expected uint8"),
    "NaN pixels": (
        lambda raw: arrays_of(raw, x_test=np.full((50, 28, 28), np.nan, dtype=np.float32)),
        "x_test holds NaN or infinite pixels; expected uint8 pixels 0..255",
    ),
    "float labels": (lambda raw: arrays_of(raw, y_train=raw.y_train.astype(float)), "expected integer labels"),
    "length mismatch": (lambda raw: arrays_of(raw, y_train=raw.y_train[:150]), "200 images but y_train has 150"),
    "labels out of range": (lambda raw: arrays_of(raw, y_test=raw.y_test + 5), "expected 0..9"),
    "negative labels": (lambda raw: arrays_of(raw, y_test=raw.y_test.astype(np.int64) - 10), "expected 0..9"),
    "empty arrays": (
        lambda raw: arrays_of(raw, x_test=np.zeros((0, 28, 28), np.uint8), y_test=np.zeros(0, np.uint8)),
        "x_test is empty",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_arrays_are_refused(case, good, tmp_path):
    make, message = MALFORMED[case]
    path = save(tmp_path, **make(good))
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        load_npz(path)
    assert str(path) in str(error.value)


def test_broken_files_are_refused(good, tmp_path):
    missing = tmp_path / "nope.npz"
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    not_zip = tmp_path / "text.npz"
    not_zip.write_text("hello, not a zip file\n" * 10)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(save(tmp_path, **arrays_of(good)).read_bytes()[:3000])
    objects = tmp_path / "objects.npz"
    np.savez(objects, **arrays_of(good, y_train=np.array([{"label": 1}] * 200, dtype=object)))
    single = tmp_path / "single.npy"
    np.save(single, good.x_train)
    cases = {
        missing: "no such file",
        tmp_path: "is a directory",
        empty: "is empty",
        not_zip: "not a readable .npz file",
        truncated: "not a readable .npz file",
        objects: "object array that would need unpickling",
        single: "single .npy array",
    }
    for path, message in cases.items():
        with pytest.raises(DataError, match=message):
            load_npz(path)
