"""``GET /metrics``: Prometheus text format, computed from the database and Redis at each scrape.

The database is the source of truth, so every API replica reports the same numbers and nothing is
lost when a process restarts: a fresh ``CollectorRegistry`` is filled per scrape. Names:

==========================================  =======  ========================================================
``brainscan_up``                            gauge    1 (the API answered this scrape)
``brainscan_broker_up``                     gauge    1 when Redis answered, else 0
``brainscan_queue_depth{queue}``            gauge    messages waiting in the Celery queue (LLEN; each message
                                                     holds up to BRAINSCAN_ENQUEUE_CHUNK item ids)
``brainscan_workers``                       gauge    workers whose heartbeat key is alive
``brainscan_workers_unhealthy{reason}``     gauge    of those, workers that cannot score (``storage``: they
                                                     cannot read the scan store; they take no work)
``brainscan_items{status}``                 gauge    items by status (queued, running, succeeded, failed)
``brainscan_jobs{status}``                  gauge    jobs by status
``brainscan_item_failures{reason}``         gauge    failed items by reason code (a fixed set,
                                                     ``FAILURE_REASONS``; never text from an error)
``brainscan_scans_scored_total``            counter  items scored successfully, ever (use ``rate()``)
``brainscan_items_flagged_total{flag}``     counter  scored items flagged, ever, by flag: ``uncertain`` and
                                                     ``out_of_scope`` (both always present)
``brainscan_scans_scored_last_minute``      gauge    items scored with finished_at in the last 60 s
``brainscan_oldest_queued_age_seconds``     gauge    age of the oldest item still queued (0 when none)
``brainscan_stage_latency_seconds{stage}``  summary  preprocess / inference time per item over the latest
                                                     BRAINSCAN_METRICS_LATENCY_WINDOW finished items, with
                                                     quantiles 0.5, 0.9, 0.99
==========================================  =======  ========================================================

Unauthenticated, like most scrape targets: it exposes counts only, never ids, names or scan data.
Failure reasons in particular are codes chosen in SQL from a fixed table (``REASON_CODES``): an item
error may quote a limit or a header field's name, and what a label can hold must not depend on what
an upload contained.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from brainscan.db import Item, ItemStatus, Job, JobStatus
from brainscan.queue_contract import QUEUE, priority_lists
from brainscan.queueing import redis_client
from brainscan.settings import Settings
from brainscan.workers import read_beats

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])

QUANTILES = (0.5, 0.9, 0.99)
REDIS_TIMEOUT_S = 1.0

# Item error -> reason code: the first row whose phrases occur in the (lower-cased) error wins; no
# error text is ever a label. ``unknown``: a failed item without an error; ``other``: none matched.
REASON_CODES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gave_up", ("gave up after",)),  # quotes the last error: must come first
    ("intake_interrupted", ("intake stopped",)),
    ("job_full", ("job reached its limit",)),
    ("model_error", ("model call failed", "non-finite")),
    ("scan_missing", ("no stored bytes", "missing")),
    (
        "archive_entry_refused",
        ("link in archive", "special file", "sparse file", "encrypted", "nested archive"),
    ),
    (
        "too_large",
        (
            "larger than",
            "more pixels than",
            "too large",
            "limit of",
            "over the limit",
            "budget",
            "too many",
            "exceed",
        ),
    ),
    ("empty", ("empty", "no pixel data", "non-blank", "without an image")),
    ("unsupported", ("unsupported", "not supported", "4-d nifti", "multi-frame", "one frame per scan")),
    (
        "corrupt",
        ("cannot decode", "corrupt", "damaged", "truncated", "unreadable", "cannot read", "not a readable"),
    ),
)
FAILURE_REASONS = (*(code for code, _ in REASON_CODES), "unknown", "other")


def reason_code_sql(error: Any) -> Any:
    """A SQL expression mapping an item's error to its code (the same on SQLite and PostgreSQL)."""
    lowered = func.lower(error)
    whens = [
        (or_(*(lowered.like(f"%{phrase}%") for phrase in phrases)), code) for code, phrases in REASON_CODES
    ]
    return case((error.is_(None), "unknown"), *whens, else_="other")


