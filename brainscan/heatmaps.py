"""Stored Grad-CAM overlays, shared by the API (serves them) and the worker (writes them).

A heatmap lives at ``<storage>/gradcam/<item_id>.png``: the path is built from the integer item id
only, never from anything a client sent. Beside it, two small markers:

- ``<item_id>.pending``: a computation was queued (so a page polling ``gradcam.png`` every two
  seconds queues one task, not one per poll); it goes stale after ``PENDING_TTL_S``, so a lost task
  is queued again by the next poll;
- ``<item_id>.failed``: the scan cannot be explained (it could not be decoded); holds the reason.

The PNG's text chunks say how it was made (``explainer``: ``gradcam`` or ``saliency``, the model,
the class explained), so the API can label it without a database column. Nothing here imports
TensorFlow: the computation is ``worker/gradcam.py``, queued by
``brainscan.queueing.Publisher.request_heatmaps``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

PENDING_TTL_S = 60.0
TEXT_KEYS = ("explainer", "model", "class", "layer")
# A SavedModel exported by brainscan splits its network at the map Grad-CAM explains
# (``training.export.export_savedmodel``): pixels -> maps, and maps -> probabilities.
GRADCAM_MAPS = "gradcam_maps"
GRADCAM_HEAD = "gradcam_head"
GRADCAM_MAPS_OUTPUT = "maps"


class HeatmapStore:
    def __init__(self, storage_dir: Path) -> None:
        self.root = Path(storage_dir) / "gradcam"

    def _path(self, item_id: int, suffix: str) -> Path:
        return self.root / f"{int(item_id)}{suffix}"

    def png_path(self, item_id: int) -> Path:
        return self._path(item_id, ".png")

    def read(self, item_id: int) -> tuple[bytes, dict[str, str]] | None:
        """The overlay PNG and its text chunks, or None when none is stored."""
        try:
            data = self.png_path(item_id).read_bytes()
        except FileNotFoundError:
            return None
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                text = {k: str(v) for k, v in getattr(image, "text", {}).items() if k in TEXT_KEYS}
        except Exception:  # a damaged file: recompute rather than serve it
            log.warning("unreadable heatmap for item %d; it will be recomputed", item_id)
            self.png_path(item_id).unlink(missing_ok=True)
            return None
        return data, text

    def failure(self, item_id: int) -> str | None:
        try:
            return self._path(item_id, ".failed").read_text(errors="replace")[:500] or "cannot explain"
        except FileNotFoundError:
            return None

    def write(self, item_id: int, png: bytes) -> None:
        self._atomic(self.png_path(item_id), png)
        self._path(item_id, ".failed").unlink(missing_ok=True)
        self._path(item_id, ".pending").unlink(missing_ok=True)

    def write_failure(self, item_id: int, reason: str) -> None:
        self._atomic(self._path(item_id, ".failed"), reason[:500].encode("utf-8", "replace"))
        self._path(item_id, ".pending").unlink(missing_ok=True)

    def claim_pending(self, item_id: int, ttl_s: float = PENDING_TTL_S) -> bool:
        """True when the caller should queue a computation (none queued, or the last one is stale)."""
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self._path(item_id, ".pending")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - marker.stat().st_mtime < ttl_s:
                    return False
            except FileNotFoundError:
                pass  # finished meanwhile; the caller re-reads the PNG next time
            marker.touch()
            return True
        os.close(fd)
        return True

    def release_pending(self, item_id: int) -> None:
        self._path(item_id, ".pending").unlink(missing_ok=True)

    def _atomic(self, target: Path, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)  # readers never see half a PNG
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
