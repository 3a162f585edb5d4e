"""Issue 13, the storage lifecycle wired in: retention on beat's schedule and run by a real worker,
and the operator's ``brainscan jobs purge JOB_ID`` (real databases, a real Celery worker, the CLI as
a process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from celery.schedules import crontab
from sqlalchemy import select, update

from brainscan.db import Item, Job, session_scope, utcnow
from brainscan.settings import Settings
from brainscan.storage import ScanStore
from tests.support.backends import Backend
from tests.support.environment import ROOT, wait_for
from tests.support.images import make_jpeg
from tests.support.processes import Service
from tests.support.records import create_job

pytestmark = pytest.mark.integration


def test_beat_runs_retention_daily_and_the_webhook_reaper_with_the_item_reaper() -> None:
    from brainscan.queue_contract import TASK_ROUTES
    from worker.celery import NOTIFY_REAP_TASK, RETENTION_TASK, celery_config

    schedule = celery_config(Settings())["beat_schedule"]
    retention = schedule["retention"]
    assert retention["task"] == RETENTION_TASK
    assert retention["schedule"] == crontab(minute="30", hour="3")  # BRAINSCAN_RETENTION_CRON's default
    webhooks = schedule["reap-owed-webhooks"]
    assert (webhooks["task"], webhooks["schedule"]) == (NOTIFY_REAP_TASK, 60.0)
    assert TASK_ROUTES[RETENTION_TASK] == {"queue": "brainscan.aux"}
    custom = celery_config(Settings(retention_cron="0 4 * * 0"))["beat_schedule"]["retention"]
    assert custom["schedule"] == crontab(minute="0", hour="4", day_of_week="0")
    with pytest.raises(ValueError, match="BRAINSCAN_RETENTION_CRON"):
        celery_config(Settings(retention_cron="daily"))


def finished_job(backend: Backend, name: str, finished_days_ago: float) -> tuple[str, str]:
    """A finished job holding one stored scan (unique bytes); returns (job id, scan sha256)."""
    job_id = create_job(backend, [(name, make_jpeg(sum(map(ord, name)) + int(time.time())))])
    with backend.active(), session_scope() as session:
        finished = utcnow() - timedelta(days=finished_days_ago)
        session.execute(
            update(Job).where(Job.id == job_id).values(status="succeeded", done=1, finished_at=finished)
        )
        session.execute(
            update(Item).where(Item.job_id == job_id).values(status="succeeded", finished_at=finished)
        )
        sha = session.scalar(select(Item.sha256).where(Item.job_id == job_id))
    assert sha is not None
    path = ScanStore(backend.storage_dir).path_for(sha)
    then = time.time() - finished_days_ago * 86400
    os.utime(path, (then, then))  # stored when the job ran
    return job_id, sha


def job_exists(backend: Backend, job_id: str) -> bool:
    with backend.active(), session_scope() as session:
        return session.get(Job, job_id) is not None


def test_the_retention_task_on_a_real_worker_removes_expired_jobs_and_their_scans(
    backend: Backend, worker_process: Service
) -> None:
    from brainscan.queueing import default_publisher
    from worker.celery import RETENTION_TASK

    store = ScanStore(backend.storage_dir)
    expired, expired_sha = finished_job(backend, "expired.jpg", finished_days_ago=45)
    recent, recent_sha = finished_job(backend, "recent.jpg", finished_days_ago=2)
    leftover = store.tmp_dir / "upload-from-a-dead-api"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(leftover, (two_hours_ago, two_hours_ago))

    with backend.active():
        default_publisher().send(RETENTION_TASK, [[]])
    wait_for(lambda: not job_exists(backend, expired), what="retention to delete the expired job")
    wait_for(lambda: not store.path_for(expired_sha).exists(), what="retention to remove its scan")
    wait_for(lambda: not leftover.exists(), what="retention to sweep storage/tmp")
    assert job_exists(backend, recent) and store.path_for(recent_sha).exists()  # within 30 days


def purge(backend: Backend, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "brainscan_cli.main", "jobs", "purge", *args],
        env={**os.environ, **backend.env()},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_jobs_purge_removes_a_finished_jobs_scans_and_keeps_its_results(backend: Backend) -> None:
    store = ScanStore(backend.storage_dir)
    job_id, sha = finished_job(backend, "purge-me.jpg", finished_days_ago=0)
    result = purge(backend, job_id)
    assert result.returncode == 0, result.stderr
    assert f"job {job_id}: removed 1 scan file(s)" in result.stdout
    assert not store.path_for(sha).exists()
    with backend.active(), session_scope() as session:
        item = session.scalars(select(Item).where(Item.job_id == job_id)).one()
        assert (item.status, item.sha256) == ("succeeded", None)  # the result stays, without a scan

    unknown = purge(backend, "no-such-job")
    assert unknown.returncode == 1 and "no job 'no-such-job'" in unknown.stderr

    running = create_job(backend, [("running.jpg", make_jpeg(991))])
    refused = purge(backend, running)
    assert refused.returncode == 1 and "still has queued or running items" in refused.stderr