class DatabaseCollector(Collector):
    def __init__(self, session: Session, settings: Settings) -> None:
        self.session = session
        self.settings = settings

    def collect(self):  # type: ignore[no-untyped-def]
        session = self.session
        now = datetime.now(UTC)

        items = GaugeMetricFamily("brainscan_items", "Items by status.", labels=["status"])
        item_counts = dict(session.execute(select(Item.status, func.count()).group_by(Item.status)).all())
        for state in ItemStatus:
            items.add_metric([state.value], item_counts.get(state.value, 0))
        yield items

        jobs = GaugeMetricFamily("brainscan_jobs", "Jobs by status.", labels=["status"])
        job_counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        for state in JobStatus:
            jobs.add_metric([state.value], job_counts.get(state.value, 0))
        yield jobs

        scored = CounterMetricFamily("brainscan_scans_scored", "Items scored successfully, ever.")
        scored.add_metric([], item_counts.get(ItemStatus.succeeded.value, 0))
        yield scored

        # Summed from the jobs' counters (kept with done/failed), not by scanning every item.
        flagged = CounterMetricFamily(
            "brainscan_items_flagged", "Scored items flagged, by flag.", labels=["flag"]
        )
        uncertain, out_of_scope = session.execute(
            select(func.sum(Job.flagged_uncertain), func.sum(Job.flagged_out_of_scope))
        ).one()
        for flag, total in (("uncertain", uncertain), ("out_of_scope", out_of_scope)):
            flagged.add_metric([flag], int(total or 0))
        yield flagged

        failures = GaugeMetricFamily(
            "brainscan_item_failures", "Failed items by reason code.", labels=["reason"]
        )
        for reason, count in self._failure_reasons():
            failures.add_metric([reason], count)
        yield failures

        minute = session.scalar(
            select(func.count())
            .select_from(Item)
            .where(Item.status == ItemStatus.succeeded.value, Item.finished_at >= now - timedelta(seconds=60))
        )
        yield GaugeMetricFamily(
            "brainscan_scans_scored_last_minute", "Items scored in the last 60 seconds.", value=minute or 0
        )

        oldest = session.scalar(
            select(func.min(Item.created_at)).where(Item.status == ItemStatus.queued.value)
        )
        age = 0.0
        if oldest is not None:
            oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC)
            age = max(0.0, (now - oldest).total_seconds())
        yield GaugeMetricFamily(
            "brainscan_oldest_queued_age_seconds", "Age of the oldest queued item.", value=age
        )

        yield self._latencies()

    def _failure_reasons(self) -> list[tuple[str, int]]:
        code = reason_code_sql(Item.error)
        failed = Item.status == ItemStatus.failed.value
        counts = dict(self.session.execute(select(code, func.count()).where(failed).group_by(code)).all())
        return [(reason, int(counts.get(reason, 0))) for reason in FAILURE_REASONS]

    def _latencies(self) -> SummaryMetricFamily:
        window = self.settings.metrics_latency_window
        latest = (
            select(Item.preprocess_ms, Item.inference_ms)
            .where(Item.status == ItemStatus.succeeded.value, Item.finished_at.is_not(None))
            .order_by(Item.finished_at.desc())
            .limit(window)
        )
        rows = self.session.execute(latest).all()
        family = SummaryMetricFamily(
            "brainscan_stage_latency_seconds",
            f"Per-item stage time over the latest {window} scored items.",
            labels=["stage"],
        )
        for index, stage in enumerate(("preprocess", "inference")):
            values = (
                np.asarray([row[index] for row in rows if row[index] is not None], dtype=np.float64) / 1000
            )
            family.add_metric([stage], count_value=int(values.size), sum_value=float(values.sum()))
            if values.size:
                for q, v in zip(QUANTILES, np.quantile(values, QUANTILES), strict=True):
                    family.add_sample(
                        "brainscan_stage_latency_seconds", {"stage": stage, "quantile": str(q)}, float(v)
                    )
        return family


class BrokerCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self):  # type: ignore[no-untyped-def]
        up = GaugeMetricFamily("brainscan_broker_up", "1 when the Redis broker answered.")
        try:
            # Kombu keeps a queue as one Redis list per priority step (brainscan.queue_contract).
            client = redis_client(self.settings.broker_url, REDIS_TIMEOUT_S)
            try:
                pipe = client.pipeline()
                for name in priority_lists(QUEUE):
                    pipe.llen(name)
                depth = sum(int(n) for n in pipe.execute())
                beats = read_beats(client)  # each worker's latest heartbeat, with its health
            finally:
                client.close()
            workers = len(beats)  # one scan of the heartbeat keys serves both figures
        except Exception as exc:
            # The broker URL may hold a password: the error type only.
            log.warning("metrics: broker unreachable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        queue = GaugeMetricFamily("brainscan_queue_depth", "Messages waiting in the queue.", labels=["queue"])
        queue.add_metric([QUEUE], depth)
        yield queue
        yield GaugeMetricFamily("brainscan_workers", "Workers with a live heartbeat.", value=workers)
        unhealthy = GaugeMetricFamily(
            "brainscan_workers_unhealthy", "Live workers that cannot score, by why.", labels=["reason"]
        )
        unhealthy.add_metric(["storage"], sum(1 for beat in beats if beat.storage is not None))
        yield unhealthy


@router.get("/metrics", response_class=Response, include_in_schema=True)
def metrics(request: Request) -> Response:
    """Prometheus text exposition of queue, item, job, failure and latency figures."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Up())
    with request.app.state.sessions() as session:
        registry.register(DatabaseCollector(session, request.app.state.settings))
        registry.register(BrokerCollector(request.app.state.settings))
        body = generate_latest(registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


class _Up(Collector):
    def collect(self):  # type: ignore[no-untyped-def]
        yield GaugeMetricFamily("brainscan_up", "1: the API answered this scrape.", value=1)
