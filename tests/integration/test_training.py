"""The training pipeline end to end on generated scans: train (both architectures), resume, evaluate.

Small on purpose (6 scans per class, one epoch): the point is that every piece runs and fits
together. That training and serving see the same tensor for the same image is
tests/unit/test_training_tensors.py.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from typer.testing import CliRunner

from brainscan import CLASSES
from brainscan.imaging import prepare
from brainscan.modelrepo import ModelCard
from brainscan_cli.main import app
from tests.support.training import write_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]
runner = CliRunner()


def _invoke(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "Training", per_class=6, size=64)


@pytest.fixture(scope="module")
def compact_model(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "compact" / "1"
    _invoke(
        "train",
        "--data",
        str(dataset),
        "--out",
        str(out),
        "--arch",
        "compact",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--seed",
        "7",
        # Smaller than the recipe's own: checks --input-size and keeps the suite quick.
        "--input-size",
        "96",
        "--no-cache",
    )
    return out


# ---- train ----------------------------------------------------------------------------------------
def _assert_model_folder(out: Path, arch: str) -> ModelCard:
    assert (out / "saved_model.pb").is_file() and (out / "variables").is_dir()
    card = ModelCard.model_validate_json((out / "model.json").read_text())
    assert card.architecture == arch and card.classes == list(CLASSES)
    assert card.name == out.parent.name and card.version == out.name
    # Every class with >= 2 scans has a validation scan, even in a 6-per-class dataset.
    assert all(n >= 1 for n in card.training["validation_counts"].values()), card.training
    assert sum(card.training["validation_counts"].values()) == card.metrics["val_n"]
    assert 0.0 <= card.metrics["val_accuracy"] <= 1.0
    reports = out / "reports"
    for name in (
        "curves.png",
        "validation_confusion.png",
        "validation.json",
        "validation.txt",
        "history.csv",
        "split.json",
        "train.log",
    ):
        assert (reports / name).is_file(), name
    assert (reports / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Issue 11: `brainscan train` ends calibrated (too few scans here for a scope detector).
    assert card.trust is not None and card.trust.temperature > 0 and card.trust.fitted_at
    assert (reports / "reliability.png").is_file() and (reports / "calibration.json").is_file()
    return card


def test_train_compact_end_to_end(compact_model: Path, dataset: Path) -> None:
    import keras

    from training.recipe import COMPACT_RECIPE

    card = _assert_model_folder(compact_model, "compact")
    assert (card.input_size, card.channels, card.preprocessing, card.crop) == (
        (96, 96),
        1,
        "head-zscore",
        "head",
    )
    # Trained in bfloat16 where that is faster here, but what is served is float32 throughout.
    log = (compact_model / "reports" / "train.log").read_text()
    assert card.training["precision"] in ("mixed_bfloat16", "float32")
    assert f"precision: {card.training['precision']}\n" in log
    served = keras.saving.load_model(compact_model / "model.keras")
    assert {layer.dtype_policy.name for layer in served.layers} == {"float32"}
    # --seed and --input-size move the initial weights, augmentation, batch order and the decoded
    # pixels, never the validation split (compared with the split at the recipe's own size).
    from training.data import leak_free_split, load_scanset
    from training.train import input_spec

    recipe = card.training["recipe"]
    assert (recipe["seed"], recipe["split_seed"], recipe["input_size"]) == (7, COMPACT_RECIPE.split_seed, 96)
    assert served.input_shape == (None, 96, 96, 1)
    scans = load_scanset(dataset, input_spec(COMPACT_RECIPE), cache_dir=None)
    _, default_split = leak_free_split(scans, COMPACT_RECIPE.validation_fraction, COMPACT_RECIPE.split_seed)
    split = json.loads((compact_model / "reports" / "split.json").read_text())["validation"]
    assert split == default_split.paths
    # Keras' progress bar (its final state: 20 training scans at batch 8 = 3 steps) and the summary.
    assert "stage 1/1" in log and "\n3/3 " in log and "validation accuracy" in log
    assert "\r" not in log and "\b" not in log  # progress bars kept as their final line only


@pytest.fixture(scope="module")
def second_member(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "compact-seed8" / "1"
    # The recipe's own seed (the first member was trained with --seed 7).
    _invoke(
        "train",
        "--data",
        str(dataset),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--input-size",
        "96",
        "--no-cache",
    )
    return out


def test_an_ensemble_of_seeded_members_serves_their_mean(
    compact_model: Path, second_member: Path, dataset: Path, tmp_path: Path
) -> None:
    import tensorflow as tf

    from training.recipe import COMPACT_RECIPE

    out = tmp_path / "ensemble" / "1"
    members = [compact_model, second_member]
    args = [arg for member in members for arg in ("--member", str(member))]
    output = _invoke(
        "ensemble", *args, "--out", str(out), "--data", str(dataset), "--cache-dir", str(tmp_path)
    )
    assert "validation accuracy" in output and "temperature" in output
    card = ModelCard.model_validate_json((out / "model.json").read_text())
    member_cards = [ModelCard.model_validate_json((m / "model.json").read_text()) for m in members]
    assert card.architecture == "compact-ensemble" and card.gradcam_layer == "maps"
    assert [m["seed"] for m in card.training["members"]] == [7, COMPACT_RECIPE.seed]
    assert card.training["wall_seconds"] >= sum(c.training["wall_seconds"] for c in member_cards)
    assert card.metrics["val_n"] == member_cards[0].metrics["val_n"] and card.trust is not None
    # Served from the SavedModel alone (Grad-CAM reads its split signatures), on the members' split.
    assert not (out / "model.keras").exists()
    assert (out / "reports" / "split.json").read_text() == (
        compact_model / "reports" / "split.json"
    ).read_text()
    files = sorted(dataset.rglob("*.*"))[:6]
    pixels = tf.constant(np.stack([prepare(f.read_bytes(), card.input_spec) for f in files]))
    served = [tf.saved_model.load(str(folder)).signatures["serve"] for folder in (out, *members)]
    ensemble, *singles = (function(pixels=pixels)["output_0"].numpy() for function in served)
    np.testing.assert_allclose(ensemble, np.mean(singles, axis=0), atol=1e-5)


def test_an_ensemble_refuses_members_validated_on_other_scans(
    compact_model: Path, second_member: Path, dataset: Path, tmp_path: Path
) -> None:
    import shutil

    other = tmp_path / "other" / "1"
    shutil.copytree(second_member, other)
    split = json.loads((other / "reports" / "split.json").read_text())
    (other / "reports" / "split.json").write_text(json.dumps({"validation": split["validation"][1:]}))
    members = ["--member", str(compact_model), "--member", str(other)]
    where = ["--out", str(tmp_path / "e" / "1"), "--data", str(dataset), "--cache-dir", str(tmp_path)]
    result = runner.invoke(app, ["ensemble", *members, *where])
    assert result.exit_code != 0
    assert "was validated on other scans" in result.output
    assert not (tmp_path / "e" / "1" / "saved_model.pb").exists()


def test_train_resnet50_with_no_weights_end_to_end(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "resnet50" / "1"
    output = _invoke(
        "train",
        "--data",
        str(dataset),
        "--out",
        str(out),
        "--arch",
        "resnet50",
        "--weights",
        "none",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--limit-per-class",
        "6",
        "--no-cache",
    )
    card = _assert_model_folder(out, "resnet50")
    assert (card.input_size, card.channels, card.preprocessing) == ((224, 224), 3, "resnet50")
    # Both stages of the original recipe ran (one epoch each at --epochs 1).
    assert "stage 1/2" in output and "stage 2/2" in output
    with open(out / "reports" / "history.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]
    # The export serves under the original contract's input name.
    from brainscan.runtime import load_scorer

    scorer = load_scorer(out, model_format="savedmodel")
    assert scorer.input_name == "keras_tensor"  # type: ignore[attr-defined]


def test_interrupted_training_resumes_from_its_last_epoch(dataset: Path, tmp_path: Path) -> None:
    import keras

    from training.train import train

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
            raise KeyboardInterrupt  # after BackupAndRestore saved epoch 1 (callbacks run in order)

    out = tmp_path / "models" / "compact" / "1"
    with pytest.raises(KeyboardInterrupt):
        train(
            dataset,
            out,
            arch="compact",
            epochs=2,
            batch_size=8,
            cache_dir=None,
            verbose=0,
            extra_callbacks=[Interrupt()],
        )
    assert not (out / "saved_model.pb").exists()
    assert (out / "checkpoints" / "backup-stage1").is_dir()

    output = _invoke(
        "train", "--data", str(dataset), "--out", str(out), "--epochs", "2", "--batch-size", "8", "--no-cache"
    )
    assert "Epoch 2/2" in output and "Epoch 1/2" not in output  # continued, did not start over
    with open(out / "reports" / "history.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]
    _assert_model_folder(out, "compact")

    # Run again once finished: nothing left to train, the model is re-evaluated and re-exported.
    again = _invoke(
        "train", "--data", str(dataset), "--out", str(out), "--epochs", "2", "--batch-size", "8", "--no-cache"
    )
    assert "finished in an earlier run" in again and "Epoch" not in again


def test_train_refuses_to_resume_a_run_with_other_settings(compact_model: Path, dataset: Path) -> None:
    """Another seed into a finished run's folder would resume its checkpoints under the new name."""
    before = (compact_model / "model.json").read_text()
    options = ["--epochs", "1", "--batch-size", "8", "--seed", "8", "--input-size", "96", "--no-cache"]
    result = runner.invoke(app, ["train", "--data", str(dataset), "--out", str(compact_model), *options])
    assert result.exit_code == 1
    assert "holds checkpoints of a run with other settings (seed)" in result.output
    assert "Epoch" not in result.output and "Traceback" not in result.output
    assert (compact_model / "model.json").read_text() == before  # the finished run is untouched


