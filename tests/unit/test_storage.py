"""brainscan/storage.py: content-addressed scan storage on a real folder."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from brainscan.storage import ScanStore

SCAN = b"\xff\xd8\xff\xe0 a scan's bytes \x00\r\n" * 100
SCAN_SHA = hashlib.sha256(SCAN).hexdigest()


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "scans").rglob("*") if p.is_file()) if (root / "scans").exists() else []


def tmp_files(store: ScanStore) -> list[str]:
    return sorted(p.name for p in store.tmp_dir.iterdir()) if store.tmp_dir.exists() else []


# ---- content addressing ------------------------------------------------------------------------
def test_the_path_is_the_sha256_fanned_out_by_its_first_bytes(tmp_path: Path) -> None:
    store = ScanStore(tmp_path)
    assert store.path_for(SCAN_SHA) == tmp_path / "scans" / SCAN_SHA[:2] / SCAN_SHA[2:4] / SCAN_SHA


def test_put_bytes_returns_the_sha256_and_stores_the_bytes_there(tmp_path: Path) -> None:
    store = ScanStore(tmp_path)
    assert not store.exists(SCAN_SHA)
    assert store.put_bytes(SCAN) == SCAN_SHA
    assert store.exists(SCAN_SHA)
    assert store.read(SCAN_SHA) == SCAN
    assert stored_files(tmp_path) == [store.path_for(SCAN_SHA)]
    assert tmp_files(store) == []  # written to tmp/, then renamed into place


def test_put_chunks_hashes_while_writing_and_agrees_with_put_bytes(tmp_path: Path) -> None:
    store = ScanStore(tmp_path)
    chunks = [SCAN[i : i + 333] for i in range(0, len(SCAN), 333)]
    assert store.put_chunks(iter(chunks)) == (SCAN_SHA, len(SCAN))
    assert store.read(SCAN_SHA) == SCAN
    assert store.put_bytes(SCAN) == SCAN_SHA  # the same content, the same address
    assert stored_files(tmp_path) == [store.path_for(SCAN_SHA)]
    assert tmp_files(store) == []


def test_empty_content_has_the_empty_sha256(tmp_path: Path) -> None:
    store = ScanStore(tmp_path)
    empty = hashlib.sha256(b"").hexdigest()
    assert store.put_chunks(iter([])) == (empty, 0)
    assert store.put_bytes(b"") == empty
    assert store.read(empty) == b""


def test_different_bytes_get_different_files(tmp_path: Path) -> None:
    store = ScanStore(tmp_path)
    first, second = store.put_bytes(b"scan one"), store.put_bytes(b"scan two")
    assert first != second
    assert (store.read(first), store.read(second)) == (b"scan one", b"scan two")
    assert stored_files(tmp_path) == sorted([store.path_for(first), store.path_for(second)])


# ---- idempotent put ----------------------------------------------------------------------------
def test_storing_the_same_bytes_twice_keeps_one_copy_with_a_fresh_time(tmp_path: Path) -> None:
    store = ScanStore(tmp_path)
    sha = store.put_bytes(SCAN)
    path = store.path_for(sha)
    long_ago = 946_684_800  # 2000-01-01: a copy retention would consider old
    os.utime(path, (long_ago, long_ago))
    assert store.put_bytes(SCAN) == sha
    assert path.stat().st_mtime > long_ago  # renewed: retention leaves a scan just stored again alone
    os.utime(path, (long_ago, long_ago))
    assert store.put_chunks([SCAN[:10], SCAN[10:]]) == (sha, len(SCAN))
    assert path.stat().st_mtime > long_ago
    assert store.read(sha) == SCAN
    assert stored_files(tmp_path) == [path]  # one copy
    assert tmp_files(store) == []  # nothing left in tmp/


def test_two_stores_on_one_folder_share_the_content(tmp_path: Path) -> None:
    sha = ScanStore(tmp_path).put_bytes(SCAN)
    assert ScanStore(tmp_path).read(sha) == SCAN  # an API process writes, a worker reads


# ---- a stream that fails -------------------------------------------------------------------------
class StreamCut(Exception):
    pass


def test_a_stream_that_raises_stores_nothing(tmp_path: Path) -> None:
    store = ScanStore(tmp_path)

    def chunks() -> Iterator[bytes]:
        yield b"first part of a scan"
        raise StreamCut("over the per-file cap")

    with pytest.raises(StreamCut, match="over the per-file cap"):
        store.put_chunks(chunks())
    assert stored_files(tmp_path) == []
    assert tmp_files(store) == []
    assert not store.exists(hashlib.sha256(b"first part of a scan").hexdigest())


# ---- nothing but a digest names a path -----------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "..",
        "",
        SCAN_SHA.upper(),  # the store writes lower-case hex only
        SCAN_SHA[:-1],  # 63 digits
        SCAN_SHA + "0",  # 65 digits
        SCAN_SHA[:62] + "/.",
        "../" + SCAN_SHA[3:],
        SCAN_SHA[:63] + "g",  # not hex
        "scan.jpg",
    ],
)
def test_anything_but_a_sha256_is_refused_as_a_path(tmp_path: Path, name: str) -> None:
    store = ScanStore(tmp_path)
    for use in (store.path_for, store.exists, store.read):
        with pytest.raises(ValueError, match=r"^not a SHA-256 hex digest$"):
            use(name)


def test_a_digest_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^not a SHA-256 hex digest$"):
        ScanStore(tmp_path).path_for(SCAN_SHA + "\n")


def test_every_path_stays_inside_the_store(tmp_path: Path) -> None:
    store = ScanStore(tmp_path / "store")
    for data in (b"a", b"b" * 1000, SCAN):
        path = store.path_for(store.put_bytes(data)).resolve()
        assert path.is_relative_to((tmp_path / "store" / "scans").resolve())
