"""Report files written next to a model (``<model>/reports/``): curves, confusion matrix, text report."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt

from training.evaluate import classification_report


def plot_history(history_csv: Path, out_png: Path) -> None:
    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax in (("accuracy", ax_acc), ("loss", ax_loss)):
        for prefix, label in (("", "train"), ("val_", "validation")):
            if prefix + key in rows[0]:
                ax.plot(epochs, [float(r[prefix + key]) for r in rows], label=label)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_confusion(metrics: dict[str, Any], out_png: Path, title: str) -> None:
    classes, matrix = metrics["classes"], metrics["confusion_matrix"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(
                j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black"
            )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def write_evaluation(metrics: dict[str, Any], folder: Path, name: str, title: str) -> None:
    """``<name>.json``, ``<name>.txt`` (classification report) and ``<name>_confusion.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (folder / f"{name}.txt").write_text(f"{title}\n\n" + classification_report(metrics))
    plot_confusion(metrics, folder / f"{name}_confusion.png", title)
