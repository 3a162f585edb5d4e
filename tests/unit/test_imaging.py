"""``crop: head`` and ``preprocessing: head-zscore`` (model version 3), and that older cards are untouched.

Generated scans only: a head-like ellipse with texture on a black border (tests/support/training.py),
upscaled to the 512 px of the dataset's typical JPEG.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from brainscan.imaging import (
    InputSpec,
    ScanError,
    crop_square_and_resize,
    crop_to_brain,
    head_box,
    load_pixels,
    normalize,
    prepare,
    resize,
)
from tests.support.training import draw_scan

V3 = InputSpec(192, 192, 1, "head-zscore", "head")
V2 = InputSpec(192, 192, 1, "none", "brain")


def scan_image(seed: int = 0, size: int = 512, label: int = 0) -> Image.Image:
    small = Image.fromarray(draw_scan(label, seed, 128))
    return small.resize((size, size), Image.Resampling.BICUBIC)


def encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 92} if fmt == "JPEG" else {}), **options)
    return out.getvalue()


def test_a_version_2_card_still_gets_the_full_decode_and_absolute_threshold_crop() -> None:
    data = encode(scan_image(1))
    full = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.uint8)[..., None]
    expected = resize(crop_to_brain(full), 192, 192)
    np.testing.assert_array_equal(load_pixels(data, V2), expected)
    np.testing.assert_array_equal(prepare(data, V2), expected.astype(np.float32))


def test_head_crop_from_a_reduced_decode_matches_the_full_resolution_crop() -> None:
    """The DCT-domain decode (here 1/2 of 512 px for a 192 px input) loses nothing the model sees."""
    data = encode(scan_image(2))
    fast = load_pixels(data, V3).astype(np.float64)
    # The same box (found on the 1/8-scale decode), cut from a full decode instead.
    low = Image.open(io.BytesIO(data))
    low.draft("L", (64, 64))
    box = head_box(np.asarray(low.convert("L"))[..., None])
    full = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.uint8)[..., None]
    reference = crop_square_and_resize(full, box, 192, 192).astype(np.float64)
    assert fast.shape == (192, 192, 1) and box != (0.0, 1.0, 0.0, 1.0)
    assert np.abs(fast - reference).mean() < 2.0  # grey levels, out of 255


def test_png_and_jpeg_of_one_scan_give_nearly_the_same_tensor() -> None:
    image = scan_image(3)
    from_png = prepare(encode(image, "PNG"), V3)
    from_jpeg = prepare(encode(image, "JPEG"), V3)
    assert np.abs(from_png - from_jpeg).mean() < 0.05  # z units


@pytest.mark.parametrize(
    ("enhancer", "factor", "tolerance"),
    # Contrast x1.5 and brightness x1.3 saturate the brightest pixels at 255: information lost in
    # the file itself, which only augmentation can teach the model to live with.
    [("Brightness", 0.7, 0.05), ("Brightness", 1.3, 0.2), ("Contrast", 0.7, 0.05), ("Contrast", 1.5, 0.2)],
)
def test_head_zscore_takes_brightness_and_contrast_out_of_the_input(
    enhancer: str, factor: float, tolerance: float
) -> None:
    image = scan_image(4)
    shifted = getattr(ImageEnhance, enhancer)(image).enhance(factor)
    original, after = prepare(encode(image, "PNG"), V3), prepare(encode(shifted, "PNG"), V3)
    raw_change = np.abs(load_pixels(encode(image, "PNG"), V3) * 1.0 - load_pixels(encode(shifted, "PNG"), V3))
    assert raw_change.mean() > 5.0  # grey levels: the shift is real
    assert np.abs(original - after).mean() < tolerance  # z units: the input barely moves
    assert np.isfinite(after).all()


def test_head_zscore_is_per_scan_in_a_batch_and_in_tensorflow() -> None:
    import tensorflow as tf

    batch = np.stack([load_pixels(encode(scan_image(s)), V3) for s in (5, 6)]).astype(np.float32)
    one_by_one = np.stack([normalize(scan, "head-zscore") for scan in batch])
    np.testing.assert_allclose(normalize(batch, "head-zscore"), one_by_one, atol=1e-5)
    np.testing.assert_allclose(normalize(tf.constant(batch), "head-zscore").numpy(), one_by_one, atol=1e-4)
    head = batch[0] > batch[0].min() + 0.5 * (batch[0].mean() - batch[0].min())
    assert abs(float(one_by_one[0][head].mean())) < 1e-3  # standardised inside the head mask


def test_uint8_serving_path_matches_the_float_path_the_training_graph_runs() -> None:
    # Serving (and evaluation) normalise uint8 pixels from a histogram; training runs the float
    # formula in TensorFlow on augmented pixels. Same statistics, same tensor, to float rounding.
    pixels = np.stack([load_pixels(encode(scan_image(s)), V3) for s in (7, 8, 9)])
    assert pixels.dtype == np.uint8
    from_floats = normalize(pixels.astype(np.float32), "head-zscore")
    from_uint8 = normalize(pixels, "head-zscore")
    assert from_uint8.dtype == np.float32 and from_uint8.shape == pixels.shape
    np.testing.assert_allclose(from_uint8, from_floats, atol=1e-5)
    np.testing.assert_allclose(normalize(pixels[0], "head-zscore"), from_floats[0], atol=1e-5)
    blank = np.full((32, 32, 1), 40, np.uint8)  # no head at all: finite, like the float path
    np.testing.assert_allclose(
        normalize(blank, "head-zscore"), normalize(blank.astype(np.float32), "head-zscore")
    )
    # Other preprocessings take uint8 too (cast first: no uint8 wrap-around in the subtraction).
    rgb = pixels[0].repeat(3, axis=-1)
    np.testing.assert_allclose(normalize(rgb, "resnet50"), normalize(rgb.astype(np.float32), "resnet50"))


def test_a_blank_scan_is_a_finite_constant() -> None:
    for value in (0, 128):
        tensor = prepare(encode(Image.new("L", (512, 512), value)), V3)
        assert tensor.shape == (192, 192, 1) and np.isfinite(tensor).all()
        assert float(tensor.max() - tensor.min()) == 0.0


def test_exif_rotation_is_applied_on_the_fast_path() -> None:
    image = scan_image(7, size=512).crop((0, 0, 512, 384))  # landscape, so the rotation shows
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    upright = image.transpose(Image.Transpose.ROTATE_270)
    rotated = load_pixels(encode(image, exif=exif.tobytes()), V3).astype(np.float64)
    reference = load_pixels(encode(upright), V3).astype(np.float64)
    assert np.abs(rotated - reference).mean() < 3.0


def test_rgb_jpeg_and_three_channel_models_take_the_fast_path_too() -> None:
    data = encode(scan_image(8).convert("RGB"))
    assert load_pixels(data, V3).shape == (192, 192, 1)
    assert load_pixels(data, InputSpec(96, 96, 3, "head-zscore", "head")).shape == (96, 96, 3)


def test_a_truncated_jpeg_fails_alone_with_a_clear_reason() -> None:
    data = encode(scan_image(9))
    with pytest.raises(ScanError, match="cannot decode image"):
        load_pixels(data[: len(data) // 3], V3)
    with pytest.raises(ScanError, match="more pixels than the limit"):
        load_pixels(data, V3, max_pixels=1000)
