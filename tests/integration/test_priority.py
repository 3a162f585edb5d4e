"""The urgent lane: a single-scan job is not queued behind an archive's messages.

Redis lists are FIFO. Without a priority lane, a single scan submitted after a big job waits until
the worker has read every one of the big job's messages. With it (``brainscan.queueing.publish``
sends small jobs at ``URGENT_PRIORITY``), the worker reads the single scan first and scores it in
its first model batch. Real worker process, real Redis, tiny model; no timed assertions: the order
of the database's own ``finished_at`` stamps says who went first.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from brainscan.db import Item, Job, session_scope
from tests.support.backends import Backend
from tests.support.environment import wait_for
from tests.support.images import make_jpeg
from tests.support.processes import Service
from tests.support.records import create_job, job_finished, queued_ids

pytestmark = pytest.mark.integration

BIG = 120  # > urgent_max_items: bulk lane; 15 messages of enqueue_chunk=8 in the test env


def item_rows(backend: Backend, job_id: str) -> tuple[Job, list[Item]]:
    with backend.active(), session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job, list(session.scalars(select(Item).where(Item.job_id == job_id)))


def test_single_scan_job_overtakes_a_queued_archive(backend: Backend, worker_process: Service) -> None:
    from brainscan.queueing import _celery, enqueue_job
    from worker.celery import BULK_PRIORITY, QUEUE

    big_id = create_job(backend, [(f"bulk_{i:03d}.jpg", make_jpeg(1000 + i)) for i in range(BIG)])
    single_id = create_job(backend, [("urgent.jpg", make_jpeg(2000))])
    with backend.active():
        control = _celery().control
        # Pause consumption so that both jobs are queued, archive first, when the worker resumes.
        control.cancel_consumer(QUEUE, destination=[worker_process.hostname], reply=True, timeout=10)
        try:
            assert enqueue_job(big_id) is True
            assert enqueue_job(single_id) is True
            _, big_items = item_rows(backend, big_id)
            _, (single_item,) = item_rows(backend, single_id)
            # The archive went to the bulk list, the single scan to the urgent (plain) one.
            assert queued_ids(backend, f"{QUEUE}\x06\x16{BULK_PRIORITY}") >= {i.id for i in big_items}
            urgent = queued_ids(backend, QUEUE)
            assert single_item.id in urgent and not urgent & {i.id for i in big_items}
        finally:
            control.add_consumer(QUEUE, destination=[worker_process.hostname], reply=True, timeout=10)

    wait_for(lambda: job_finished(backend, big_id), what="the archive to finish")
    wait_for(lambda: job_finished(backend, single_id), what="the single scan to finish")
    big, big_items = item_rows(backend, big_id)
    single, (item,) = item_rows(backend, single_id)
    assert (big.status, big.done, single.status, single.done) == ("succeeded", BIG, "succeeded", 1)
    assert item.status == "succeeded" and item.label is not None
    assert single.finished_at < big.finished_at
    # It rode in the worker's first model batch: no archive item was written before it (FIFO would
    # have put it behind all 120).
    assert sum(1 for i in big_items if i.finished_at < item.finished_at) == 0


def test_publish_picks_the_lane_by_size(backend: Backend) -> None:
    from brainscan.queueing import priority_for
    from worker.celery import BULK_PRIORITY, URGENT_PRIORITY

    with backend.active(BRAINSCAN_URGENT_MAX_ITEMS="8"):
        assert [priority_for(n) for n in (1, 8, 9, 1000)] == [URGENT_PRIORITY] * 2 + [BULK_PRIORITY] * 2
    with backend.active(BRAINSCAN_URGENT_MAX_ITEMS="0"):  # lane off: everything is bulk, FIFO again
        assert priority_for(1) == BULK_PRIORITY
