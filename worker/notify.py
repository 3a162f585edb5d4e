"""Job-finished webhooks: ``brainscan.notify_job(job_id)`` POSTs the job's summary to its callback_url.

Durable from the commit on. The need to notify is part of the job's final results: a job with a
``callback_url`` whose ``finished_at`` is set (in the transaction that writes its last result, or at
submit when every file failed at intake) owes its webhook until ``webhook_done_at`` is set
(delivered, refused, or given up after ``settings.webhook_attempts`` tries). ``worker/tasks.py`` and
``brainscan.intake`` queue the task right after that commit (``Publisher.notify_jobs``, which stamps
``webhook_queued_at``); if the process dies in between, or the broker is down, or the message is
lost, :func:`reap_webhooks` (on beat, every ``reaper_interval_s``) queues it again: a job owed a
webhook whose task was never queued, or has not run for :data:`STALLED_AFTER_S`. Every run of the
task stamps ``webhook_queued_at``, so a notification waiting for its next try is not re-queued.

Retries are Celery's. Each run makes one POST (``brainscan.webhooks.post_once``, a total deadline of
``settings.webhook_timeout_s``); a failure worth another try re-queues the task (``self.retry``)
after ``settings.webhook_backoff_s`` doubling (capped by :data:`MAX_BACKOFF_S`; a longer
``Retry-After`` is honoured within the cap). The retry is a message on the broker, not a sleeping
thread, so a worker that dies loses nothing (``acks_late``). The delivery id is derived from the job
id, the same for every try, redelivery and reaper re-send, so a receiver can drop duplicates.

Fairness between keys. At most ``settings.webhook_key_concurrency`` tries of one API key's jobs run
at once, across all workers (slots are Redis keys with a lease); a try that finds its key's slots
taken is deferred (not counted as a try). A try that used up its whole deadline keeps its slot for
one more deadline: a key whose receiver is slow gets at most one try per two deadlines per slot, so
its backlog cannot hold the delivery slots (or a solo worker's scoring) while other keys wait.
The queue is ``NOTIFY_QUEUE``, apart from the scoring lane.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import or_, select, update

from brainscan.db import Job, session_scope, utcnow, with_db_retry
from brainscan.logs import job_context
from brainscan.queueing import default_publisher, redis_client
from brainscan.settings import get_settings
from brainscan.webhooks import DestinationPolicy, job_payload, post_once, retry_delay
from worker.celery import NOTIFY_REAP_TASK, NOTIFY_TASK, app

log = logging.getLogger(__name__)

SETTINGS = get_settings()
# A retry waits on the broker unacked; past the visibility timeout Redis would hand it out twice.
MAX_BACKOFF_S = min(300, SETTINGS.visibility_timeout_s // 2)
# A pending webhook whose task has not run for this long lost its message: the reaper re-queues it.
STALLED_AFTER_S = MAX_BACKOFF_S + 2 * SETTINGS.webhook_timeout_s + 30
NEVER_QUEUED_GRACE_S = 5  # the committing process queues the task right after its commit
OWED_HORIZON = timedelta(days=1)  # a webhook still owed a day after the job finished is dropped
REAP_LIMIT = 1000
SLOT_PREFIX = "brainscan:webhook-slot:"
DELIVERY_NAMESPACE = uuid.UUID("5d0c9f44-58a4-4d6a-9d64-6f1c1f3e7a21")


def delivery_id(job_id: str) -> str:
    """One id per job's notification, whoever (a retry, a redelivery, the reaper) sends it."""
    return uuid.uuid5(DELIVERY_NAMESPACE, job_id).hex


@dataclass(frozen=True)
class Webhook:
    url: str
    payload: dict[str, Any]
    owner_key_id: int | None


