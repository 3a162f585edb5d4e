"""Job-finished webhooks: ``brainscan.notify_job(job_id)`` POSTs the job's summary to its callback_url.

Who sends it. ``worker/tasks.py`` closes a job with a guarded UPDATE (``finished_at IS NULL``) and
calls :func:`enqueue_notifications` with the jobs *that* transaction closed, after it committed; a
redelivered batch closes nothing, so it notifies nothing. ``brainscan.intake`` does the same for a
job that is final at submit (every file failed at intake).

Why a thread. ``brainscan.webhooks.notify`` retries with backoff (seconds to minutes). A worker runs
the solo pool, so sleeping in the task would stop scoring for as long; the task hands the delivery to
a small thread pool and returns. The pool's threads are joined when the worker exits, so a warm
shutdown (SIGTERM) finishes pending deliveries; a killed worker loses the retries in flight (logged
at each attempt). The queue is ``NOTIFY_QUEUE``, apart from the scoring lane.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from brainscan.settings import get_settings
from worker.celery import NOTIFY_QUEUE, NOTIFY_TASK, app

log = logging.getLogger(__name__)

DELIVERY_THREADS = 4
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=DELIVERY_THREADS, thread_name_prefix="webhook")
        return _POOL


def deliver(job_id: str) -> bool | None:
    """Load the job and POST its summary (with retries). None when there is nothing to send."""
    from brainscan.db import Job, session_scope
    from brainscan.logs import job_context
    from brainscan.webhooks import job_payload, notify

    settings = get_settings()
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or not job.callback_url or job.finished_at is None:
            return None
        url, payload = job.callback_url, job_payload(job)
    with job_context(job_id):
        return notify(url, payload, settings.webhook_attempts, settings.webhook_backoff_s)


def _delivered(future: Future[Any], job_id: str) -> None:
    exc = future.exception()
    if exc is not None:  # notify never raises; a database error loading the job might
        log.error("webhook for job %s not sent: %s", job_id, type(exc).__name__, extra={"job_id": job_id})


@app.task(name=NOTIFY_TASK, ignore_result=True, acks_late=False)
def notify_job(job_id: str) -> None:
    """Celery entry point: hand the delivery to the webhook threads and return at once."""
    job_id = str(job_id)[:64]
    future = _pool().submit(deliver, job_id)
    future.add_done_callback(lambda f: _delivered(f, job_id))


def enqueue_notifications(job_ids: Iterable[str]) -> None:
    """Queue ``notify_job`` for each job (call after the transaction that closed them committed).

    Never raises: a broker hiccup costs a webhook (logged), never the results already committed.
    """
    ids = [str(job_id) for job_id in job_ids]
    if not ids:
        return
    try:
        from brainscan.queueing import PUBLISH_RETRY_POLICY, _celery

        client: Any = _celery()
        with client.producer_or_acquire() as producer:
            for job_id in ids:
                client.send_task(
                    NOTIFY_TASK,
                    args=[job_id],
                    queue=NOTIFY_QUEUE,
                    producer=producer,
                    retry=True,
                    retry_policy=PUBLISH_RETRY_POLICY,
                )
    except Exception as exc:
        log.error("could not queue %d job webhook(s): %s", len(ids), type(exc).__name__)
