"""Jobs and items as data: the JSON the API returns (and the CLI prints) and the CSV export.

One place decides the shape, so ``GET /v1/jobs/{id}``, ``results.csv`` and ``brainscan status --json``
cannot drift apart. Counts: ``done`` = items scored, ``failed`` = items that failed (at intake or in a
worker), ``pending`` = the rest; a job is finished when ``pending`` is 0.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from brainscan import CLASSES
from brainscan.db import Item, Job, JobStatus

FINAL_JOB_STATUSES = (JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.partial.value)
CSV_PAGE = 1000

CSV_COLUMNS = (
    "job_id",
    "item_id",
    "position",
    "filename",
    "source_ref",
    "sha256",
    "status",
    "label",
    "confidence",
    *(f"prob_{name}" for name in CLASSES),
    "error",
    "model_name",
    "model_version",
    "started_at",
    "finished_at",
    "preprocess_ms",
    "inference_ms",
)


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC; SQLite hands back naive datetimes for values we stored in UTC."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


def job_summary(job: Job) -> dict[str, Any]:
    """A job without its items (for lists and for polling)."""
    pending = max(job.total - job.done - job.failed, 0)
    return {
        "id": job.id,
        "status": job.status,
        "finished": job.status in FINAL_JOB_STATUSES,
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "pending": pending,
        "model": {"name": job.model_name or None, "version": job.model_version or None},
        "source": job.source,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }


def item_to_dict(item: Item) -> dict[str, Any]:
    probabilities = None
    if item.prob_glioma is not None:
        probabilities = {name: getattr(item, f"prob_{name}") for name in CLASSES}
    return {
        "id": item.id,
        "position": item.position,
        "filename": item.filename,
        "source_ref": item.source_ref,
        "sha256": item.sha256,
        "status": item.status,
        "label": item.label,
        "confidence": item.confidence,
        "probabilities": probabilities,
        "error": item.error,
        "model": {"name": item.model_name, "version": item.model_version},
        "attempts": item.attempts,
        "timings": {
            "created_at": iso(item.created_at),
            "enqueued_at": iso(item.enqueued_at),
            "started_at": iso(item.started_at),
            "finished_at": iso(item.finished_at),
            "preprocess_ms": item.preprocess_ms,
            "inference_ms": item.inference_ms,
        },
    }


def job_items(session: Session, job_id: str, offset: int = 0, limit: int = 100) -> list[Item]:
    query = select(Item).where(Item.job_id == job_id).order_by(Item.position, Item.id)
    return list(session.scalars(query.offset(offset).limit(limit)))


def stored_item_ids(session: Session, job_id: str) -> list[int]:
    """The ids of a job's items that have a stored scan (failed-at-intake items have none)."""
    return list(session.scalars(select(Item.id).where(Item.job_id == job_id, Item.sha256.is_not(None))))


def job_to_dict(session: Session, job: Job, offset: int = 0, limit: int = 100) -> dict[str, Any]:
    """The job with its counts and one page of items (``offset``/``limit``, in upload order)."""
    items = job_items(session, job.id, offset, limit) if limit > 0 else []
    data = job_summary(job)
    next_offset = offset + len(items) if offset + len(items) < job.total else None
    data["items"] = [item_to_dict(item) for item in items]
    data["page"] = {"offset": offset, "limit": limit, "returned": len(items), "next_offset": next_offset}
    return data


def list_jobs(session: Session, owner_key_id: int | None, offset: int = 0, limit: int = 50) -> dict[str, Any]:
    """The caller's jobs, newest first."""
    where = Job.owner_key_id.is_(None) if owner_key_id is None else Job.owner_key_id == owner_key_id
    total = session.scalar(select(func.count()).select_from(Job).where(where)) or 0
    jobs = session.scalars(
        select(Job).where(where).order_by(Job.created_at.desc(), Job.id.desc()).offset(offset).limit(limit)
    )
    return {
        "jobs": [job_summary(job) for job in jobs],
        "page": {"offset": offset, "limit": limit, "total": total},
    }


def _csv_text(value: Any) -> Any:
    # Client-chosen text (file names) must not run as a spreadsheet formula when the CSV is opened.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def csv_row(job_id: str, item: Item) -> list[Any]:
    return [
        job_id,
        item.id,
        item.position,
        _csv_text(item.filename),
        _csv_text(item.source_ref),
        item.sha256,
        item.status,
        item.label,
        item.confidence,
        *(getattr(item, f"prob_{name}") for name in CLASSES),
        _csv_text(item.error),
        item.model_name,
        item.model_version,
        iso(item.started_at),
        iso(item.finished_at),
        item.preprocess_ms,
        item.inference_ms,
    ]


def iter_csv(session: Session, job_id: str, page: int = CSV_PAGE) -> Iterator[str]:
    """The job's results as CSV text, a page of rows at a time (memory stays flat for big jobs)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    yield _drain(buffer)
    last_position = -1
    while True:
        # Keyset pagination on (position): stable and cheap however deep into the job we are.
        items = list(
            session.scalars(
                select(Item)
                .where(Item.job_id == job_id, Item.position > last_position)
                .order_by(Item.position)
                .limit(page)
            )
        )
        if not items:
            return
        for item in items:
            writer.writerow(csv_row(job_id, item))
        last_position = items[-1].position
        yield _drain(buffer)


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text
