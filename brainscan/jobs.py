"""Jobs and items, the write side: a job opens, receives its items in committed chunks, then closes.

:mod:`brainscan.results` is the read side (the JSON and CSV shapes). The workers move items on from
here (``worker/tasks.py``), intake (:mod:`brainscan.intake`) and the nightly re-score create jobs.

Intake in chunks (``brainscan.intake.submit``): :func:`create_job` with ``receiving=True`` commits
the job with its first chunk in status ``receiving``, so it is visible and pollable while a large
archive is still being read; :func:`add_items` commits each further chunk (and moves the job's
``total``/``failed``) before the caller enqueues it, so workers score the first chunks while the rest
is read and an item is never on the queue before it is in the database; :func:`close_intake` ends
``receiving``. Workers never close a job that is still ``receiving`` (its ``total`` is still
growing), so ``close_intake`` closes it itself when every item is already final. A job whose intake
stopped half way (the API process died) stays ``receiving``; :func:`close_abandoned_intakes` (run by
the reaper) then adds one failed item that says so and closes the intake, so the job ends
``partial`` or ``failed``, never silent. The reaper cannot tell a dead intake from one that is only
slow: every chunk is therefore written only while the job is still ``receiving`` (a guarded UPDATE
of the job row before its items are inserted), so a late chunk raises :class:`IntakeClosed` instead
of landing after the job's last (reason) item or changing a final job. An upload smaller than one
chunk is one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import case, exists, func, insert, select, update
from sqlalchemy.orm import Session

from brainscan.db import Item, ItemStatus, Job, JobStatus

# Shown as the file name of the failed item that records an interrupted intake (display data only).
INTERRUPTED_INTAKE_NAME = "(rest of the upload)"


@dataclass
class IntakeEntry:
    """One future item: a stored scan (sha256 set) or a failure (error set)."""

    filename: str
    sha256: str | None = None
    error: str | None = None
    size: int = 0
    source_ref: str | None = None
    # Bytes this item adds to its key's daily byte quota (brainscan.quotas), set by intake for each
    # entry of an uploaded file (brainscan.intake.expansion.UploadCharge). None: its stored size.
    quota_bytes: int | None = field(default=None, compare=False)

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def charged_bytes(self) -> int | None:
        """What ``items.size_bytes`` holds: the quota charge, else the stored scan's size."""
        if self.quota_bytes is not None:
            return self.quota_bytes
        return self.size if self.sha256 is not None else None


def _item_rows(job_id: str, entries: Sequence[IntakeEntry], first_position: int, now: datetime) -> list[dict]:
    return [
        {
            "job_id": job_id,
            "position": first_position + offset,
            "filename": entry.filename,
            "source_ref": entry.source_ref,
            "sha256": entry.sha256,
            "size_bytes": entry.charged_bytes,
            "status": ItemStatus.failed.value if entry.failed else ItemStatus.queued.value,
            "error": entry.error,
            "created_at": now,
            "finished_at": now if entry.failed else None,
        }
        for offset, entry in enumerate(entries)
    ]


def create_job(
    session: Session,
    owner_key_id: int | None,
    entries: Sequence[IntakeEntry],
    *,
    source: str = "api",
    callback_url: str | None = None,
    receiving: bool = False,
) -> Job:
    """Write a job and these items in one transaction, and commit it.

    ``receiving``: more items will follow (:func:`add_items`, then :func:`close_intake`); the job is
    visible at once and no worker closes it meanwhile. Otherwise these are all its items: a small
    upload costs one transaction. Items that failed at intake are written already failed (and
    counted), so a client sees exactly what it sent; a complete job whose every item failed is final.
    """
    now = datetime.now(UTC)
    failed = sum(1 for e in entries if e.failed)
    all_failed = failed == len(entries) and not receiving
    if receiving:
        status = JobStatus.receiving.value
    else:
        status = JobStatus.failed.value if all_failed else JobStatus.queued.value
    job = Job(
        owner_key_id=owner_key_id,
        status=status,
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
        if entries:
            session.execute(insert(Item), _item_rows(job.id, entries, 0, now))
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return job


# ---- intake in chunks -------------------------------------------------------------------------------


class IntakeClosed(ValueError):
    """A chunk came for a job that is no longer ``receiving``: nothing of the chunk was written.

    The reaper (:func:`close_abandoned_intakes`) closes an intake that stored nothing for
    ``stale_after_s``; an intake that was only slow finds that out at its next chunk. The items
    committed before stay the job's (they are scored, after the failed item that says the intake
    stopped); the rest of the upload has to be submitted again.
    """

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"the intake of job {job_id} was closed before this upload was fully stored: no part of it "
            "was stored for longer than BRAINSCAN_STALE_AFTER_S, so it was taken for abandoned; the "
            "items stored before that are scored as that job, the rest of the upload was not stored: "
            "submit the rest again"
        )
        self.job_id = job_id


