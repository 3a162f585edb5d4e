"""Submitting a job: expand the files, write the job in one transaction, then (only then) enqueue."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from brainscan.db import Job, JobStatus
from brainscan.intake.expansion import IntakeLimits, expand_uploads
from brainscan.jobs import create_job
from brainscan.storage import ScanStore

log = logging.getLogger(__name__)


@dataclass
class Submitted:
    job: Job
    enqueued: bool


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
) -> Submitted:
    """Expand and store ``files``, write the job, then (only after the commit) enqueue it.

    ``enqueue(job_id)`` sends a stored job's items and ``notify(job_ids)`` queues job-finished
    webhooks (``Publisher.enqueue_job`` / ``Publisher.notify_jobs`` of the calling process).
    ``enqueued`` is False when the broker was unreachable: the job is safely stored and the reaper
    sends its items later, so the caller still answers with the job id.
    """
    entries = expand_uploads(store, limits, files)
    job = create_job(session, owner_key_id, entries, source=source, callback_url=callback_url)
    enqueued = True
    if job.status == JobStatus.queued.value:
        enqueued = enqueue(job.id)
    elif job.callback_url:  # final at submit (every file failed at intake): the webhook fires now
        notify([job.id])
    log.info(
        "job %s stored: %d item(s), %d failed at intake, enqueued=%s",
        job.id,
        job.total,
        job.failed,
        enqueued,
        extra={"job_id": job.id},
    )
    return Submitted(job, enqueued)
