"""A scan that cannot be read is told apart from a scan that is gone (``ScanStore.read``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainscan.storage import ScanStore, StorageUnavailable


def test_a_missing_scan_in_a_readable_store_is_the_scans_own_problem(tmp_path: Path) -> None:
    store = ScanStore(tmp_path)
    store.put_bytes(b"another scan")
    with pytest.raises(FileNotFoundError) as caught:
        store.read("0" * 64)
    assert not isinstance(caught.value, StorageUnavailable)


def test_a_store_without_its_scans_folder_is_unavailable(tmp_path: Path) -> None:
    store = ScanStore(tmp_path / "not-mounted")
    with pytest.raises(StorageUnavailable, match=r"^FileNotFoundError: no scans folder"):
        store.read("0" * 64)


def test_an_io_error_reading_a_scan_is_unavailable_storage(tmp_path: Path) -> None:
    store = ScanStore(tmp_path)
    sha = store.put_bytes(b"a scan")
    path = store.path_for(sha)
    path.unlink()
    path.mkdir()  # reading it fails with an OSError that is not "no such file" (as EIO or EACCES do)
    with pytest.raises(StorageUnavailable, match=r"^IsADirectoryError: cannot read the storage"):
        store.read(sha)
