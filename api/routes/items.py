"""``/v1/items/{id}``: one scan of a job. ``image.png`` returns the stored scan as PNG; with
``?view=model``, the scan as the served model sees it (cropped, resized, grey): the frame that
``gradcam.png`` is drawn on, so the web page can lay the heatmap over it.

Owner-checked like jobs: another key's item is "not found". ``own_item`` is shared with the
Grad-CAM route.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Path, Query, status
from fastapi.responses import Response
from PIL import Image
from sqlalchemy.orm import Session

from api.deps import CallerDep, SessionDep, SettingsDep, StoreDep
from api.schemas import Problem
from brainscan.db import ApiKey, Item, Job
from brainscan.imaging import ScanError, load_pixels, open_image
from brainscan.modelrepo import ModelNotFound, public_reason, resolve_model
from brainscan.settings import Settings
from brainscan.storage import StorageUnavailable

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/items", tags=["items"])

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ITEM_ID = Path(..., ge=1, le=2**63 - 1, description="An item id from `GET /v1/jobs/{id}`.")
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or invalid API key."},
    404: {"model": Problem, "description": "No such item for this key, or nothing stored for it."},
}


def own_item(session: Session, caller: ApiKey, item_id: int) -> Item:
    """The caller's item, or 404 (another key's item is not confirmed to exist)."""
    item = session.get(Item, item_id)
    job = session.get(Job, item.job_id) if item is not None else None
    if item is None or job is None or job.owner_key_id != caller.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="item not found")
    return item


@router.get(
    "/{item_id}/image.png",
    response_class=Response,
    responses={
        **NOT_FOUND,
        200: {"content": {"image/png": {}}, "description": "The stored scan, as PNG."},
        422: {"model": Problem, "description": "The stored file cannot be decoded."},
        503: {
            "model": Problem,
            "description": "Scan storage unreadable, or (`view=model`) no model to serve.",
        },
    },
)
def item_image(
    caller: CallerDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    item_id: int = ITEM_ID,
    view: Literal["stored", "model"] = Query(
        "stored",
        description="`stored`: the scan as stored; `model`: as the served model sees it (cropped, "
        "resized, grey), the frame `gradcam.png` is drawn on. `X-Brainscan-Model` names that model.",
    ),
) -> Response:
    """The scan this item scored (DICOM/NIfTI items: the PNG derived at intake)."""
    item = own_item(session, caller, item_id)
    if item.sha256 is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no scan stored for this item")
    try:
        data = store.read(item.sha256)
    except FileNotFoundError:  # removed by retention or `brainscan jobs purge`; the store is fine
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no scan stored for this item") from None
    except StorageUnavailable as exc:
        log.warning("item %s: scan storage unreadable: %s", item.id, exc)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail=exc.public_message, headers={"Retry-After": "5"}
        ) from None
    if view == "model":
        png, model = _as_model_sees_it(item.id, data, settings)
        # Not cached for long: a promotion changes the frame.
        return Response(
            png,
            media_type="image/png",
            headers={
                "Cache-Control": "private, no-cache",
                "X-Content-Type-Options": "nosniff",
                "X-Brainscan-Model": model,
            },
        )
    if not data.startswith(PNG_MAGIC):
        try:
            image = open_image(data, settings.max_image_pixels)
        except ScanError as exc:
            log.warning("item %s: stored scan cannot be decoded: %s", item.id, exc)
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=exc.public_message) from None
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        out = io.BytesIO()
        image.save(out, format="PNG")
        data = out.getvalue()
    # An item's scan never changes (content-addressed), but it is the caller's data: private.
    return Response(
        data,
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


def _as_model_sees_it(item_id: int, data: bytes, settings: Settings) -> tuple[bytes, str]:
    """The scan through the serving path's decode, crop and resize, in grey as the Grad-CAM overlay
    draws it (worker/gradcam.py ``overlay_png``); and the model, as ``name/version``."""
    try:
        ref = resolve_model(settings.model_dir, settings.model_name, settings.model_version)
    except (ModelNotFound, OSError, ValueError) as exc:
        # The full text (model folder, card errors) is for the operator's log only.
        log.warning("item %s: view=model: no model to serve: %s", item_id, exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=public_reason(exc)) from None
    try:
        pixels = load_pixels(data, ref.card.input_spec, settings.max_image_pixels)
    except ScanError as exc:
        log.warning("item %s: view=model: stored scan cannot be decoded: %s", item_id, exc)
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=exc.public_message) from None
    grey = pixels.astype(np.float32).mean(axis=-1) if pixels.ndim == 3 else pixels.astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue(), f"{ref.card.name}/{ref.card.version}"
