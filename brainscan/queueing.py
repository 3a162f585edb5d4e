"""Publishing work to the workers; light enough for the API (no TensorFlow).

The database is the source of truth and the broker only carries item ids: an item is sent when it
has ``enqueued_at IS NULL`` and that column is set once the message is out. If the broker is down at
submit time the ``enqueue_*`` methods return ``False`` (never raise, never block for long); the job
is already stored, and the reaper beat task sends the stranded items once the broker is back.

One :class:`Publisher` per process, built where the process is wired: ``api.app.create_app`` builds
it from its own settings and sessions; a worker, the CLI and scripts (which have no constructor to
inject into) use :func:`default_publisher`, built once from the environment. Every message leaves
through :meth:`Publisher.send`, under the contract in :mod:`brainscan.queue_contract`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from brainscan.db import Item, ItemStatus, Job, default_sessions
from brainscan.queue_contract import (
    BULK_PRIORITY,
    GRADCAM_TASK,
    HEARTBEAT_PREFIX,
    NOTIFY_TASK,
    PUBLISH_RETRY_POLICY,
    SCORE_TASK,
    URGENT_PRIORITY,
    broker_config,
)
from brainscan.settings import Settings, get_settings

log = logging.getLogger(__name__)

HEATMAP_CHUNK = 8  # Grad-CAM ids per message: a large job's heatmaps interleave with scoring


def redis_client(url: str, timeout: float = 1.0) -> redis.Redis:
    """The one way this code base opens a Redis connection: short timeouts, never a hang."""
    return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)


def redis_problem(url: str, timeout: float = 0.5) -> str | None:
    """None when a Redis server answers PING at ``url`` within ``timeout`` s, else why not.

    The reason is the error's type only: the URL (which may hold a password) is never quoted.
    """
    try:
        client = redis_client(url, timeout)
        try:
            return None if client.ping() else "NoPong"
        finally:
            client.close()
    except Exception as exc:
        return type(exc).__name__


def redis_ping(url: str, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING at ``url`` within ``timeout`` seconds."""
    return redis_problem(url, timeout) is None


def publisher_config(settings: Settings) -> dict[str, Any]:
    """The contract's configuration with the publishing side's socket timeouts.

    A broker that accepts the connection but never answers (frozen, overloaded, a stuck network
    path) must cost a publish ``broker_timeout_s`` per try, not a hang: every Redis operation of a
    publish gets a connect *and* a read timeout and no silent retry on timeout (the publish retry
    policy already retries). A consumer does not use this: its blocking reads wait by design.
    """
    config = broker_config(settings)
    timeout = settings.broker_timeout_s
    config["broker_connection_timeout"] = timeout
    config["broker_transport_options"] = {
        **config["broker_transport_options"],
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry_on_timeout": False,
    }
    return config


def make_celery(settings: Settings) -> Celery:
    """A Celery app that publishes under the queue contract, with bounded socket timeouts."""
    app = Celery("brainscan", set_as_current=False)
    app.conf.update(publisher_config(settings))
    return app


