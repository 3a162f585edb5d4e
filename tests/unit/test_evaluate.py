"""Evaluation metrics against numbers worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from brainscan import CLASSES
from training.evaluate import classification_metrics, classification_report, evaluate_scorer

# 10 scans. True labels and the predicted class (argmax of the probabilities below):
#   glioma(0):     true 3 -> predicted 0, 0, 1
#   meningioma(1): true 3 -> predicted 1, 1, 2
#   notumor(2):    true 2 -> predicted 2, 2
#   pituitary(3):  true 2 -> predicted 3, 0
LABELS = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
PREDICTED = [0, 0, 1, 1, 1, 2, 2, 2, 3, 0]
CONFUSION = [  # rows true, columns predicted
    [2, 1, 0, 0],
    [0, 2, 1, 0],
    [0, 0, 2, 0],
    [1, 0, 0, 1],
]
TRUE_CLASS_PROBABILITY = [0.7, 0.6, 0.3, 0.8, 0.5, 0.2, 0.9, 0.55, 0.65, 0.1]


def _probabilities() -> np.ndarray:
    rows = []
    for label, predicted, p_true in zip(LABELS, PREDICTED, TRUE_CLASS_PROBABILITY, strict=True):
        row = np.zeros(4)
        row[label] = p_true
        if predicted != label:
            row[predicted] = 1 - p_true  # larger than p_true in every wrong case above
        else:
            row[(label + 1) % 4] = 1 - p_true
        rows.append(row)
    return np.array(rows)


def test_metrics_match_the_hand_computed_confusion_matrix() -> None:
    metrics = classification_metrics(_probabilities(), LABELS)
    assert metrics["confusion_matrix"] == CONFUSION
    assert metrics["n"] == 10
    assert metrics["classes"] == list(CLASSES)
    assert metrics["accuracy"] == pytest.approx(7 / 10)
    expected_loss = -sum(math.log(p) for p in TRUE_CLASS_PROBABILITY) / 10
    assert metrics["loss"] == pytest.approx(expected_loss)
    # Per class, from the matrix: precision = diagonal / column sum, recall = diagonal / row sum.
    expected = {
        "glioma": (2 / 3, 2 / 3, 3),
        "meningioma": (2 / 3, 2 / 3, 3),
        "notumor": (2 / 3, 1.0, 2),
        "pituitary": (1.0, 0.5, 2),
    }
    for name, (precision, recall, support) in expected.items():
        got = metrics["per_class"][name]
        assert got["precision"] == pytest.approx(precision)
        assert got["recall"] == pytest.approx(recall)
        assert got["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
        assert got["support"] == support


def test_metrics_are_json_with_the_documented_keys() -> None:
    metrics = json.loads(json.dumps(classification_metrics(_probabilities(), LABELS)))
    assert {"accuracy", "loss", "n", "per_class", "confusion_matrix"} <= set(metrics)
    assert set(metrics["per_class"]) == set(CLASSES)


def test_a_class_never_predicted_has_zero_precision_not_an_error() -> None:
    probabilities = np.tile([0.1, 0.2, 0.6, 0.1], (4, 1))  # always notumor
    metrics = classification_metrics(probabilities, [0, 1, 2, 3])
    assert metrics["per_class"]["glioma"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert metrics["per_class"]["notumor"]["precision"] == pytest.approx(0.25)
    assert metrics["accuracy"] == pytest.approx(0.25)


def test_report_prints_the_figures_and_the_matrix() -> None:
    report = classification_report(classification_metrics(_probabilities(), LABELS))
    assert "accuracy" in report and "0.7000" in report
    assert "    2     1     0     0" in report  # first confusion row
    assert "pituitary    1.0000    0.5000" in report


class _LookupScorer:
    """A deterministic stand-in model: class = the first pixel's value mod 4, to test batching."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(len(batch))
        out = np.full((len(batch), 4), 0.1, np.float32)
        out[np.arange(len(batch)), batch[:, 0, 0, 0].astype(int) % 4] = 0.7
        return out


def test_evaluate_scorer_batches_and_normalizes_like_serving() -> None:
    labels = np.array([0, 1, 2, 3, 0, 1, 2])
    pixels = np.zeros((7, 2, 2, 3), np.uint8)
    pixels[:, 0, 0, 2] = labels  # the last channel: 'resnet50' normalization moves it to channel 0 (BGR)
    pixels[:, 0, 0, 2] += 104  # + the blue mean (103.939) -> lands on label + ~0.06 after subtraction
    scorer = _LookupScorer()
    metrics = evaluate_scorer(scorer, pixels, labels, "resnet50", batch_size=3)
    assert scorer.batches == [3, 3, 1]
    assert metrics["accuracy"] == 1.0 and metrics["n"] == 7
