"""Celery tasks: score items in cross-job batches, and reap stranded items.

Batching. Each message carries a list of item ids (``settings.enqueue_chunk`` per message, one for
a single-scan job). ``score_items`` is a ``celery_batches.Batches`` task: the worker buffers
messages of *any* job and flushes them into one call when they hold ``FLUSH_BATCHES * batch_size``
items, or every ``max_batch_wait_ms``, whichever comes first. The call splits the items into model
batches of ``batch_size`` and decodes batch k+1 on a thread pool while the model scores batch k.

Latency. Small jobs are published on the urgent lane (Redis priority, ``brainscan/queue_contract.py``), so the
worker reads them before any queued bulk message; within a flush their items go into the first
model batch. A single scan submitted while an archive is being scored therefore waits for at most
the flush in progress (about ``FLUSH_BATCHES`` batch times) plus one batch, or ``max_batch_wait_ms``
on an idle worker.

Delivery. With ``acks_late``, celery-batches acks the buffered messages only after the call
returns, i.e. after the results are committed; a worker killed mid-batch leaves them unacked and
Redis redelivers them after the visibility timeout. Every write is idempotent: an item is finalised
by ``UPDATE ... WHERE status IN ('queued','running')`` and the job's counters move by the number of
rows that really changed, in the same transaction. Redelivered or duplicated ids are skipped.
Database errors are retried with exponential backoff (``settings.db_retry_s``), so a database
restart during scoring loses nothing; if it stays down longer, the reaper re-sends the items.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
from celery import signals
from celery_batches import Batches
from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from brainscan import CLASSES
from brainscan.db import Item, ItemStatus, Job, JobStatus, session_scope, utcnow, with_db_retry
from brainscan.queue_contract import HEARTBEAT_PREFIX
from brainscan.queueing import default_publisher, redis_client
from brainscan.settings import get_settings
from brainscan.storage import ScanStore
from worker.celery import REAP_TASK, SCORE_TASK, URGENT_PRIORITY, app

log = logging.getLogger(__name__)

# A flush holds two model batches: one is scored while the next decodes.
FLUSH_BATCHES = 2
OPEN_STATUSES = (ItemStatus.queued.value, ItemStatus.running.value)


# ---- batching task class ---------------------------------------------------------------------
class ItemBatches(Batches):
    """``Batches`` that flushes on buffered *items* (ids in the messages), not on message count."""

    abstract = True
    flush_every = 10**9  # never by message count; see Strategy
    flush_interval = max(0.005, get_settings().max_batch_wait_ms / 1000.0)
    flush_items = FLUSH_BATCHES * get_settings().batch_size

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Callable[..., None]:
        handler = super().Strategy(task, app, consumer)

        def on_message(*args: Any, **kwargs: Any) -> None:
            handler(*args, **kwargs)
            if self._buffered_items() >= self.flush_items:
                self._do_flush()

        return on_message

    def _buffered_items(self) -> int:
        total = 0
        for request in list(self._buffer.queue):
            try:
                total += len(request.args[0])
            except (IndexError, TypeError, AttributeError):
                total += 1
        return total


# ---- claiming and finalising ------------------------------------------------------------------
@dataclass(frozen=True)
class Claimed:
    id: int
    job_id: str
    sha256: str | None
    attempts: int
    last_error: str | None = None  # why the previous attempt left it open (model call failed)


@dataclass
class Outcome:
    id: int
    job_id: str
    status: str
    probabilities: np.ndarray | None = None
    error: str | None = None
    preprocess_ms: float | None = None
    inference_ms: float | None = None


def claim(item_ids: Sequence[int]) -> list[Claimed]:
    """Mark the still-open items ``running`` (attempts+1) and their jobs ``running``; one transaction."""
    now = utcnow()
    with session_scope() as session:
        rows = session.execute(
            select(Item.id, Item.job_id, Item.sha256, Item.attempts, Item.error)
            .where(Item.id.in_(item_ids), Item.status.in_(OPEN_STATUSES))
            .order_by(Item.job_id, Item.position)
        ).all()
        if not rows:
            return []
        ids = [row.id for row in rows]
        session.execute(
            update(Item)
            .where(Item.id.in_(ids), Item.status.in_(OPEN_STATUSES))
            .values(status=ItemStatus.running.value, started_at=now, attempts=Item.attempts + 1)
        )
        session.execute(
            update(Job)
            .where(Job.id.in_({row.job_id for row in rows}), Job.status == JobStatus.queued.value)
            .values(status=JobStatus.running.value, started_at=now)
        )
        return [Claimed(row.id, row.job_id, row.sha256, row.attempts + 1, row.error) for row in rows]


def finalize(outcomes: Iterable[Outcome], model_name: str, model_version: str) -> dict[str, tuple[int, int]]:
    """Write a batch's results in one transaction, idempotently. Returns counted (done, failed) per job."""
    now = utcnow()
    moved: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    with session_scope() as session:
        for outcome in outcomes:
            values: dict[str, Any] = {
                "status": outcome.status,
                "finished_at": now,
                "error": outcome.error,
                "preprocess_ms": outcome.preprocess_ms,
                "inference_ms": outcome.inference_ms,
                "model_name": model_name,
                "model_version": model_version,
            }
            if outcome.probabilities is not None:
                probabilities = [float(p) for p in outcome.probabilities]
                best = int(np.argmax(outcome.probabilities))
                values.update(
                    label=CLASSES[best],
                    confidence=probabilities[best],
                    **{f"prob_{name}": p for name, p in zip(CLASSES, probabilities, strict=True)},
                )
            changed = session.execute(
                update(Item).where(Item.id == outcome.id, Item.status.in_(OPEN_STATUSES)).values(**values)
            ).rowcount
            if changed:
                moved[outcome.job_id][0 if outcome.status == ItemStatus.succeeded.value else 1] += changed
        for job_id, (done, failed) in moved.items():
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    done=Job.done + done,
                    failed=Job.failed + failed,
                    model_name=case((Job.model_name == "", model_name), else_=Job.model_name),
                    model_version=case((Job.model_version == "", model_version), else_=Job.model_version),
                )
            )
        closed = _close_finished_jobs(session, list(moved), now) if moved else []
    # brainscan: webhooks -- only for jobs this (now committed) transaction closed: a redelivered
    # batch closes nothing, so it never notifies twice (worker/notify.py).
    if closed:
        default_publisher().notify_jobs(closed)
    return {job: (d, f) for job, (d, f) in moved.items()}


