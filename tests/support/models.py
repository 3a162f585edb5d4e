"""Small real SavedModels for tests: built with Keras, exported with ``model.export``, plus a card;
and a model that refuses one kind of scan (a poison item for the fault tests).

Imported lazily by fixtures (TensorFlow is slow to import); every model is deterministic (seeded).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from brainscan.modelrepo import ModelCard

TINY_SIZE = 32


def add_model(repo: Path, name: str, version: str, **fields: Any) -> Path:
    """A card-only model folder ``repo/name/version`` (no weights): for the repository's own logic."""
    folder = repo / name / version
    folder.mkdir(parents=True)
    ModelCard(name=name, version=version, **fields).write(folder)
    return folder


def build_tiny_model(
    folder: Path,
    *,
    name: str = "tiny",
    version: str = "1",
    size: int = TINY_SIZE,
    channels: int = 3,
    preprocessing: str = "resnet50",
    seed: int = 0,
    card: bool = True,
) -> Path:
    """A 32x32 conv net (a few thousand weights) exported to ``folder`` with a model card."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, channels))
    x = keras.layers.Rescaling(1.0 / 128.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    model.export(str(folder), verbose=False)
    if card:
        ModelCard(
            name=name,
            version=version,
            input_size=(size, size),
            channels=channels,
            preprocessing=preprocessing,  # type: ignore[arg-type]
            architecture="tiny-cnn",
            metrics={"note": "random weights, tests only"},
        ).write(folder)
    return folder


def grey_card(name: str = "compact", architecture: str = "compact", **fields: Any) -> ModelCard:
    """The card of a one-channel 32x32 model that takes brain-cropped raw pixels (preprocessing none)."""
    return ModelCard(
        **{
            "name": name,
            "version": "1",
            "input_size": (TINY_SIZE, TINY_SIZE),
            "channels": 1,
            "preprocessing": "none",
            "crop": "brain",
            "architecture": architecture,
            **fields,
        }
    )


def small_compact_keras(seed: int = 0):  # type: ignore[no-untyped-def]
    """The compact architecture (``training.architectures``), narrowed for tests: 32x32, one channel."""
    import keras

    from training.architectures import CompactShape, build_compact

    keras.utils.set_random_seed(seed)
    return build_compact(TINY_SIZE, 1, CompactShape(widths=(8, 8, 16, 16), blocks=(1, 1, 1, 1), stem_width=8))


def tiny_feature_keras(seed: int = 0, size: int = TINY_SIZE, channels: int = 1):  # type: ignore[no-untyped-def]
    """A tiny conv net with named layers (``pool`` gives the features ``export_savedmodel`` serves)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, channels), name="pixels")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(4, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs)


def build_original_resnet50(folder: Path, seed: int = 0):  # type: ignore[no-untyped-def]
    """Exactly the original project's architecture (random weights), exported card-less.

    Returns the Keras model so the test can compare ``model.predict`` with the worker.
    """
    import keras

    keras.utils.set_random_seed(seed)
    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(224, 224, 3))
    x = keras.layers.Flatten()(base.output)
    x = keras.layers.Dense(512, activation="relu")(x)
    x = keras.layers.Dropout(0.5)(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    model = keras.Model(base.input, outputs)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    model.export(str(folder), verbose=False)
    return model


# ---- a model that refuses one kind of scan -----------------------------------------------------
POISON_MEAN = 250.0


def build_poison_model(folder: Path, size: int = 32) -> Path:
    """A SavedModel whose serving call raises when any image in the batch is (almost) all white.

    That is a scan that "crashes the model call" every time it is scored, in any batch, while every
    other scan scores normally: a poison item, built from real TensorFlow ops.
    """
    import numpy as np
    import tensorflow as tf

    class Poisonable(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            rng = np.random.default_rng(0)
            self.weights = tf.Variable(rng.normal(size=(3, 4)).astype(np.float32) / 100.0)

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="keras_tensor")])
        def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
            means = tf.reduce_mean(images, axis=[1, 2, 3])
            check = tf.debugging.assert_less(
                means, tf.constant(POISON_MEAN), message="poison scan: the model refuses it"
            )
            with tf.control_dependencies([check]):
                features = tf.reduce_mean(images, axis=[1, 2])
                return {"output_0": tf.nn.softmax(tf.matmul(features, self.weights))}

    module = Poisonable()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tf.saved_model.save(module, str(folder), signatures={"serve": module.serve})
    ModelCard(
        name="poisonable",
        version="1",
        input_size=(size, size),
        channels=3,
        preprocessing="none",
        architecture="test: refuses all-white scans",
        metrics={"note": "tests only"},
    ).write(folder)
    return folder