def load_webhook(job_id: str) -> Webhook | None:
    """The job's pending webhook (and stamp it as alive); None when nothing is owed."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or not job.callback_url or job.finished_at is None or job.webhook_done_at:
            return None
        job.webhook_queued_at = utcnow()
        return Webhook(job.callback_url, job_payload(job), job.owner_key_id)


def mark_done(job_id: str) -> None:
    """Delivery ended (delivered, refused or given up): nothing is owed any more."""
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(webhook_done_at=utcnow()))


# ---- per-key delivery slots ------------------------------------------------------------------------
_OWNED = "if redis.call('get', KEYS[1]) == ARGV[1] then return "
_RELEASE = _OWNED + "redis.call('del', KEYS[1]) end return 0"
_HOLD = _OWNED + "redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"


class KeySlot:
    """One of ``webhook_key_concurrency`` leases an API key's webhook tries share, in Redis."""

    def __init__(self, client: redis.Redis | None, name: str | None, token: str) -> None:
        self.client, self.name, self.token = client, name, token

    @classmethod
    def acquire(cls, owner_key_id: int | None, lease_s: float) -> KeySlot | None:
        """A slot, or None when the key's slots are all taken. Broker unreachable: an unchecked slot."""
        token = uuid.uuid4().hex
        try:
            client = redis_client(SETTINGS.broker_url, timeout=2.0)
        except Exception:
            return cls(None, None, token)
        try:
            for index in range(SETTINGS.webhook_key_concurrency):
                name = f"{SLOT_PREFIX}{owner_key_id}:{index}"
                if client.set(name, token, nx=True, px=int(lease_s * 1000)):
                    return cls(client, name, token)
        except redis.RedisError as exc:
            client.close()
            log.warning("webhook slots unavailable (%s); trying without", type(exc).__name__)
            return cls(None, None, token)
        client.close()
        return None

    def release(self, hold_s: float = 0.0) -> None:
        """Free the slot, or keep it ``hold_s`` more seconds (a receiver that used up its deadline)."""
        if self.client is None or self.name is None:
            return
        try:
            if hold_s > 0:
                self.client.eval(_HOLD, 1, self.name, self.token, int(hold_s * 1000))
            else:
                self.client.eval(_RELEASE, 1, self.name, self.token)
        except redis.RedisError:
            pass  # the lease expires by itself
        finally:
            self.client.close()


# ---- the task ------------------------------------------------------------------------------------
@app.task(bind=True, name=NOTIFY_TASK, ignore_result=True, acks_late=True, max_retries=None)
def notify_job(self: Any, job_id: str, deferrals: int = 0) -> None:
    """One try of the job's webhook; Celery schedules the next one (or a deferred try)."""
    job_id = str(job_id)[:64]
    webhook = with_db_retry(lambda: load_webhook(job_id), "loading a webhook", SETTINGS.db_retry_s)
    if webhook is None:
        return
    deadline = SETTINGS.webhook_timeout_s
    slot = KeySlot.acquire(webhook.owner_key_id, lease_s=deadline + 30)
    if slot is None:  # this key's slots are busy: let other keys' deliveries go first
        raise self.retry(countdown=deadline, kwargs={"deferrals": deferrals + 1})
    attempt = self.request.retries - int(deferrals) + 1
    with job_context(job_id):
        result = post_once(  # never raises
            webhook.url,
            webhook.payload,
            delivery_id(job_id),
            deadline_s=deadline,
            policy=DestinationPolicy.parse(SETTINGS.webhook_allow),
        )
        slot.release(hold_s=deadline if result.timed_out else 0.0)
        extra = {"job_id": job_id}
        if result.delivered:
            mark_done(job_id)
            return
        if not result.retry:
            log.warning("webhook refused, not retried: %s", result.outcome, extra=extra)
            mark_done(job_id)
            return
        if attempt >= SETTINGS.webhook_attempts:
            log.warning("webhook failed after %d attempts: %s", attempt, result.outcome, extra=extra)
            mark_done(job_id)
            return
        log.info("webhook attempt %d failed (%s); retrying", attempt, result.outcome, extra=extra)
    countdown = retry_delay(attempt, SETTINGS.webhook_backoff_s, MAX_BACKOFF_S, result.retry_after)
    raise self.retry(countdown=countdown, kwargs={"deferrals": deferrals})


# ---- the webhook reaper ---------------------------------------------------------------------------
def find_owed_webhooks(now: Any = None) -> list[str]:
    """Jobs owed a webhook whose task was never queued, or has not run for STALLED_AFTER_S."""
    now = now or utcnow()
    with session_scope() as session:
        return list(
            session.scalars(
                select(Job.id)
                .where(
                    Job.finished_at >= now - OWED_HORIZON,
                    Job.finished_at < now - timedelta(seconds=NEVER_QUEUED_GRACE_S),
                    Job.callback_url.is_not(None),
                    Job.webhook_done_at.is_(None),
                    or_(
                        Job.webhook_queued_at.is_(None),
                        Job.webhook_queued_at < now - timedelta(seconds=STALLED_AFTER_S),
                    ),
                )
                .order_by(Job.finished_at)
                .limit(REAP_LIMIT)
            )
        )


@app.task(name=NOTIFY_REAP_TASK, ignore_result=True, acks_late=False)
def reap_webhooks() -> int:
    """Queue the webhooks committed as owed but never queued (a crash, a broker outage, a lost task)."""
    ids = with_db_retry(find_owed_webhooks, "finding owed webhooks", SETTINGS.db_retry_s)
    if ids:
        log.info("webhook reaper: queueing %d owed webhook(s)", len(ids))
        default_publisher().notify_jobs(ids)
    return len(ids)