def add_items(
    session: Session, job_id: str, entries: Sequence[IntakeEntry], first_position: int | None = None
) -> int:
    """Commit a chunk of a receiving job's items and grow its counts, in one transaction.

    Returns how many of them are queued for scoring (the rest failed at intake). The caller enqueues
    only after this returns: an item is never on the queue before it is in the database. Raises
    :class:`IntakeClosed` (and writes nothing) if the job is no longer receiving.
    ``first_position``: None puts them after the job's last item.
    """
    if not entries:
        return 0
    try:
        _append_items(session, job_id, entries, first_position)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return sum(1 for e in entries if not e.failed)


def _append_items(
    session: Session, job_id: str, entries: Sequence[IntakeEntry], first_position: int | None
) -> None:
    """Grow the job's counts, then insert the items; the caller commits (or rolls back).

    The job row is updated first, guarded by ``status = 'receiving'``: that one statement is the
    check (no read-then-write gap), and on PostgreSQL it locks the row until the commit, so a reaper
    closing the intake either commits first (this raises) or waits for this chunk. The position
    "after the last item" is read only after that, under the lock (SQLite: the write lock).
    """
    failed = sum(1 for e in entries if e.failed)
    grown = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.receiving.value)
        .values(total=Job.total + len(entries), failed=Job.failed + failed)
        .returning(Job.id)
    ).first()
    if grown is None:
        raise IntakeClosed(job_id)
    if first_position is None:
        first_position = int(
            session.scalar(select(func.coalesce(func.max(Item.position) + 1, 0)).where(Item.job_id == job_id))
            or 0
        )
    session.execute(insert(Item), _item_rows(job_id, entries, first_position, datetime.now(UTC)))


def close_intake(session: Session, job_id: str, now: datetime | None = None) -> Job | None:
    """End a job's ``receiving``: final now if every item already is, else ``queued``/``running``.

    One UPDATE on the job row, guarded by ``status = 'receiving'``: a worker committing results at the
    same moment either committed first (its counts are seen here) or sees the job no longer
    receiving and closes it itself. Returns the job (None if it was not receiving).
    """
    try:
        closed = _close_receiving(session, job_id, now or datetime.now(UTC))
        session.commit()
    except BaseException:
        session.rollback()
        raise
    if not closed:
        return None
    return session.get(Job, job_id, populate_existing=True)


def _close_receiving(session: Session, job_id: str, now: datetime) -> bool:
    """The UPDATE of :func:`close_intake`, uncommitted; False if the job was not receiving."""
    final = Job.done + Job.failed >= Job.total
    started = exists(select(Item.id).where(Item.job_id == Job.id, Item.started_at.is_not(None)))
    closed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.receiving.value)
        .values(
            status=case(
                (final & (Job.done == 0), JobStatus.failed.value),
                (final & (Job.failed == 0), JobStatus.succeeded.value),
                (final, JobStatus.partial.value),
                (started, JobStatus.running.value),
                else_=JobStatus.queued.value,
            ),
            started_at=select(func.min(Item.started_at)).where(Item.job_id == Job.id).scalar_subquery(),
            finished_at=case((final, now), else_=None),
        )
        .returning(Job.id)
    ).first()
    return closed is not None


def interrupt_intake(session: Session, job_id: str, reason: str) -> Job | None:
    """Record why a receiving job's intake stopped (one failed item, after its last one) and close it.

    The items already committed stay and are scored; the job ends ``partial`` (or ``failed``) with
    the reason on the extra item, so the client sees that part of what it sent was never read. One
    transaction: no chunk can land between the reason and the close, so the reason is the job's
    last item. Returns None (and writes nothing) if the job was no longer receiving.
    """
    try:
        _append_items(session, job_id, [IntakeEntry(INTERRUPTED_INTAKE_NAME, error=reason)], None)
        _close_receiving(session, job_id, datetime.now(UTC))
        session.commit()
    except IntakeClosed:
        session.rollback()
        return None
    except BaseException:
        session.rollback()
        raise
    return session.get(Job, job_id, populate_existing=True)


def abandoned_intakes(session: Session, stale_after_s: float, now: datetime | None = None) -> list[str]:
    """Receiving jobs with no new item for ``stale_after_s``: their intake process is gone."""
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=stale_after_s)
    recent_item = exists(select(Item.id).where(Item.job_id == Job.id, Item.created_at >= cutoff))
    return list(
        session.scalars(
            select(Job.id).where(
                Job.status == JobStatus.receiving.value, Job.created_at < cutoff, ~recent_item
            )
        )
    )


def close_abandoned_intakes(session: Session, stale_after_s: float, now: datetime | None = None) -> list[Job]:
    """Mark every abandoned intake (see :func:`abandoned_intakes`); returns the jobs it closed."""
    closed: list[Job] = []
    for job_id in abandoned_intakes(session, stale_after_s, now):
        total = session.scalar(select(Job.total).where(Job.id == job_id)) or 0
        reason = (
            f"intake stopped before the upload was fully read (the process reading it ended): "
            f"{total} item(s) were stored and are scored, the rest was not read; submit it again"
        )
        job = interrupt_intake(session, job_id, reason)
        if job is not None:
            closed.append(job)
    return closed