def _close_finished_jobs(session: Session, job_ids: list[str], now: Any) -> list[str]:
    """Close the finished jobs among ``job_ids``; returns those closed here that have a callback_url."""
    closed = session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.finished_at.is_(None), Job.done + Job.failed >= Job.total)
        .values(
            status=case(
                (Job.failed == 0, JobStatus.succeeded.value),
                (Job.done == 0, JobStatus.failed.value),
                else_=JobStatus.partial.value,
            ),
            finished_at=now,
        )
        .returning(Job.id, Job.callback_url)
    ).all()
    return [row.id for row in closed if row.callback_url]


# ---- scoring ---------------------------------------------------------------------------------
def _store() -> ScanStore:
    return ScanStore(get_settings().resolved_storage_dir)


def score(item_ids: Sequence[int], urgent_ids: Iterable[int] = ()) -> int:
    """Score these items (any jobs), write results batch by batch. Returns how many were finalised.

    Items in ``urgent_ids`` (from urgent-lane messages) are scored in the first model batches.
    """
    from worker.engine import get_engine

    settings = get_settings()
    engine = get_engine()
    engine.maybe_reload()  # a batch boundary: pick up a newly promoted model
    ids = sorted({int(i) for i in item_ids})
    if not ids:
        return 0
    claimed = with_db_retry(lambda: claim(ids), "claiming items", settings.db_retry_s)
    if not claimed:
        return 0  # duplicate delivery: everything already final (or gone)
    card = engine.card
    exhausted = [c for c in claimed if c.attempts > settings.max_attempts]
    outcomes_total = 0
    if exhausted:
        # An item whose every delivery killed its worker (or timed out) fails alone, at last.
        failures = [Outcome(c.id, c.job_id, ItemStatus.failed.value, error=_gave_up(c)) for c in exhausted]
        with_db_retry(
            lambda: finalize(failures, card.name, card.version), "writing results", settings.db_retry_s
        )
        outcomes_total += len(failures)
    urgent = {int(i) for i in urgent_ids}
    # Stable sort: urgent items first, otherwise claim's (job, position) order.
    todo = sorted(
        (c for c in claimed if c.attempts <= settings.max_attempts), key=lambda c: c.id not in urgent
    )
    store = _store()
    batches = [todo[i : i + settings.batch_size] for i in range(0, len(todo), settings.batch_size)]
    pending = engine.prepare_many([_reader(store, c.sha256) for c in batches[0]]) if batches else None
    for index, batch in enumerate(batches):
        assert pending is not None
        prepared = pending.result()
        if index + 1 < len(batches):  # decode the next batch while this one is scored
            pending = engine.prepare_many([_reader(store, c.sha256) for c in batches[index + 1]])
        outcomes, left_open = _score_prepared(engine, batch, prepared)
        with_db_retry(
            lambda o=outcomes: finalize(o, card.name, card.version), "writing results", settings.db_retry_s
        )
        outcomes_total += len(outcomes)
        if left_open:
            with_db_retry(lambda s=left_open: note_errors(s), "recording model errors", settings.db_retry_s)
    return outcomes_total


