"""Model builders and augmentation, in plain Keras 3 (no TensorFlow calls: backend-agnostic).

- ``build_resnet50``: the original project's network, exactly: ResNet50 (include_top=False) ->
  Flatten -> Dense 512 relu -> Dropout 0.5 -> Dense 4 softmax, fed ``resnet50.preprocess_input`` pixels.
- ``build_compact``: brainscan's default, a narrow residual net for single-channel, head-cropped
  scans that trains from scratch on a 2-core CPU. With ``rescale`` it owns its input scaling
  (``preprocessing: none``, up to version 2); without, it takes ``head-zscore`` input as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
from keras import layers, ops

from brainscan import CLASSES


def build_resnet50(weights: str | None, input_size: int = 224) -> tuple[keras.Model, keras.Model]:
    """(model, backbone). ``weights``: "imagenet", None, or a path to a weights file for the backbone."""
    backbone = keras.applications.ResNet50(
        include_top=False, weights=weights, input_shape=(input_size, input_size, 3)
    )
    inputs = keras.Input((input_size, input_size, 3), name="keras_tensor")
    x = backbone(inputs)
    x = layers.Flatten()(x)
    x = layers.Dense(512, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(len(CLASSES), activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="resnet50_brainscan"), backbone


def set_resnet50_stage(backbone: keras.Model, stage: int, unfrozen_layers: int = 40) -> None:
    """Stage 1: backbone frozen. Stage 2: its last ``unfrozen_layers`` trainable, BatchNorm kept frozen."""
    backbone.trainable = stage == 2
    if stage == 2:
        for layer in backbone.layers[:-unfrozen_layers]:
            layer.trainable = False
        for layer in backbone.layers[-unfrozen_layers:]:
            layer.trainable = not isinstance(layer, layers.BatchNormalization)


@dataclass(frozen=True)
class CompactShape:
    widths: tuple[int, ...] = (32, 64, 128, 256)  # channels of the four stages
    blocks: tuple[int, ...] = (1, 2, 2, 1)  # residual blocks per stage
    stem_width: int = 24
    dropout: float = 0.3


def _residual_block(x, width: int, stride: int, name: str):  # type: ignore[no-untyped-def]
    shortcut = x
    if stride != 1 or x.shape[-1] != width:
        # Average-pool then 1x1 conv (ResNet-D): downsampling without throwing away 3/4 of the pixels.
        if stride != 1:
            shortcut = layers.AveragePooling2D(stride, padding="same", name=f"{name}_pool")(shortcut)
        shortcut = layers.Conv2D(width, 1, use_bias=False, name=f"{name}_proj")(shortcut)
        shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    # Zero-initialised last BatchNorm: each block starts as identity, which steadies early training.
    y = layers.BatchNormalization(gamma_initializer="zeros", name=f"{name}_bn2")(y)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_out")(y)


def build_compact(
    input_size: int, channels: int = 1, shape: CompactShape | None = None, rescale: bool = True
) -> keras.Model:
    """``rescale``: the input is uint8-range pixels, mapped to [-1, 1] in the graph; otherwise the
    input is already standardised (``head-zscore``) and goes in unchanged."""
    shape = shape or CompactShape()
    inputs = keras.Input((input_size, input_size, channels), name="pixels")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(inputs) if rescale else inputs
    x = layers.Conv2D(shape.stem_width, 3, strides=2, padding="same", use_bias=False, name="stem_conv1")(x)
    x = layers.BatchNormalization(name="stem_bn1")(x)
    x = layers.ReLU(name="stem_relu1")(x)
    x = layers.Conv2D(shape.widths[0], 3, padding="same", use_bias=False, name="stem_conv2")(x)
    x = layers.BatchNormalization(name="stem_bn2")(x)
    x = layers.ReLU(name="stem_relu2")(x)
    for stage, (width, blocks) in enumerate(zip(shape.widths, shape.blocks, strict=True)):
        for block in range(blocks):
            stride = 2 if block == 0 else 1
            x = _residual_block(x, width, stride, name=f"stage{stage + 1}_block{block + 1}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(shape.dropout, name="dropout")(x)
    outputs = layers.Dense(len(CLASSES), activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="brainscan_compact")


@dataclass(frozen=True)
class Augmentation:
    """Training-time changes; the defaults change nothing (a recipe names what it uses)."""

    rotation_degrees: float = 0.0
    shift: float = 0.0
    shear: float = 0.0
    zoom: float = 0.0
    horizontal_flip: bool = False
    contrast: float = 0.0  # Keras RandomContrast factor (the original recipe's style)
    brightness: float = 0.0  # Keras RandomBrightness factor
    # Per-scan intensity changes as scanners and windowing make them (``RandomIntensity``), as
    # (low, high) factor ranges sampled log-uniformly; None leaves that change out.
    contrast_range: tuple[float, float] | None = None  # PIL-style: around the scan's mean
    brightness_range: tuple[float, float] | None = None  # a gain
    gamma_range: tuple[float, float] | None = None
    window_jitter: float = 0.0  # black and white points each move by up to this fraction of 255


class RandomIntensity(layers.Layer):
    """Random window, gamma, contrast and brightness per scan, on uint8-range pixels, while training.

    Contrast and brightness follow ``PIL.ImageEnhance`` (blend with the scan's mean grey / with
    black), the shifts a served scan meets when a scanner, a DICOM window or a 16-bit stretch sets its
    intensities. Each result is clipped to 0-255, as an 8-bit file would be.
    """

    def __init__(self, aug: Augmentation, seed: int | None = None, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.aug = aug
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _factor(self, batch, bounds: tuple[float, float]):  # type: ignore[no-untyped-def]
        low, high = math.log(bounds[0]), math.log(bounds[1])
        shape = (batch, 1, 1, 1)
        return ops.exp(keras.random.uniform(shape, low, high, seed=self.seed_generator))

    def call(self, x, training: bool = False):  # type: ignore[no-untyped-def]
        if not training:
            return x
        aug, batch = self.aug, ops.shape(x)[0]
        if aug.window_jitter:
            jitter = aug.window_jitter * 255.0
            black = keras.random.uniform((batch, 1, 1, 1), -jitter, jitter, seed=self.seed_generator)
            white = 255.0 + keras.random.uniform((batch, 1, 1, 1), -jitter, jitter, seed=self.seed_generator)
            x = ops.clip((x - black) * (255.0 / (white - black)), 0.0, 255.0)
        if aug.gamma_range:
            x = 255.0 * ops.power(x / 255.0, self._factor(batch, aug.gamma_range))
        if aug.contrast_range:
            mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
            x = ops.clip(mean + self._factor(batch, aug.contrast_range) * (x - mean), 0.0, 255.0)
        if aug.brightness_range:
            x = ops.clip(x * self._factor(batch, aug.brightness_range), 0.0, 255.0)
        return x

    def compute_output_shape(self, input_shape):  # type: ignore[no-untyped-def]
        return input_shape


def build_augmenter(aug: Augmentation, seed: int = 1337) -> keras.Sequential:
    """Random geometry and intensity changes, applied to uint8-range pixels of a batch at train time.

    Geometry first, intensity after: the black that rotation and zoom bring in is then shifted
    like the scan's own background, as it would be on a scanner.
    """
    steps: list[layers.Layer] = []
    if aug.horizontal_flip:
        steps.append(layers.RandomFlip("horizontal", seed=seed))
    if aug.rotation_degrees:
        steps.append(layers.RandomRotation(aug.rotation_degrees / 360.0, fill_mode="constant", seed=seed))
    if aug.shear:
        steps.append(
            layers.RandomShear(x_factor=aug.shear, y_factor=aug.shear, fill_mode="constant", seed=seed)
        )
    if aug.zoom:
        steps.append(layers.RandomZoom(aug.zoom, fill_mode="constant", seed=seed))
    if aug.shift:
        steps.append(layers.RandomTranslation(aug.shift, aug.shift, fill_mode="constant", seed=seed))
    if aug.contrast:
        steps.append(layers.RandomContrast(aug.contrast, value_range=(0, 255), seed=seed))
    if aug.brightness:
        steps.append(layers.RandomBrightness(aug.brightness, value_range=(0, 255), seed=seed))
    if aug.contrast_range or aug.brightness_range or aug.gamma_range or aug.window_jitter:
        steps.append(RandomIntensity(aug, seed=seed, name="random_intensity"))
    return keras.Sequential(steps, name="augment")