def test_train_refuses_a_folder_with_unknown_classes(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d", per_class=2, size=32)
    (data / "astrocytoma").mkdir()
    (data / "astrocytoma" / "x.png").write_bytes((data / "glioma" / "glioma_001.png").read_bytes())
    result = runner.invoke(
        app, ["train", "--data", str(data), "--out", str(tmp_path / "m" / "x" / "1"), "--no-cache"]
    )
    assert result.exit_code == 1
    assert "astrocytoma" in result.output and "not among" in result.output


# ---- evaluate -------------------------------------------------------------------------------------
def test_evaluate_json_matches_an_independent_count(
    compact_model: Path, dataset: Path, tmp_path: Path
) -> None:
    json_out = tmp_path / "eval.json"
    output = _invoke(
        "evaluate",
        "--model",
        str(compact_model),
        "--data",
        str(dataset),
        "--json",
        str(json_out),
        "--batch-size",
        "5",
        "--no-cache",
    )
    report = json.loads(json_out.read_text())
    assert report["n"] == 24 and report["model"]["format"] == "savedmodel"

    # Independently: every file's bytes through the serving path, one by one, counted by hand.
    from brainscan.runtime import load_scorer

    scorer = load_scorer(compact_model, model_format="savedmodel")
    confusion = [[0] * 4 for _ in CLASSES]
    losses = []
    for k, name in enumerate(CLASSES):
        for path in sorted((dataset / name).iterdir()):
            probabilities = scorer.predict(prepare(path.read_bytes(), scorer.card.input_spec)[None])[0]
            confusion[k][int(probabilities.argmax())] += 1
            losses.append(-np.log(max(float(probabilities[k]), 1e-7)))
    assert report["confusion_matrix"] == confusion
    assert report["accuracy"] == pytest.approx(sum(confusion[k][k] for k in range(4)) / 24)
    assert report["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-4)
    for k, name in enumerate(CLASSES):
        assert report["per_class"][name]["support"] == 6
        predicted = sum(row[k] for row in confusion)
        expected = confusion[k][k] / predicted if predicted else 0.0
        assert report["per_class"][name]["precision"] == pytest.approx(expected)
    assert "confusion matrix" in output and f"{report['accuracy']:.4f}" in output
    assert "same data fingerprint" in output  # it was trained on this very folder, and says so


def test_evaluate_without_model_uses_the_served_one(
    compact_model: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from brainscan.settings import get_settings

    monkeypatch.setenv("BRAINSCAN_MODEL_DIR", str(compact_model.parents[1]))
    monkeypatch.setenv("BRAINSCAN_MODEL_NAME", "")
    monkeypatch.setenv("BRAINSCAN_MODEL_FORMAT", "")
    monkeypatch.setenv("BRAINSCAN_VAR_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    try:
        _invoke("evaluate", "--data", str(dataset), "--json", str(tmp_path / "served.json"))
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    report = json.loads((tmp_path / "served.json").read_text())
    assert report["model"]["path"] == str(compact_model) and report["n"] == 24
    assert list((tmp_path / "var" / "cache").glob("scans-*.npz"))  # decoded once, cached under var_dir


def test_evaluate_without_any_model_is_a_clear_error(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from brainscan.settings import get_settings

    monkeypatch.setenv("BRAINSCAN_MODEL_DIR", str(tmp_path / "empty"))
    get_settings.cache_clear()
    try:
        result = runner.invoke(app, ["evaluate", "--data", str(dataset), "--no-cache"])
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert result.exit_code == 1 and "no model" in result.output
