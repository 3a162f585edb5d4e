"""Intake in committed chunks (brainscan.intake.submit, brainscan.jobs) on a real SQLite file.

The broker is replaced by a recorder here (the integration tests in
tests/integration/test_chunked_intake.py use a real one and a real worker): what matters is the
order of commits and sends, which the recorder reads back from the database at each send.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from brainscan.db import Item, ItemStatus, Job, JobStatus
from brainscan.intake import submit_job
from brainscan.jobs import (
    INTERRUPTED_INTAKE_NAME,
    IntakeClosed,
    IntakeEntry,
    add_items,
    close_abandoned_intakes,
    close_intake,
    create_job,
)
from brainscan.storage import ScanStore
from tests.support.archives import make_tar, make_zip
from tests.support.images import make_jpeg
from tests.support.intake import ROOMY_LIMITS

LIMITS = ROOMY_LIMITS


@pytest.fixture
def store(tmp_path: Path) -> ScanStore:
    return ScanStore(tmp_path / "store")


def upload(tmp_path: Path, name: str, members: dict[str, bytes]) -> tuple[Path, str]:
    path = tmp_path / f"upload-{name}"
    path.write_bytes(make_zip(members))
    return path, name


class Recorder:
    """``enqueue`` for submit_job: what the database held for the job each time it was called."""

    def __init__(self, sessions: sessionmaker[Session], answer: bool = True) -> None:
        self.sessions = sessions
        self.answer = answer
        self.calls: list[tuple[str, int, int]] = []  # (job status, committed items, job total)

    def __call__(self, job_id: str) -> bool:
        with self.sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None
            items = session.scalars(select(Item.id).where(Item.job_id == job_id)).all()
            self.calls.append((job.status, len(items), job.total))
        return self.answer


def test_archive_is_committed_and_enqueued_chunk_by_chunk(
    sqlite_sessions: sessionmaker[Session], store: ScanStore, tmp_path: Path
) -> None:
    members = {f"s/{i:03d}.jpg": make_jpeg(i) for i in range(150)}
    members["s/notes.txt"] = b"not a scan"
    recorder = Recorder(sqlite_sessions)
    with sqlite_sessions() as session:
        result = submit_job(
            session,
            store,
            LIMITS,
            None,
            [upload(tmp_path, "a.zip", members)],
            enqueue=recorder,
            notify=lambda ids: None,
            chunk=64,
        )
    # Each send came after its chunk's commit, while the job was still receiving and growing.
    assert recorder.calls == [("receiving", 64, 64), ("receiving", 128, 128), ("receiving", 151, 151)]
    assert result.enqueued is True
    with sqlite_sessions() as session:
        job = session.get(Job, result.job.id)
        assert (job.status, job.total, job.failed, job.finished_at) == ("queued", 151, 1, None)
        items = session.scalars(select(Item).where(Item.job_id == job.id).order_by(Item.position)).all()
        assert [item.position for item in items] == list(range(151))
        assert [item.filename for item in items[:2]] == ["a.zip/s/000.jpg", "a.zip/s/001.jpg"]
        assert items[-1].status == "failed" and items[-1].error.startswith("unsupported")
        assert all(item.sha256 and store.exists(item.sha256) for item in items[:-1])
        # The quota charge (brainscan.quotas): the larger of the upload's size and the scans stored,
        # spread over items committed in three chunks.
        stored = sum(len(data) for name, data in members.items() if name.endswith(".jpg"))
        uploaded = (tmp_path / "upload-a.zip").stat().st_size
        assert sum(item.size_bytes for item in items) == max(uploaded, stored)


def test_broker_down_stops_sending_but_stores_everything(
    sqlite_sessions: sessionmaker[Session], store: ScanStore, tmp_path: Path
) -> None:
    recorder = Recorder(sqlite_sessions, answer=False)
    members = {f"{i}.jpg": make_jpeg(i) for i in range(10)}
    with sqlite_sessions() as session:
        result = submit_job(
            session, store, LIMITS, None, [upload(tmp_path, "b.zip", members)],
            enqueue=recorder, notify=lambda ids: None, chunk=4,
        )  # fmt: skip
    assert result.enqueued is False
    assert len(recorder.calls) == 1  # one failed send; the reaper sends the rest
    with sqlite_sessions() as session:
        assert session.get(Job, result.job.id).total == 10


def test_every_file_failed_is_final_at_intake_and_notifies(
    sqlite_sessions: sessionmaker[Session], store: ScanStore, tmp_path: Path
) -> None:
    notified: list[str] = []
    recorder = Recorder(sqlite_sessions)
    path = tmp_path / "junk"
    path.write_bytes(b"plain text")
    with sqlite_sessions() as session:
        result = submit_job(
            session, store, LIMITS, None, [(path, "junk.txt")],
            enqueue=recorder, notify=notified.extend, callback_url="http://hooks.invalid/x",
        )  # fmt: skip
    assert (result.job.status, result.job.total, result.job.failed) == ("failed", 1, 1)
    assert result.job.finished_at is not None
    assert recorder.calls == [] and notified == [result.job.id]


def test_storage_failure_mid_intake_leaves_a_job_that_says_so(
    sqlite_sessions: sessionmaker[Session], store: ScanStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = 0
    real_put = ScanStore.put_chunks

    def failing_put(self: ScanStore, chunks):  # type: ignore[no-untyped-def]
        nonlocal stored
        if stored == 5:
            raise OSError(28, "No space left on device")
        stored += 1
        return real_put(self, chunks)

    monkeypatch.setattr(ScanStore, "put_chunks", failing_put)
    members = {f"{i}.jpg": make_jpeg(i) for i in range(8)}
    with sqlite_sessions() as session, pytest.raises(OSError) as raised:
        submit_job(
            session, store, LIMITS, None, [upload(tmp_path, "c.zip", members)],
            enqueue=Recorder(sqlite_sessions), notify=lambda ids: None, chunk=2,
        )  # fmt: skip
    assert raised.value.errno == 28  # the caller still sees the real error (the API answers 503)
    with sqlite_sessions() as session:
        job = session.scalars(select(Job)).one()
        items = session.scalars(select(Item).where(Item.job_id == job.id).order_by(Item.position)).all()
    # The 4 items committed before the failure stay (and are scored); one more item says why the
    # rest is missing. The job is no longer receiving: workers close it when the 4 are final.
    assert (job.status, job.total, job.failed) == ("queued", 5, 1)
    assert [item.status for item in items] == ["queued"] * 4 + ["failed"]
    assert items[-1].filename == INTERRUPTED_INTAKE_NAME
    assert "OSError" in items[-1].error and "submit it again" in items[-1].error
    assert "No space" not in items[-1].error


def finish(session: Session, job_id: str, status: str = ItemStatus.succeeded.value) -> None:
    """What a worker does to every open item of the job (counts included)."""
    now = datetime.now(UTC)
    changed = session.execute(
        update(Item)
        .where(Item.job_id == job_id, Item.status == ItemStatus.queued.value)
        .values(status=status, started_at=now, finished_at=now)
    ).rowcount
    column = "done" if status == ItemStatus.succeeded.value else "failed"
    session.execute(update(Job).where(Job.id == job_id).values({column: getattr(Job, column) + changed}))
    session.commit()


def test_close_intake_closes_a_job_whose_items_are_all_final(sqlite_sessions: sessionmaker[Session]) -> None:
    with sqlite_sessions() as session:
        job = create_job(session, None, [IntakeEntry("a.jpg", sha256="a" * 64, size=3)], receiving=True)
        assert job.status == JobStatus.receiving.value
        add_items(session, job.id, [IntakeEntry("b.txt", error="unsupported file type")], 1)
        finish(session, job.id)  # workers finished everything before intake ended
        closed = close_intake(session, job.id)
        assert closed is not None
        assert (closed.status, closed.total, closed.done, closed.failed) == ("partial", 2, 1, 1)
        assert closed.finished_at is not None and closed.started_at is not None
        assert close_intake(session, job.id) is None  # only a receiving job closes its intake


def test_close_intake_of_a_job_being_scored_is_running(sqlite_sessions: sessionmaker[Session]) -> None:
    with sqlite_sessions() as session:
        job = create_job(
            session, None, [IntakeEntry(f"{i}.jpg", sha256="b" * 64) for i in range(3)], receiving=True
        )
        session.execute(
            update(Item)
            .where(Item.job_id == job.id, Item.position == 0)
            .values(status="running", started_at=datetime.now(UTC))
        )
        session.commit()
        closed = close_intake(session, job.id)
        assert closed is not None
        assert (closed.status, closed.finished_at) == ("running", None)
        assert closed.started_at is not None


def test_add_items_to_a_job_no_longer_receiving_writes_nothing(
    sqlite_sessions: sessionmaker[Session],
) -> None:
    with sqlite_sessions() as session:
        job_id = create_job(session, None, [IntakeEntry("a.jpg", sha256="e" * 64)], receiving=True).id
        close_intake(session, job_id)
        with pytest.raises(IntakeClosed):
            add_items(session, job_id, [IntakeEntry("b.jpg", sha256="f" * 64)], 1)
    job, items = job_items(sqlite_sessions, job_id)
    assert (job.status, job.total, job.failed) == ("queued", 1, 0)
    assert [item.filename for item in items] == ["a.jpg"]


def test_reaper_marks_only_stale_intakes(sqlite_sessions: sessionmaker[Session]) -> None:
    with sqlite_sessions() as session:
        stale = create_job(
            session,
            None,
            [IntakeEntry("a.jpg", sha256="c" * 64)],
            callback_url="http://x.invalid/",
            receiving=True,
        )
        finish(session, stale.id)
        fresh = create_job(session, None, [], receiving=True)
        done_receiving = create_job(session, None, [IntakeEntry("x.jpg", sha256="d" * 64)], receiving=True)
        close_intake(session, done_receiving.id)
        # Ten minutes later: only `stale` and `fresh` are still receiving with no new item.
        later = datetime.now(UTC) + timedelta(seconds=601)
        assert close_abandoned_intakes(session, stale_after_s=600, now=datetime.now(UTC)) == []
        closed = close_abandoned_intakes(session, stale_after_s=600, now=later)
        assert sorted(job.id for job in closed) == sorted([stale.id, fresh.id])
        by_id = {job.id: job for job in closed}
        # The stale job's one scan was scored: it ends partial, with the reason on an extra item.
        assert (by_id[stale.id].status, by_id[stale.id].total, by_id[stale.id].failed) == ("partial", 2, 1)
        assert (by_id[fresh.id].status, by_id[fresh.id].total) == ("failed", 1)
        reason = session.scalars(
            select(Item.error).where(Item.job_id == stale.id, Item.filename == INTERRUPTED_INTAKE_NAME)
        ).one()
        assert "1 item(s) were stored" in reason and "submit it again" in reason
        assert session.get(Job, done_receiving.id).status == "queued"


def job_items(sqlite_sessions: sessionmaker[Session], job_id: str) -> tuple[Job, list[Item]]:
    with sqlite_sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        items = session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.position)).all()
        return job, list(items)


def submit_big_tar(
    sqlite_sessions: sessionmaker[Session],
    store: ScanStore,
    tmp_path: Path,
    *,
    chunk: int,
    then: tuple[tuple[Path, str], ...] = (),
    enqueue: Recorder | None = None,
    **limits: int,
) -> tuple[Job, list[Item], Job]:
    """A 15-entry tar against an entry limit of 10 (and ``limits``), then the uploads ``then``:
    (the job as stored, its items by position, the job ``submit_job`` returned)."""
    tar = tmp_path / "big.tar"
    tar.write_bytes(make_tar({f"{i:02d}.jpg": make_jpeg(i) for i in range(15)}))
    limited = replace(LIMITS, max_archive_entries=10, **limits)
    with sqlite_sessions() as session:
        result = submit_job(
            session, store, limited, None, [(tar, "big.tar"), *then],
            enqueue=enqueue or Recorder(sqlite_sessions), notify=lambda ids: None, chunk=chunk,
        )  # fmt: skip
    job, items = job_items(sqlite_sessions, result.job.id)
    return job, items, result.job


def test_tar_found_over_the_entry_limit_keeps_the_chunks_already_committed(
    sqlite_sessions: sessionmaker[Session], store: ScanStore, tmp_path: Path
) -> None:
    recorder = Recorder(sqlite_sessions)
    job, items, returned = submit_big_tar(sqlite_sessions, store, tmp_path, chunk=4, enqueue=recorder)
    # A tar is read once: the two chunks committed before the 11th entry stay (they may be scored
    # already); entries 9-10 were not committed and are dropped; one failed item says why.
    assert recorder.calls[:2] == [("receiving", 4, 4), ("receiving", 8, 8)]
    assert [item.position for item in items] == list(range(9))
    assert [item.filename for item in items] == [f"big.tar/{i:02d}.jpg" for i in range(8)] + ["big.tar"]
    assert [item.status for item in items] == ["queued"] * 8 + ["failed"]
    assert items[-1].error == (
        "archive has more than 10 entries (BRAINSCAN_MAX_ARCHIVE_ENTRIES): its first 8 item(s) were "
        "stored before that was found and are scored, the rest of it was not read; split it"
    )
    assert (job.status, job.total, job.failed) == ("queued", 9, 1)
    assert (returned.total, returned.failed) == (9, 1)


def test_tar_over_the_entry_limit_half_way_never_lets_the_job_pass_its_item_limit(
    sqlite_sessions: sessionmaker[Session], store: ScanStore, tmp_path: Path
) -> None:
    """The committed part of the tar counts against max_items_per_job for the files after it."""
    more = upload(tmp_path, "more.zip", {f"{i}.jpg": make_jpeg(100 + i) for i in range(10)})
    job, items, returned = submit_big_tar(
        sqlite_sessions, store, tmp_path, chunk=4, then=(more,), max_items_per_job=12
    )
    # 8 committed tar scans + its reason + 3 scans of more.zip = 12 (the limit), then the one
    # explanatory item over it; positions dense, the job's counts equal its rows.
    assert [item.position for item in items] == list(range(13))
    assert [item.filename for item in items[8:]] == [
        "big.tar",
        "more.zip/0.jpg",
        "more.zip/1.jpg",
        "more.zip/2.jpg",
        "more.zip/3.jpg",
    ]
    assert [item.status for item in items] == ["queued"] * 8 + ["failed"] + ["queued"] * 3 + ["failed"]
    assert "more than 10 entries" in items[8].error and "the rest of it was not read" in items[8].error
    assert items[-1].error.startswith("not read: the job reached its limit of 12 scans")
    assert (job.total, job.failed) == (len(items), 2) == (returned.total, returned.failed)


def test_tar_over_the_entry_limit_in_a_full_job_says_both(
    sqlite_sessions: sessionmaker[Session], store: ScanStore, tmp_path: Path
) -> None:
    after = upload(tmp_path, "after.zip", {"a.jpg": make_jpeg(99)})
    job, items, _ = submit_big_tar(
        sqlite_sessions, store, tmp_path, chunk=5, then=(after,), max_items_per_job=10
    )
    # All 10 scans were committed when the 11th entry was found: the reason is the one item over
    # the limit, and nothing of after.zip is read.
    assert [item.position for item in items] == list(range(11))
    assert [item.status for item in items] == ["queued"] * 10 + ["failed"]
    assert items[-1].filename == "big.tar"
    assert items[-1].error == (
        "archive has more than 10 entries (BRAINSCAN_MAX_ARCHIVE_ENTRIES): its first 10 item(s) were "
        "stored before that was found and are scored, the rest of it was not read; split it; the job "
        "reached its limit of 10 scans (BRAINSCAN_MAX_ITEMS_PER_JOB): submit the rest as another job"
    )
    assert (job.total, job.failed) == (11, 1)


def test_a_slow_intake_closed_by_the_reaper_stops_with_a_clean_error(
    sqlite_sessions: sessionmaker[Session], store: ScanStore, tmp_path: Path
) -> None:
    first = upload(tmp_path, "first.zip", {f"{i}.jpg": make_jpeg(i) for i in range(4)})
    second = upload(tmp_path, "second.zip", {f"{i}.jpg": make_jpeg(50 + i) for i in range(4)})
    closed: list[Job] = []

    def slow_upload() -> Iterator[tuple[Path, str]]:
        yield first
        # Between two files (no timing involved): the reaper runs as if stale_after_s had passed
        # and takes this live but slow intake for a dead one.
        with sqlite_sessions() as session:
            later = datetime.now(UTC) + timedelta(seconds=601)
            closed.extend(close_abandoned_intakes(session, stale_after_s=600, now=later))
        yield second

    with sqlite_sessions() as session, pytest.raises(IntakeClosed) as raised:
        submit_job(
            session, store, LIMITS, None, slow_upload(),  # type: ignore[arg-type]
            enqueue=Recorder(sqlite_sessions), notify=lambda ids: None, chunk=4,
        )  # fmt: skip
    assert len(closed) == 1
    job_id = closed[0].id
    assert raised.value.job_id == job_id
    assert "submit the rest again" in str(raised.value) and "BRAINSCAN_STALE_AFTER_S" in str(raised.value)
    assert str(tmp_path) not in str(raised.value)
    job, items = job_items(sqlite_sessions, job_id)
    # As the reaper left it: the first chunk, then its one reason item; nothing of second.zip and
    # no second "interrupted" item from the intake's own error handling.
    assert (job.status, job.total, job.failed, job.finished_at) == ("queued", 5, 1, None)
    assert [item.position for item in items] == list(range(5))
    assert [item.filename for item in items] == [f"first.zip/{i}.jpg" for i in range(4)] + [
        INTERRUPTED_INTAKE_NAME
    ]
    assert "4 item(s) were stored" in items[-1].error


def test_an_upload_smaller_than_a_chunk_is_one_transaction_never_receiving(
    sqlite_sessions: sessionmaker[Session], store: ScanStore, tmp_path: Path
) -> None:
    recorder = Recorder(sqlite_sessions)
    members = {"a.jpg": make_jpeg(1), "b.jpg": make_jpeg(2)}
    with sqlite_sessions() as session:
        result = submit_job(
            session, store, LIMITS, None, [upload(tmp_path, "small.zip", members)],
            enqueue=recorder, notify=lambda ids: None, chunk=64,
        )  # fmt: skip
    assert recorder.calls == [("queued", 2, 2)]
    assert (result.job.status, result.job.total) == ("queued", 2)
