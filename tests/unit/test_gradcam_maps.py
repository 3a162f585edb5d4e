"""Grad-CAM maps (compact net, ResNet50, saliency fallback), computed in this process.

The maps are checked for what makes them usable: the model's input size, values in [0, 1], and not
constant (a map of zeros or ones would mean the gradients never reached the feature layer).
The API + worker flow is tests/integration/test_gradcam.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainscan.modelrepo import ModelCard, resolve_model
from tests.support.images import make_png


def assert_usable(heat: np.ndarray, size: int) -> None:
    assert heat.shape == (size, size)
    assert heat.dtype == np.float32
    assert float(heat.min()) >= 0.0 and float(heat.max()) <= 1.0
    assert float(heat.max()) == pytest.approx(1.0) and float(heat.std()) > 0.01  # not constant


@pytest.fixture(scope="module")
def compact_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny compact net (32 px, one channel) exported as ``brainscan train`` does: SavedModel,
    ``model.keras`` and a card."""
    import keras

    from training.architectures import build_compact

    keras.utils.set_random_seed(3)
    folder = tmp_path_factory.mktemp("compact") / "compact" / "1"
    folder.parent.mkdir(parents=True)
    model = build_compact(32, channels=1)
    model.export(str(folder), verbose=False)
    model.save(str(folder / "model.keras"))
    ModelCard(
        name="compact",
        version="1",
        input_size=(32, 32),
        channels=1,
        preprocessing="none",
        crop="brain",
        architecture="compact",
    ).write(folder)
    return folder.parent.parent


def test_gradcam_of_the_compact_net(compact_repo: Path) -> None:
    from brainscan.imaging import prepare
    from worker.gradcam import GRADCAM, explain_scan, load_explainer

    explainer = load_explainer(resolve_model(compact_repo))
    assert explainer.kind == GRADCAM
    pixels = prepare(make_png(5, size=(48, 48)), explainer.ref.card.input_spec)  # the serving path
    heat, best, probability = explainer.explain(pixels)
    assert_usable(heat, 32)
    assert 0 <= best < 4 and 0.0 < probability <= 1.0
    # At 32 px the last stage is 1x1, so the last *spatial* map explains (never a 1x1 one).
    assert explainer.layer == "stage3_block2_out"

    png = explain_scan(explainer, make_png(6, size=(48, 48)), 10**7)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (256, 256)
        assert image.text["explainer"] == "gradcam" and image.text["model"] == "compact/1"
        assert np.asarray(image).std() > 1.0


def test_gradcam_layer_named_in_the_card(compact_repo: Path) -> None:
    import keras

    from worker.gradcam import gradcam

    model = keras.models.load_model(compact_repo / "compact" / "1" / "model.keras", compile=False)
    batch = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype(np.float32)
    maps, probabilities, layer = gradcam(model, batch, "stage2_block2_out")
    assert layer == "stage2_block2_out" and maps.shape == (2, 32, 32) and probabilities.shape == (2, 4)
    for heat in maps:
        assert_usable(heat, 32)


def test_gradcam_of_resnet50() -> None:
    """The original recipe's network (ResNet50 backbone nested in the model), random weights; one
    224 px call. The map is the backbone's last block, ``conv5_block3_out`` (7x7, upsampled)."""
    import keras

    from training.architectures import build_resnet50
    from worker.gradcam import gradcam

    keras.utils.set_random_seed(0)
    model, _ = build_resnet50(None, 224)
    x = np.random.default_rng(1).uniform(-120, 130, (1, 224, 224, 3)).astype(np.float32)
    maps, probabilities, layer = gradcam(model, x)
    assert layer == "conv5_block3_out"
    assert probabilities.shape == (1, 4)
    assert_usable(maps[0], 224)


def test_saliency_when_the_model_has_no_keras_file(tiny_model_dir: Path) -> None:
    from worker.gradcam import SALIENCY, load_explainer

    explainer = load_explainer(resolve_model(tiny_model_dir))
    assert explainer.kind == SALIENCY
    pixels = np.random.default_rng(2).uniform(-100, 150, (32, 32, 3)).astype(np.float32)
    heat, best, _ = explainer.explain(pixels)
    assert_usable(heat, 32)
    assert 0 <= best < 4


@pytest.fixture(scope="module")
def ensemble_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two compact nets (96 px: a 3x3 last map) combined and exported as ``brainscan ensemble`` does:
    a SavedModel with the Grad-CAM split signatures, no ``model.keras``."""
    import keras

    from training.architectures import build_compact
    from training.ensemble import combine
    from training.export import export_savedmodel

    members = []
    for seed in (4, 5):
        keras.utils.set_random_seed(seed)
        member = build_compact(96, channels=1, rescale=False)
        for layer in member.layers:  # blocks start as the identity; give their last BatchNorm a scale
            if layer.name.endswith("_bn2"):
                layer.gamma.assign(np.ones(layer.gamma.shape, np.float32))
        members.append(member)
    folder = tmp_path_factory.mktemp("ensemble") / "ensemble" / "1"
    model = combine(members)
    export_savedmodel(model, folder)
    model.save(str(folder.parent / "reference.keras"))  # outside the model folder: for comparison only
    ModelCard(
        name="ensemble",
        version="1",
        input_size=(96, 96),
        channels=1,
        preprocessing="head-zscore",
        crop="head",
        architecture="compact-ensemble",
    ).write(folder)
    return folder.parent.parent


def test_an_ensemble_averages_its_members_probabilities() -> None:
    from training.architectures import build_compact
    from training.ensemble import combine

    members = [build_compact(64, channels=1, rescale=False) for _ in range(3)]
    pixels = np.random.default_rng(0).normal(size=(5, 64, 64, 1)).astype(np.float32)
    expected = np.mean([np.asarray(m(pixels, training=False)) for m in members], axis=0)
    model = combine(members)
    np.testing.assert_allclose(np.asarray(model(pixels, training=False)), expected, atol=1e-6)
    assert model.get_layer("pool").output.shape[-1] == 3 * members[0].get_layer("pool").output.shape[-1]


def test_gradcam_from_the_savedmodel_alone_equals_keras_gradcam(ensemble_repo: Path) -> None:
    """No model.keras: Grad-CAM through the SavedModel's split signatures, on the same map."""
    import keras

    from worker.gradcam import GRADCAM, gradcam, load_explainer

    ref = resolve_model(ensemble_repo)
    assert not (ref.path / "model.keras").exists()
    explainer = load_explainer(ref)
    assert explainer.kind == GRADCAM
    pixels = np.random.default_rng(6).normal(size=(96, 96, 1)).astype(np.float32)
    heat, best, probability = explainer.explain(pixels)
    assert_usable(heat, 96)
    reference = keras.saving.load_model(ensemble_repo / "ensemble" / "reference.keras", compile=False)
    keras_heat, keras_probabilities, layer = gradcam(reference, pixels[None])
    assert layer == "maps"  # the members' maps side by side
    np.testing.assert_allclose(heat, keras_heat[0], atol=1e-5)
    assert best == int(np.argmax(keras_probabilities[0]))
    assert probability == pytest.approx(float(keras_probabilities[0].max()), abs=1e-6)
