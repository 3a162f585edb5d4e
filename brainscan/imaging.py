"""Decode and preprocess scans: the one implementation that training and serving share.

``load_pixels`` turns file bytes into the uint8 array a model's input wants (decoded, converted to
the model's channels, optionally cropped to the brain, resized). ``normalize`` then maps pixels to
the model's input scale with plain arithmetic that works on NumPy arrays and TensorFlow tensors
alike, so the training pipeline (which augments uint8 pixels in TensorFlow first) and the workers
(NumPy) apply literally the same function.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Preprocessing = Literal["resnet50", "none"]
Crop = Literal["none", "brain"]

# Keras' caffe-style ``resnet50.preprocess_input``: RGB -> BGR, then subtract the ImageNet means.
CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)
SUPPORTED_FORMATS = {"JPEG", "PNG"}


class ScanError(ValueError):
    """A scan that cannot be scored; its message is the per-item reason shown to the client."""


@dataclass(frozen=True)
class InputSpec:
    """What one model wants as input; comes from the model card."""

    height: int = 224
    width: int = 224
    channels: int = 3
    preprocessing: Preprocessing = "resnet50"
    crop: Crop = "none"


ORIGINAL_RESNET50 = InputSpec()  # the original project's export, served card-less


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode an image, refusing anything we do not score or that is too large."""
    if not data:
        raise ScanError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in SUPPORTED_FORMATS:
                raise ScanError(f"unsupported image format {image.format or 'unknown'} (JPEG or PNG only)")
            width, height = image.size
            if width * height > max_pixels:
                raise ScanError(f"image is {width}x{height} pixels, over the limit of {max_pixels}")
            if getattr(image, "n_frames", 1) > 1:
                raise ScanError("animated or multi-frame image: one frame per scan expected")
            image.load()
    except ScanError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ScanError(f"image too large to decode safely: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ScanError(f"cannot decode image: {exc}") from None
    return image


def to_grey_or_rgb(image: Image.Image, channels: int) -> np.ndarray:
    """Any mode (L, RGB, RGBA, P, CMYK, 16-bit) to uint8 with 1 or 3 channels."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float scans: stretch the used range to 8 bits rather than clip it away.
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        image = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become black, which is what the MRI background is.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def brain_bounding_box(pixels: np.ndarray, threshold: int = 20, margin: float = 0.02) -> tuple[int, ...]:
    """Bounding box (top, bottom, left, right) of the head, found by thresholding away the black border.

    Rows/columns count as head when at least 1% of their pixels are above the threshold, which
    ignores isolated bright specks and burnt-in text. Falls back to the whole image when the box
    would be implausibly small (an almost black or blank scan).
    """
    grey = pixels.max(axis=-1) if pixels.ndim == 3 else pixels
    height, width = grey.shape
    mask = grey > threshold
    rows = np.flatnonzero(mask.sum(axis=1) > 0.01 * width)
    cols = np.flatnonzero(mask.sum(axis=0) > 0.01 * height)
    if rows.size == 0 or cols.size == 0:
        return 0, height, 0, width
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if (bottom - top) < 0.2 * height or (right - left) < 0.2 * width:
        return 0, height, 0, width
    pad_y, pad_x = int(margin * height), int(margin * width)
    return max(0, top - pad_y), min(height, bottom + pad_y), max(0, left - pad_x), min(width, right + pad_x)


def crop_to_brain(pixels: np.ndarray) -> np.ndarray:
    """Crop to the head and pad to a square, so that resizing keeps the anatomy's proportions."""
    top, bottom, left, right = brain_bounding_box(pixels)
    cropped = pixels[top:bottom, left:right]
    height, width = cropped.shape[:2]
    side = max(height, width)
    square = np.zeros((side, side, cropped.shape[2]), dtype=cropped.dtype)
    y, x = (side - height) // 2, (side - width) // 2
    square[y : y + height, x : x + width] = cropped
    return square


def resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    if pixels.shape[:2] == (height, width):
        return pixels
    squeeze = pixels.shape[2] == 1
    image = Image.fromarray(pixels[..., 0] if squeeze else pixels)
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)
    return resized[..., None] if squeeze else resized


def load_pixels(data: bytes, spec: InputSpec, max_pixels: int = 50_000_000) -> np.ndarray:
    """File bytes -> uint8 array of shape (height, width, channels), ready for ``normalize``."""
    image = open_image(data, max_pixels)
    image = ImageOps.exif_transpose(image) or image
    pixels = to_grey_or_rgb(image, spec.channels)
    return pixels_for_model(pixels, spec)


def pixels_for_model(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Already-decoded uint8 pixels (H, W, C) -> the model's size, cropped when the spec says so."""
    if spec.crop == "brain":
        pixels = crop_to_brain(pixels)
    return resize(pixels, spec.height, spec.width)


def normalize(pixels: Any, preprocessing: Preprocessing) -> Any:
    """uint8-range pixels (NumPy array or tf.Tensor, float32) -> the model's input values."""
    if preprocessing == "none":
        return pixels
    if preprocessing == "resnet50":
        bgr = pixels[..., ::-1]
        return bgr - np.asarray(CAFFE_BGR_MEANS, dtype=np.float32)
    raise ValueError(f"unknown preprocessing {preprocessing!r}")


def prepare(data: bytes, spec: InputSpec, max_pixels: int = 50_000_000) -> np.ndarray:
    """File bytes -> float32 model input (height, width, channels): the serving path."""
    pixels = load_pixels(data, spec, max_pixels).astype(np.float32)
    return normalize(pixels, spec.preprocessing).astype(np.float32)
