"""``brainscan export``: SavedModel check, float and int8 TFLite variants recorded in the card and served."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from typer.testing import CliRunner

from brainscan.imaging import prepare
from brainscan.modelrepo import ModelCard
from brainscan.runtime import load_scorer
from brainscan_cli.main import app
from tests.support.models import grey_card, small_compact_keras
from tests.support.training import write_dataset

pytestmark = [pytest.mark.integration]
runner = CliRunner()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "Training", per_class=5, size=64)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    """A small compact-architecture model, fitted for a few steps so its outputs depend on the scans."""
    import keras

    model = small_compact_keras(seed=0)
    card = grey_card()
    from brainscan import CLASSES

    files = sorted(dataset.rglob("*.*"))
    x = np.stack([prepare(p.read_bytes(), card.input_spec) for p in files])
    y = keras.utils.to_categorical([CLASSES.index(p.parent.name) for p in files], 4)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    model.fit(x, y, epochs=3, batch_size=10, verbose=0)
    folder = tmp_path_factory.mktemp("models") / "compact" / "1"
    model.export(str(folder), format="tf_saved_model", verbose=False)
    card.write(folder)
    # As training writes it: the validation split, which int8 calibration must leave out.
    (folder / "reports").mkdir()
    validation = [str(p.relative_to(dataset)) for p in files[::5]]
    (folder / "reports" / "split.json").write_text(json.dumps({"validation": validation}))
    return folder


def test_export_writes_float_and_int8_variants_and_records_them(model_folder: Path, dataset: Path) -> None:
    result = runner.invoke(
        app,
        [
            "export",
            "--model",
            str(model_folder),
            "--tflite",
            "--int8",
            "--representative",
            str(dataset),
            "--samples",
            "12",
            "--data",
            str(dataset),
            "--cache-dir",
            str(model_folder.parent / "cache"),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert (model_folder / "model.tflite").is_file() and (model_folder / "model-int8.tflite").is_file()

    card = ModelCard.model_validate_json((model_folder / "model.json").read_text())
    assert card.tflite_file == "model.tflite"
    float_entry, int8_entry = card.variants["tflite"], card.variants["tflite-int8"]
    assert float_entry["file"] == "model.tflite" and float_entry["max_abs_diff"] < 1e-4
    assert int8_entry["file"] == "model-int8.tflite" and "12 scans" in int8_entry["calibration"]
    assert int8_entry["max_abs_diff"] < 0.2
    # Accuracy of both on the model's validation split (4 of the 20 scans listed in split.json).
    assert "4 validation scans" in int8_entry["validation"]
    assert 0 <= int8_entry["val_accuracy"] <= 1 and 0 <= int8_entry["savedmodel_val_accuracy"] <= 1
    assert "max |tflite - SavedModel|" in result.output and "val_accuracy" in result.output

    # The recorded variants serve, and agree with the SavedModel on real decoded scans.
    scans = np.stack([prepare(p.read_bytes(), card.input_spec) for p in sorted(dataset.rglob("*.*"))[:6]])
    saved = load_scorer(model_folder, model_format="savedmodel").predict(scans)
    np.testing.assert_allclose(
        load_scorer(model_folder, model_format="tflite").predict(scans), saved, atol=1e-4
    )
    int8 = load_scorer(model_folder, model_format="tflite-int8").predict(scans)
    np.testing.assert_allclose(int8.sum(axis=1), 1.0, atol=1e-5)


def test_calibration_leaves_the_validation_split_out(model_folder: Path, dataset: Path) -> None:
    from training.data import validation_paths
    from training.export import representative_inputs

    exclude = validation_paths(model_folder)
    card = ModelCard.model_validate_json((model_folder / "model.json").read_text())
    everything = representative_inputs(dataset, card.input_spec, 100)
    without = representative_inputs(dataset, card.input_spec, 100, exclude=exclude)
    assert len(everything) == 20 and len(without) == 20 - len(exclude)


def test_int8_needs_a_representative_folder(model_folder: Path) -> None:
    result = runner.invoke(app, ["export", "--model", str(model_folder), "--int8"])
    assert result.exit_code == 1 and "--representative" in result.output


def test_a_model_whose_card_disagrees_with_its_graph_is_refused(model_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "broken" / "1"
    shutil.copytree(model_folder, folder, ignore=shutil.ignore_patterns("*.tflite"))
    card = ModelCard.model_validate_json((folder / "model.json").read_text())
    card.model_copy(update={"input_size": (64, 64)}).write(folder)
    result = runner.invoke(app, ["export", "--model", str(folder), "--tflite"])
    assert result.exit_code == 1 and "its card says (64, 64, 1)" in result.output
    assert not (folder / "model.tflite").exists()


def test_the_exported_savedmodel_stores_each_weight_once_and_serves_the_keras_outputs(tmp_path: Path) -> None:
    """keras-team/keras#23553: tracking the model beside its endpoint saved every weight twice."""
    import tensorflow as tf

    from training.export import export_savedmodel

    model = small_compact_keras(seed=1)
    folder = export_savedmodel(model, tmp_path / "compact" / "1")
    stored = tf.train.list_variables(str(folder / "variables" / "variables"))
    stored_values = sum(int(np.prod(shape)) for name, shape in stored if "OBJECT_GRAPH" not in name)
    assert stored_values == model.count_params()
    pixels = np.random.default_rng(0).normal(size=(2, *model.input_shape[1:])).astype(np.float32)
    served = tf.saved_model.load(str(folder)).signatures["serve"](tf.constant(pixels))
    np.testing.assert_allclose(served["output_0"].numpy(), np.asarray(model(pixels)), atol=1e-6)
