"""Submitting a job: its items committed and enqueued in chunks while the upload is read, then closed.

The order that keeps "nothing is lost": each chunk of ``INTAKE_CHUNK`` items is stored (scans made
durable with one file-system sync), committed, and only then enqueued, so workers score the first
chunks of a large archive while the rest is still being read. The first chunk creates the job in
status ``receiving`` (visible and pollable from then on); :func:`brainscan.jobs.close_intake` ends
``receiving``. An upload smaller than one chunk is written in one transaction, like before. If intake
fails half way in this process (storage or database error), the job gets one failed item saying so
before the error goes up; if the process dies, the reaper does the same
(:func:`brainscan.jobs.close_abandoned_intakes`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from brainscan.db import Job, JobStatus
from brainscan.intake.expansion import Intake, IntakeLimits
from brainscan.jobs import IntakeEntry, add_items, close_intake, create_job, interrupt_intake
from brainscan.storage import ScanStore

log = logging.getLogger(__name__)

# Items per committed (and enqueued) chunk: one worker flush (two model batches of 32). Small enough
# that scoring starts after the first few dozen scans, large enough that a 1,000-scan archive costs
# 16 commits and 16 enqueues.
INTAKE_CHUNK = 64


@dataclass
class Submitted:
    job: Job
    enqueued: bool


class _ChunkWriteFailed(Exception):
    """Storing a chunk failed: not the client's file (expansion must not read it as a corrupt one)."""


@dataclass
class _ChunkWriter:
    """Commits a job's recorded entries in chunks (the first creates the job) and enqueues each."""

    session: Session
    store: ScanStore  # deferring_sync(): made durable here, once per chunk
    intake: Intake
    enqueue: Callable[[str], bool]
    owner_key_id: int | None
    source: str
    callback_url: str | None
    chunk: int = INTAKE_CHUNK
    job: Job | None = None
    written: int = 0  # items committed (the next item's position)
    seen: int = 0  # len(intake.entries) at the last commit
    enqueued: bool = True
    # The entries committed, by id(); the list keeps them alive so that no new entry reuses an id.
    committed: set[int] = field(default_factory=set)
    committed_entries: list[IntakeEntry] = field(default_factory=list)

    def on_record(self) -> None:
        if len(self.intake.entries) - self.seen >= self.chunk:
            try:
                self.flush(final=False)
            except Exception as exc:
                raise _ChunkWriteFailed from exc

    def flush(self, final: bool) -> None:
        entries = self.intake.entries
        last = self.committed_entries[-1] if self.committed_entries else None
        if self.seen == 0 or (len(entries) >= self.seen and entries[self.seen - 1] is last):
            fresh = entries[self.seen :]  # appended since the last commit: the usual case
        else:
            # Intake dropped entries it had recorded (a tar stream found over the entry limit half
            # way). Those already committed stay items of the job (they may be scored already); the
            # failed entry that says why comes after them.
            fresh = [entry for entry in entries if id(entry) not in self.committed]
        self.seen = len(entries)
        if not fresh and self.job is not None:
            return
        if any(entry.sha256 for entry in fresh):
            self.store.sync()  # every scan of the chunk on disk before a committed row names it
        if self.job is None:
            # The first chunk creates the job: still receiving unless this is all of the upload.
            self.job = create_job(
                self.session,
                self.owner_key_id,
                fresh,
                source=self.source,
                callback_url=self.callback_url,
                receiving=not final,
            )
            queued = sum(1 for entry in fresh if not entry.failed)
        else:
            queued = add_items(self.session, self.job.id, fresh, self.written)
        self.written += len(fresh)
        self.committed.update(id(entry) for entry in fresh)
        self.committed_entries.extend(fresh)
        # Broker down once: stop trying for this job (each try costs the publish retries); the
        # committed items are sent by the reaper.
        if queued and self.enqueued:
            self.enqueued = self.enqueue(self.job.id)


def submit_job(
    session: Session,
    store: ScanStore,
    limits: IntakeLimits,
    owner_key_id: int | None,
    files: Sequence[tuple[Path, str | bytes | None]],
    *,
    enqueue: Callable[[str], bool],
    notify: Callable[[Sequence[str]], None],
    source: str = "api",
    callback_url: str | None = None,
    chunk: int = INTAKE_CHUNK,
) -> Submitted:
    """Store ``files`` into a new job chunk by chunk (each enqueued after its commit), then close it.

    ``enqueue(job_id)`` sends a job's committed items that were never sent and ``notify(job_ids)``
    queues job-finished webhooks (``Publisher.enqueue_job`` / ``Publisher.notify_jobs`` of the
    calling process). ``enqueued`` is False when the broker was unreachable: the items are safely
    stored and the reaper sends them later, so the caller still answers with the job id.
    """
    intake = Intake(store.deferring_sync(), limits)
    writer = _ChunkWriter(session, intake.store, intake, enqueue, owner_key_id, source, callback_url, chunk)
    intake.on_record = writer.on_record
    try:
        for path, filename in files:
            intake.add_file(path, filename)
        writer.flush(final=True)
    except BaseException as exc:
        cause = exc.__cause__ if isinstance(exc, _ChunkWriteFailed) and exc.__cause__ else exc
        if writer.job is not None:  # nothing committed yet: no job, the error says it all
            _record_interruption(session, writer.job.id, writer.written, cause)
        raise cause from None
    job = writer.job
    assert job is not None
    if job.status == JobStatus.receiving.value:
        job = close_intake(session, job.id) or session.get(Job, job.id, populate_existing=True) or job
    if job.finished_at is not None and job.callback_url:  # final at intake (every file failed)
        notify([job.id])
    log.info(
        "job %s stored: %d item(s), %d failed at intake, %d chunk(s), enqueued=%s",
        job.id,
        job.total,
        job.failed,
        -(-writer.written // chunk),
        writer.enqueued,
        extra={"job_id": job.id},
    )
    return Submitted(job, writer.enqueued)


def _record_interruption(session: Session, job_id: str, written: int, cause: BaseException) -> None:
    """Best effort: leave the job saying that its intake stopped (the reaper does it otherwise)."""
    reason = (
        f"intake stopped after {written} item(s) ({type(cause).__name__} on the server); "
        "the rest of the upload was not read: submit it again"
    )
    try:
        session.rollback()
        if interrupt_intake(session, job_id, reason) is not None:
            log.error("job %s: %s", job_id, reason, extra={"job_id": job_id})
    except Exception as exc:  # the database is what failed: the reaper marks the job later
        log.error(
            "job %s: intake stopped and could not be marked (%s); the reaper will", job_id, type(exc).__name__
        )
