"""``/v1/jobs``: submit scans, poll a job, export its results. Thin: the work is in brainscan.intake."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import CallerDep, PublisherDep, SessionDep, SettingsDep, StoreDep, SubmitterDep
from api.schemas import JobAccepted, JobList, JobOut, Problem
from api.upload import (
    MalformedUpload,
    SpooledForm,
    TooManyFiles,
    UploadTimeout,
    UploadTooLarge,
    spool_multipart,
)
from brainscan import intake, results
from brainscan.db import ApiKey, Job
from brainscan.jobs import IntakeClosed
from brainscan.settings import Settings
from brainscan.webhooks import DestinationPolicy

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files"],
                "properties": {
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "JPEG/PNG scans, or .zip / .tar / .tar.gz archives of them.",
                    },
                    "callback_url": {"type": "string", "description": "http(s) URL called when done."},
                    "gradcam": {
                        "type": "boolean",
                        "description": "true: workers also compute each scan's Grad-CAM overlay "
                        "(GET /v1/items/{id}/gradcam.png).",
                    },
                },
            }
        }
    },
}
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or invalid API key."},
    503: {"model": Problem, "description": "Database unavailable; retry shortly."},
}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    openapi_extra={"requestBody": UPLOAD_BODY},
    responses={
        **ERRORS,
        400: {"model": Problem, "description": "Malformed multipart body, or no files."},
        408: {"model": Problem, "description": "Body too slow (a pause or the whole); nothing stored."},
        413: {"model": Problem, "description": "Body over the size cap or too many files; nothing stored."},
        429: {"model": Problem, "description": "The key's daily quota is used up; see Retry-After."},
    },
)
async def submit_job(
    request: Request,
    caller: SubmitterDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    publisher: PublisherDep,
) -> JSONResponse:
    """Upload scans (multipart field `files`, repeatable). Stored first, then queued: answers 202."""
    form = await _spool(request, settings, store.tmp_dir, caller.id)
    try:
        if not form.files:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                detail="no files: send one or more multipart fields named 'files'",
            )
        callback_url = _callback_url(form.fields.get("callback_url"), settings)
        try:
            submitted = await run_in_threadpool(
                intake.submit_job,
                session,
                store,
                intake.IntakeLimits.from_settings(settings),
                caller.id,
                [(spooled.path, spooled.filename) for spooled in form.files],
                enqueue=publisher.enqueue_job,
                notify=publisher.notify_jobs,
                callback_url=callback_url,
            )
        except IntakeClosed as exc:
            # The reaper closed this (slow) intake half way: the message names the job, which holds
            # what was stored before, and says to submit the rest again. No path or content in it.
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from None
        except OSError as exc:
            log.error("storage failed during intake: %s", type(exc).__name__)
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, detail="scan storage unavailable, retry shortly"
            ) from None
    finally:
        form.cleanup()
    job = submitted.job
    if _flag(form.fields.get("gradcam")):  # Grad-CAM overlays, queued apart from scoring
        # Best effort: GET gradcam.png computes on demand anyway.
        ids = await run_in_threadpool(results.stored_item_ids, session, job.id)
        await run_in_threadpool(publisher.request_heatmaps, ids)
    # From configuration, never from the request's Host header (a client could name any host).
    status_url = settings.resolved_public_url + request.app.url_path_for("get_job", job_id=job.id)
    body = {
        "id": job.id,
        "status": job.status,
        "total": job.total,
        "failed": job.failed,
        "enqueued": submitted.enqueued,
        "status_url": status_url,
    }
    return JSONResponse(body, status_code=status.HTTP_202_ACCEPTED, headers={"Location": status_url})


async def _spool(request: Request, settings: Settings, tmp_dir: Path, caller_id: int) -> SpooledForm:
    """The multipart body on disk, or 413 (over the cap) / 400 (malformed); nothing left behind."""
    try:
        return await spool_multipart(
            request,
            tmp_dir,
            settings.max_request_bytes,
            max_files=settings.max_items_per_job,
            timeout_s=settings.upload_timeout_s,
            idle_timeout_s=settings.upload_idle_timeout_s,
        )
    except TooManyFiles as exc:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            detail=f"{exc}: the limit is {settings.max_items_per_job} files per request "
            "(BRAINSCAN_MAX_ITEMS_PER_JOB); nothing was stored",
        ) from None
    except UploadTimeout:
        raise HTTPException(
            status.HTTP_408_REQUEST_TIMEOUT,
            detail=f"upload too slow: the body must arrive within {settings.upload_timeout_s:g} s, with no "
            f"pause over {settings.upload_idle_timeout_s:g} s (BRAINSCAN_UPLOAD_TIMEOUT_S, "
            "BRAINSCAN_UPLOAD_IDLE_TIMEOUT_S); nothing was stored",
        ) from None
    except UploadTooLarge as exc:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            detail=f"{exc}: the limit is {settings.max_request_bytes} bytes per request "
            "(BRAINSCAN_MAX_REQUEST_BYTES); nothing was stored",
        ) from None
    except MalformedUpload as exc:
        log.info("upload refused as malformed (key %s): %s", caller_id, exc)
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=exc.public_message) from None


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _callback_url(value: str | None, settings: Settings) -> str | None:
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        parts = urlsplit(value)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and len(value) <= 2000
    except ValueError:
        valid = False
    if not valid:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="callback_url must be an http(s) URL")
    # A literal internal address is refused now; a host name again at each send (brainscan.webhooks).
    problem = DestinationPolicy.parse(settings.webhook_allow).submit_problem(value)
    if problem is not None:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=problem)
    return value


def _own_job(session: Session, caller: ApiKey, job_id: str) -> Job:
    job = session.get(Job, job_id) if len(job_id) <= 64 else None
    # Another key's job is "not found", not "forbidden": ids of others' jobs are not confirmed.
    if job is None or job.owner_key_id != caller.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="job not found")
    return job


@router.get("", response_model=JobList, responses=ERRORS)
def list_jobs(
    caller: CallerDep,
    session: SessionDep,
    offset: int = Query(0, ge=0, le=10**9),
    limit: int = Query(50, ge=1, le=1000),
) -> dict[str, Any]:
    """The caller's jobs, newest first."""
    return results.list_jobs(session, caller.id, offset, limit)


