"""Intake that overlaps with scoring, against a real worker, a real broker and a real database.

A job's items are committed and enqueued in chunks while the rest of the upload is read, so its
first results exist while it is still ``receiving``; a job whose intake process died mid-way is
marked by the reaper (one failed item saying why), never left silent. Runs once per backend.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from brainscan.db import Item, ItemStatus, Job, make_engine, session_scope, utcnow
from brainscan.jobs import (
    INTERRUPTED_INTAKE_NAME,
    IntakeClosed,
    IntakeEntry,
    add_items,
    close_abandoned_intakes,
    create_job,
    interrupt_intake,
)
from tests.support.archives import make_zip
from tests.support.backends import Backend
from tests.support.environment import ROOT, wait_for
from tests.support.images import make_jpeg
from tests.support.processes import Service
from tests.support.records import job_finished, make_key
from tests.support.services import own_database

pytestmark = pytest.mark.integration


def job_state(backend: Backend, job_id: str) -> tuple[Job, list[Item]]:
    with backend.active(), session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        items = list(session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.position)))
        return job, items


def receiving_job_of(backend: Backend, owner_key_id: int) -> str | None:
    with backend.active(), session_scope() as session:
        return session.scalar(select(Job.id).where(Job.owner_key_id == owner_key_id))


def scans_zip(path: Path, count: int, seed: int) -> Path:
    path.write_bytes(make_zip({f"s/{i:03d}.jpg": make_jpeg(seed + i) for i in range(count)}))
    return path


def test_first_results_exist_before_the_intake_ends(
    backend: Backend, worker_process: Service, tmp_path: Path
) -> None:
    from brainscan.intake import IntakeLimits, submit_job
    from brainscan.intake.submit import INTAKE_CHUNK
    from brainscan.queueing import default_publisher
    from brainscan.settings import get_settings
    from brainscan.storage import ScanStore

    owner, _ = make_key(backend)
    first = scans_zip(tmp_path / "first.zip", INTAKE_CHUNK + 6, seed=0)
    second = scans_zip(tmp_path / "second.zip", 10, seed=500)
    during: list[tuple[str, int, int]] = []

    def upload() -> Iterator[tuple[Path, str]]:
        yield first, "first.zip"
        # Between two files of one upload (no timing involved): the first chunk was committed and
        # enqueued; wait until the worker has scored all of it while the job is still receiving.
        job_id = receiving_job_of(backend, owner)
        assert job_id is not None

        def first_chunk_scored() -> bool:
            job, _ = job_state(backend, job_id)
            return job.done == INTAKE_CHUNK

        wait_for(first_chunk_scored, what="the first chunk to be scored during intake")
        job, _ = job_state(backend, job_id)
        during.append((job.status, job.total, job.done))
        yield second, "second.zip"

    with backend.active():
        get_settings.cache_clear()
        settings = get_settings()
        publisher = default_publisher()
        with session_scope() as session:
            submitted = submit_job(
                session,
                ScanStore(settings.resolved_storage_dir),
                IntakeLimits.from_settings(settings),
                owner,
                upload(),  # type: ignore[arg-type]
                enqueue=publisher.enqueue_job,
                notify=publisher.notify_jobs,
            )
    # Every item of the first chunk was final while the job was receiving with total == done: the
    # worker did not close a job whose total was still growing.
    assert during == [("receiving", INTAKE_CHUNK, INTAKE_CHUNK)]
    assert submitted.enqueued is True
    wait_for(lambda: job_finished(backend, submitted.job.id), what="the job to finish")
    job, items = job_state(backend, submitted.job.id)
    assert (job.status, job.total, job.done, job.failed) == (
        "succeeded",
        INTAKE_CHUNK + 16,
        INTAKE_CHUNK + 16,
        0,
    )
    assert [item.position for item in items] == list(range(INTAKE_CHUNK + 16))
    assert items[-1].filename == "second.zip/s/009.jpg"
    first_result = min(item.finished_at for item in items)
    last_stored = max(item.created_at for item in items)
    assert first_result < last_stored  # read back from the rows: a result before the last chunk


KILLED_MID_INTAKE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    from brainscan.db import session_scope
    from brainscan.intake import IntakeLimits, submit_job
    from brainscan.queueing import default_publisher
    from brainscan.settings import get_settings
    from brainscan.storage import ScanStore

    def upload():
        yield Path(sys.argv[1]), "part-one.zip"
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies half way through the upload
        yield Path(sys.argv[1]), "never-read.zip"

    settings = get_settings()
    publisher = default_publisher()
    with session_scope() as session:
        submit_job(
            session, ScanStore(settings.resolved_storage_dir), IntakeLimits.from_settings(settings),
            int(sys.argv[2]), upload(), enqueue=publisher.enqueue_job, notify=publisher.notify_jobs,
        )
    """
)


