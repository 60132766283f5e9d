"""Answer the exercise's two questions from the finished configurations.

Winners are chosen on validation accuracy (best epoch); test accuracy is only reported.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass

from study.config import ACTIVATIONS, LOSSES

RESULT_COLUMNS = (
    "config",
    "activation",
    "loss",
    "seed",
    "best_val_accuracy",
    "test_accuracy",
    "test_loss",
    "train_seconds",
)


@dataclass(frozen=True)
class ConfigResult:
    """One configuration's row of the results table."""

    config: str
    activation: str
    loss: str
    seed: int
    best_val_accuracy: float
    test_accuracy: float
    test_loss: float
    train_seconds: float
    diverged: bool = False


def best(results: Sequence[ConfigResult]) -> ConfigResult:
    """The configuration with the highest validation accuracy (diverged ones only as a last resort)."""
    return max(results, key=lambda row: (not row.diverged, _finite(row.best_val_accuracy)))


def results_csv(results: Sequence[ConfigResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for row in results:
        writer.writerow([getattr(row, column) for column in RESULT_COLUMNS])
    return buffer.getvalue()


def results_table(results: Sequence[ConfigResult]) -> str:
    """A fixed-width table for the console."""
    header = f"{'config':<22}{'best val acc':>13}{'test acc':>10}{'test loss':>11}{'seconds':>9}"
    lines = [header, "-" * len(header)]
    for row in results:
        flag = "  (diverged)" if row.diverged else ""
        lines.append(
            f"{row.config:<22}{row.best_val_accuracy:>13.4f}{row.test_accuracy:>10.4f}"
            f"{row.test_loss:>11.4f}{row.train_seconds:>9.1f}{flag}"
        )
    return "\n".join(lines)


def summary_markdown(results: Sequence[ConfigResult], settings: str) -> str:
    """Which activation did best per loss, which loss per activation, and the overall winner."""
    by_name = {row.config: row for row in results}
    lines = ["# MNIST activation study: summary", "", settings, ""]
    lines += ["Winners are chosen on validation accuracy; test accuracy is reported, not used to choose.", ""]
    lines += ["## Which activation did best (per loss)", ""]
    for loss in LOSSES:
        rows = [by_name[f"{activation}-{loss}"] for activation in ACTIVATIONS if f"{activation}-{loss}" in by_name]
        if rows:
            winner = best(rows)
            lines.append(
                f"- **{loss}**: **{winner.activation}** (validation {winner.best_val_accuracy:.4f}, "
                f"test {winner.test_accuracy:.4f}); " + _others(rows, winner, "activation")
            )
    lines += ["", "## Which loss did best (per activation)", ""]
    for activation in ACTIVATIONS:
        rows = [by_name[f"{activation}-{loss}"] for loss in LOSSES if f"{activation}-{loss}" in by_name]
        if rows:
            winner = best(rows)
            lines.append(
                f"- **{activation}**: **{winner.loss}** (validation {winner.best_val_accuracy:.4f}, "
                f"test {winner.test_accuracy:.4f}); " + _others(rows, winner, "loss")
            )
    overall = best(results)
    lines += [
        "",
        "## Overall",
        "",
        f"Best configuration on validation: **{overall.config}** (validation "
        f"{overall.best_val_accuracy:.4f}, test {overall.test_accuracy:.4f}).",
        "",
        "One run per configuration: differences of a few tenths of a point are within seed noise.",
        "",
        "## Results",
        "",
        "| config | best val accuracy | test accuracy | test loss | train seconds |",
        "|---|---|---|---|---|",
    ]
    for row in results:
        note = " (diverged)" if row.diverged else ""
        lines.append(
            f"| {row.config}{note} | {row.best_val_accuracy:.4f} | {row.test_accuracy:.4f} | "
            f"{row.test_loss:.4f} | {row.train_seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _others(rows: Sequence[ConfigResult], winner: ConfigResult, field: str) -> str:
    others = [row for row in rows if row is not winner]
    return "then " + ", ".join(
        f"{getattr(row, field)} (validation {row.best_val_accuracy:.4f}, test {row.test_accuracy:.4f})"
        for row in others
    )


def _finite(value: float) -> float:
    return value if value == value and abs(value) != float("inf") else float("-inf")
