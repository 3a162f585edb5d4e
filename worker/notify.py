"""Job-finished webhooks: ``brainscan.notify_job(job_id)`` POSTs the job's summary to its callback_url.

Who sends it. ``worker/tasks.py`` closes a job with a guarded UPDATE (``finished_at IS NULL``) and
calls ``Publisher.notify_jobs`` (``brainscan/queueing.py``) with the jobs *that* transaction closed,
after it committed; a redelivered batch closes nothing, so it notifies nothing. ``brainscan.intake``
does the same for a job that is final at submit (every file failed at intake).

Retries are Celery's. Each run of the task makes one POST (``brainscan.webhooks.post_once``); a
failure worth another try raises :class:`WebhookNotDelivered` and ``autoretry_for`` sends the task
again after ``retry_backoff`` (``settings.webhook_backoff_s``, doubling, capped), at most
``settings.webhook_attempts`` tries in all; a ``Retry-After`` longer than that is honoured through
``self.retry``. The retry is a message on the broker, not a sleeping thread, so a worker that dies
loses nothing (``acks_late``), and the solo pool keeps scoring while a try waits. The delivery id is
the task id, the same for every try and redelivery. The queue is ``NOTIFY_QUEUE``, apart from the
scoring lane.
"""

from __future__ import annotations

import logging
from typing import Any

from brainscan.db import Job, session_scope
from brainscan.logs import job_context
from brainscan.settings import get_settings
from brainscan.webhooks import job_payload, post_once, retry_delay
from worker.celery import NOTIFY_TASK, app

log = logging.getLogger(__name__)

SETTINGS = get_settings()
# A retry waits on the broker unacked; past the visibility timeout Redis would hand it out twice.
MAX_BACKOFF_S = min(300, SETTINGS.visibility_timeout_s // 2)


class WebhookNotDelivered(Exception):
    """A try that failed in a way worth retrying (connection error, timeout, 429, 5xx)."""


def load_webhook(job_id: str) -> tuple[str, dict[str, Any]] | None:
    """The job's callback URL and payload; None when there is nothing to send."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or not job.callback_url or job.finished_at is None:
            return None
        return job.callback_url, job_payload(job)


@app.task(
    bind=True,
    name=NOTIFY_TASK,
    ignore_result=True,
    acks_late=True,
    autoretry_for=(WebhookNotDelivered,),
    retry_backoff=SETTINGS.webhook_backoff_s,
    retry_backoff_max=MAX_BACKOFF_S,
    retry_jitter=False,
    default_retry_delay=0,  # used only when webhook_backoff_s is 0
    max_retries=SETTINGS.webhook_attempts - 1,
)
def notify_job(self: Any, job_id: str) -> None:
    """One try of the job's webhook; Celery schedules the next one."""
    job_id = str(job_id)[:64]
    webhook = load_webhook(job_id)
    if webhook is None:
        return
    url, payload = webhook
    attempt = self.request.retries + 1
    with job_context(job_id):
        result = post_once(url, payload, delivery=str(self.request.id))
        if result.delivered:
            return
        extra = {"job_id": job_id}
        if not result.retry:
            log.warning("webhook refused, not retried: %s", result.outcome, extra=extra)
            return
        if attempt > self.max_retries:
            log.warning("webhook failed after %d attempts: %s", attempt, result.outcome, extra=extra)
            return
        log.info("webhook attempt %d failed (%s); retrying", attempt, result.outcome, extra=extra)
    failure = WebhookNotDelivered(result.outcome)
    backoff = retry_delay(attempt, SETTINGS.webhook_backoff_s, MAX_BACKOFF_S)
    if result.retry_after > backoff:  # the receiver asked for longer than our backoff
        countdown = retry_delay(attempt, SETTINGS.webhook_backoff_s, MAX_BACKOFF_S, result.retry_after)
        raise self.retry(exc=failure, countdown=countdown)
    raise failure
