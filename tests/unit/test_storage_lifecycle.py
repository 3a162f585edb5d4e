"""Scan storage without a database: content addressing, renewal on re-store, the tmp sweep."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from brainscan.storage import ScanStore, sweep_tmp


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_sweep_removes_leftovers_and_keeps_live_temporary_files(tmp_path: Path) -> None:
    store = ScanStore(tmp_path / "storage")
    store.tmp_dir.mkdir(parents=True)
    leftovers = [store.tmp_dir / "upload-abc", store.tmp_dir / "tmpx1y2.nii"]
    for path, size in zip(leftovers, (1000, 5000), strict=True):
        path.write_bytes(b"\0" * size)
        age(path, 2 * 3600)
    live = store.tmp_dir / "upload-live"
    live.write_bytes(b"being written")
    stored = store.put_bytes(b"a stored scan")
    age(store.path_for(stored), 10 * 86400)  # old, but a scan: never the sweep's business
    outside = tmp_path / "outside"
    outside.write_bytes(b"not ours")
    link = store.tmp_dir / "link"
    link.symlink_to(outside)
    os.utime(link, (time.time() - 7200,) * 2, follow_symlinks=False)

    link_size = link.lstat().st_size

    report = sweep_tmp(store)

    assert (report.files, report.bytes) == (3, 6000 + link_size)
    assert not any(path.exists() for path in leftovers) and not link.is_symlink()
    assert live.read_bytes() == b"being written"
    assert outside.read_bytes() == b"not ours"  # a link is removed, never followed
    assert store.read(stored) == b"a stored scan"


def test_sweep_at_start_up_removes_everything_and_tolerates_a_missing_dir(tmp_path: Path) -> None:
    store = ScanStore(tmp_path / "storage")
    assert sweep_tmp(store).files == 0  # nothing there yet
    store.tmp_dir.mkdir(parents=True)
    (store.tmp_dir / "upload-1").write_bytes(b"x" * 10)
    (store.tmp_dir / "nested").mkdir()
    (store.tmp_dir / "nested" / "tmp.bin").write_bytes(b"y" * 5)
    report = sweep_tmp(store, older_than=timedelta(0))
    assert (report.files, report.bytes) == (2, 15)
    assert list(store.tmp_dir.iterdir()) == []


def test_storing_the_same_bytes_again_renews_the_scan_and_keeps_one_copy(tmp_path: Path) -> None:
    store = ScanStore(tmp_path / "storage")
    sha = store.put_bytes(b"scan bytes")
    path = store.path_for(sha)
    age(path, 40 * 86400)
    old = path.stat().st_mtime
    assert store.put_chunks([b"scan ", b"bytes"]) == (sha, 10)
    assert path.stat().st_mtime > old + 30 * 86400  # retention now sees it as just stored
    assert [s for s, _ in store.stored()] == [sha]
    assert list(store.tmp_dir.iterdir()) == []
    assert not hasattr(store, "put_file")  # one way to store: put_bytes / put_chunks
