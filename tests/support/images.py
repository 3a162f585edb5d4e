"""Small synthetic scans (JPEG, PNG), different per seed."""

from __future__ import annotations

import io
import random


def make_image(
    seed: int = 0, size: tuple[int, int] = (40, 40), fmt: str = "JPEG", mode: str = "RGB"
) -> bytes:
    """A small synthetic scan: a bright blob on black, different per seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    radius = rng.uniform(0.2, 0.4) * min(width, height)
    blob = np.clip(255 * (1 - ((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2), 0, 255)
    noise = rng.integers(0, 40, size=(height, width))
    grey = np.clip(blob + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(grey, mode="L").convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def make_jpeg(seed: int = 0, size: tuple[int, int] = (40, 40)) -> bytes:
    return make_image(seed, size, "JPEG")


def make_png(seed: int = 0, size: tuple[int, int] = (40, 40)) -> bytes:
    return make_image(seed, size, "PNG")


def make_scans(count: int, prefix: str = "scan", seed: int = 0) -> dict[str, bytes]:
    """``count`` named scans, two JPEGs to every PNG."""
    rng = random.Random(seed)
    return {
        f"{prefix}_{i:04d}.{'jpg' if i % 3 else 'png'}": make_image(
            rng.randrange(1 << 30), fmt="JPEG" if i % 3 else "PNG"
        )
        for i in range(count)
    }
