"""The latency lane inside a flush: bulk work gives way between model batches when urgent work waits.

A flush holds two or more model batches and a worker reads no message while it scores them. When a
message waits on the urgent list at a batch boundary, ``worker.tasks.score`` stops, puts the flush's
unscored bulk items back to ``queued`` (attempt not counted) and sends them again on the bulk lane;
nothing is lost and nothing is scored twice. Real database (both backends), real Redis, a real
SavedModel in this process; the urgent message is a placeholder on the urgent list (no worker runs
here to take it).
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from brainscan.db import Item, Job, session_scope
from tests.support.backends import Backend
from tests.support.images import make_jpeg
from tests.support.records import create_job, queued_ids

pytestmark = pytest.mark.integration

SCANS = 40  # three model batches of 16 (the test backend's batch size)


def _rows(job_id: str) -> tuple[Job, list[Item]]:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        items = list(session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.position)))
        session.expunge_all()
        return job, items


def test_a_flush_gives_its_bulk_items_back_when_urgent_work_waits(backend: Backend) -> None:
    import redis

    import worker.engine
    from brainscan.queue_contract import BULK_PRIORITY, QUEUE, priority_lists

    job_id = create_job(backend, [(f"bulk_{i:02d}.jpg", make_jpeg(3000 + i)) for i in range(SCANS)])
    with backend.active():
        from worker.tasks import score

        client = redis.Redis.from_url(backend.broker_url)
        client.delete(*priority_lists())
        worker.engine._ENGINE = None  # this backend's model repository
        try:
            _, items = _rows(job_id)
            client.lpush(QUEUE, b"{}")  # urgent work waits
            assert score([i.id for i in items]) == 16  # one model batch, then it gave way
            job, items = _rows(job_id)
            done = [i for i in items if i.status == "succeeded"]
            back = [i for i in items if i.status == "queued"]
            assert (len(done), len(back), job.done, job.status) == (16, SCANS - 16, 16, "running")
            assert all(i.attempts == 1 and i.label is not None for i in done)
            assert all(i.attempts == 0 and i.started_at is None and i.finished_at is None for i in back)
            # Sent again on the bulk lane, so a few left-over archive items never jump the queue.
            assert queued_ids(backend, f"{QUEUE}\x06\x16{BULK_PRIORITY}") == {i.id for i in back}

            client.delete(*priority_lists())  # nothing waits now: the rest goes in one flush
            assert score([i.id for i in items]) == SCANS - 16  # the scored ones are skipped
            job, items = _rows(job_id)
            assert (job.status, job.done, job.failed) == ("succeeded", SCANS, 0)
            assert all(i.status == "succeeded" and i.attempts == 1 for i in items)
        finally:
            worker.engine._ENGINE = None
            client.delete(*priority_lists())
            client.close()


def test_the_reaper_is_scheduled_off_the_urgent_list() -> None:
    # A flush gives way whenever the urgent list holds a message: the reaper's periodic runs must not
    # land there, or every flush that overlaps a run would give its bulk items back for nothing.
    from brainscan.queue_contract import PRIORITY_STEPS, REAP_PRIORITY, URGENT_PRIORITY, priority_lists
    from brainscan.settings import Settings
    from worker.celery import REAP_TASK, celery_config

    entry = celery_config(Settings())["beat_schedule"]["reap-stranded-items"]
    assert entry["task"] == REAP_TASK
    priority = entry["options"]["priority"]
    assert priority == REAP_PRIORITY and priority in PRIORITY_STEPS and priority != URGENT_PRIORITY
    assert priority_lists()[PRIORITY_STEPS.index(priority)] != priority_lists()[0]
