"""Classification metrics from probabilities: accuracy, loss, per-class precision/recall/F1, confusion."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
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
        batch = normalize(pixels[start : start + batch_size], preprocessing)  # type: ignore[arg-type]
        outputs.append(scorer.predict(np.asarray(batch, dtype=np.float32)))
    probabilities = np.concatenate(outputs) if outputs else np.zeros((0, len(CLASSES)), np.float32)
    return classification_metrics(probabilities, labels)


# ---- trust: calibration, flags and the scope detector (issue 11) -------------------------------
def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float | None:
    """P(out score > in score) + P(tie) / 2: how well a score ranks out-of-scope above in-scope items."""
    a = np.asarray(in_scores, dtype=np.float64)
    b = np.asarray(out_scores, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return None
    values = np.concatenate([a, b])
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    # Average ranks over ties (Mann-Whitney U).
    starts = np.flatnonzero(np.append(True, sorted_values[1:] != sorted_values[:-1]))
    ends = np.append(starts[1:], len(values))
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2
    rank_sum = ranks[len(a) :].sum()
    return float((rank_sum - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def judge_pixels(
    scorer: Any,
    pixels: np.ndarray,
    preprocessing: str,
    findings: Sequence[str | None] | None,
    batch_size: int = 32,
) -> tuple[list[Any], np.ndarray]:
    """(verdicts, raw probabilities) for uint8 pixels, the scorer's trust applied as a worker applies it."""
    from brainscan.imaging import normalize

    verdicts: list[Any] = []
    raw = []
    for start in range(0, len(pixels), batch_size):
        batch = normalize(pixels[start : start + batch_size], preprocessing)  # type: ignore[arg-type]
        probabilities, features = scorer.predict_with_features(np.asarray(batch, dtype=np.float32))
        part = None if findings is None else list(findings[start : start + batch_size])
        verdicts += scorer.trust.judge(probabilities, features, part)
        raw.append(probabilities)
    return verdicts, (np.concatenate(raw) if raw else np.zeros((0, len(CLASSES)), np.float32))


def flag_metrics(verdicts: Sequence[Any], raw: np.ndarray, labels: Sequence[int]) -> dict[str, Any]:
    """Calibration (ECE 15 bins top-label, NLL) before/after the temperature, and the flags' shares."""
    from brainscan.trust import expected_calibration_error, negative_log_likelihood

    labels = np.asarray(labels, dtype=np.int64)
    calibrated = np.stack([v.probabilities for v in verdicts]) if verdicts else raw
    flags = np.array([v.flag or "" for v in verdicts])
    correct = calibrated.argmax(axis=1) == labels
    unflagged = flags == ""
    return {
        "ece_before": expected_calibration_error(raw, labels),
        "ece_after": expected_calibration_error(calibrated, labels),
        "nll_before": negative_log_likelihood(raw, labels),
        "nll_after": negative_log_likelihood(calibrated, labels),
        "out_of_scope_share": float((flags == "out_of_scope").mean()) if len(flags) else 0.0,
        "uncertain_share": float((flags == "uncertain").mean()) if len(flags) else 0.0,
        "unflagged_share": float(unflagged.mean()) if len(flags) else 0.0,
        "unflagged_accuracy": float(correct[unflagged].mean()) if unflagged.any() else None,
        "flag_reasons": {
            code: int(sum(v.flag_code == code for v in verdicts))
            for code in sorted({v.flag_code for v in verdicts if v.flag_code})
        },
    }


def folder_findings(scorer: Any, data_dir: Path, paths: Sequence[str]) -> list[str | None] | None:
    """Input-check findings for files of ``data_dir`` (None when the model has no input checks)."""
    if scorer.trust.input_checks is None:
        return None
    return [scorer.trust.check((Path(data_dir) / p).read_bytes()) for p in paths]


def _ranking_score(verdict: Any) -> float:
    """The served decision as one number: refused by an input check ranks above every distance."""
    if verdict.flag_code in ("near_constant", "strong_colour", "no_head"):
        return float("inf")
    return float(verdict.scope_score) if verdict.scope_score is not None else 1.0 - verdict.confidence


def evaluate_ood(
    scorer: Any, in_verdicts: Sequence[Any], ood_dir: Path, batch_size: int = 32, max_pixels: int = 50_000_000
) -> dict[str, Any]:
    """Every file under ``ood_dir`` scored as a worker would; per family (first sub-folder) and overall:

    AUROC of the served decision (input checks, then ``scope_score``) and of the bare detector score
    against ``in_verdicts`` (the in-distribution data), the share flagged ``out_of_scope`` at the
    served threshold, the share refused outright (not decodable: failed with a reason), and the share
    that would be served unflagged. Max-softmax AUROC is given as the baseline.
    """
    from brainscan.imaging import ScanError, prepare

    ood_dir = Path(ood_dir)
    spec = scorer.card.input_spec
    families: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in ood_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(ood_dir)
        family = relative.parts[0] if len(relative.parts) > 1 else "."
        entry = families.setdefault(family, {"pixels": [], "findings": [], "refused": 0})
        data = path.read_bytes()
        try:
            pixels = prepare(data, spec, max_pixels)
        except ScanError:
            entry["refused"] += 1
            continue
        entry["pixels"].append(pixels)
        entry["findings"].append(scorer.trust.check(data))

    def summary(verdicts: list[Any], refused: int) -> dict[str, Any]:
        total = len(verdicts) + refused
        oos = sum(v.flag == "out_of_scope" for v in verdicts)
        scored_in = [_ranking_score(v) for v in in_verdicts]
        scored_out = [_ranking_score(v) for v in verdicts] + [float("inf")] * refused
        result: dict[str, Any] = {
            "n": total,
            "refused": refused,
            "out_of_scope": oos,
            "flagged_or_refused_share": (oos + refused) / total if total else None,
            "uncertain": sum(v.flag == "uncertain" for v in verdicts),
            "unflagged": sum(v.flag is None for v in verdicts),
            "auroc": auroc(np.array(scored_in), np.array(scored_out)),
            "auroc_max_softmax": auroc(
                np.array([-v.confidence for v in in_verdicts]), np.array([-v.confidence for v in verdicts])
            ),
        }
        if in_verdicts and in_verdicts[0].scope_score is not None and verdicts:
            result["auroc_scope_score"] = auroc(
                np.array([v.scope_score for v in in_verdicts]), np.array([v.scope_score for v in verdicts])
            )
        return result

    report: dict[str, Any] = {"dir": str(ood_dir), "families": {}}
    all_verdicts: list[Any] = []
    all_refused = 0
    for family, entry in families.items():
        empty = np.zeros((0, spec.height, spec.width, spec.channels), np.float32)
        pixels = np.stack(entry["pixels"]) if entry["pixels"] else empty
        verdicts: list[Any] = []
        for start in range(0, len(pixels), batch_size):
            verdicts += scorer.judge(
                pixels[start : start + batch_size], entry["findings"][start : start + batch_size]
            )
        report["families"][family] = summary(verdicts, entry["refused"])
        all_verdicts += verdicts
        all_refused += entry["refused"]
    report["overall"] = summary(all_verdicts, all_refused)
    return report
