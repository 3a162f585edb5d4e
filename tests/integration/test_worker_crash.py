"""Issue 3, fault 1: a worker SIGKILLed mid-batch loses nothing and counts nothing twice.

Real PostgreSQL + Redis, real worker processes. The visibility timeout is 10 s here (300 s by
default), so the dead worker's unacknowledged messages come back within seconds.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from brainscan.db import Item, Job, session_scope
from tests.support.backends import Backend
from tests.support.environment import wait_for
from tests.support.processes import start_worker
from tests.support.records import create_job, job_finished

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def large_jpeg(seed: int, side: int = 1400) -> bytes:
    # Big, noisy scans make decoding slow enough that "mid-batch" is a wide window to hit.
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


@pytest.fixture
def pg_backend(postgres_url: str, redis_url: str, tiny_model_dir: Path, tmp_path: Path) -> Backend:
    return Backend("postgres", postgres_url, redis_url, tmp_path / "var", tiny_model_dir)


def test_worker_killed_mid_batch_every_item_scored_exactly_once(pg_backend: Backend, tmp_path: Path) -> None:
    from brainscan.queueing import enqueue_job

    scans = [large_jpeg(0), large_jpeg(1), large_jpeg(2)]
    total = 96
    job_id = create_job(pg_backend, [(f"big_{i}.jpg", scans[i % 3]) for i in range(total)])
    victim = start_worker(pg_backend, tmp_path / "logs")
    try:
        with pg_backend.active():
            assert enqueue_job(job_id)

        def running_items() -> list[int]:
            with pg_backend.active(), session_scope() as session:
                return list(
                    session.scalars(select(Item.id).where(Item.job_id == job_id, Item.status == "running"))
                )

        wait_for(running_items, what="the worker to start a batch")
        victim.kill()  # SIGKILL: no ack, no cleanup, results of the batch in flight never written
    finally:
        victim.stop()
    orphaned = running_items()
    assert orphaned, "the kill should have landed while a batch was in flight"

    rescuer = start_worker(pg_backend, tmp_path / "logs")
    try:
        wait_for(lambda: job_finished(pg_backend, job_id), what="the job to finish after the crash")
    finally:
        rescuer.stop()

    with pg_backend.active(), session_scope() as session:
        job = session.get(Job, job_id)
        statuses = dict(
            session.execute(
                select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status)
            ).all()
        )
        orphan_attempts = list(session.scalars(select(Item.attempts).where(Item.id.in_(orphaned))))
        without_result = session.scalar(
            select(func.count()).where(Item.job_id == job_id, Item.prob_glioma.is_(None))
        )
    assert job is not None
    assert statuses == {"succeeded": total}
    assert (job.status, job.total, job.done, job.failed) == ("succeeded", total, total, 0)
    assert without_result == 0
    assert all(attempts >= 2 for attempts in orphan_attempts)  # redelivered, scored again, counted once