def _gave_up(item: Claimed) -> str:
    reason = f"gave up after {item.attempts - 1} attempts"
    return f"{reason}; last error: {item.last_error}" if item.last_error else reason


def note_errors(items: Sequence[tuple[Claimed, str]]) -> None:
    """Record why items were left open (still ``running``): the reaper re-sends them later, and
    the reason is what the client sees if they finally fail after ``max_attempts``."""
    with session_scope() as session:
        for item, error in items:
            session.execute(
                update(Item).where(Item.id == item.id, Item.status.in_(OPEN_STATUSES)).values(error=error)
            )


def _reader(store: ScanStore, sha256: str | None) -> Callable[[], bytes]:
    def read() -> bytes:
        if sha256 is None:
            raise FileNotFoundError("no stored bytes")
        return store.read(sha256)

    return read


def _score_prepared(
    engine: Any, batch: list[Claimed], prepared: list[Any]
) -> tuple[list[Outcome], list[tuple[Claimed, str]]]:
    """Outcomes to write, and the items left open because the model call failed on them."""
    outcomes: list[Outcome] = []
    left_open: list[tuple[Claimed, str]] = []
    good = [(c, p) for c, p in zip(batch, prepared, strict=True) if p.error is None]
    for item, p in zip(batch, prepared, strict=True):
        if p.error is not None:
            outcomes.append(
                Outcome(item.id, item.job_id, ItemStatus.failed.value, error=p.error, preprocess_ms=p.ms)
            )
    if good:
        images = np.stack([p.pixels for _, p in good])
        started = time.perf_counter()
        try:
            verdicts = engine.score_batch(images, [p.finding for _, p in good])
            scored = list(zip(good, verdicts, strict=True))
        except Exception as exc:
            # One poison scan must not take its batch-mates down with it: score them one by one.
            # A scan the model still fails on alone is left open (not failed: the error may be
            # transient) for the reaper to re-send, until max_attempts says it is the scan.
            log.warning(
                "model call failed on a batch of %d (%s); scoring one by one", len(good), type(exc).__name__
            )
            scored = []
            for item, p in good:
                try:
                    scored.append(((item, p), engine.score_batch(p.pixels[None], [p.finding])[0]))
                except Exception as single:
                    log.error("model call failed on item %d: %s", item.id, type(single).__name__)
                    left_open.append((item, f"model call failed on this scan: {type(single).__name__}"))
        per_item_ms = (time.perf_counter() - started) * 1000.0 / len(good)
        for (item, p), verdict in scored:
            row = verdict.probabilities  # issue 11: flag, flag_reason, scope_score, label are on verdict
            if not np.all(np.isfinite(row)):
                outcomes.append(
                    Outcome(
                        item.id,
                        item.job_id,
                        ItemStatus.failed.value,
                        error="model produced non-finite output",
                    )
                )
                continue
            outcomes.append(
                Outcome(
                    item.id,
                    item.job_id,
                    ItemStatus.succeeded.value,
                    probabilities=row,
                    preprocess_ms=p.ms,
                    inference_ms=per_item_ms,
                )
            )
    return outcomes, left_open


