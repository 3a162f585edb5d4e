"""Property-based tests of archive expansion: whatever the names and sizes, nothing escapes the store."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brainscan.intake import MAX_FILENAME_CHARS, IntakeLimits, expand_uploads
from brainscan.storage import ScanStore

# zipfile warns when the same member name is written twice; duplicates are part of the input space.
pytestmark = pytest.mark.filterwarnings("ignore:Duplicate name")

JPEG_MAGIC = b"\xff\xd8\xff\xe0"
LIMITS = IntakeLimits(
    max_archive_entries=12,
    max_expanded_bytes=40_000,
    max_scan_bytes=6_000,
    max_image_pixels=1_000_000,
    max_items_per_job=1000,
)

name_parts = st.one_of(
    st.sampled_from(["..", ".", "", "/", "etc", "passwd", "C:", "\\..\\", "scan.jpg", "__MACOSX", "._x"]),
    st.text(min_size=1, max_size=20),  # any unicode, control characters included
)
member_names = st.lists(name_parts, min_size=1, max_size=6).map(lambda parts: "/".join(parts))
payloads = st.one_of(
    st.binary(max_size=64),  # junk: unsupported
    st.integers(min_value=0, max_value=9000).map(lambda n: JPEG_MAGIC + bytes(n)),  # a "scan", maybe too big
    st.just(b"PK\x05\x06" + bytes(18)),  # a nested (empty) zip
)
members = st.lists(st.tuples(member_names, payloads), max_size=16)


def build(kind: str, entries: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in entries:
                archive.writestr(zipfile.ZipInfo(name or "x"), data)
    else:
        with tarfile.open(
            fileobj=out, mode="w:gz" if kind == "tgz" else "w", format=tarfile.PAX_FORMAT
        ) as archive:
            for name, data in entries:
                info = tarfile.TarInfo(name or "x")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def files_under(root: Path) -> set[Path]:
    return {Path(dirpath) / name for dirpath, _dirs, names in os.walk(root) for name in names}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["zip", "tar", "tgz"]), entries=members, archive_name=st.text(max_size=300))
def test_expansion_stays_in_the_store(kind: str, entries: list[tuple[str, bytes]], archive_name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        sandbox = base / "sandbox"
        sandbox.mkdir()
        upload = sandbox / "upload"
        upload.write_bytes(build(kind, entries))
        store = ScanStore(sandbox / "store")
        before = files_under(base)

        result = expand_uploads(store, LIMITS, [(upload, archive_name)])

        # Nothing was written anywhere but the store's content-addressed paths (tmp/ is left empty).
        created = files_under(base) - before
        for path in created:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert path == store.path_for(digest), path
        stored = {e.sha256 for e in result if e.sha256}
        assert {p.name for p in created} == stored - {p.name for p in before}

        # Every entry is either a stored scan or a failure with a reason, never both.
        for entry in result:
            assert (entry.sha256 is None) == (entry.error is not None)
            assert 0 < len(entry.filename) <= MAX_FILENAME_CHARS
            assert not any(ord(ch) < 32 or ord(ch) == 127 for ch in entry.filename)
            if entry.sha256:
                assert store.path_for(entry.sha256).stat().st_size == entry.size <= LIMITS.max_scan_bytes

        # Counts are consistent: at most one item per member, plus at most one for the archive itself.
        assert 1 <= len(result) <= len(entries) + 1
        expanded = sum(e.size for e in result if e.sha256)
        assert expanded <= LIMITS.max_expanded_bytes
