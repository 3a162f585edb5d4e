"""Jobs and items as data: the JSON the API returns (and the CLI prints) and the CSV export.

One place decides the shape, so ``GET /v1/jobs/{id}``, ``results.csv``, ``brainscan status --json``
and the webhook payload cannot drift apart. Counts: ``done`` = items scored, ``failed`` = items that
failed (at intake or in a worker), ``pending`` = the rest; a job is finished when ``pending`` is 0.

Flags (issue 11): every scored item carries ``flag`` (None | "uncertain" | "out_of_scope"),
``flag_reason`` and ``scope_score``; an out-of-scope item has no label and no confidence (its
probabilities stay, for audit). ``flags`` on a job counts its flagged items; it is None for a job
scored before flags existed (migration 0003), whose items were never checked.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from brainscan import CLASSES
from brainscan.db import Item, Job, JobStatus
from brainscan.trust import FLAGS

FINAL_JOB_STATUSES = (JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.partial.value)
CSV_PAGE = 1000
# ``GET /v1/jobs/{id}?flag=...&order=...``: which items a page holds, and in what order.
FlagFilter = Literal["any", "none", "uncertain", "out_of_scope"]
ItemOrder = Literal["position", "confidence", "-confidence"]
FLAG_FILTERS: tuple[str, ...] = get_args(FlagFilter)
ITEM_ORDERS: tuple[str, ...] = get_args(ItemOrder)

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
    "flag",
    "flag_reason",
    "scope_score",
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
        "flags": flag_counts(job),
        "model": {"name": job.model_name or None, "version": job.model_version or None},
        "source": job.source,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }


def flag_counts(job: Job) -> dict[str, int] | None:
    """``{"uncertain": n, "out_of_scope": m}``; None for a job scored before flags existed."""
    if job.flagged_uncertain is None or job.flagged_out_of_scope is None:
        return None
    return {"uncertain": job.flagged_uncertain, "out_of_scope": job.flagged_out_of_scope}


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
        "flag": item.flag,
        "flag_reason": item.flag_reason,
        "scope_score": item.scope_score,
        "probabilities": probabilities,
        "error": item.error,
        "model": {"name": item.model_name, "version": item.model_version},
        "attempts": item.attempts,
        "worker_id": item.worker_id,
        "timings": {
            "created_at": iso(item.created_at),
            "enqueued_at": iso(item.enqueued_at),
            "started_at": iso(item.started_at),
            "finished_at": iso(item.finished_at),
            "preprocess_ms": item.preprocess_ms,
            "inference_ms": item.inference_ms,
        },
    }


def _flag_condition(flag: FlagFilter) -> ColumnElement[bool]:
    if flag == "any":
        return Item.flag.is_not(None)
    if flag == "none":
        return Item.flag.is_(None)
    if flag not in FLAGS:
        raise ValueError(f"flag must be one of {', '.join(FLAG_FILTERS)}")
    return Item.flag == flag


def job_items(
    session: Session,
    job_id: str,
    offset: int = 0,
    limit: int = 100,
    *,
    flag: FlagFilter | None = None,
    order: ItemOrder = "position",
) -> list[Item]:
    """One page of a job's items. ``flag``: only items with that flag ("any": flagged, "none": not
    flagged, which includes failed and pending items); None: all. ``order``: upload order, or by
    confidence ascending / descending ("-confidence"), items without one (failed, pending, out of
    scope) last either way, ties in upload order."""
    query = select(Item).where(Item.job_id == job_id)
    if flag is not None:
        query = query.where(_flag_condition(flag))
    if order == "position":
        query = query.order_by(Item.position, Item.id)
    elif order in ("confidence", "-confidence"):
        by_confidence = Item.confidence.desc() if order == "-confidence" else Item.confidence.asc()
        # "IS NULL" first in the key: NULLs last on both databases, in both directions.
        query = query.order_by(Item.confidence.is_(None), by_confidence, Item.position, Item.id)
    else:
        raise ValueError(f"order must be one of {', '.join(ITEM_ORDERS)}")
    return list(session.scalars(query.offset(offset).limit(limit)))


def stored_item_ids(session: Session, job_id: str) -> list[int]:
    """The ids of a job's items that have a stored scan (failed-at-intake items have none)."""
    return list(session.scalars(select(Item.id).where(Item.job_id == job_id, Item.sha256.is_not(None))))


def job_to_dict(
    session: Session,
    job: Job,
    offset: int = 0,
    limit: int = 100,
    *,
    flag: FlagFilter | None = None,
    order: ItemOrder = "position",
) -> dict[str, Any]:
    """The job with its counts and one page of items (``offset``/``limit`` within the items that
    ``flag`` selects, in ``order``; see :func:`job_items`)."""
    # One row more than the page tells whether another page follows, whatever the filter; limit 0 asks
    # for the counts only (no item query, and no next page to follow).
    rows = job_items(session, job.id, offset, limit + 1, flag=flag, order=order) if limit else []
    items = rows[:limit]
    data = job_summary(job)
    data["items"] = [item_to_dict(item) for item in items]
    data["page"] = {
        "offset": offset,
        "limit": limit,
        "returned": len(items),
        "next_offset": offset + limit if len(rows) > limit else None,
        "flag": flag,
        "order": order,
    }
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
        item.flag,
        item.flag_reason,
        item.scope_score,
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
