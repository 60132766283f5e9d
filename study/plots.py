"""Figures for one configuration and for the study, drawn with matplotlib (no display needed)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from study.data import NUM_CLASSES  # noqa: E402


def learning_curves(history: dict[str, list[float]], title: str) -> Figure:
    """Loss and accuracy per epoch, train vs validation."""
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
        axis.plot(epochs, history[f"train_{metric}"], marker="o", label="train")
        axis.plot(epochs, history[f"val_{metric}"], marker="o", label="validation")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{title}: learning curves")
    # Fixed margins, not tight_layout(): this figure is drawn for every run, and measuring its text for
    # tight_layout cost more than drawing it (benchmarks/README.md, tracking overhead).
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.87, wspace=0.25)
    return figure


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, title: str) -> Figure:
    """Counts of true digit (rows) vs predicted digit (columns) on the test set."""
    counts = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    figure, axis = plt.subplots(figsize=(6, 5.5))
    image = axis.imshow(counts, cmap="Blues")
    for row in range(NUM_CLASSES):
        for column in range(NUM_CLASSES):
            value = counts[row, column]
            color = "white" if value > counts.max() / 2 else "black"
            axis.text(column, row, str(value), ha="center", va="center", fontsize=7, color=color)
    axis.set_xticks(range(NUM_CLASSES))
    axis.set_yticks(range(NUM_CLASSES))
    axis.set_xlabel("predicted digit")
    axis.set_ylabel("true digit")
    axis.set_title(f"{title}: test-set confusion matrix")
    figure.colorbar(image, ax=axis)
    figure.subplots_adjust(left=0.1, right=0.98, bottom=0.1, top=0.93)  # fixed margins, as in learning_curves
    return figure


def comparison(
    names: Sequence[str],
    test_accuracy: Sequence[float],
    val_curves: Sequence[Sequence[float]],
) -> Figure:
    """The configurations side by side: test accuracy bars and the validation curves overlaid."""
    figure, (bar_axis, curve_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    positions = np.arange(len(names))
    bars = bar_axis.bar(positions, test_accuracy, color="tab:blue")
    bar_axis.bar_label(bars, labels=[f"{value:.4f}" for value in test_accuracy], fontsize=8)
    bar_axis.set_xticks(positions, names, rotation=30, ha="right")
    finite = [value for value in test_accuracy if np.isfinite(value)]
    low = min(finite) if finite else 0.0
    bar_axis.set_ylim(max(0.0, low - 0.02), 1.0)
    bar_axis.set_ylabel("test accuracy")
    bar_axis.set_title("test accuracy per configuration")
    for name, curve in zip(names, val_curves, strict=True):
        curve_axis.plot(np.arange(1, len(curve) + 1), curve, marker=".", label=name)
    curve_axis.set_xlabel("epoch")
    curve_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    curve_axis.set_ylabel("validation accuracy")
    curve_axis.set_title("validation accuracy per epoch")
    curve_axis.grid(alpha=0.3)
    curve_axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def test_accuracy_intervals(
    names: Sequence[str],
    means: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    seed_values: Sequence[Sequence[float]],
) -> Figure:
    """Mean test accuracy per configuration with its 95% CI as error bars, and each seed's run as a dot."""
    figure, axis = plt.subplots(figsize=(8, 4.5))
    positions = np.arange(len(names))
    means_array = np.asarray(means, dtype=float)
    lower = np.where(np.isfinite(lows), means_array - np.asarray(lows, dtype=float), 0.0)
    upper = np.where(np.isfinite(highs), np.asarray(highs, dtype=float) - means_array, 0.0)
    axis.errorbar(
        positions, means_array, yerr=[lower, upper], fmt="o", color="tab:blue", capsize=6, label="mean, 95% CI"
    )
    for position, values in zip(positions, seed_values, strict=True):
        jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(len(values))
        axis.scatter(position + jitter, values, s=12, color="tab:gray", alpha=0.7, zorder=3)
    axis.scatter([], [], s=12, color="tab:gray", label="one seed")
    for position, mean in zip(positions, means_array, strict=True):
        axis.annotate(f"{mean:.4f}", (position, mean), textcoords="offset points", xytext=(10, 0), fontsize=8)
    axis.set_xticks(positions, names, rotation=30, ha="right")
    axis.set_ylabel("test accuracy")
    axis.set_title("test accuracy per configuration (mean and 95% CI over seeds)")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def validation_bands(
    names: Sequence[str],
    means: Sequence[np.ndarray],
    lows: Sequence[np.ndarray],
    highs: Sequence[np.ndarray],
) -> Figure:
    """Validation accuracy per epoch: the mean over seeds as a line, its 95% CI as a shaded band."""
    figure, axis = plt.subplots(figsize=(9, 5))
    for name, mean, low, high in zip(names, means, lows, highs, strict=True):
        epochs = np.arange(1, len(mean) + 1)
        (line,) = axis.plot(epochs, mean, marker=".", label=name)
        axis.fill_between(epochs, low, high, where=np.isfinite(low), color=line.get_color(), alpha=0.2)
        if len(epochs) == 1 and np.isfinite(low[0]):  # a band over one epoch is invisible: an error bar instead
            axis.errorbar(epochs, mean, yerr=[mean - low, high - mean], color=line.get_color(), capsize=5)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation accuracy")
    axis.set_title("validation accuracy per epoch (mean over seeds, band = 95% CI)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure
