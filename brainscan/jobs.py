"""Jobs and items, the write side: a new job and all its items in one transaction.

:mod:`brainscan.results` is the read side (the JSON and CSV shapes). The workers move items on from
here (``worker/tasks.py``), intake (:mod:`brainscan.intake`) and the nightly re-score create jobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import insert
from sqlalchemy.orm import Session

from brainscan.db import Item, ItemStatus, Job, JobStatus


@dataclass
class IntakeEntry:
    """One future item: a stored scan (sha256 set) or a failure (error set)."""

    filename: str
    sha256: str | None = None
    error: str | None = None
    size: int = 0
    source_ref: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


def create_job(
    session: Session,
    owner_key_id: int | None,
    entries: Sequence[IntakeEntry],
    *,
    source: str = "api",
    callback_url: str | None = None,
) -> Job:
    """Write the job and all its items in one transaction and commit it.

    Items that failed at intake are written already failed (and counted), so a client sees exactly
    what it sent. A job whose every item failed is final at once.
    """
    now = datetime.now(UTC)
    failed = sum(1 for e in entries if e.failed)
    all_failed = failed == len(entries)
    job = Job(
        owner_key_id=owner_key_id,
        status=JobStatus.failed.value if all_failed else JobStatus.queued.value,
        total=len(entries),
        done=0,
        failed=failed,
        source=source,
        callback_url=callback_url,
        created_at=now,
        finished_at=now if all_failed else None,
    )
    try:
        session.add(job)
        session.flush()
        rows = [
            {
                "job_id": job.id,
                "position": position,
                "filename": entry.filename,
                "source_ref": entry.source_ref,
                "sha256": entry.sha256,
                "status": ItemStatus.failed.value if entry.failed else ItemStatus.queued.value,
                "error": entry.error,
                "created_at": now,
                "finished_at": now if entry.failed else None,
            }
            for position, entry in enumerate(entries)
        ]
        if rows:
            session.execute(insert(Item), rows)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return job
