"""``brainscan calibrate``: fit a model's scope detector, temperature and flag thresholds; write the card.

``calibrate_model(model_dir, data_dir)`` is the one entry point (``brainscan train`` calls it last):

1. Make sure the SavedModel serves ``features`` beside ``output_0``; a model exported before that is
   re-exported from its ``model.keras`` (its TFLite variants are re-converted). A model with neither
   gets a temperature and a threshold but no detector.
2. Decode ``data_dir`` with the serving code and split it the way the model was trained: the files in
   ``reports/split.json`` are the validation split, the rest the training split.
3. Fit the detector (class-conditional Mahalanobis, shared shrunk covariance) on the **training split
   only**; choose its threshold on the **validation split** so that at most ``max_out_of_scope`` of
   it is out of scope (with the input checks, at most 1.5%).
4. Fit the temperature on validation NLL; choose ``uncertain_below``, the lowest calibrated confidence
   at which the unflagged validation scans are >= ``target_accuracy`` correct.
5. Write ``trust.npz``, the card's ``trust`` section, ``reports/calibration.json`` and
   ``reports/reliability.png``.

Nothing here sees a negative (non-scan) image: those are for ``brainscan evaluate --ood`` only.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from brainscan.imaging import normalize
from brainscan.modelrepo import ModelCard, ModelNotFound, ModelRef, read_card
from brainscan.runtime import DEFAULT_VARIANT_FILES, Scorer, load_savedmodel, load_tflite, variant_file
from brainscan.trust import (
    REASONS,
    TRUST_FILE,
    InputChecks,
    ScopeDetector,
    TrustCard,
    apply_temperature,
    check_input,
    expected_calibration_error,
    fit_temperature,
    input_thumbnail,
    negative_log_likelihood,
    quantile_threshold,
    reliability_bins,
    uncertain_threshold,
)

MAX_OUT_OF_SCOPE = 0.01  # validation share the distance threshold may put out of scope
MAX_INPUT_CHECK_SHARE = 0.005  # an input check flagging more of the training split than this is dropped
TARGET_ACCURACY = 0.995  # unflagged validation scans must be at least this accurate
SHRINKAGE = 0.1


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_features_export(model_dir: Path, data_dir: Path | None = None) -> list[str]:
    """Re-export the SavedModel with a ``features`` output when it lacks one; notes on what was done."""
    import tensorflow as tf

    from brainscan.runtime import features_output, serving_signature

    model_dir = Path(model_dir)
    module = tf.saved_model.load(str(model_dir))
    function, _, _ = serving_signature(module)
    if features_output(function) is not None:
        return []
    keras_file = model_dir / "model.keras"
    if not keras_file.is_file():
        return [f"{model_dir} has no features output and no model.keras: no scope detector"]
    import keras

    from training.export import export_savedmodel

    model = keras.saving.load_model(str(keras_file), compile=False)
    export_savedmodel(model, model_dir)
    notes = ["re-exported the SavedModel from model.keras with a features output"]
    card = read_card(model_dir)
    stale = [v for v in ("tflite", "tflite-int8") if v in card.variants]
    if stale:
        from training.export import export_variants

        if "tflite-int8" in stale and data_dir is None:
            raise ValueError("the int8 variant must be re-converted: pass the training folder")
        export_variants(
            model_dir,
            tflite="tflite" in stale,
            int8="tflite-int8" in stale,
            representative_dir=data_dir if "tflite-int8" in stale else None,
        )
        notes.append(f"re-converted {', '.join(stale)} with the features output")
    return notes


def model_outputs(
    scorer: Scorer, pixels: np.ndarray, preprocessing: str, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray | None]:
    """(raw probabilities, features or None) for uint8 pixels, through the serving normalisation."""
    probabilities, features = [], []
    for start in range(0, len(pixels), batch_size):
        batch = normalize(pixels[start : start + batch_size], preprocessing)  # type: ignore[arg-type]
        p, f = scorer.predict_with_features(np.asarray(batch, dtype=np.float32))
        probabilities.append(p)
        if f is not None:
            features.append(f)
    probs = np.concatenate(probabilities) if probabilities else np.zeros((0, 4), np.float32)
    return probs, (np.concatenate(features) if features else None)


def input_findings(data_dir: Path, paths: list[str], checks: InputChecks) -> list[str | None]:
    return [check_input(input_thumbnail((Path(data_dir) / p).read_bytes()), checks) for p in paths]


def calibrate_model(
    model_dir: Path,
    data_dir: Path,
    cache_dir: Path | None = Path("var/cache"),
    *,
    max_out_of_scope: float = MAX_OUT_OF_SCOPE,
    target_accuracy: float = TARGET_ACCURACY,
    shrinkage: float = SHRINKAGE,
    batch_size: int = 64,
) -> ModelCard:
    """Fit and write the model folder's trust section (see the module doc); returns the new card."""
    model_dir = Path(model_dir)
    if not (model_dir / "saved_model.pb").is_file():
        raise ModelNotFound(f"{model_dir} holds no saved_model.pb")
    notes = ensure_features_export(model_dir, data_dir)
    for note in notes:
        _log(f"calibrate: {note}")
    card = read_card(model_dir)
    if card.card_less:
        card = card.model_copy(update={"card_less": False})
    train, val, fingerprint = _split_scans(model_dir, Path(data_dir), card, cache_dir, notes)

    scorer = load_savedmodel(model_dir, card)
    val_probs, val_features = model_outputs(scorer, val.pixels, card.preprocessing, batch_size)
    checks = _fit_input_checks(Path(data_dir), train.paths, notes)
    failed_check = np.array([f is not None for f in input_findings(Path(data_dir), val.paths, checks)])
    detector = _fit_detector(
        scorer, card, train, val_features, failed_check, shrinkage, max_out_of_scope, batch_size, notes
    )
    if detector is not None:
        detector.save(model_dir / TRUST_FILE)
    distances = detector.distances(val_features) if detector is not None else np.zeros(len(val.labels))
    out_of_scope = failed_check | (distances > detector.threshold if detector else False)

    # Temperature on all validation scans; the uncertainty threshold on those left in scope.
    temperature = fit_temperature(val_probs, val.labels)
    calibrated = apply_temperature(val_probs, temperature)
    threshold = uncertain_threshold(
        calibrated.max(axis=1)[~out_of_scope],
        (calibrated.argmax(axis=1) == val.labels)[~out_of_scope],
        target_accuracy,
    )
    variants = _variant_thresholds(
        model_dir, card, val, failed_check, detector, temperature, target_accuracy, batch_size
    )
    # One threshold for every format the folder can serve: an int8 variant's confidences differ
    # slightly, so take the strictest of the per-format thresholds (each fitted on validation).
    threshold = max([threshold, *(v["uncertain_below"] for v in variants.values())])
    validation = _validation_figures(
        val_probs, calibrated, out_of_scope, failed_check, val.labels, threshold, target_accuracy, variants
    )
    trust = TrustCard(
        temperature=temperature,
        uncertain_below=threshold,
        target_accuracy=target_accuracy,
        detector="mahalanobis" if detector else None,
        detector_file=TRUST_FILE if detector else None,
        features_output="features" if detector else None,
        feature_layer=_feature_layer_name(model_dir) if detector else None,
        feature_dim=int(detector.means.shape[1]) if detector else None,
        shrinkage=shrinkage if detector else None,
        scope_threshold=detector.threshold if detector else None,
        max_out_of_scope=max_out_of_scope if detector else None,
        input_checks=checks,
        fitted_on={
            "data_dir": str(data_dir),
            "data_fingerprint": fingerprint,
            "detector": f"{len(train.labels)} training-split scans (split.json's complement)",
            "thresholds_and_temperature": f"{len(val.labels)} validation-split scans (reports/split.json)",
            "notes": notes,
        },
        validation=validation,
        fitted_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    card = card.model_copy(update={"trust": trust})
    card.write(model_dir)
    _write_reports(model_dir / "reports", trust, val_probs, calibrated, val.labels)
    return card


def _split_scans(
    model_dir: Path, data_dir: Path, card: ModelCard, cache_dir: Path | None, notes: list[str]
) -> tuple[Any, Any, str]:
    """(training split, validation split, data fingerprint): the model's own split (reports/split.json)."""
    from training.data import load_scanset, validation_paths

    held_out = validation_paths(model_dir)
    scans = load_scanset(data_dir, card.input_spec, cache_dir)
    is_validation = np.array([p in held_out for p in scans.paths])
    if not is_validation.any():
        raise ValueError(f"none of {data_dir}'s files is in the model's reports/split.json")
    train, val = scans.subset(~is_validation), scans.subset(is_validation)
    if card.data_fingerprint and card.data_fingerprint != scans.fingerprint:
        notes.append(f"{data_dir}'s fingerprint differs from the card's: not the folder it was trained on")
    _log(f"calibrate: {len(train.labels)} training / {len(val.labels)} validation scans")
    return train, val, scans.fingerprint


def _fit_input_checks(data_dir: Path, train_paths: list[str], notes: list[str]) -> InputChecks:
    """The input checks, keeping only those the model's own training scans pass."""
    checks = InputChecks()
    train_findings = input_findings(data_dir, train_paths, checks)
    for code in list(checks.enabled):
        share = float(np.mean([f == code for f in train_findings]))
        if share > MAX_INPUT_CHECK_SHARE:
            checks.enabled.remove(code)
            notes.append(f"input check {code} dropped: it flags {share:.2%} of the training split")
    return checks


def _fit_detector(  # type: ignore[no-untyped-def]
    scorer: Scorer,
    card: ModelCard,
    train,
    val_features: np.ndarray | None,
    failed_check: np.ndarray,
    shrinkage: float,
    max_out_of_scope: float,
    batch_size: int,
    notes: list[str],
) -> ScopeDetector | None:
    """Fitted on the training split's features, thresholded on the validation split's."""
    if val_features is None:
        return None
    _, train_features = model_outputs(scorer, train.pixels, card.preprocessing, batch_size)
    assert train_features is not None
    try:
        fitted = ScopeDetector.fit(train_features, train.labels, shrinkage=shrinkage)
    except ValueError as exc:  # a smoke run on a handful of scans: serve without a detector
        notes.append(f"no scope detector: {exc}")
        return None
    passing = fitted.distances(val_features)[~failed_check]
    return fitted.with_threshold(quantile_threshold(passing, max_out_of_scope))


def _variant_thresholds(  # type: ignore[no-untyped-def]
    model_dir: Path,
    card: ModelCard,
    val,
    failed_check: np.ndarray,
    detector: ScopeDetector | None,
    temperature: float,
    target_accuracy: float,
    batch_size: int,
) -> dict[str, dict[str, Any]]:
    """Each TFLite variant's own uncertainty threshold, calibrated probabilities and scope decisions."""
    figures: dict[str, dict[str, Any]] = {}
    for variant in DEFAULT_VARIANT_FILES:
        if variant not in card.variants:
            continue
        scorer = load_tflite(variant_file(ModelRef(model_dir, card), variant), card, variant=variant)
        probs, features = model_outputs(scorer, val.pixels, card.preprocessing, batch_size)
        far = detector is not None and features is not None
        out = failed_check | (detector.distances(features) > detector.threshold if far else False)  # type: ignore[union-attr]
        calibrated = apply_temperature(probs, temperature)
        confidence, correct = calibrated.max(axis=1), calibrated.argmax(axis=1) == val.labels
        own = uncertain_threshold(confidence[~out], correct[~out], target_accuracy)
        figures[variant] = {"uncertain_below": own, "probs": calibrated, "out": out}
    return figures


def _validation_figures(
    raw: np.ndarray,
    calibrated: np.ndarray,
    out_of_scope: np.ndarray,
    failed_check: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    target_accuracy: float,
    variants: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The card's ``trust.validation``: flag shares and calibration on the validation split, per format."""
    correct = calibrated.argmax(axis=1) == labels
    in_scope = ~out_of_scope
    unflagged = in_scope & (calibrated.max(axis=1) >= threshold)
    return {
        "n": len(labels),
        "out_of_scope_share": float(out_of_scope.mean()),
        "out_of_scope_by_input_checks": int(failed_check.sum()),
        "uncertain_share": float((in_scope & ~unflagged).mean()),
        "unflagged_share": float(unflagged.mean()),
        "unflagged_accuracy": float(correct[unflagged].mean()) if unflagged.any() else None,
        "accuracy": float(correct.mean()),
        "ece_before": expected_calibration_error(raw, labels),
        "ece_after": expected_calibration_error(calibrated, labels),
        "nll_before": negative_log_likelihood(raw, labels),
        "nll_after": negative_log_likelihood(calibrated, labels),
        "target_met": bool(unflagged.any() and correct[unflagged].mean() >= target_accuracy),
        "variants": {
            name: _variant_validation(v["probs"], v["out"], labels, threshold)
            | {"own_uncertain_below": v["uncertain_below"]}
            for name, v in variants.items()
        },
    }


def _write_reports(
    reports: Path, trust: TrustCard, raw: np.ndarray, calibrated: np.ndarray, labels: np.ndarray
) -> None:
    reports.mkdir(exist_ok=True)
    (reports / "calibration.json").write_text(
        json.dumps(
            {
                "trust": trust.model_dump(mode="json"),
                "reliability_before": reliability_bins(raw, labels),
                "reliability_after": reliability_bins(calibrated, labels),
                "reasons": REASONS,
            },
            indent=2,
        )
        + "\n"
    )
    plot_reliability(raw, calibrated, labels, trust.temperature, reports / "reliability.png")


def _variant_validation(
    calibrated: np.ndarray, out_of_scope: np.ndarray, labels: np.ndarray, threshold: float
) -> dict[str, Any]:
    """A served variant's flag figures on the validation split, under the model's shared threshold."""
    correct = calibrated.argmax(axis=1) == labels
    unflagged = ~out_of_scope & (calibrated.max(axis=1) >= threshold)
    return {
        "out_of_scope_share": float(out_of_scope.mean()),
        "unflagged_share": float(unflagged.mean()),
        "unflagged_accuracy": float(correct[unflagged].mean()) if unflagged.any() else None,
        "accuracy": float(correct.mean()),
        "ece_after": expected_calibration_error(calibrated, labels),
    }


def _feature_layer_name(model_dir: Path) -> str | None:
    keras_file = Path(model_dir) / "model.keras"
    if not keras_file.is_file():
        return None
    import keras

    from training.export import feature_layer

    return feature_layer(keras.saving.load_model(str(keras_file), compile=False))[0]


def plot_reliability(
    before: np.ndarray, after: np.ndarray, labels: np.ndarray, temperature: float, out_png: Path
) -> None:
    """Reliability diagram (15 bins, top label) before and after temperature scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, probs, title in ((axes[0], before, "raw"), (axes[1], after, f"temperature {temperature:.3f}")):
        bins = reliability_bins(probs, labels)
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
        ax.bar(
            [b["low"] for b in bins],
            [b["accuracy"] for b in bins],
            width=1 / 15,
            align="edge",
            alpha=0.6,
            edgecolor="black",
            label="accuracy",
        )
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="C3", ms=4)
        ece = expected_calibration_error(probs, labels)
        ax.set_title(f"{title}: ECE {ece:.4f}, NLL {negative_log_likelihood(probs, labels):.4f}")
        ax.set_xlabel("confidence (top label)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    fig.suptitle(f"validation split, {len(labels)} scans")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def describe(card: ModelCard) -> list[str]:
    """Lines for the command's output."""
    trust = card.trust
    if trust is None:
        return ["no trust section"]
    v: dict[str, Any] = trust.validation
    detector = trust.detector or "none"
    if trust.detector:
        detector += f", {trust.feature_dim} features, threshold {trust.scope_threshold:.3f}"
    return [
        f"temperature {trust.temperature:.4f}; uncertain below {trust.uncertain_below:.4f} (calibrated)",
        f"detector: {detector}",
        f"validation ({v['n']} scans): out of scope {v['out_of_scope_share']:.2%}, uncertain "
        f"{v['uncertain_share']:.2%}, unflagged {v['unflagged_share']:.2%} at accuracy "
        f"{(v['unflagged_accuracy'] or 0):.4f} (all: {v['accuracy']:.4f})",
        f"ECE {v['ece_before']:.4f} -> {v['ece_after']:.4f}; "
        f"NLL {v['nll_before']:.4f} -> {v['nll_after']:.4f}",
    ]
