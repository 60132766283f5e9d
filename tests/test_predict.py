"""`predict` and serving: real MNIST test digits as PNG (one inverted, one corrupt file), arrays, bad input, and
`mlflow models serve` answering /invocations; against a SQLite store and a real `mlflow server`."""

from __future__ import annotations

import csv
import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from registry_support import (
    REGISTERED_MODEL,
    RegisteredStore,
    cli_in_process,
    free_port,
    last_test_digits,
    save_pngs,
    start_server,
    tracking,
)

from study.images import InputError, read_image_file, read_input, to_rows

pytest_plugins = ["registry_support"]

LINE = re.compile(r"^(?P<file>\S+)\s+(?P<digit>\d)\s+(?P<probability>[01]\.\d{4})$")


def parse_lines(stdout: str) -> dict[str, tuple[int, float]]:
    """`file digit probability` lines -> {file: (digit, probability)}; every line must have that form."""
    predictions = {}
    for line in stdout.splitlines():
        match = LINE.match(line)
        assert match, f"not a prediction line: {line!r}"
        predictions[match["file"]] = (int(match["digit"]), float(match["probability"]))
    return predictions


# --- study.images: preparing images the MNIST way (no model involved) ---------------------------------------


def test_png_round_trip_inversion_and_transparency(tmp_path: Path, mnist_path: Path):
    (digit,), _ = last_test_digits(mnist_path, 1)
    Image.fromarray(digit).save(tmp_path / "plain.png")
    Image.fromarray(255 - digit).save(tmp_path / "dark-on-light.png")  # border bright -> inverted back
    ink = np.zeros((28, 28, 4), np.uint8)
    ink[..., 3] = digit  # black ink whose opacity is the digit, on a transparent background
    Image.fromarray(ink, "RGBA").save(tmp_path / "transparent.png")
    np.testing.assert_array_equal(read_image_file(tmp_path / "plain.png"), digit)
    np.testing.assert_array_equal(read_image_file(tmp_path / "dark-on-light.png"), digit)
    assert np.abs(read_image_file(tmp_path / "transparent.png").astype(int) - digit).max() <= 1


def test_a_large_photo_like_jpeg_is_cropped_scaled_and_centred_like_mnist(tmp_path: Path, mnist_path: Path):
    (digit,), _ = last_test_digits(mnist_path, 1)
    big = np.asarray(Image.fromarray(digit).resize((280, 280), Image.Resampling.BILINEAR), dtype=np.float32)
    page = np.full((420, 360), 210.0, np.float32)  # grey paper, the digit off-centre, dark ink
    page[30:310, 60:340] -= big * (190 / 255)
    Image.fromarray(page.clip(0, 255).astype(np.uint8)).save(tmp_path / "photo.jpg", quality=90)
    prepared = read_image_file(tmp_path / "photo.jpg").astype(np.float32)
    assert prepared.shape == (28, 28) and prepared.max() == 255 and prepared[:2].max() < 30
    correlation = np.corrcoef(prepared.ravel(), digit.astype(np.float32).ravel())[0, 1]
    assert correlation > 0.8, correlation


def test_arrays_are_read_without_unpickling(tmp_path: Path, mnist_path: Path):
    images, _ = last_test_digits(mnist_path, 4)
    np.savez(tmp_path / "mnist-like.npz", x_train=images[:1], x_test=images)
    np.savez(tmp_path / "other.npz", digits=images[:2])
    np.save(tmp_path / "rows.npy", images.reshape(4, 784).astype(np.float32) / 255.0)
    from_npz = read_input(tmp_path / "mnist-like.npz")
    assert from_npz.names == [f"mnist-like.npz[{index}]" for index in range(4)]  # x_test, not the first array
    np.testing.assert_allclose(from_npz.pixels, to_rows(images))
    assert read_input(tmp_path / "other.npz").names == ["other.npz[0]", "other.npz[1]"]
    np.testing.assert_allclose(read_input(tmp_path / "rows.npy").pixels, to_rows(images), atol=1e-6)

    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "wrong-shape.npy", np.zeros((3, 10, 10), np.uint8))
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "notes.txt").write_text("not a digit")
    for name, expected in [
        ("objects.npy", "unpickling"),
        ("wrong-shape.npy", "(3, 10, 10)"),
        ("empty-folder", "no image files"),
        ("notes.txt", "unsupported extension"),
        ("missing.png", "does not exist"),
    ]:
        with pytest.raises(InputError, match=re.escape(expected)):
            read_input(tmp_path / name)


# --- predict through the command line -----------------------------------------------------------------------


