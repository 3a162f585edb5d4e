"""Publishing work to the workers; light enough for the API (no TensorFlow).

The database is the source of truth and the broker only carries item ids: an item is sent when it
has ``enqueued_at IS NULL`` and that column is set once the message is out. If the broker is down at
submit time these functions return ``False`` (never raise, never block for long); the job is already
stored, and the reaper beat task sends the stranded items once the broker is back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from sqlalchemy import select, update

from brainscan.db import Item, ItemStatus, session_scope
from brainscan.settings import get_settings

log = logging.getLogger(__name__)

# Short and bounded: the API must answer even when Redis is gone.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.25, "interval_max": 0.5}
HEARTBEAT_PREFIX = "brainscan:worker:"


def _celery():  # type: ignore[no-untyped-def]
    """A publishing client for the configured broker (one per broker URL, so tests can switch)."""
    settings = get_settings()
    client = _CLIENTS.get(settings.broker_url)
    if client is None:
        from worker.celery import create_app

        client = _CLIENTS[settings.broker_url] = create_app(settings, set_as_current=False)
    return client


_CLIENTS: dict[str, object] = {}


def _chunks(ids: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def priority_for(count: int) -> int:
    """The queue priority of a send of ``count`` items: small jobs ride the urgent lane.

    A single-scan job queued behind a 1,000-scan archive would otherwise wait for the whole archive
    (Redis lists are FIFO); see ``worker/celery.py``. The lane holds only small sends, so it cannot
    itself get long unless small jobs alone saturate the workers.
    """
    from worker.celery import BULK_PRIORITY, URGENT_PRIORITY

    return URGENT_PRIORITY if count <= get_settings().urgent_max_items else BULK_PRIORITY


def publish(item_ids: Sequence[int], priority: int | None = None) -> None:
    """Send item ids in messages of ``enqueue_chunk`` ids and stamp ``enqueued_at``. Raises on failure.

    ``priority`` defaults to ``priority_for(len(item_ids))``: one job's ids (or one reaper run's)
    share one lane.
    """
    from worker.celery import SCORE_TASK

    app = _celery()
    ids_all = list(item_ids)
    chunk = get_settings().enqueue_chunk
    if priority is None:
        priority = priority_for(len(ids_all))
    with app.producer_or_acquire() as producer:
        for ids in _chunks(ids_all, chunk):
            app.send_task(
                SCORE_TASK,
                args=[ids],
                producer=producer,
                priority=priority,
                retry=True,
                retry_policy=PUBLISH_RETRY_POLICY,
            )
            # Stamped per message: if the broker dies half way, only the unsent rest stays NULL.
            with session_scope() as session:
                session.execute(update(Item).where(Item.id.in_(ids)).values(enqueued_at=datetime.now(UTC)))


def enqueue_items(item_ids: Iterable[int]) -> bool:
    """Send these items to the workers. False (logged) when the broker or database is unreachable."""
    ids = sorted({int(i) for i in item_ids})
    if not ids:
        return True
    try:
        publish(ids)
    except Exception as exc:  # broker or database down: the reaper sends them later
        log.warning("could not enqueue %d item(s), the reaper will retry: %s", len(ids), _why(exc))
        return False
    return True


def enqueue_job(job_id: str) -> bool:
    """Send a job's queued items that were never sent. Call after the job's transaction committed."""
    try:
        with session_scope() as session:
            ids = list(
                session.scalars(
                    select(Item.id)
                    .where(
                        Item.job_id == job_id,
                        Item.status == ItemStatus.queued.value,
                        Item.enqueued_at.is_(None),
                    )
                    .order_by(Item.position)
                )
            )
    except Exception as exc:
        log.warning("could not read job %s to enqueue it: %s", job_id, _why(exc))
        return False
    if not ids:
        return True
    try:
        publish(ids)
    except Exception as exc:
        log.warning(
            "could not enqueue job %s (%d items), the reaper will retry: %s", job_id, len(ids), _why(exc)
        )
        return False
    return True


def ping_workers(timeout: float = 1.0) -> int:
    """How many workers are alive. 0 when none answer or the broker is unreachable.

    Workers write a heartbeat key with a TTL from a background thread, so a worker busy scoring a
    long batch (its event loop blocked, deaf to control pings) still counts. Falls back to a
    Celery control ping for workers that do not write heartbeats.
    """
    try:
        import redis

        client = redis.Redis.from_url(
            get_settings().broker_url, socket_connect_timeout=timeout, socket_timeout=timeout
        )
        try:
            alive = sum(1 for _ in client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=1000))
        finally:
            client.close()
        if alive:
            return alive
        replies = _celery().control.ping(timeout=timeout)
        return len(replies or [])
    except Exception as exc:
        log.info("no worker reachable: %s", _why(exc))
        return 0


def redis_ping(url: str, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING at ``url`` within ``timeout`` seconds."""
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def broker_reachable(timeout: float = 1.0) -> bool:
    return redis_ping(get_settings().broker_url, timeout)


def _why(exc: BaseException) -> str:
    # The broker URL may hold a password: log the error type and message, not the URL.
    return f"{type(exc).__name__}: {str(exc)[:200]}"
