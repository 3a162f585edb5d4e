"""Mixup (``recipe.mixup_alpha``): training batches blended pairwise, pixels and labels by one weight."""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from training.recipe import COMPACT_RECIPE, with_overrides
from training.train import to_dataset


def _scans(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    # Scan i is flat grey 20 * i, so a blended pixel tells which two scans and what weight made it.
    pixels = np.stack([np.full((4, 4, 1), 20 * i, np.uint8) for i in range(n)])
    return pixels, np.arange(n) % 4


def test_training_batches_are_blended_and_validation_batches_are_not() -> None:
    pixels, labels = _scans()
    recipe = with_overrides(COMPACT_RECIPE, mixup_alpha=0.4, batch_size=10)
    # shuffle=False is the validation dataset: the scans as they are.
    (plain, plain_labels), *rest = [
        (np.asarray(x), np.asarray(y)) for x, y in to_dataset(pixels, labels, recipe, False, 0)
    ]
    assert not rest
    np.testing.assert_array_equal(plain, pixels.astype(np.float32))
    np.testing.assert_array_equal(plain_labels, np.eye(4, dtype=np.float32)[labels])

    (x, y), *rest = [(np.asarray(x), np.asarray(y)) for x, y in to_dataset(pixels, labels, recipe, True, 0)]
    assert not rest
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-6)
    assert ((y > 0).sum(axis=1) <= 2).all()  # each scan blends at most two classes
    assert (x.min(axis=(1, 2, 3)) == x.max(axis=(1, 2, 3))).all()  # blends of flat scans are flat
    greys = x[:, 0, 0, 0]
    assert ((greys >= 0) & (greys <= 180)).all()
    # Blended: Beta(0.4, 0.4) puts ten weights all within 1e-3 of 0 or 1 with negligible probability.
    assert not np.isin(greys.round(3), pixels[:, 0, 0, 0].astype(np.float32)).all()
    # Off: the training batches are the scans, shuffled.
    off = with_overrides(recipe, mixup_alpha=0.0)
    (x, _), *_ = [(np.asarray(x), np.asarray(y)) for x, y in to_dataset(pixels, labels, off, True, 0)]
    assert sorted(x[:, 0, 0, 0]) == sorted(pixels[:, 0, 0, 0].astype(np.float32))


def test_blend_weights_apply_to_pixels_and_labels_alike() -> None:
    import tensorflow as tf

    from training.train import mix_up

    pixels = tf.constant(np.stack([np.full((2, 2, 1), v, np.float32) for v in (0.0, 100.0, 200.0)]))
    labels = tf.constant(np.eye(4, dtype=np.float32)[[0, 1, 3]])
    x, y = (np.asarray(t) for t in mix_up(pixels, labels, alpha=0.4))
    # Row i blends scan i with scan 2 - i: grey = w * v_i + (1 - w) * v_(2-i), label weights w and 1 - w.
    for i, (low, high) in enumerate([(0, 3), (1, 1), (3, 0)]):
        weight = y[i, low] if low != high else 1.0
        expected = weight * [0.0, 100.0, 200.0][i] + (1 - weight) * [0.0, 100.0, 200.0][2 - i]
        np.testing.assert_allclose(x[i], expected, atol=1e-3)
    np.testing.assert_allclose(x[1], 100.0, atol=1e-4)  # the middle scan blends with itself
    np.testing.assert_array_equal(y[1], [0, 1, 0, 0])