@app.task(base=ItemBatches, name=SCORE_TASK, ignore_result=True)
def score_items(requests: Sequence[Any]) -> int:
    """Batch task: each request's first argument is a list of item ids."""
    item_ids: list[int] = []
    urgent_ids: list[int] = []
    for request in requests:
        try:
            ids = [int(i) for i in request.args[0]]
        except (IndexError, TypeError, ValueError):
            log.warning("ignoring malformed score message %s", getattr(request, "id", "?"))
            continue
        item_ids.extend(ids)
        if _is_urgent(request):
            urgent_ids.extend(ids)
    return score(item_ids, urgent_ids)


def _is_urgent(request: Any) -> bool:
    priority = (getattr(request, "delivery_info", None) or {}).get("priority")
    # A message without a priority is on Kombu's default (highest) step, like the urgent lane.
    return priority is None or int(priority) <= URGENT_PRIORITY


# ---- the reaper ------------------------------------------------------------------------------
REAP_LIMIT = 10_000  # items per run; a backlog larger than this drains over several runs
NEVER_ENQUEUED_GRACE_S = 5  # the API stamps enqueued_at right after commit; do not race it


def find_stranded(now: Any = None) -> list[int]:
    settings = get_settings()
    now = now or utcnow()
    stale = now - timedelta(seconds=settings.stale_after_s)
    grace = now - timedelta(seconds=NEVER_ENQUEUED_GRACE_S)
    with session_scope() as session:
        never_sent = select(Item.id).where(
            Item.status == ItemStatus.queued.value, Item.enqueued_at.is_(None), Item.created_at < grace
        )
        lost_in_queue = select(Item.id).where(
            Item.status == ItemStatus.queued.value, Item.enqueued_at < stale
        )
        died_running = select(Item.id).where(Item.status == ItemStatus.running.value, Item.started_at < stale)
        ids: set[int] = set()
        for query in (never_sent, lost_in_queue, died_running):
            ids.update(session.scalars(query.limit(REAP_LIMIT)))
        return sorted(ids)[:REAP_LIMIT]


@app.task(name=REAP_TASK, ignore_result=True, acks_late=False)
def reap() -> int:
    """Re-send items stranded by a broker outage at submit time or by a worker that died."""
    ids = with_db_retry(find_stranded, "finding stranded items", get_settings().db_retry_s)
    if ids:
        log.info("reaper: re-sending %d stranded item(s)", len(ids))
        default_publisher().enqueue_items(ids)
    return len(ids)


# ---- worker process lifecycle ----------------------------------------------------------------
def _load_engine_or_exit() -> None:
    from brainscan.modelrepo import ModelNotFound
    from worker.engine import get_engine

    try:
        get_engine()
    except ModelNotFound as exc:
        log.critical("cannot start: %s", exc)
        raise SystemExit(2) from None


@signals.worker_process_init.connect
def _load_model(**_: Any) -> None:
    # Sent by the solo pool when it is created (before consuming) and in each prefork child: every
    # scoring process loads and warms its own model, and TensorFlow is never loaded before a fork.
    _load_engine_or_exit()


class Heartbeat(threading.Thread):
    """Writes ``brainscan:worker:<host>`` with a TTL, so /readyz sees a worker busy in a long batch."""

    def __init__(self, hostname: str, every_s: float = 5.0) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.key = f"{HEARTBEAT_PREFIX}{hostname}"
        self.every_s = every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        client = redis_client(get_settings().broker_url, timeout=2)
        while not self.stopped.is_set():
            # Broker down: the worker itself reconnects; keep trying quietly.
            with contextlib.suppress(Exception):
                client.set(self.key, str(os.getpid()), ex=int(self.every_s * 3))
            self.stopped.wait(self.every_s)
        with contextlib.suppress(Exception):
            client.delete(self.key)


_heartbeat: Heartbeat | None = None


@signals.worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    global _heartbeat
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    _heartbeat = Heartbeat(f"{hostname}:{os.getpid()}")
    _heartbeat.start()


@signals.worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stopped.set()