@router.get(
    "/{job_id}",
    name="get_job",
    response_model=JobOut,
    responses={**ERRORS, 404: {"model": Problem, "description": "No such job for this key."}},
)
def get_job(
    job_id: str,
    caller: CallerDep,
    session: SessionDep,
    offset: int = Query(0, ge=0, le=10**9, description="First item to return (of those `flag` selects)."),
    limit: int = Query(100, ge=0, le=1000, description="Items per page; 0 for counts only."),
    flag: results.FlagFilter | None = Query(
        None,
        description="Only items with this flag: `uncertain`, `out_of_scope`, `any` (either) or `none` "
        "(not flagged, including failed and pending items). Absent: every item.",
    ),
    order: results.ItemOrder = Query(
        "position",
        description="`position` (upload order), `confidence` (lowest first) or `-confidence` (highest "
        "first); items without a confidence (failed, pending, out of scope) come last.",
    ),
) -> dict[str, Any]:
    """A job's status, counts (with per-flag counts) and one page of its items."""
    job = _own_job(session, caller, job_id)
    return results.job_to_dict(session, job, offset, limit, flag=flag, order=order)


@router.get(
    "/{job_id}/results.csv",
    response_class=StreamingResponse,
    responses={
        **ERRORS,
        200: {"content": {"text/csv": {}}, "description": "One row per item."},
        404: {"model": Problem, "description": "No such job for this key."},
    },
)
def job_results_csv(
    request: Request,
    job_id: str,
    caller: CallerDep,
    session: SessionDep,
) -> StreamingResponse:
    """Every item of the job as CSV, streamed."""
    job = _own_job(session, caller, job_id)
    sessions = request.app.state.sessions

    def rows():  # type: ignore[no-untyped-def]
        # Its own session: the request's is closed once the response starts streaming.
        with sessions() as stream_session:
            yield from results.iter_csv(stream_session, job.id)

    return StreamingResponse(
        rows(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{job.id}.csv"'},
    )