def test_a_job_whose_intake_process_died_is_marked_by_the_reaper(
    backend: Backend, worker_process: Service, tmp_path: Path
) -> None:
    from brainscan.intake.submit import INTAKE_CHUNK

    owner, _ = make_key(backend)
    archive = scans_zip(tmp_path / "part.zip", INTAKE_CHUNK + 6, seed=1000)
    died = subprocess.run(
        [sys.executable, "-c", KILLED_MID_INTAKE, str(archive), str(owner)],
        env={**backend.env(), "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    assert died.returncode == -9, died.stderr.decode(errors="replace")[-2000:]
    job_id = receiving_job_of(backend, owner)
    assert job_id is not None

    def committed_chunk_scored() -> bool:
        job, _ = job_state(backend, job_id)
        return job.done == INTAKE_CHUNK

    # The chunk committed before the crash is scored; the job stays receiving (its intake never
    # ended), so polling clients see it as not finished rather than a finished, smaller job.
    wait_for(committed_chunk_scored, what="the committed chunk to be scored")
    job, _ = job_state(backend, job_id)
    assert (job.status, job.total, job.finished_at) == ("receiving", INTAKE_CHUNK, None)

    from brainscan.settings import get_settings
    from worker.tasks import close_abandoned_intakes

    with backend.active():
        get_settings.cache_clear()
        assert close_abandoned_intakes(now=utcnow()) == []  # not stale yet: nothing marked
        later = utcnow() + timedelta(seconds=get_settings().stale_after_s + 1)
        assert job_id in close_abandoned_intakes(now=later)
    job, items = job_state(backend, job_id)
    assert (job.status, job.total, job.done, job.failed) == ("partial", INTAKE_CHUNK + 1, INTAKE_CHUNK, 1)
    assert job.finished_at is not None
    marker = items[-1]
    assert (marker.filename, marker.status, marker.position) == (
        INTERRUPTED_INTAKE_NAME,
        "failed",
        INTAKE_CHUNK,
    )
    assert f"{INTAKE_CHUNK} item(s) were stored" in marker.error and "submit it again" in marker.error


def test_an_archive_through_the_http_api_is_scored_whole(
    backend: Backend, worker_process: Service, api_server: str, tmp_path: Path
) -> None:
    _, key = make_key(backend)
    members = {f"s/{i:03d}.jpg": make_jpeg(2000 + i) for i in range(150)}
    members["s/readme.txt"] = b"not a scan"
    headers = {"Authorization": f"Bearer {key}"}
    response = httpx.post(
        f"{api_server}/v1/jobs",
        files=[("files", ("study.zip", make_zip(members), "application/zip"))],
        headers=headers,
        timeout=120,
    )
    assert response.status_code == 202, response.text
    body = response.json()
    # Intake has ended when the API answers: the job is no longer receiving.
    assert body["status"] in ("queued", "running", "succeeded", "partial")
    assert (body["total"], body["failed"], body["enqueued"]) == (151, 1, True)
    wait_for(lambda: job_finished(backend, body["id"]), what="the job to finish")
    job = httpx.get(f"{api_server}/v1/jobs/{body['id']}", params={"limit": 0}, headers=headers).json()
    assert (job["status"], job["total"], job["done"], job["failed"], job["pending"]) == (
        "partial",
        151,
        150,
        1,
        0,
    )
    _, items = job_state(backend, body["id"])
    assert [item.position for item in items] == list(range(151))
    assert all(item.enqueued_at is not None for item in items if item.sha256 is not None)


@pytest.fixture(params=["sqlite", "postgres"])
def sessions_of_its_own(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A migrated database of this test's own: the reaper closes every stale intake in it."""
    with own_database(request.param, tmp_path) as url:
        engine = make_engine(url)
        yield sessionmaker(engine, expire_on_commit=False)
        engine.dispose()


def test_a_chunk_after_the_reaper_closed_the_intake_is_refused_whole(
    sessions_of_its_own: sessionmaker[Session],
) -> None:
    sessions = sessions_of_its_own
    with sessions() as session:
        job_id = create_job(
            session, None, [IntakeEntry(f"{i}.jpg", sha256=f"{i}" * 64) for i in range(2)], receiving=True
        ).id
        add_items(session, job_id, [IntakeEntry("b.txt", error="unsupported file type")], 2)
        # Workers scored both scans while the intake was (slowly) still reading.
        now = utcnow()
        session.execute(
            update(Item)
            .where(Item.job_id == job_id, Item.status == ItemStatus.queued.value)
            .values(status=ItemStatus.succeeded.value, started_at=now, finished_at=now)
        )
        session.execute(update(Job).where(Job.id == job_id).values(done=2))
        session.commit()
        later = utcnow() + timedelta(seconds=601)
        assert [job.id for job in close_abandoned_intakes(session, stale_after_s=600, now=later)] == [job_id]

    def state() -> tuple[tuple, list[tuple]]:
        with sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None
            items = session.execute(
                select(Item.position, Item.filename, Item.status)
                .where(Item.job_id == job_id)
                .order_by(Item.position)
            ).all()
            return (job.status, job.total, job.done, job.failed, job.finished_at), [tuple(i) for i in items]

    closed = state()
    assert closed == (
        ("partial", 4, 2, 2, closed[0][4]),
        [
            (0, "0.jpg", "succeeded"),
            (1, "1.jpg", "succeeded"),
            (2, "b.txt", "failed"),
            (3, INTERRUPTED_INTAKE_NAME, "failed"),
        ],
    )
    assert closed[0][4] is not None

    # The intake was only slow: its next chunk comes now, and is refused whole.
    with sessions() as session, pytest.raises(IntakeClosed) as raised:
        add_items(session, job_id, [IntakeEntry("5.jpg", sha256="5" * 64), IntakeEntry("x", error="bad")], 3)
    assert raised.value.job_id == job_id and "submit the rest again" in str(raised.value)
    # Its error handling does not mark the closed job a second time either.
    with sessions() as session:
        assert interrupt_intake(session, job_id, "intake stopped after 3 item(s)") is None
    assert state() == closed  # items, counts, status and finished_at as the reaper left them
