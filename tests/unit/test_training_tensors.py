"""One image, one tensor: the training pipeline feeds the network exactly what a worker feeds it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from brainscan.imaging import load_pixels, normalize, prepare
from tests.support.training import write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "Training", per_class=6, size=64)


@pytest.mark.parametrize("arch", ["compact", "resnet50"])
def test_same_image_gives_the_same_tensor_on_both_paths(arch: str, dataset: Path) -> None:
    """The validation tensor the training pipeline feeds the network == what a worker feeds it."""
    from training.data import load_scanset
    from training.recipe import RECIPES
    from training.train import input_spec, to_dataset

    recipe = RECIPES[arch]
    spec = input_spec(recipe)
    scans = load_scanset(dataset, spec, cache_dir=None)
    batches = to_dataset(scans.pixels, scans.labels, recipe, shuffle=False, seed=0)
    # Training normalises inside the graph (with_input_normalisation) with the same function.
    training_tensors = np.concatenate([np.asarray(normalize(x, spec.preprocessing)) for x, _ in batches])
    serving_tensors = np.stack([prepare((dataset / path).read_bytes(), spec) for path in scans.paths])
    # The decoded pixels are the same bits (one ``load_pixels`` for both paths).
    np.testing.assert_array_equal(
        scans.pixels, np.stack([load_pixels((dataset / p).read_bytes(), spec) for p in scans.paths])
    )
    assert training_tensors.dtype == serving_tensors.dtype == np.float32
    assert training_tensors.shape == (24, recipe.input_size, recipe.input_size, recipe.channels)
    same = _same_bits if spec.preprocessing != "head-zscore" else _same_up_to_summation_order
    same(training_tensors, serving_tensors)
    # And through the Keras layer that training really wraps around the network.
    if spec.preprocessing != "none":
        import keras

        from training.train import with_input_normalisation

        inputs = keras.Input(serving_tensors.shape[1:])
        wrapped = with_input_normalisation(keras.Model(inputs, inputs), recipe)  # identity network
        first = next(iter(batches))[0]
        same(np.asarray(wrapped(first)), serving_tensors[: len(first)])


def _same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(actual, expected)


def _same_up_to_summation_order(actual: np.ndarray, expected: np.ndarray) -> None:
    """Per-scan statistics (``head-zscore``) are sums that TensorFlow and NumPy add in different
    orders: equal to float32 rounding, far below one grey level (~0.02 in z units)."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)