def digits_folder(folder: Path, mnist_path: Path) -> np.ndarray:
    """20 real MNIST test digits as PNG, the first also inverted (dark on light), and a corrupt file."""
    images, labels = last_test_digits(mnist_path, 20)
    save_pngs(folder, images, labels)
    Image.fromarray(255 - images[0]).save(folder / "inverted.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    return labels


def check_folder_predictions(folder: Path, labels: np.ndarray, code: int, stdout: str, stderr: str, output: Path):
    assert code == 1, stderr  # 1: a file could not be read; the others were classified
    assert "Traceback" not in stderr
    assert re.search(r"^skipped corrupt\.png: not a readable image \(.+\)$", stderr, re.M), stderr
    predictions = parse_lines(stdout)
    assert sorted(predictions) == sorted(path.name for path in folder.glob("*.png") if path.name != "corrupt.png")
    right = sum(predictions[f"{index:02d}-label{label}.png"][0] == label for index, label in enumerate(labels))
    assert right >= 16, f"{right}/20 right"
    assert predictions["inverted.png"] == predictions[f"00-label{labels[0]}.png"]
    assert all(0.1 <= probability <= 1 for _, probability in predictions.values())
    with output.open() as file:
        rows = list(csv.DictReader(file))
    assert [row["file"] for row in rows] == list(predictions)
    assert all(int(row["digit"]) == predictions[row["file"]][0] for row in rows)


def test_predict_command_names_every_file_with_its_digit(
    sqlite_store: RegisteredStore, tmp_path: Path, mnist_path: Path
):
    """`python -m study predict --input FOLDER --output CSV` in its own process, default model (the champion)."""
    labels = digits_folder(tmp_path / "digits", mnist_path)
    output = tmp_path / "predictions.csv"
    result = run_cli(
        "predict",
        "--input",
        str(tmp_path / "digits"),
        "--output",
        str(output),
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": sqlite_store.uri},
    )
    check_folder_predictions(tmp_path / "digits", labels, result.returncode, result.stdout, result.stderr, output)


def test_predict_folder_with_the_model_from_the_tracking_server(
    server_store: RegisteredStore, tmp_path: Path, mnist_path: Path, capsys
):
    """The same through the artifact-proxying `mlflow server` (in this process, to keep the suite fast)."""
    labels = digits_folder(tmp_path / "digits", mnist_path)
    output = tmp_path / "predictions.csv"
    with tracking(server_store.uri):
        code = cli_in_process("predict", "--input", str(tmp_path / "digits"), "--output", str(output))
    captured = capsys.readouterr()
    check_folder_predictions(tmp_path / "digits", labels, code, captured.out, captured.err, output)


def test_predict_arrays_aliases_and_bad_input(
    registered_store: RegisteredStore, tmp_path: Path, mnist_path: Path, capsys
):
    images, labels = last_test_digits(mnist_path, 10)
    np.savez(tmp_path / "digits.npz", x_test=images, y_test=labels)
    assert cli_in_process("predict", "--input", str(tmp_path / "digits.npz")) == 0
    captured = capsys.readouterr()
    predictions = parse_lines(captured.out)
    assert list(predictions) == [f"digits.npz[{index}]" for index in range(10)]
    assert sum(predictions[f"digits.npz[{index}]"][0] == label for index, label in enumerate(labels)) >= 8

    # A configuration's alias and a version number load too.
    for model in (f"models:/{REGISTERED_MODEL}@tanh-hinge", f"models:/{REGISTERED_MODEL}/2"):
        assert cli_in_process("predict", "--model", model, "--input", str(tmp_path / "digits.npz")) == 0
        assert len(parse_lines(capsys.readouterr().out)) == 10

    for arguments, expected in [
        (["--model", f"models:/{REGISTERED_MODEL}@no-such-alias"], "no-such-alias"),
        (["--model", "models:/no-such-model@champion"], "no-such-model"),
        (["--model", str(tmp_path / "no-such-folder")], "neither an MLflow model URI nor an existing path"),
        (["--input", str(tmp_path / "missing.png")], "input: "),
        (["--output", str(tmp_path / "no-folder" / "out.csv")], "output: "),
    ]:
        argv = {"--input": str(tmp_path / "digits.npz"), **dict(zip(arguments[::2], arguments[1::2], strict=True))}
        assert cli_in_process("predict", *[item for pair in argv.items() for item in pair]) == 2, arguments
        captured = capsys.readouterr()
        error = captured.err.strip()
        assert error.startswith("error: ") and "\n" not in error and expected in error, error
        assert captured.out == ""


# --- serving --------------------------------------------------------------------------------------------------


def test_served_champion_answers_invocations_with_probabilities(
    sqlite_store: RegisteredStore, tmp_path: Path, mnist_path: Path
):
    """`mlflow models serve -m models:/mnist-mlp@champion --env-manager local`, as the README says."""
    images, labels = last_test_digits(mnist_path, 50)
    server = start_server(
        ["models", "serve", "-m", f"models:/{REGISTERED_MODEL}@champion", "--env-manager", "local", "-w", "1"],
        free_port(),
        tmp_path / "serve.log",
        "/ping",
        env={"MLFLOW_TRACKING_URI": sqlite_store.uri},
    )
    try:
        url = server.wait_ready()
        body = json.dumps({"inputs": to_rows(images).tolist()}).encode()
        request = urllib.request.Request(
            url + "/invocations", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            answer = json.loads(response.read())
    finally:
        server.stop()
    probabilities = np.asarray(answer["predictions"], dtype=np.float64)
    assert probabilities.shape == (50, 10)
    assert (probabilities >= 0).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert (probabilities.argmax(axis=1) == labels).mean() >= 0.8
