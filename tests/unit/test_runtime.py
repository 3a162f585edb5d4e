"""brainscan.runtime: real SavedModels and TFLite files, loaded the way workers and evaluate load them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from brainscan import CLASSES
from brainscan.imaging import normalize
from brainscan.modelrepo import ModelNotFound, promote
from brainscan.runtime import load_scorer, predict_in_batches
from tests.support.models import TINY_SIZE, grey_card, small_compact_keras

SIZE = TINY_SIZE  # the side of grey_card's and small_compact_keras' input


def _compact_keras(seed: int = 0):  # type: ignore[no-untyped-def]
    """The compact architecture, narrowed for a test, with its BatchNorm statistics made non-trivial."""
    import keras

    model = small_compact_keras(seed)
    # Fresh BatchNorm layers are identities and zero-initialised gammas mute the residual branches;
    # give them values so the export is compared on a network that actually mixes its inputs.
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape),
                    rng.normal(0, 0.1, beta.shape),
                    rng.normal(0, 0.1, mean.shape),
                    rng.uniform(0.5, 1.5, var.shape),
                ]
            )
    return model


@pytest.fixture(scope="module")
def compact(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model = _compact_keras()
    repo = tmp_path_factory.mktemp("models")
    folder = repo / "compact" / "1"
    model.export(str(folder), format="tf_saved_model", verbose=False)
    grey_card().write(folder)
    pixels = np.random.default_rng(1).integers(0, 256, (7, SIZE, SIZE, 1)).astype(np.float32)
    return {"model": model, "repo": repo, "folder": folder, "pixels": pixels}


@pytest.fixture(scope="module")
def tflite_files(compact: dict) -> dict:
    from training.export import convert_tflite

    folder = compact["folder"]
    float_file = convert_tflite(folder, folder / "model.tflite")
    int8_file = convert_tflite(folder, folder / "model-int8.tflite", representative=compact["pixels"])
    return {"float": float_file, "int8": int8_file}


def test_savedmodel_round_trip_equals_keras_predict(compact: dict) -> None:
    scorer = load_scorer(compact["folder"], model_format="savedmodel")
    assert scorer.variant == "savedmodel" and scorer.input_name == "pixels"  # type: ignore[attr-defined]
    expected = compact["model"].predict(compact["pixels"], verbose=0)
    got = scorer.predict(compact["pixels"])
    assert got.dtype == np.float32 and got.shape == (7, len(CLASSES))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.ptp(expected, axis=0).max() > 1e-3  # the inputs do move the outputs: a real comparison


def test_repository_folder_resolves_the_promoted_model(compact: dict) -> None:
    promote(compact["repo"], "compact", "1")
    scorer = load_scorer(compact["repo"], model_format="savedmodel")
    assert scorer.path == compact["folder"] and scorer.card.name == "compact"


def test_original_contract_model_without_card(tmp_path: Path) -> None:
    """Input ``keras_tensor``, output ``output_0``, no card: served as the original 224x224 contract."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((224, 224, 3), name="keras_tensor")
    x = keras.layers.Conv2D(4, 7, strides=8)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    folder = tmp_path / "original" / "1"
    model.export(str(folder), verbose=False)
    scorer = load_scorer(folder, model_format="")
    assert scorer.card.card_less and scorer.card.input_spec.preprocessing == "resnet50"
    assert scorer.input_name == "keras_tensor" and scorer.output_name == "output_0"  # type: ignore[attr-defined]
    batch = normalize(
        np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3)).astype(np.float32), "resnet50"
    )
    np.testing.assert_allclose(scorer.predict(batch), model.predict(batch, verbose=0), atol=1e-5)


def test_outputs_follow_CLASSES_whatever_order_the_card_lists(compact: dict, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "reordered" / "1"
    shutil.copytree(compact["folder"], folder)
    reversed_classes = list(reversed(CLASSES))
    grey_card(classes=reversed_classes).write(folder)
    plain = load_scorer(compact["folder"], model_format="savedmodel").predict(compact["pixels"])
    reordered = load_scorer(folder, model_format="savedmodel").predict(compact["pixels"])
    # The model's column k means reversed_classes[k]; the scorer returns CLASSES order.
    np.testing.assert_allclose(reordered, plain[:, ::-1], atol=1e-6)


def test_wrong_input_shape_is_a_clear_error(compact: dict) -> None:
    scorer = load_scorer(compact["folder"], model_format="savedmodel")
    with pytest.raises(ValueError, match=r"takes \[n, 32, 32, 1\] input, got shape \[2, 32, 32, 3\]"):
        scorer.predict(np.zeros((2, SIZE, SIZE, 3), np.float32))
    assert scorer.predict(np.zeros((0, SIZE, SIZE, 1), np.float32)).shape == (0, 4)


def test_missing_tflite_variant_says_how_to_make_it(tmp_path: Path, compact: dict) -> None:
    import shutil

    folder = tmp_path / "bare" / "1"
    shutil.copytree(compact["folder"], folder, ignore=shutil.ignore_patterns("*.tflite"))
    with pytest.raises(ModelNotFound, match=r"no tflite-int8 variant.*brainscan export --model .* --int8"):
        load_scorer(folder, model_format="tflite-int8")


def test_tflite_float_agrees_with_the_savedmodel(compact: dict, tflite_files: dict) -> None:
    saved = load_scorer(compact["folder"], model_format="savedmodel")
    lite = load_scorer(compact["folder"], model_format="tflite", num_threads=1)
    assert lite.variant == "tflite" and lite.card.format == "tflite"
    np.testing.assert_allclose(lite.predict(compact["pixels"]), saved.predict(compact["pixels"]), atol=1e-4)


def test_tflite_batch_size_changes_between_calls(compact: dict, tflite_files: dict) -> None:
    lite = load_scorer(tflite_files["float"], num_threads=1)
    whole = lite.predict(compact["pixels"])
    pieces = np.concatenate([lite.predict(compact["pixels"][i : i + 1]) for i in range(7)])
    np.testing.assert_allclose(pieces, whole, atol=1e-6)
    np.testing.assert_allclose(predict_in_batches(lite, compact["pixels"], batch_size=3), whole, atol=1e-6)


def test_int8_runs_and_returns_probabilities(compact: dict, tflite_files: dict) -> None:
    scorer = load_scorer(tflite_files["int8"], num_threads=2)
    assert scorer.variant == "tflite-int8"
    details = scorer.interpreter.get_input_details()[0]  # type: ignore[attr-defined]
    assert details["dtype"] == np.int8 and details["quantization"][0] > 0  # full-integer input
    probabilities = scorer.predict(compact["pixels"])
    assert probabilities.shape == (7, 4) and probabilities.dtype == np.float32
    assert np.all(probabilities >= 0) and np.all(probabilities <= 1)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    saved = load_scorer(compact["folder"], model_format="savedmodel").predict(compact["pixels"])
    assert np.abs(probabilities - saved).max() < 0.1  # int8 is close, not equal


def test_model_format_setting_is_honoured(
    compact: dict, tflite_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from brainscan.settings import get_settings

    monkeypatch.setenv("BRAINSCAN_MODEL_FORMAT", "tflite-int8")
    monkeypatch.setenv("BRAINSCAN_TF_THREADS", "1")
    get_settings.cache_clear()
    try:
        scorer = load_scorer(compact["folder"])
        assert scorer.variant == "tflite-int8" and scorer.path.name == "model-int8.tflite"
        monkeypatch.setenv("BRAINSCAN_MODEL_FORMAT", "savedmodel")
        get_settings.cache_clear()
        assert load_scorer(compact["folder"]).variant == "savedmodel"
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
