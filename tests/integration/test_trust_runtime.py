"""Trust end to end on a real tiny model: export with features, calibrate, serve in every format.

The model is a small real Keras network exported by ``training.export.export_savedmodel``,
calibrated by ``training.calibrate.calibrate_model`` on a generated scan folder, converted to float
and int8 TFLite by ``brainscan export``'s code, then loaded by ``brainscan.runtime.load_scorer``
the way workers load it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from brainscan.imaging import prepare
from brainscan.modelrepo import ModelNotFound, read_card
from brainscan.runtime import load_scorer
from brainscan.trust import TRUST_FILE
from tests.support.models import grey_card, tiny_feature_keras
from tests.support.training import write_dataset

VARIANTS = ("savedmodel", "tflite", "tflite-int8")


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _negatives() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    colour = Image.new("RGB", (120, 90), (200, 30, 30))
    ImageDraw.Draw(colour).ellipse([20, 20, 90, 70], fill=(250, 250, 40))
    page = Image.new("L", (240, 160), 255)
    for line in range(6):
        ImageDraw.Draw(page).text((8, 8 + 24 * line), "impression: normal study", fill=0)
    return {
        "blank": _png(Image.new("L", (100, 100), 0)),
        "colour": _png(colour),
        "text": _png(page),
        "noise": _png(Image.fromarray(rng.integers(0, 256, (96, 96), dtype=np.uint8))),
    }


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from training.calibrate import calibrate_model
    from training.export import export_savedmodel, export_variants

    root = tmp_path_factory.mktemp("trust")
    data = write_dataset(root / "data", per_class=12, size=64)
    folder = root / "models" / "tiny" / "1"
    export_savedmodel(tiny_feature_keras(), folder)
    grey_card("tiny", architecture="tiny-cnn").write(folder)
    files = sorted(str(p.relative_to(data)) for p in data.rglob("*.*"))
    validation = files[::3]
    (folder / "reports").mkdir()
    (folder / "reports" / "split.json").write_text(json.dumps({"validation": validation}))
    card = calibrate_model(folder, data, cache_dir=None)
    export_variants(folder, tflite=True, int8=True, representative_dir=data, samples=24, num_threads=1)
    scans = [(data / p).read_bytes() for p in validation]
    return {"folder": folder, "repo": root / "models", "card": card, "scans": scans, "data": data}


def test_calibration_writes_the_card_section_and_files(calibrated: dict) -> None:
    folder = calibrated["folder"]
    card = read_card(folder)
    trust = card.trust
    assert trust is not None and trust.detector == "mahalanobis"
    assert trust.detector_file == TRUST_FILE and (folder / TRUST_FILE).is_file()
    assert trust.feature_layer is None  # no model.keras in this folder: the layer is not named
    assert trust.feature_dim == 8 and trust.features_output == "features"
    assert trust.temperature > 0 and 0 < trust.uncertain_below <= 1.0 + 1e-9
    # At most 1% of the 16 validation scans by distance: floor(0.16) = 0 above the threshold.
    assert trust.validation["n"] == 16
    assert trust.validation["out_of_scope_share"] <= 0.015
    assert trust.input_checks is not None and "near_constant" in trust.input_checks.enabled
    assert (folder / "reports" / "reliability.png").stat().st_size > 1000
    saved = json.loads((folder / "reports" / "calibration.json").read_text())
    assert saved["trust"]["temperature"] == pytest.approx(trust.temperature)
    assert set(card.variants) == {"tflite", "tflite-int8"}


def test_recalibrating_with_variants_sets_one_threshold_that_holds_for_each(
    calibrated: dict, tmp_path: Path
) -> None:
    from training.calibrate import calibrate_model

    folder = tmp_path / "tiny" / "1"
    shutil.copytree(calibrated["folder"], folder)
    card = calibrate_model(folder, calibrated["data"], cache_dir=None)
    assert card.trust is not None
    per_variant = card.trust.validation["variants"]
    assert set(per_variant) == {"tflite", "tflite-int8"}
    saved_model_alone = calibrated["card"].trust.uncertain_below
    # The shared threshold is the strictest of the formats' own (each fitted on the validation split).
    own = [figures["own_uncertain_below"] for figures in per_variant.values()]
    assert card.trust.uncertain_below == pytest.approx(max([saved_model_alone, *own]))
    for figures in per_variant.values():
        assert 0.0 <= figures["unflagged_share"] <= 1.0 and 0.0 <= figures["accuracy"] <= 1.0


def test_every_format_returns_features_and_the_same_flags(calibrated: dict) -> None:
    negatives = _negatives()
    inputs = calibrated["scans"] + list(negatives.values())
    results = {}
    for variant in VARIANTS:
        scorer = load_scorer(calibrated["folder"], model_format=variant, num_threads=1)
        assert scorer.variant == variant and scorer.trust.detector is not None
        batch = np.stack([prepare(data, scorer.card.input_spec) for data in inputs])
        _, features = scorer.predict_with_features(batch)
        assert features is not None and features.shape == (len(inputs), 8)
        findings = [scorer.trust.check(data) for data in inputs]
        results[variant] = (scorer.judge(batch, findings), features)

    saved, saved_features = results["savedmodel"]
    lite, lite_features = results["tflite"]
    np.testing.assert_allclose(lite_features, saved_features, atol=1e-4)
    assert [v.flag for v in lite] == [v.flag for v in saved]
    assert [v.label for v in lite] == [v.label for v in saved]
    np.testing.assert_allclose([v.scope_score for v in lite], [v.scope_score for v in saved], rtol=1e-4)

    int8, _ = results["tflite-int8"]
    threshold = read_card(calibrated["folder"]).trust.uncertain_below  # type: ignore[union-attr]
    for a, b in zip(saved, int8, strict=True):
        # int8 moves scores by a little: compare where neither decision is within that little.
        clear = abs(a.scope_score - 1.0) > 0.15 and abs(a.confidence - threshold) > 0.03
        if clear or a.flag_code in ("near_constant", "strong_colour", "no_head"):
            assert (a.flag, a.flag_code, a.label) == (b.flag, b.flag_code, b.label)

    codes = {name: v.flag_code for name, v in zip(negatives, saved[len(calibrated["scans"]) :], strict=True)}
    assert codes["blank"] == "near_constant"
    assert codes["colour"] == "strong_colour"
    assert codes["text"] == "no_head"
    assert all(v.flag == "out_of_scope" and v.label is None for v in saved[-4:-1])
    # Calibrated probabilities are distributions, and the scans that pass the input checks.
    assert all(abs(float(v.probabilities.sum()) - 1.0) < 1e-5 for v in saved)
    assert all(v.flag_code not in ("near_constant", "strong_colour", "no_head") for v in saved[:16])


def test_a_setting_overrides_the_uncertain_threshold(calibrated: dict, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from brainscan.settings import get_settings

    monkeypatch.setenv("BRAINSCAN_UNCERTAIN_BELOW", "0.0")
    get_settings.cache_clear()
    try:
        scorer = load_scorer(calibrated["folder"], model_format="savedmodel")
    finally:
        monkeypatch.delenv("BRAINSCAN_UNCERTAIN_BELOW")
        get_settings.cache_clear()
    assert scorer.trust.uncertain_below == 0.0
    batch = np.stack([prepare(data, scorer.card.input_spec) for data in calibrated["scans"]])
    assert all(v.flag != "uncertain" for v in scorer.judge(batch))


def test_the_worker_engine_hands_on_flags(calibrated: dict) -> None:
    from brainscan.settings import Settings
    from worker.engine import Engine

    engine = Engine(Settings(model_dir=calibrated["repo"], model_format="savedmodel"))
    engine.load()
    sources = [lambda d=data: d for data in [calibrated["scans"][0], _negatives()["blank"]]]
    prepared = engine.prepare_many(sources).result()
    assert [p.error for p in prepared] == [None, None]
    assert [p.finding for p in prepared] == [None, "near_constant"]
    verdicts = engine.score_batch(np.stack([p.pixels for p in prepared]), [p.finding for p in prepared])
    assert verdicts[1].flag == "out_of_scope" and verdicts[1].label is None
    assert verdicts[1].flag_reason and "uniform" in verdicts[1].flag_reason
    assert verdicts[0].scope_score is not None and verdicts[0].probabilities.shape == (4,)


def test_a_card_less_export_still_loads_with_raw_confidence_flags(tmp_path: Path) -> None:
    model = tiny_feature_keras(seed=1, size=224, channels=3)  # the original contract's input, a tiny network
    folder = tmp_path / "original" / "1"
    model.export(str(folder), verbose=False)  # one output, output_0; no card
    scorer = load_scorer(folder, model_format="savedmodel")
    assert scorer.card.card_less and not scorer.trust.calibrated and scorer.trust.detector is None
    batch = np.random.default_rng(0).uniform(-120, 140, (3, 224, 224, 3)).astype(np.float32)
    probabilities, features = scorer.predict_with_features(batch)
    assert features is None
    np.testing.assert_allclose(probabilities, model.predict(batch, verbose=0), atol=1e-5)
    verdicts = scorer.judge(batch, ["near_constant"] * 3)  # no input checks without a card section
    for verdict, row in zip(verdicts, probabilities, strict=True):
        np.testing.assert_allclose(verdict.probabilities, row, atol=1e-6)  # temperature 1
        assert verdict.scope_score is None
        assert verdict.flag == ("uncertain" if row.max() < 0.9 else None)


def test_a_detector_without_a_features_output_is_refused(calibrated: dict, tmp_path: Path) -> None:
    folder = tmp_path / "stale" / "1"
    tiny_feature_keras().export(str(folder), verbose=False)
    card = read_card(calibrated["folder"]).model_copy(update={"variants": {}, "name": "stale"})
    card.write(folder)
    (folder / TRUST_FILE).write_bytes((calibrated["folder"] / TRUST_FILE).read_bytes())
    with pytest.raises(ModelNotFound, match="brainscan calibrate"):
        load_scorer(folder, model_format="savedmodel")


def test_calibrate_and_evaluate_commands(calibrated: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from brainscan_cli.main import app
    from training.export import export_savedmodel

    folder = tmp_path / "models" / "fresh" / "1"
    export_savedmodel(tiny_feature_keras(seed=3), folder)
    grey_card("fresh", architecture="tiny-cnn").write(folder)
    (folder / "reports").mkdir()
    split = calibrated["folder"] / "reports" / "split.json"
    (folder / "reports" / "split.json").write_text(split.read_text())
    runner = CliRunner()
    data = str(calibrated["data"])
    result = runner.invoke(
        app, ["calibrate", "--model", str(folder), "--data", data, "--cache-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "temperature" in result.output and "detector: mahalanobis, 8 features" in result.output
    assert read_card(folder).trust is not None

    negatives = tmp_path / "negatives"
    for family, (name, payload) in zip(("blank", "colour"), list(_negatives().items())[:2], strict=True):
        (negatives / family).mkdir(parents=True)
        (negatives / family / f"{name}.png").write_bytes(payload)
    (negatives / "notes.txt").write_bytes(b"not an image")  # refused at decode: counts as flagged
    report = tmp_path / "evaluation.json"
    args = [
        "evaluate",
        "--data",
        data,
        "--model",
        str(folder),
        "--json",
        str(report),
        "--ood",
        str(negatives),
    ]
    result = runner.invoke(app, [*args, "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    evaluation = json.loads(report.read_text())
    trust = evaluation["trust"]
    assert {"ece_before", "ece_after", "nll_before", "nll_after", "unflagged_share"} <= set(trust)
    ood = evaluation["ood"]
    assert set(ood["families"]) == {"blank", "colour", "."}
    assert ood["families"]["."] == pytest.approx(
        {**ood["families"]["."], "n": 1, "refused": 1, "flagged_or_refused_share": 1.0}
    )
    assert ood["families"]["blank"]["out_of_scope"] == 1 and ood["overall"]["n"] == 3
    # Input checks refuse both generated images outright: they rank above every scan.
    assert ood["overall"]["auroc"] == 1.0 and ood["overall"]["flagged_or_refused_share"] == 1.0
