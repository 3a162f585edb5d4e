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
import json
import logging
import os
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
from celery import signals
from celery_batches import Batches
from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from brainscan import CLASSES, jobs
from brainscan.db import Item, ItemStatus, Job, JobStatus, session_scope, utcnow, with_db_retry
from brainscan.queue_contract import BULK_PRIORITY, priority_lists
from brainscan.queueing import default_publisher, redis_client
from brainscan.settings import get_settings
from brainscan.storage import ScanStore
from brainscan.trust import Verdict
from brainscan.workers import (
    BEAT_S,
    STORAGE_PROBLEM_TTL_S,
    WorkerBeat,
    beat_key,
    restore_orphans,
    storage_problem_key,
)
from worker.celery import QUEUE, REAP_TASK, SCORE_TASK, URGENT_PRIORITY, app

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
            # A lone urgent message goes at once; a burst of them (more waiting in Redis) still
            # fills a batch, as bulk messages do.
            full = self._buffered_items() >= self.flush_items
            if full or (self._urgent_buffered() and not urgent_waiting()):
                self._do_flush()

        return on_message

    def _urgent_buffered(self) -> bool:
        return any(_is_urgent(request) for request in list(self._buffer.queue))

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
    verdict: Verdict | None = None  # a scored item: calibrated probabilities, label and flag
    error: str | None = None
    preprocess_ms: float | None = None
    inference_ms: float | None = None


def claim(item_ids: Sequence[int], node: str | None = None) -> list[Claimed]:
    """Mark the still-open items ``running`` (attempts+1, ``worker_id`` = this worker) and their jobs
    ``running``; one transaction."""
    now = utcnow()
    with session_scope() as session:
        # One guarded UPDATE ... RETURNING takes the open items (one round trip, not select + update).
        rows = session.execute(
            update(Item)
            .where(Item.id.in_(item_ids), Item.status.in_(OPEN_STATUSES))
            .values(
                status=ItemStatus.running.value,
                started_at=now,
                attempts=Item.attempts + 1,
                worker_id=node or worker_id(),
            )
            .returning(Item.id, Item.job_id, Item.position, Item.sha256, Item.attempts, Item.error)
            .execution_options(synchronize_session=False)
        ).all()
        if not rows:
            return []
        rows.sort(key=lambda row: (row.job_id, row.position))
        session.execute(
            update(Job)
            .where(Job.id.in_({row.job_id for row in rows}), Job.status == JobStatus.queued.value)
            .values(status=JobStatus.running.value, started_at=now)
        )
        return [Claimed(row.id, row.job_id, row.sha256, row.attempts, row.error) for row in rows]


def finalize(outcomes: Iterable[Outcome], model_name: str, model_version: str) -> dict[str, tuple[int, int]]:
    """Write a batch's results in one transaction, idempotently. Returns counted (done, failed) per job."""
    now = utcnow()
    moved: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    flagged: dict[str, Counter[str]] = defaultdict(Counter)
    outcomes = list(outcomes)
    with session_scope() as session:
        # One guarded UPDATE ... RETURNING takes the still-open items (PostgreSQL locks their rows,
        # SQLite holds its write lock, until the commit); a redelivered or duplicated outcome is not
        # among them. Their results then go out in one executemany: three statements a batch, not one
        # per item (the per-item UPDATEs were ~0.8 ms an item on SQLite, ~6 on PostgreSQL).
        open_ids = (
            set(
                session.scalars(
                    update(Item)
                    .where(Item.id.in_([o.id for o in outcomes]), Item.status.in_(OPEN_STATUSES))
                    .values(finished_at=now)
                    .returning(Item.id)
                    .execution_options(synchronize_session=False)
                )
            )
            if outcomes
            else set()
        )
        results: list[dict[str, Any]] = []
        for outcome in outcomes:
            if outcome.id not in open_ids:
                continue
            open_ids.discard(outcome.id)  # an id twice in one batch counts once
            values: dict[str, Any] = {
                "id": outcome.id,
                "status": outcome.status,
                "finished_at": now,
                "error": outcome.error,
                "preprocess_ms": outcome.preprocess_ms,
                "inference_ms": outcome.inference_ms,
                "model_name": model_name,
                "model_version": model_version,
            }
            if outcome.verdict is not None:
                values.update(verdict_values(outcome.verdict))
            results.append(values)
            moved[outcome.job_id][0 if outcome.status == ItemStatus.succeeded.value else 1] += 1
            if outcome.verdict is not None and outcome.verdict.flag is not None:
                flagged[outcome.job_id][outcome.verdict.flag] += 1
        if results:
            # ORM bulk UPDATE by primary key: one executemany per set of columns (scored / failed).
            session.execute(update(Item), results)
        for job_id, (done, failed) in moved.items():
            flags = flagged[job_id]
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    done=Job.done + done,
                    failed=Job.failed + failed,
                    # NULL (a job from before flags existed) stays NULL: its count would be partial.
                    flagged_uncertain=Job.flagged_uncertain + flags["uncertain"],
                    flagged_out_of_scope=Job.flagged_out_of_scope + flags["out_of_scope"],
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


