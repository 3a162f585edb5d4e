"""Generated scan folders for the training-side tests.

``write_dataset`` draws tiny "scans": a head-like ellipse with a smooth random texture on a black
border, plus a class-dependent mark (glioma: a bright blob on one side, meningioma: a bright arc at
the rim, notumor: nothing, pituitary: a bright spot low in the middle), saved as JPEG, PNG, grey,
RGB and palette images so the loaders see the dataset's mix of formats and modes.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainscan import CLASSES
from tests.support.environment import ROOT

REAL_TRAINING = Path(
    os.environ.get("BRAINSCAN_TEST_DATA", ROOT.parent / "shared" / "data" / "brain-tumor-mri" / "Training")
)
needs_real_data = pytest.mark.skipif(
    not REAL_TRAINING.is_dir(),
    reason=f"the real dataset is not at {REAL_TRAINING} (../shared/data/brain-tumor-mri/Training)",
)


def draw_scan(label: int, seed: int, size: int = 64) -> np.ndarray:
    """uint8 (size, size) grey scan of class ``label``; different for every seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = 0.5 + rng.uniform(-0.04, 0.04, 2)
    ry, rx = rng.uniform(0.38, 0.44), rng.uniform(0.34, 0.4)
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    # Anatomy-like structure at the scale a difference hash sees (a 16x16 thumbnail), with contrast
    # enough that re-encoding does not flip its bits, and different for every seed.
    coarse = Image.fromarray(rng.uniform(0, 255, (10, 10)).astype(np.uint8))
    texture = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) - 128
    image = np.where(inside, 110 + 0.6 * texture, 0.0)
    if label == 0:  # glioma: a bright blob on the left or right
        side = cx + rng.choice([-1, 1]) * rx * 0.45
        image += 120 * np.exp(-((yy - cy) ** 2 + (xx - side) ** 2) / (2 * 0.06**2)) * inside
    elif label == 1:  # meningioma: a bright arc hugging the rim
        rim = np.abs(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 - 0.8) < 0.12
        image += np.where(rim & (yy < cy), 110, 0)
    elif label == 3:  # pituitary: a small bright spot low in the middle
        image += 140 * np.exp(-((yy - (cy + ry * 0.45)) ** 2 + (xx - cx) ** 2) / (2 * 0.035**2))
    image += rng.normal(0, 2, image.shape) * inside
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str = "JPEG", mode: str = "L", quality: int = 92) -> bytes:
    image = Image.fromarray(pixels, mode="L")
    image = image.convert("P") if mode == "P" else image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return out.getvalue()


FORMATS = [("JPEG", "L", ".jpg"), ("PNG", "L", ".png"), ("JPEG", "RGB", ".jpg"), ("PNG", "P", ".png")]


def write_dataset(root: Path, per_class: int = 6, size: int = 64, seed: int = 0) -> Path:
    """``root/<class>/<file>`` with ``per_class`` distinct scans per class, in mixed formats and modes."""
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fmt, mode, suffix = FORMATS[i % len(FORMATS)]
            pixels = draw_scan(label, seed * 100_000 + label * 1000 + i, size)
            (folder / f"{name}_{i:03d}{suffix}").write_bytes(encode(pixels, fmt, mode))
    return root
