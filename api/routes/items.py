"""``/v1/items/{id}``: one scan of a job. ``image.png`` returns the stored scan as PNG.

Owner-checked like jobs: another key's item is "not found". ``own_item`` is shared with the
Grad-CAM route.
"""

from __future__ import annotations

import io
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Path, status
from fastapi.responses import Response
from sqlalchemy.orm import Session

from api.deps import get_caller, get_session, get_settings, get_store
from api.schemas import Problem
from brainscan.db import ApiKey, Item, Job
from brainscan.imaging import ScanError, open_image
from brainscan.settings import Settings
from brainscan.storage import ScanStore

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
    },
)
def item_image(
    item_id: int = ITEM_ID,
    caller: ApiKey = Depends(get_caller),
    session: Session = Depends(get_session),
    store: ScanStore = Depends(get_store),
    settings: Settings = Depends(get_settings),
) -> Response:
    """The scan this item scored (DICOM/NIfTI items: the PNG derived at intake)."""
    item = own_item(session, caller, item_id)
    if item.sha256 is None or not store.exists(item.sha256):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no scan stored for this item")
    data = store.read(item.sha256)
    if not data.startswith(PNG_MAGIC):
        try:
            image = open_image(data, settings.max_image_pixels)
        except ScanError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
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