def verdict_values(verdict: Verdict) -> dict[str, Any]:
    """An item's result columns from its verdict. An out-of-scope item keeps its probabilities (for
    audit) but no label and no confidence: there is no answer whose confidence it could be."""
    out_of_scope = verdict.flag == "out_of_scope"
    return {
        "label": None if out_of_scope else verdict.label,
        "confidence": None if out_of_scope else float(verdict.confidence),
        "flag": verdict.flag,
        "flag_reason": verdict.flag_reason,
        "scope_score": None if verdict.scope_score is None else float(verdict.scope_score),
        **{f"prob_{name}": float(p) for name, p in zip(CLASSES, verdict.probabilities, strict=True)},
    }


def _close_finished_jobs(session: Session, job_ids: list[str], now: Any) -> list[str]:
    """Close the finished jobs among ``job_ids``; returns those closed here that have a callback_url."""
    closed = session.execute(
        update(Job)
        .where(
            Job.id.in_(job_ids),
            Job.finished_at.is_(None),
            Job.done + Job.failed >= Job.total,
            # Still receiving: its total is still growing; brainscan.jobs.close_intake closes it.
            Job.status != JobStatus.receiving.value,
        )
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

    Items in ``urgent_ids`` (from urgent-lane messages) are scored in the first model batches. While
    this worker cannot read storage it claims nothing: the items go back to the queue for another
    worker (see :func:`release_unreadable`).
    """
    from worker.engine import get_engine

    settings = get_settings()
    engine = get_engine()
    engine.maybe_reload()  # a batch boundary: pick up a newly promoted model
    ids = sorted({int(i) for i in item_ids})
    if not ids:
        return 0
    if storage_problem() is not None:
        # Messages this worker took before it stopped consuming: pass them on, untouched.
        _send_back(ids, urgent_ids)
        return 0
    node = worker_id()
    claimed = with_db_retry(lambda: claim(ids, node), "claiming items", settings.db_retry_s)
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
        started = time.perf_counter()
        prepared = pending.result()
        waited_ms = (time.perf_counter() - started) * 1000.0
        if index + 1 < len(batches):  # decode the next batch while this one is scored
            pending = engine.prepare_many([_reader(store, c.sha256) for c in batches[index + 1]])
        unreadable = [(c, p) for c, p in zip(batch, prepared, strict=True) if p.unreadable]
        if unreadable:
            # Not the scans' fault: back to the queue for another worker, never failed.
            release_unreadable([c for c, _ in unreadable], urgent, unreadable[0][1].error or "")
            readable = [(c, p) for c, p in zip(batch, prepared, strict=True) if not p.unreadable]
            batch, prepared = [c for c, _ in readable], [p for _, p in readable]
            if not batch:
                continue
        started = time.perf_counter()
        outcomes, left_open = _score_prepared(engine, batch, prepared)
        scored_ms = (time.perf_counter() - started) * 1000.0
        started = time.perf_counter()
        with_db_retry(
            lambda o=outcomes: finalize(o, card.name, card.version), "writing results", settings.db_retry_s
        )
        written_ms = (time.perf_counter() - started) * 1000.0
        outcomes_total += len(outcomes)
        if left_open:
            with_db_retry(lambda s=left_open: note_errors(s), "recording model errors", settings.db_retry_s)
        log_batch(node, f"{card.name}/{card.version}", batch, prepared, outcomes, left_open,
                  {"decode_ms": sum(p.ms for p in prepared), "decode_wait_ms": waited_ms,
                   "inference_ms": scored_ms, "write_ms": written_ms})  # fmt: skip
        rest = [c for later in batches[index + 1 :] for c in later]
        if rest and not urgent.intersection(c.id for c in rest) and urgent_waiting():
            assert pending is not None
            pending.cancel()
            yield_to_urgent(rest, node)
            break
    return outcomes_total


# ---- the latency lane -----------------------------------------------------------------------------
# A flush holds two model batches and the worker reads no message while it scores them, so a single
# scan submitted meanwhile would wait for the rest of the flush and then ride in a full batch. Two
# things keep its wait near one batch: between model batches the worker looks at the urgent list
# and, if something waits there, gives the flush's remaining bulk items back (queued again, their
# attempt not counted, sent again on the bulk lane) and returns; and an urgent message that arrives
# with no other urgent message behind it is flushed at once instead of after ``max_batch_wait_ms``.


def urgent_waiting() -> bool:
    """Whether a message waits on the urgent lane's Redis list (one LLEN; False if Redis is away)."""
    try:
        return bool(_redis().llen(priority_lists()[0]))
    except Exception:
        return False


def yield_to_urgent(items: Sequence[Claimed], node: str) -> None:
    """Give claimed but unscored bulk items back to the queue so that urgent work goes first."""
    settings = get_settings()
    with_db_retry(lambda: _unclaim([c.id for c in items]), "giving items back", settings.db_retry_s)
    log.info(
        "gave %d bulk item(s) back to score urgent work first",
        len(items),
        extra={"event": "yielded_to_urgent", "worker_id": node, "items": len(items)},
    )
    try:
        # The bulk lane, whatever their number: a few left-over archive items are not a small job.
        default_publisher().publish([c.id for c in items], BULK_PRIORITY)
    except Exception as exc:  # the broker is down: they are queued, so the reaper re-sends them
        log.warning("could not send %d item(s) back: %s", len(items), type(exc).__name__)


def _unclaim(ids: Sequence[int]) -> None:
    """``running`` items this worker claimed back to ``queued``, the attempt not counted."""
    with session_scope() as session:
        session.execute(
            update(Item)
            .where(Item.id.in_(ids), Item.status == ItemStatus.running.value)
            .values(status=ItemStatus.queued.value, attempts=Item.attempts - 1, started_at=None)
        )


def log_batch(
    node: str,
    model: str,
    batch: Sequence[Claimed],
    prepared: Sequence[Any],
    outcomes: Sequence[Outcome],
    left_open: Sequence[tuple[Claimed, str]],
    stages_ms: dict[str, float],
) -> None:
    """One INFO line per scored model batch: what an operator needs to see the worker working.

    ``decode_ms`` is the read+decode time summed over the batch's scans (on the decode threads,
    overlapped with the previous batch's inference); ``decode_wait_ms`` how long scoring waited for
    it; ``inference_ms`` the model call(s); ``write_ms`` the results' transaction.
    """
    job_ids = sorted({c.job_id for c in batch})
    failed = sum(1 for o in outcomes if o.status != ItemStatus.succeeded.value)
    log.info(
        "scored a batch of %d scan(s) from %d job(s) in %.0f ms",
        len(batch),
        len(job_ids),
        sum(stages_ms.values()) - stages_ms["decode_ms"],
        extra={
            "event": "batch_scored",
            "worker_id": node,
            "items": len(batch),
            "jobs": len(job_ids),
            "job_ids": job_ids,
            "failed": failed,
            "left_open": len(left_open),
            "model": model,
            **{name: round(ms, 1) for name, ms in stages_ms.items()},
        },
    )


# ---- storage that cannot be read ------------------------------------------------------------------
# A scan that cannot be *read* (permissions, a missing or failing volume) says nothing about the scan:
# the item goes back to the queue with its attempt not counted, the worker stops taking scoring work
# and says so in its heartbeat (/readyz, /metrics), and its heartbeat thread probes storage until it
# can read again, then resumes. Another worker that can read storage scores the items meanwhile.
_storage_problem: str | None = None  # this process's view; the Redis key is every process's


def storage_problem() -> str | None:
    """Why this worker cannot read storage now (an error type), or None.

    The Redis key is the truth (the heartbeat clears it, possibly in another process of a prefork
    worker); this process's own flag stands in while Redis cannot be asked.
    """
    try:
        raw = _redis().get(storage_problem_key(worker_id()))
    except Exception:
        return _storage_problem
    return str(json.loads(raw)["error"]) if raw else None


_REDIS: dict[str, Any] = {}


def _redis() -> Any:
    """This process's Redis client for the broker URL (asked once per flush: keep the connection)."""
    url = get_settings().broker_url
    if url not in _REDIS:
        _REDIS[url] = redis_client(url, timeout=2)
    return _REDIS[url]


def release_unreadable(items: Sequence[Claimed], urgent: set[int], error: str) -> None:
    """Put items whose scans could not be read back to ``queued`` (the attempt does not count), send
    them again, and take this worker off scoring until storage reads again."""
    global _storage_problem
    settings = get_settings()
    ids = [c.id for c in items]
    with_db_retry(lambda: _unclaim(ids), "releasing unreadable items", settings.db_retry_s)
    node = worker_id()
    first = _storage_problem is None
    _storage_problem = error.split(":", 1)[0] or "OSError"  # the error type (see ScanStore.read)
    with contextlib.suppress(Exception):
        problem = {"error": _storage_problem, "sha256": items[0].sha256, "since": time.time()}
        _redis().set(storage_problem_key(node), json.dumps(problem), ex=STORAGE_PROBLEM_TTL_S)
    if first:
        log.error(
            "storage unreadable (%s): this worker stops scoring until it can read it again; "
            "the API and every worker must share the storage volume and its owner",
            error,
            extra={"event": "storage_unreadable", "worker_id": node, "error_type": _storage_problem},
        )
        _pause_scoring(node)
    log.warning(
        "sent %d item(s) back to the queue: storage unreadable here",
        len(ids),
        extra={"event": "items_released", "worker_id": node, "items": len(ids)},
    )
    _send_back(ids, urgent)


def _send_back(ids: Sequence[int], urgent: Iterable[int]) -> None:
    urgent_set = set(urgent)
    first = [i for i in ids if i in urgent_set]
    rest = [i for i in ids if i not in urgent_set]
    publisher = default_publisher()
    for group, priority in ((first, URGENT_PRIORITY), (rest, None)):
        if group:
            try:
                publisher.publish(group, priority)
            except Exception as exc:  # the broker is down: the reaper re-sends them (they are queued)
                log.warning("could not send %d item(s) back: %s", len(group), type(exc).__name__)


def _pause_scoring(node: str) -> None:
    # A control message to this worker's own consumer, processed once the current task returns.
    with contextlib.suppress(Exception):
        app.control.cancel_consumer(QUEUE, destination=[node], reply=False)


def _resume_scoring(node: str) -> None:
    with contextlib.suppress(Exception):
        app.control.add_consumer(QUEUE, destination=[node], reply=False)


def storage_readable(store: ScanStore, sha256: str | None) -> bool:
    """The heartbeat's probe: the scans folder lists and the scan that failed reads (or is gone)."""
    try:
        if not store.scans_dir.is_dir():
            return False
        os.listdir(store.scans_dir)
        if sha256:
            with contextlib.suppress(FileNotFoundError), open(store.path_for(sha256), "rb") as f:
                f.read(1)
        return True
    except OSError:
        return False


def check_storage_problem(client: Any, node: str) -> str | None:
    """Heartbeat side: probe storage if a scoring process reported a problem; clear it once readable."""
    global _storage_problem
    raw = client.get(storage_problem_key(node))
    if not raw:
        return None
    problem = json.loads(raw)
    if storage_readable(_store(), problem.get("sha256")):
        client.delete(storage_problem_key(node))
        _storage_problem = None
        log.info(
            "storage readable again: this worker scores again",
            extra={"event": "storage_readable", "worker_id": node},
        )
        _resume_scoring(node)
        return None
    client.expire(storage_problem_key(node), STORAGE_PROBLEM_TTL_S)
    return str(problem.get("error") or "OSError")


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
            score = verdict.scope_score
            # NaN/inf have no JSON form and mean nothing: the scan fails alone, with a reason.
            finite = np.all(np.isfinite(verdict.probabilities)) and (score is None or np.isfinite(score))
            if not finite:
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
                    verdict=verdict,
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


def close_abandoned_intakes(now: Any = None) -> list[str]:
    """Mark jobs stuck in ``receiving`` for ``stale_after_s`` (brainscan.jobs); notify closed ones."""
    with session_scope() as session:
        closed = jobs.close_abandoned_intakes(session, get_settings().stale_after_s, now)
        for job in closed:
            log.warning(
                "job %s: intake was interrupted; marked %s", job.id, job.status, extra={"job_id": job.id}
            )
        final = [job.id for job in closed if job.finished_at is not None and job.callback_url]
    if final:
        default_publisher().notify_jobs(final)
    return [job.id for job in closed]


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
    """Re-send items stranded by a broker outage at submit time or by a worker that died, and close
    the intake of jobs whose API process died while reading their upload (they say so)."""
    with_db_retry(close_abandoned_intakes, "closing abandoned intakes", get_settings().db_retry_s)
    ids = with_db_retry(find_stranded, "finding stranded items", get_settings().db_retry_s)
    if ids:
        log.info("reaper: re-sending %d stranded item(s)", len(ids))
        default_publisher().enqueue_items(ids)
    restore_orphans(get_settings())  # a dead worker's unacked messages, without waiting for Kombu
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


def worker_id() -> str:
    """This worker's id: its Celery node name (``brainscan-<pid>@<host>`` by default), stored on the
    items it scores and named in its log lines; ``<host>:<pid>`` outside a Celery worker."""
    return _node or f"{socket.gethostname()}:{os.getpid()}"


_node: str | None = None


@signals.celeryd_after_setup.connect
def _remember_node(sender: Any = None, **_: Any) -> None:
    # Sent in the main process before any pool child forks, so the children inherit it.
    global _node
    _node = str(sender) if sender else None


class Heartbeat(threading.Thread):
    """Every ``BEAT_S``: this worker's beat (``brainscan.workers.WorkerBeat``) with a TTL of three beats.

    From its own thread, so a worker busy in a long batch still counts for /readyz. Each beat lists
    the messages the worker holds unacknowledged (so others can tell a dead worker's messages from
    a live one's), carries the storage probe's verdict, and every third beat gives back messages
    that no live worker holds (``restore_orphans``: a dead worker's, in seconds rather than after
    the visibility timeout).
    """

    RESTORE_EVERY = 3

    def __init__(self, node: str, consumer: Any = None, every_s: float = BEAT_S) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.node = node
        self.pid = os.getpid()
        self.key = beat_key(node, self.pid)
        self.consumer = consumer
        self.every_s = every_s
        self.stopped = threading.Event()

    def held(self) -> frozenset[str]:
        """Delivery tags of the messages this worker holds unacked (read from another thread: retried)."""
        for _ in range(3):
            try:
                qos = self.consumer.task_consumer.channel.qos
                return frozenset(str(tag) for tag in list(qos._delivered))
            except RuntimeError:  # the dict changed size while copied
                continue
            except AttributeError:  # no consumer (yet), or a transport without QoS bookkeeping
                break
        return frozenset()

    def run(self) -> None:
        settings = get_settings()
        client = redis_client(settings.broker_url, timeout=2)
        beats = 0
        while not self.stopped.is_set():
            # Broker down: the worker itself reconnects; keep trying quietly.
            with contextlib.suppress(Exception):
                problem = check_storage_problem(client, self.node)
                beat = WorkerBeat(self.node, self.pid, time.time(), problem, self.held())
                client.set(self.key, beat.dumps(), ex=int(self.every_s * 3))
            beats += 1
            if beats % self.RESTORE_EVERY == 0:
                restore_orphans(settings)
            self.stopped.wait(self.every_s)
        with contextlib.suppress(Exception):
            client.delete(self.key)


_heartbeat: Heartbeat | None = None


@signals.worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    global _heartbeat
    node = getattr(sender, "hostname", None) or _node or socket.gethostname()
    _heartbeat = Heartbeat(str(node), consumer=sender)
    _heartbeat.start()
    restore_orphans(get_settings())  # a restarted worker picks up what its predecessor held


@signals.worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stopped.set()
