"""Classification metrics from probabilities: accuracy, loss, per-class precision/recall/F1, confusion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from brainscan import CLASSES


def classification_metrics(probabilities: np.ndarray, labels: Sequence[int]) -> dict[str, Any]:
    """The JSON ``brainscan evaluate`` writes. Rows of the confusion matrix are true classes."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    predicted = probabilities.argmax(axis=1)
    n_classes = len(CLASSES)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    per_class = {}
    for k, name in enumerate(CLASSES):
        true_positive = int(confusion[k, k])
        predicted_k, actual_k = int(confusion[:, k].sum()), int(confusion[k, :].sum())
        precision = true_positive / predicted_k if predicted_k else 0.0
        recall = true_positive / actual_k if actual_k else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual_k}
    return {
        "accuracy": float((predicted == labels).mean()) if len(labels) else 0.0,
        "loss": float(-np.log(picked).mean()) if len(labels) else 0.0,
        "n": len(labels),
        "classes": list(CLASSES),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def classification_report(metrics: dict[str, Any]) -> str:
    """A plain-text report in the shape of scikit-learn's, as the original project printed."""
    lines = [f"{'':>12} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}", ""]
    for name, m in metrics["per_class"].items():
        lines.append(f"{name:>12} {m['precision']:9.4f} {m['recall']:9.4f} {m['f1']:9.4f} {m['support']:9d}")
    lines += ["", f"{'accuracy':>12} {'':>9} {'':>9} {metrics['accuracy']:9.4f} {metrics['n']:9d}"]
    lines.append(f"{'loss':>12} {metrics['loss']:9.4f}")
    lines += [
        "",
        "confusion matrix (rows: true, columns: predicted; order " + ", ".join(metrics["classes"]) + ")",
    ]
    lines += ["  " + " ".join(f"{v:5d}" for v in row) for row in metrics["confusion_matrix"]]
    return "\n".join(lines) + "\n"


def evaluate_scorer(
    scorer: Any, pixels: np.ndarray, labels: Sequence[int], preprocessing: str, batch_size: int = 32
) -> dict[str, Any]:
    """Metrics of a ``brainscan.runtime`` scorer on uint8 pixels (``training.data.ScanSet.pixels``).

    Pixels are normalised batch by batch with ``brainscan.imaging.normalize``, the serving function,
    so a whole folder never sits in memory as float32.
    """
    from brainscan.imaging import normalize

    outputs = []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size].astype(np.float32)
        batch = normalize(batch, preprocessing)  # type: ignore[arg-type]
        outputs.append(scorer.predict(np.asarray(batch, dtype=np.float32)))
    probabilities = np.concatenate(outputs) if outputs else np.zeros((0, len(CLASSES)), np.float32)
    return classification_metrics(probabilities, labels)
