"""Submitting a job: its items committed and enqueued in chunks while the upload is read, then closed.

The order that keeps "nothing is lost": each chunk of ``INTAKE_CHUNK`` items is stored (scans made
durable with one file-system sync), committed, and only then enqueued, so workers score the first
chunks of a large archive while the rest is still being read. The first chunk creates the job in
status ``receiving`` (visible and pollable from then on); :func:`brainscan.jobs.close_intake` ends
``receiving``. An upload smaller than one chunk is written in one transaction, like before. If intake
fails half way in this process (storage or database error), the job gets one failed item saying so
before the error goes up; if the process dies, the reaper does the same
(:func:`brainscan.jobs.close_abandoned_intakes`). The reaper may also close an intake that is only
slow (nothing stored for ``stale_after_s``): its next chunk is then refused whole and
:class:`brainscan.jobs.IntakeClosed` goes up, with nothing more written to the closed job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from brainscan.db import Job, JobStatus
from brainscan.intake.expansion import Intake, IntakeLimits
from brainscan.jobs import IntakeClosed, IntakeEntry, add_items, close_intake, create_job, interrupt_intake
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
    last_committed: IntakeEntry | None = None
    enqueued: bool = True

    def on_record(self) -> None:
        if len(self.intake.entries) - self.written >= self.chunk:
            try:
                self.flush(final=False)
            except Exception as exc:
                raise _ChunkWriteFailed from exc

    def flush(self, final: bool) -> None:
        entries = self.intake.entries
        # Intake never drops a committed entry (``Intake.committed``; a tar stream found over the
        # entry limit half way drops only what came after the last commit), so what follows the
        # committed prefix is exactly the next chunk, positions and totals included.
        if self.written and (
            len(entries) < self.written or entries[self.written - 1] is not self.last_committed
        ):
            raise RuntimeError("intake dropped entries that are committed items of the job")
        fresh = entries[self.written :]
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
        self.intake.committed = self.written
        if fresh:
            self.last_committed = fresh[-1]
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
        if isinstance(cause, IntakeClosed):
            # The reaper took this slow intake for a dead one and closed the job, with the failed
            # item that says so after the items committed: nothing more is written to it.
            session.rollback()
            log.error(
                "job %s: intake closed by the reaper after %d item(s) (slower than stale_after_s); "
                "the rest of the upload was not stored",
                cause.job_id,
                writer.written,
                extra={"job_id": cause.job_id},
            )
        elif writer.job is not None:  # nothing committed yet: no job, the error says it all
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
