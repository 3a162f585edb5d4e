"""Decode and preprocess scans: the one implementation that training and serving share.

``load_pixels`` turns file bytes into the uint8 array a model's input wants (decoded, converted to
the model's channels, optionally cropped to the head, resized). ``normalize`` then maps pixels to
the model's input scale with plain arithmetic that works on NumPy arrays and TensorFlow tensors
alike, so the training pipeline (which augments uint8 pixels in TensorFlow first) and the workers
(NumPy) apply literally the same function.

Both steps are versioned by the model card: ``crop`` ("none", "brain", "head") and ``preprocessing``
("resnet50", "none", "head-zscore"). A card keeps meaning exactly what it meant when its model was
trained; a faster or more robust pipeline is a new value, not a change to an old one.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# "head-zscore": per-scan standardisation inside the head mask (see ``head_zscore``).
Preprocessing = Literal["resnet50", "none", "head-zscore"]
# "brain": absolute threshold on the full decode. "head": relative threshold on a 1/8-scale decode,
# then the JPEG decoded in the DCT domain at the smallest scale that keeps the crop >= the input size.
Crop = Literal["none", "brain", "head"]

# Keras' caffe-style ``resnet50.preprocess_input``: RGB -> BGR, then subtract the ImageNet means.
CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)
SUPPORTED_FORMATS = {"JPEG", "PNG"}
# Intensity levels relative to a scan's own statistics, min + LEVEL * (mean - min): they move with any
# affine intensity change, so brightness and contrast select the same pixels.
HEAD_LEVEL = 0.5  # the head mask (box and standardisation statistics): well above JPEG noise
FLOOR_LEVEL = 0.25  # standardised pixels below this level read as this level: the black of the scan
HEAD_BOX_SCALE = 8  # the head box is found on a 1/8-scale (DC-coefficients-only) JPEG decode
HEAD_BOX_MIN_COVER = 0.03  # a row/column of the low-resolution scan is head when 3% of it is in the mask
HEAD_BOX_MARGIN = 0.02  # fraction of the scan added around the box
ZSCORE_EPSILON = 1.0  # in uint8 units: keeps a flat (blank) scan finite


class ScanError(ValueError):
    """A scan that cannot be scored; its message is the per-item reason shown to the client.

    Every raise site passes a fixed reason (our limits and setting names, PIL's format name, an
    exception's type name), never a path, a file's bytes or a library's message.
    """

    @property
    def public_message(self) -> str:
        return str(self)


@dataclass(frozen=True)
class InputSpec:
    """What one model wants as input; comes from the model card."""

    height: int = 224
    width: int = 224
    channels: int = 3
    preprocessing: Preprocessing = "resnet50"
    crop: Crop = "none"


ORIGINAL_RESNET50 = InputSpec()  # the original project's export, served card-less


# Decoding cost is bounded before PIL does any work: a header must end within this window (PIL skips
# junk between JPEG markers a byte at a time, so a header may not wander through megabytes of it),
# and a file may be at most FILE_BYTES_PER_RAW_BYTE times its declared raw pixels plus slack (a scan
# of padding or trailing data is refused, not stored and not decoded).
HEADER_WINDOW_BYTES = 256 * 1024
FILE_BYTES_PER_RAW_BYTE = 4  # 16-bit PNGs open as 8-bit modes: their files may hold twice the raw size
FILE_SLACK_BYTES = 1024 * 1024  # metadata: EXIF, ICC profiles, text chunks
TOO_LARGE_TO_DECODE = "image too large to decode safely (decompression bomb guard)"
PADDED_IMAGE = "image file is larger than its pixels could need: mostly padding or trailing data"
HEADER_NOT_IN_WINDOW = (
    f"cannot decode image: no JPEG or PNG header within its first {HEADER_WINDOW_BYTES // 1024} KiB"
)


@contextmanager
def _decode_errors() -> Iterator[None]:
    """Turn whatever PIL raises on a hostile or broken file into a ScanError with a fixed reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ScanError:
        raise
    # Fixed reasons: PIL's messages quote object reprs (memory addresses) and sizes from the file.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ScanError(TOO_LARGE_TO_DECODE) from None
    except UnidentifiedImageError:
        raise ScanError("cannot decode image: not a readable JPEG or PNG") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if "truncated" in str(exc):
            raise ScanError("cannot decode image: image file is truncated") from None
        raise ScanError(f"cannot decode image: damaged image data ({type(exc).__name__})") from None


@dataclass(frozen=True)
class ScanHeader:
    """What a JPEG or PNG declares, read from its header alone, and the most bytes it may take."""

    format: str
    width: int
    height: int
    mode: str
    max_file_bytes: int


def scan_header(data: bytes, max_pixels: int) -> ScanHeader:
    """Parse a scan's header from at most its first ``HEADER_WINDOW_BYTES``; no pixel is decoded.

    Raises ScanError (a fixed reason) for anything we do not score: not a JPEG/PNG, no header in the
    window, more than ``max_pixels``, several frames. Intake refuses junk with it before storing;
    the worker calls it again (through ``open_image``) before decoding.
    """
    return _scan_header(data, max_pixels)[0]


def _scan_header(data: bytes, max_pixels: int) -> tuple[ScanHeader, Image.Image]:
    with _decode_errors():
        try:
            image = _open_header(data[:HEADER_WINDOW_BYTES], max_pixels)
        except ScanError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
            if len(data) > HEADER_WINDOW_BYTES:
                raise ScanError(HEADER_NOT_IN_WINDOW) from None
            raise
        width, height = image.size
        mode = image.mode
        bytes_per_sample = 2 if mode.startswith("I;16") else 4 if mode in ("I", "F") else 1
        raw = width * height * len(image.getbands()) * bytes_per_sample
        header = ScanHeader(
            str(image.format), width, height, mode, FILE_BYTES_PER_RAW_BYTE * raw + FILE_SLACK_BYTES
        )
        return header, image


def _open_header(data: bytes, max_pixels: int) -> Image.Image:
    """Open an image (header only) and refuse anything we do not score or that is too large."""
    if not data:
        raise ScanError("empty file")
    image = Image.open(io.BytesIO(data))
    if image.format not in SUPPORTED_FORMATS:
        raise ScanError(f"unsupported image format {image.format or 'unknown'} (JPEG or PNG only)")
    width, height = image.size
    if width * height > max_pixels:
        # Our limit only: the file's own dimensions are not quoted.
        raise ScanError(f"image has more pixels than the limit of {max_pixels} (BRAINSCAN_MAX_IMAGE_PIXELS)")
    if getattr(image, "n_frames", 1) > 1:
        raise ScanError("animated or multi-frame image: one frame per scan expected")
    return image


def _checked_header(data: bytes, max_pixels: int) -> Image.Image:
    """The opened image, after a bounded header parse and a size check: decoding it costs at most
    what its declared pixels cost (the header is the same bytes the window already parsed)."""
    header, image = _scan_header(data, max_pixels)
    if len(data) > header.max_file_bytes:
        raise ScanError(PADDED_IMAGE)
    if len(data) <= HEADER_WINDOW_BYTES:
        return image  # the window was the whole file: parsed once
    return _open_header(data, max_pixels)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode an image, refusing anything we do not score or that is too large."""
    with _decode_errors():
        image = _checked_header(data, max_pixels)
        image.load()
    return image


@dataclass(frozen=True)
class ReducedDecode:
    """A file as ``_decode_reduced`` decoded it: uint8 ``pixels`` (EXIF-transposed, the model's channels),
    ``scale`` (the DCT-domain reduction of a JPEG, 1 when none), the file's own ``mode`` and ``size``.

    Kept so that the input check can take the head path's 1/8 decode instead of making its own when
    they are the same decode (``brainscan.trust.input_thumbnail``).
    """

    pixels: np.ndarray
    scale: int
    file_mode: str
    file_size: tuple[int, int]


def _decode_reduced(data: bytes, max_pixels: int, channels: int, scale: int) -> ReducedDecode:
    """A JPEG decoded at 1/``scale`` in the DCT domain (PNG has no reduced decode: full size, scale 1)."""
    with _decode_errors():
        image = _checked_header(data, max_pixels)
        file_mode, file_size = image.mode, image.size
        reduced_by = 1
        width, height = image.size
        # A reduced decode of a tiny scan has too few pixels to find a head in.
        if scale > 1 and image.format == "JPEG" and min(width, height) >= 16 * scale:
            request = (max(1, width // scale), max(1, height // scale))
            if image.draft("L" if channels == 1 else "RGB", request) is not None:
                reduced_by = scale
        image.load()
    image = ImageOps.exif_transpose(image) or image
    return ReducedDecode(to_grey_or_rgb(image, channels), reduced_by, file_mode, file_size)


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
    return load_pixels_and_view(data, spec, max_pixels)[0]


def load_pixels_and_view(
    data: bytes, spec: InputSpec, max_pixels: int = 50_000_000
) -> tuple[np.ndarray, ReducedDecode | None]:
    """``load_pixels``, and the ``crop: head`` path's 1/8-scale decode (None for other crops)."""
    if spec.crop == "head":
        return head_pixels_and_view(data, spec, max_pixels)
    image = open_image(data, max_pixels)
    image = ImageOps.exif_transpose(image) or image
    pixels = to_grey_or_rgb(image, spec.channels)
    return pixels_for_model(pixels, spec), None


def pixels_for_model(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Already-decoded uint8 pixels (H, W, C) -> the model's size, cropped when the spec says so."""
    if spec.crop == "head":
        return crop_square_and_resize(pixels, head_box(pixels), spec.height, spec.width)
    if spec.crop == "brain":
        pixels = crop_to_brain(pixels)
    return resize(pixels, spec.height, spec.width)


def head_box(pixels: np.ndarray) -> tuple[float, float, float, float]:
    """The head's box (top, bottom, left, right) as fractions of the scan, from a low-resolution view.

    The mask threshold is relative (``HEAD_LEVEL``), so brightness and contrast changes give the same
    box. Falls back to the whole scan when the box would be implausibly small (a blank scan).
    """
    grey = pixels.max(axis=-1) if pixels.ndim == 3 else pixels
    stride = max(1, min(grey.shape) // 128)  # a large scan's 1/8 decode is looked at on a ~128 px grid
    view = grey[::stride, ::stride].astype(np.float32)
    height, width = view.shape
    low = float(view.min())
    mask = view > low + HEAD_LEVEL * (float(view.mean()) - low)
    rows = np.flatnonzero(mask.mean(axis=1) > HEAD_BOX_MIN_COVER)
    cols = np.flatnonzero(mask.mean(axis=0) > HEAD_BOX_MIN_COVER)
    if rows.size == 0 or cols.size == 0:
        return 0.0, 1.0, 0.0, 1.0
    top, bottom = rows[0] / height, (rows[-1] + 1) / height
    left, right = cols[0] / width, (cols[-1] + 1) / width
    if bottom - top < 0.2 or right - left < 0.2:
        return 0.0, 1.0, 0.0, 1.0
    pad = HEAD_BOX_MARGIN
    return max(0.0, top - pad), min(1.0, bottom + pad), max(0.0, left - pad), min(1.0, right + pad)


def crop_square_and_resize(
    pixels: np.ndarray, box: tuple[float, float, float, float], height: int, width: int
) -> np.ndarray:
    """Crop ``box`` (fractions), pad it to a centred square with the scan's black level, resize bilinearly.

    Padding with the scan's own minimum rather than 0 keeps a brightened or contrast-reduced scan
    (whose background is no longer 0) free of an artificial black frame.
    """
    rows, cols = pixels.shape[:2]
    top, bottom = math.floor(box[0] * rows), math.ceil(box[1] * rows)
    left, right = math.floor(box[2] * cols), math.ceil(box[3] * cols)
    side = max(bottom - top, right - left)
    y0, x0 = top - (side - (bottom - top)) // 2, left - (side - (right - left)) // 2
    squeeze = pixels.shape[2] == 1
    image = Image.fromarray(pixels[..., 0] if squeeze else pixels)
    square = image.crop((x0, y0, x0 + side, y0 + side))
    if (y0, x0, side, side) != (0, 0, rows, cols):
        black = int(pixels.min()) if squeeze else tuple(int(v) for v in pixels.min(axis=(0, 1)))
        square = Image.new(image.mode, (side, side), black)
        inside = image.crop((max(0, x0), max(0, y0), min(cols, x0 + side), min(rows, y0 + side)))
        square.paste(inside, (max(0, -x0), max(0, -y0)))
    resized = np.asarray(square.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)
    return resized[..., None] if squeeze else resized


def head_pixels_and_view(
    data: bytes, spec: InputSpec, max_pixels: int = 50_000_000
) -> tuple[np.ndarray, ReducedDecode]:
    """The ``crop: head`` path: find the head on a 1/8-scale decode, then decode once more at the
    smallest scale (1/8, 1/4, 1/2, 1) whose head crop still has >= the model's input size. Returns the
    crop and that first decode (the input check may reuse it: ``brainscan.trust.input_thumbnail``)."""
    first = _decode_reduced(data, max_pixels, spec.channels, HEAD_BOX_SCALE)
    low = first.pixels
    if first.scale == 1:  # PNG (or a JPEG PIL cannot reduce): the full decode is all there is
        # Block means, as the DCT's DC coefficients are: the box a JPEG of the same scan would get.
        image = Image.fromarray(low[..., 0] if low.shape[2] == 1 else low)
        view = np.asarray(image.reduce(HEAD_BOX_SCALE)) if min(image.size) >= HEAD_BOX_SCALE else low
        return crop_square_and_resize(low, head_box(view), spec.height, spec.width), first
    box = head_box(low)
    # The full-resolution head side, from the 1/8 decode (exact to within 8 pixels).
    side = HEAD_BOX_SCALE * max((box[1] - box[0]) * low.shape[0], (box[3] - box[2]) * low.shape[1])
    scale = next(s for s in (8, 4, 2, 1) if side / s >= max(spec.height, spec.width) or s == 1)
    pixels = (
        low if scale == HEAD_BOX_SCALE else _decode_reduced(data, max_pixels, spec.channels, scale).pixels
    )
    return crop_square_and_resize(pixels, box, spec.height, spec.width), first


class _ArrayOps(NamedTuple):
    """The few reductions ``head_zscore`` needs, for NumPy arrays or TensorFlow tensors."""

    amin: Callable[[Any], Any]
    sum: Callable[[Any], Any]
    maximum: Callable[[Any, Any], Any]
    sqrt: Callable[[Any], Any]
    as_float: Callable[[Any], Any]


def _array_ops(pixels: Any) -> _ArrayOps:
    axes = (-3, -2, -1)  # one scan (h, w, c), or each scan of a batch (n, h, w, c)
    if isinstance(pixels, np.ndarray):
        return _ArrayOps(
            lambda x: x.min(axis=axes, keepdims=True),
            lambda x: x.sum(axis=axes, keepdims=True, dtype=np.float32),
            np.maximum,
            np.sqrt,
            lambda x: x.astype(np.float32),
        )
    import tensorflow as tf

    return _ArrayOps(
        lambda x: tf.reduce_min(x, axis=axes, keepdims=True),
        lambda x: tf.reduce_sum(x, axis=axes, keepdims=True),
        tf.maximum,
        tf.sqrt,
        lambda x: tf.cast(x, tf.float32),
    )


def head_zscore(pixels: Any) -> Any:
    """Each scan standardised by the mean and spread of its head: brightness/contrast-free input.

    The head mask is relative (above min + ``HEAD_LEVEL`` x (mean - min)), so an affine intensity
    change (PIL's brightness and contrast) selects the same pixels and leaves the output unchanged.
    Pixels below ``FLOOR_LEVEL`` are floored to it: the black border reads the same whatever
    brightness a scanner or a window gave it, while dark tissue above it keeps its detail.
    """
    if isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8:
        if pixels.ndim == 3:
            return _head_zscore_table(pixels)
        return (
            np.stack([_head_zscore_table(scan) for scan in pixels])
            if len(pixels)
            else pixels.astype(np.float32)
        )
    ops = _array_ops(pixels)
    count_all = float(np.prod(pixels.shape[-3:]))
    low = ops.amin(pixels)
    spread_all = ops.sum(pixels) / count_all - low
    mask = ops.as_float(pixels > low + HEAD_LEVEL * spread_all)
    count = ops.maximum(ops.sum(mask), 1.0)
    mean = ops.sum(pixels * mask) / count
    spread = ops.sqrt(ops.sum(((pixels - mean) * mask) ** 2) / count)
    return (ops.maximum(pixels, low + FLOOR_LEVEL * spread_all) - mean) / (spread + ZSCORE_EPSILON)


_LEVELS = np.arange(256, dtype=np.float64)


def _head_zscore_table(pixels: np.ndarray) -> np.ndarray:
    """``head_zscore`` of one uint8 scan, its statistics from a 256-bin histogram.

    The same statistics as the float path (which the training graph runs on augmented pixels), in
    float64 from exact integer counts: one pass to count and three in place, instead of eight.
    """
    levels = _LEVELS
    counts = np.bincount(pixels.ravel(), minlength=256).astype(np.float64)
    low = float(np.flatnonzero(counts)[0])
    spread_all = float(counts @ levels) / pixels.size - low
    threshold = low + HEAD_LEVEL * spread_all
    inside = levels > threshold
    count = max(float(counts[inside].sum()), 1.0)
    mean = float(counts[inside] @ levels[inside]) / count
    spread = math.sqrt(float(counts[inside] @ (levels[inside] - mean) ** 2) / count)
    out = pixels.astype(np.float32)
    np.maximum(out, np.float32(low + FLOOR_LEVEL * spread_all), out=out)
    out -= np.float32(mean)
    out *= np.float32(1.0 / (spread + ZSCORE_EPSILON))
    return out


def normalize(pixels: Any, preprocessing: Preprocessing) -> Any:
    """uint8-range pixels (NumPy array or tf.Tensor; float32, or uint8 NumPy) -> the model's input values.

    uint8 NumPy input (what ``load_pixels`` returns) is the serving path and the cheapest.
    """
    if isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and preprocessing != "head-zscore":
        pixels = pixels.astype(np.float32)
    if preprocessing == "none":
        return pixels
    if preprocessing == "resnet50":
        bgr = pixels[..., ::-1]
        return bgr - np.asarray(CAFFE_BGR_MEANS, dtype=np.float32)
    if preprocessing == "head-zscore":
        return head_zscore(pixels)
    raise ValueError(f"unknown preprocessing {preprocessing!r}")


def prepare(data: bytes, spec: InputSpec, max_pixels: int = 50_000_000) -> np.ndarray:
    """File bytes -> float32 model input (height, width, channels): the serving path."""
    return prepare_and_view(data, spec, max_pixels)[0]


def prepare_and_view(
    data: bytes, spec: InputSpec, max_pixels: int = 50_000_000
) -> tuple[np.ndarray, ReducedDecode | None]:
    """``prepare``, and the reduced decode it made on the way (``load_pixels_and_view``)."""
    pixels, view = load_pixels_and_view(data, spec, max_pixels)
    return np.asarray(normalize(pixels, spec.preprocessing), dtype=np.float32), view