def _chunks(ids: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


class Publisher:
    """Sends work to the workers for one process: its settings, its sessions, its one Celery app."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], celery: Celery | None = None):
        self.settings = settings
        self.sessions = sessions
        self.celery = celery if celery is not None else make_celery(settings)

    # -- the one send loop --------------------------------------------------------------------------

    def send(
        self,
        task: str,
        messages: Iterable[list[Any]],
        *,
        priority: int | None = None,
        after_each: Callable[[list[Any]], None] | None = None,
    ) -> None:
        """Send one ``task`` message per argument list, over one producer. Raises on failure.

        The queue comes from the contract's routes. ``after_each(args)`` runs once each message is
        out (``publish`` stamps ``enqueued_at`` there, so a broker dying half way leaves only the
        unsent rest unstamped).
        """
        options: dict[str, Any] = {"retry": True, "retry_policy": PUBLISH_RETRY_POLICY}
        if priority is not None:
            options["priority"] = priority
        with self.celery.producer_or_acquire() as producer:
            for args in messages:
                self.celery.send_task(task, args=args, producer=producer, **options)
                if after_each is not None:
                    after_each(args)

    # -- scoring ------------------------------------------------------------------------------------

    def priority_for(self, count: int) -> int:
        """The queue priority of a send of ``count`` items: small jobs ride the urgent lane.

        A single-scan job queued behind a 1,000-scan archive would otherwise wait for the whole
        archive (Redis lists are FIFO). The lane holds only small sends, so it cannot itself get long
        unless small jobs alone saturate the workers.
        """
        return URGENT_PRIORITY if count <= self.settings.urgent_max_items else BULK_PRIORITY

    def publish(self, item_ids: Sequence[int], priority: int | None = None) -> None:
        """Send item ids in messages of ``enqueue_chunk`` ids and stamp ``enqueued_at``. Raises on failure.

        ``priority`` defaults to ``priority_for(len(item_ids))``: one job's ids (or one reaper run's)
        share one lane.
        """
        ids_all = list(item_ids)
        if priority is None:
            priority = self.priority_for(len(ids_all))

        def stamp(args: list[Any]) -> None:
            with self.sessions.begin() as session:
                session.execute(
                    update(Item).where(Item.id.in_(args[0])).values(enqueued_at=datetime.now(UTC))
                )

        chunks = ([ids] for ids in _chunks(ids_all, self.settings.enqueue_chunk))
        self.send(SCORE_TASK, chunks, priority=priority, after_each=stamp)

    def enqueue_items(self, item_ids: Iterable[int]) -> bool:
        """Send these items to the workers. False (logged) when the broker or database is unreachable."""
        ids = sorted({int(i) for i in item_ids})
        return self._publish_or_log(ids, f"{len(ids)} item(s)")

    def enqueue_job(self, job_id: str) -> bool:
        """Send a job's queued items that were never sent. Call after the job's transaction committed."""
        try:
            with self.sessions() as session:
                rows = session.execute(_never_sent(job_id)).all()
        except Exception as exc:
            log.warning("could not read job %s to enqueue it: %s", job_id, _why(exc))
            return False
        ids = [row.id for row in rows]
        # The lane follows the job's size, not this send's: intake sends a large archive in chunks,
        # and its last few items must not jump the queue as if they were a small job.
        priority = self.priority_for(max(rows[0].total if rows else 0, len(ids)))
        return self._publish_or_log(ids, f"job {job_id} ({len(ids)} items)", priority)

    def _publish_or_log(self, ids: list[int], what: str, priority: int | None = None) -> bool:
        if not ids:
            return True
        try:
            self.publish(ids, priority)
        except Exception as exc:  # broker or database down: the reaper sends them later
            log.warning("could not enqueue %s, the reaper will retry: %s", what, _why(exc))
            return False
        return True

    # -- auxiliary work -----------------------------------------------------------------------------

    def request_heatmaps(self, item_ids: Iterable[int]) -> bool:
        """Queue Grad-CAM computations for these items (worker/gradcam.py). False if the broker is down."""
        ids = sorted({int(i) for i in item_ids})
        if not ids:
            return True
        try:
            self.send(GRADCAM_TASK, ([chunk] for chunk in _chunks(ids, HEATMAP_CHUNK)))
        except Exception as exc:
            log.warning("could not queue Grad-CAM for %d item(s): %s", len(ids), type(exc).__name__)
            return False
        return True

    def notify_jobs(self, job_ids: Iterable[str]) -> None:
        """Queue the job-finished webhook of each job (call after the transaction that closed them)
        and stamp its ``webhook_queued_at``.

        Never raises: the webhook is owed from the commit on (``worker/notify.py``), so a broker
        hiccup here only delays it until the webhook reaper queues it.
        """
        ids = [str(job_id) for job_id in job_ids]
        if not ids:
            return

        def stamp(args: list[Any]) -> None:
            with self.sessions.begin() as session:
                session.execute(
                    update(Job).where(Job.id == args[0]).values(webhook_queued_at=datetime.now(UTC))
                )

        try:
            self.send(NOTIFY_TASK, ([job_id] for job_id in ids), after_each=stamp)
        except Exception as exc:
            log.warning(
                "could not queue %d job webhook(s), the webhook reaper will: %s", len(ids), type(exc).__name__
            )

    # -- liveness -----------------------------------------------------------------------------------

    def ping_workers(self, timeout: float = 1.0) -> int:
        """How many workers are alive. 0 when none answer or the broker is unreachable.

        Workers write a heartbeat key with a TTL from a background thread, so a worker busy scoring a
        long batch (its event loop blocked, deaf to control pings) still counts. Falls back to a
        Celery control ping for workers that do not write heartbeats.
        """
        try:
            alive = count_heartbeats(self.settings.broker_url, timeout)
            if alive:
                return alive
            replies = self.celery.control.ping(timeout=timeout)
            return len(replies or [])
        except Exception as exc:
            log.info("no worker reachable: %s", _why(exc))
            return 0


def count_heartbeats(broker_url: str, timeout: float = 1.0) -> int:
    """Workers whose heartbeat key is alive. Raises when the broker is unreachable."""
    client = redis_client(broker_url, timeout)
    try:
        return sum(1 for _ in client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=1000))
    finally:
        client.close()


def _never_sent(job_id: str) -> Any:
    """A job's queued items never sent (id), with the job's total (for its lane)."""
    return (
        select(Item.id, Job.total)
        .join(Job, Job.id == Item.job_id)
        .where(Item.job_id == job_id, Item.status == ItemStatus.queued.value, Item.enqueued_at.is_(None))
        .order_by(Item.position)
    )


def _why(exc: BaseException) -> str:
    # The broker URL may hold a password: log the error type and message, not the URL.
    return f"{type(exc).__name__}: {str(exc)[:200]}"


# ---- the process's own publisher (workers, the CLI, scripts) -------------------------------------

_CELERY_APPS: dict[str, Celery] = {}
_PUBLISHERS: dict[tuple[str, str], Publisher] = {}


def use_celery_app(app: Celery) -> None:
    """Publish through ``app`` in this process (a worker's own app), so a process holds one app."""
    _CELERY_APPS[str(app.conf.broker_url)] = app


def _celery() -> Celery:
    """This process's Celery app for the configured broker (one per broker URL, so tests can switch)."""
    settings = get_settings()
    app = _CELERY_APPS.get(settings.broker_url)
    if app is None:
        app = _CELERY_APPS[settings.broker_url] = make_celery(settings)
    return app


def default_publisher() -> Publisher:
    """The publisher of a process configured by its environment (``BRAINSCAN_*``)."""
    settings = get_settings()
    key = (settings.broker_url, settings.resolved_database_url)
    publisher = _PUBLISHERS.get(key)
    if publisher is None or publisher.settings is not settings or publisher.celery is not _celery():
        publisher = _PUBLISHERS[key] = Publisher(settings, default_sessions(), _celery())
    return publisher


def publish(item_ids: Sequence[int], priority: int | None = None) -> None:
    default_publisher().publish(item_ids, priority)


def enqueue_items(item_ids: Iterable[int]) -> bool:
    return default_publisher().enqueue_items(item_ids)


def enqueue_job(job_id: str) -> bool:
    return default_publisher().enqueue_job(job_id)


def priority_for(count: int) -> int:
    return default_publisher().priority_for(count)
