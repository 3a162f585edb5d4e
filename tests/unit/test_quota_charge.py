"""What intake charges a key's daily quotas (brainscan.quotas, brainscan.intake.expansion.UploadCharge).

Real SQLite file, real scan store, real ``submit_job`` (the broker is a recorder: no message matters
here). Every item counts toward the scan quota, failed or not, and each uploaded file costs the
larger of its bytes received and the scan bytes it stored, committed in chunks or not.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from brainscan.auth import create_key
from brainscan.db import Item
from brainscan.intake import IntakeLimits, submit_job
from brainscan.quotas import Usage, quota_exceeded, usage_today
from brainscan.storage import ScanStore
from tests.support.archives import make_tar, make_zip
from tests.support.images import make_jpeg
from tests.support.intake import ROOMY_LIMITS

LIMITS = ROOMY_LIMITS


@pytest.fixture
def key_id(sqlite_sessions: sessionmaker[Session]) -> int:
    with sqlite_sessions() as session:
        key, _plaintext = create_key(session, "quota-test")
        session.commit()
        return key.id


def submit(
    sqlite_sessions: sessionmaker[Session],
    tmp_path: Path,
    key_id: int,
    files: dict[str, bytes],
    *,
    limits: IntakeLimits = LIMITS,
    chunk: int = 64,
) -> list[Item]:
    """Upload ``files`` (name: bytes) as one job; its items in order."""
    paths = []
    for index, (name, data) in enumerate(files.items()):
        path = tmp_path / f"upload-{index}"
        path.write_bytes(data)
        paths.append((path, name))
    store = ScanStore(tmp_path / "store")
    with sqlite_sessions() as session:
        job = submit_job(
            session,
            store,
            limits,
            key_id,
            paths,
            enqueue=lambda _job: True,
            notify=lambda _ids: None,
            chunk=chunk,
        ).job
        return list(session.scalars(select(Item).where(Item.job_id == job.id).order_by(Item.position)))


def usage(sqlite_sessions: sessionmaker[Session], key_id: int) -> Usage:
    with sqlite_sessions() as session:
        return usage_today(session, key_id)


def stored_bytes(items: list[Item], sizes: dict[str, int]) -> int:
    return sum(sizes[item.filename] for item in items if item.sha256 is not None)


def test_a_refused_file_costs_its_size_and_one_item(
    sqlite_sessions: sessionmaker[Session], tmp_path: Path, key_id: int
) -> None:
    items = submit(sqlite_sessions, tmp_path, key_id, {"notes.txt": b"x" * 5000})
    assert [(item.status, item.size_bytes) for item in items] == [("failed", 5000)]
    assert usage(sqlite_sessions, key_id) == Usage(scans=1, bytes=5000)
    # A JPEG whose header is refused before anything is stored costs its size too.
    bad = b"\xff\xd8\xff" + b"\x00" * 3000
    items = submit(sqlite_sessions, tmp_path, key_id, {"bad.jpg": bad})
    assert [(item.status, item.size_bytes) for item in items] == [("failed", len(bad))]
    assert usage(sqlite_sessions, key_id) == Usage(scans=2, bytes=5000 + len(bad))


def test_a_stored_scan_costs_its_size_as_before(
    sqlite_sessions: sessionmaker[Session], tmp_path: Path, key_id: int
) -> None:
    scan = make_jpeg(1)
    items = submit(sqlite_sessions, tmp_path, key_id, {"a.jpg": scan, "junk.bin": b"\x00" * 700})
    assert [(item.status, item.size_bytes) for item in items] == [("queued", len(scan)), ("failed", 700)]
    assert usage(sqlite_sessions, key_id) == Usage(scans=2, bytes=len(scan) + 700)


@pytest.mark.parametrize("chunk", [64, 4])  # 4: the archive's items are committed in chunks
def test_an_archive_costs_the_larger_of_its_size_and_the_scans_it_stored(
    sqlite_sessions: sessionmaker[Session], tmp_path: Path, key_id: int, chunk: int
) -> None:
    members = {f"s/{i:02d}.jpg": make_jpeg(i) for i in range(10)}
    members["s/notes.txt"] = b"not a scan" * 100
    archive = make_zip(members)
    items = submit(sqlite_sessions, tmp_path, key_id, {"a.zip": archive}, chunk=chunk)
    sizes = {f"a.zip/{name}": len(data) for name, data in members.items()}
    assert len(items) == 11 and items[-1].status == "failed"
    assert sum(item.size_bytes or 0 for item in items) == max(len(archive), stored_bytes(items, sizes))
    # An archive of nothing usable costs its size, however its members failed.
    junk = make_zip({f"j/{i}.txt": b"y" * 2000 for i in range(5)})
    failed = submit(sqlite_sessions, tmp_path, key_id, {"junk.zip": junk}, chunk=chunk)
    assert [item.status for item in failed] == ["failed"] * 5
    assert sum(item.size_bytes or 0 for item in failed) == len(junk)
    assert usage(sqlite_sessions, key_id).scans == 16


@pytest.mark.parametrize(("chunk", "kept"), [(64, 0), (4, 8)])
def test_a_tar_refused_half_way_still_costs_its_size(
    sqlite_sessions: sessionmaker[Session], tmp_path: Path, key_id: int, chunk: int, kept: int
) -> None:
    """A tar stream over the entry limit: its entries after the last commit are dropped (no items;
    with no commit yet, all of them, the one charged the upload's size included), and what the
    remaining items are charged still adds up to the upload's size."""
    members = {f"{i:02d}.jpg": make_jpeg(i) for i in range(30)}
    archive = make_tar(members)
    limits = IntakeLimits(**{**LIMITS.__dict__, "max_archive_entries": 10})
    items = submit(sqlite_sessions, tmp_path, key_id, {"big.tar": archive}, limits=limits, chunk=chunk)
    assert [item.status for item in items] == ["queued"] * kept + ["failed"]
    assert "BRAINSCAN_MAX_ARCHIVE_ENTRIES" in (items[-1].error or "")
    sizes = {f"big.tar/{name}": len(data) for name, data in members.items()}
    assert sum(item.size_bytes or 0 for item in items) == max(len(archive), stored_bytes(items, sizes))


def test_failed_items_and_refused_bytes_reach_the_quotas(
    sqlite_sessions: sessionmaker[Session], tmp_path: Path, key_id: int
) -> None:
    for _ in range(3):
        submit(sqlite_sessions, tmp_path, key_id, {"notes.txt": b"z" * 1000})
    with sqlite_sessions() as session:
        by_scans = quota_exceeded(session, key_id, scans_per_day=3, bytes_per_day=0)
        by_bytes = quota_exceeded(session, key_id, scans_per_day=0, bytes_per_day=3000)
        under = quota_exceeded(session, key_id, scans_per_day=4, bytes_per_day=3001)
        tomorrow = datetime.now(UTC) + timedelta(days=1)
        next_day = quota_exceeded(session, key_id, scans_per_day=3, bytes_per_day=3000, now=tomorrow)
    assert by_scans is not None and by_scans.reason == (
        "daily quota reached: 3 scans per UTC day (BRAINSCAN_QUOTA_SCANS_PER_DAY)"
    )
    assert by_bytes is not None and by_bytes.reason == (
        "daily quota reached: 3000 upload bytes per UTC day (BRAINSCAN_QUOTA_BYTES_PER_DAY)"
    )
    assert under is None and next_day is None
