"""``GET /v1/items/{id}/gradcam.png``: the scan with its Grad-CAM heatmap, computed by a worker.

Present: 200 with the overlay PNG; ``X-Brainscan-Explainer`` says ``gradcam`` or ``saliency`` (the
gradient saliency used for models without a Keras file, see worker/gradcam.py), ``X-Brainscan-Class``
the class explained. Absent: the route queues a computation (once per ``PENDING_TTL_S``, however
often it is polled) and answers 202 ``{"status": "pending", "retry_after": 2}`` with ``Retry-After``;
poll again. Owner-checked.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from api.deps import CallerDep, PublisherDep, SessionDep, SettingsDep
from api.routes.items import ITEM_ID, NOT_FOUND, own_item
from api.schemas import Problem
from brainscan.heatmaps import HeatmapStore

router = APIRouter(prefix="/v1/items", tags=["items"])

RETRY_AFTER_S = 2


@router.get(
    "/{item_id}/gradcam.png",
    response_class=Response,
    responses={
        **NOT_FOUND,
        200: {"content": {"image/png": {}}, "description": "The scan in grey with the heatmap in jet."},
        202: {"description": "Being computed: retry after `retry_after` seconds."},
        422: {"model": Problem, "description": "This scan cannot be explained (it cannot be decoded)."},
        503: {"model": Problem, "description": "The broker is unreachable; retry shortly."},
    },
)
async def item_gradcam(
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    publisher: PublisherDep,
    item_id: int = ITEM_ID,
) -> Response:
    """The item's Grad-CAM overlay, or 202 while a worker computes it."""
    item = await run_in_threadpool(own_item, session, caller, item_id)
    if item.sha256 is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no scan stored for this item")
    heatmaps = HeatmapStore(settings.resolved_storage_dir)
    found = heatmaps.read(item.id)
    if found is not None:
        data, text = found
        return Response(
            data,
            media_type="image/png",
            headers={
                "Cache-Control": "private, max-age=3600",
                "X-Content-Type-Options": "nosniff",
                "X-Brainscan-Explainer": text.get("explainer", "gradcam"),
                "X-Brainscan-Model": text.get("model", ""),
                # The class the map explains (the model's top class), without its raw probability.
                "X-Brainscan-Class": text.get("class", "").split(" (")[0],
            },
        )
    reason = heatmaps.failure(item.id)
    if reason is not None:
        detail = f"cannot explain this scan: {reason}"
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)
    if heatmaps.claim_pending(item.id) and not await run_in_threadpool(publisher.request_heatmaps, [item.id]):
        heatmaps.release_pending(item.id)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="could not queue the Grad-CAM computation, retry shortly",
            headers={"Retry-After": "5"},
        )
    return JSONResponse(
        {"status": "pending", "retry_after": RETRY_AFTER_S},
        status_code=status.HTTP_202_ACCEPTED,
        headers={"Retry-After": str(RETRY_AFTER_S), "Cache-Control": "no-store"},
    )
