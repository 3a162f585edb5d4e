"""Storage lifecycle against real databases (SQLite and PostgreSQL, migrated with Alembic):
retention and the per-job purge delete only what no live job references."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from brainscan.db import Item, ItemStatus, Job, JobStatus, make_engine
from brainscan.heatmaps import HeatmapStore
from brainscan.storage import JobNotFinished, PurgeReport, ScanStore, purge_expired, purge_job_scans
from tests.support.services import own_database

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
DAY = 86400


@pytest.fixture(params=["sqlite", "postgres"])
def database_of_its_own(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Retention purges every expired job in the database, so it must be this test's alone."""
    with own_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def session(database_of_its_own: str) -> Iterator[Session]:
    engine = make_engine(database_of_its_own)
    with sessionmaker(bind=engine, expire_on_commit=False)() as session:
        yield session
    engine.dispose()


def scan(store: ScanStore, name: str, days_old: float) -> str:
    """A stored scan with unique bytes, stored ``days_old`` ago."""
    sha = store.put_bytes(f"{name}-{uuid.uuid4()}".encode())
    then = time.time() - days_old * DAY
    os.utime(store.path_for(sha), (then, then))
    return sha


def job(
    session: Session, shas: list[str], *, finished_days_ago: float | None, created_days_ago: float
) -> Job:
    finished = finished_days_ago is not None
    row = Job(
        total=len(shas),
        status=JobStatus.succeeded.value if finished else JobStatus.running.value,
        source="test",
        created_at=NOW - timedelta(days=created_days_ago),
        finished_at=NOW - timedelta(days=finished_days_ago) if finished else None,
    )
    session.add(row)
    session.flush()
    for position, sha in enumerate(shas):
        session.add(
            Item(
                job_id=row.id,
                position=position,
                filename=f"scan{position}.png",
                sha256=sha,
                status=ItemStatus.succeeded.value if finished else ItemStatus.queued.value,
                label="glioma" if finished else None,
            )
        )
    session.commit()
    return row


def item_ids(session: Session, job_id: str) -> list[int]:
    return list(session.scalars(select(Item.id).where(Item.job_id == job_id).order_by(Item.position)))


def test_retention_removes_old_jobs_and_only_unreferenced_old_scans(session: Session, tmp_path: Path) -> None:
    store = ScanStore(tmp_path / "storage")
    heatmaps = HeatmapStore(store.root)
    only_old, shared, orphan, in_flight, recent_only, running_scan = (
        scan(store, "only-old", 45),
        scan(store, "shared", 45),
        scan(store, "orphan", 45),  # stored by an upload whose job was never written
        scan(store, "in-flight", 0),  # stored by an upload that has not committed its job yet
        scan(store, "recent", 45),
        scan(store, "running", 45),
    )
    old = job(session, [only_old, shared], finished_days_ago=40, created_days_ago=41)
    recent = job(session, [shared, recent_only], finished_days_ago=1, created_days_ago=1)
    running = job(session, [running_scan], finished_days_ago=None, created_days_ago=60)
    old_items, recent_items = item_ids(session, old.id), item_ids(session, recent.id)
    for item_id in old_items + recent_items:
        heatmaps.write(item_id, b"png")

    sizes = {sha: path.stat().st_size for sha, path in store.stored()}
    assert purge_expired(session, store, retention_days=0, now=NOW) == PurgeReport()  # 0 = keep for ever
    report = purge_expired(session, store, retention_days=30, now=NOW)

    assert (report.jobs, report.items, report.scans) == (1, 2, 2)
    assert report.scan_bytes == sizes[only_old] + sizes[orphan]
    assert session.get(Job, old.id) is None
    assert session.scalars(select(Item).where(Item.id.in_(old_items))).all() == []
    assert {j.id for j in session.scalars(select(Job).where(Job.id.in_([recent.id, running.id])))} == {
        recent.id,
        running.id,
    }
    kept = {shared, in_flight, recent_only, running_scan}
    assert {sha for sha, _ in store.stored()} == kept
    assert not any(heatmaps.png_path(i).exists() for i in old_items)
    assert all(heatmaps.png_path(i).exists() for i in recent_items)
    # Once the recent job is old too, its scans go; the running job's scan never does.
    later = purge_expired(session, store, retention_days=30, now=NOW + timedelta(days=31))
    assert (later.jobs, later.scans) == (1, 3)  # recent job; shared, recent-only, in-flight (now old)
    assert {sha for sha, _ in store.stored()} == {running_scan}


def test_purging_a_job_keeps_scans_another_job_holds(session: Session, tmp_path: Path) -> None:
    store = ScanStore(tmp_path / "storage")
    heatmaps = HeatmapStore(store.root)
    own, shared, busy = scan(store, "own", 0), scan(store, "shared", 0), scan(store, "busy", 0)
    purged = job(session, [own, shared, own], finished_days_ago=0, created_days_ago=0)
    other = job(session, [shared], finished_days_ago=0, created_days_ago=0)
    running = job(session, [busy], finished_days_ago=None, created_days_ago=0)
    for item_id in item_ids(session, purged.id):
        heatmaps.write(item_id, b"png")

    report = purge_job_scans(session, store, purged.id)

    assert (report.jobs, report.items, report.scans) == (0, 0, 1)
    assert not store.exists(own) and store.exists(shared) and store.exists(busy)
    items = session.scalars(select(Item).where(Item.job_id == purged.id)).all()
    assert [(i.sha256, i.label) for i in items] == [(None, "glioma")] * 3  # results stay, scans gone
    assert session.scalars(select(Item.sha256).where(Item.job_id == other.id)).all() == [shared]
    assert not any(heatmaps.png_path(i.id).exists() for i in items)
    with pytest.raises(JobNotFinished):
        purge_job_scans(session, store, running.id)
    assert store.exists(busy)
    with pytest.raises(LookupError):
        purge_job_scans(session, store, str(uuid.uuid4()))
