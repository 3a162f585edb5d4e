"""Bounded cost of intake (issue 13): tar headers, the request budget, junk refused before storage.

Each test builds its hostile input with ``tests.support.hostile`` (gigabytes of zeros are repeated
gzip members, built in milliseconds) and checks the reason, what was stored and what was counted.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainscan import imaging
from brainscan.intake import Intake, IntakeLimits
from brainscan.intake.archives import MAX_TAR_EXTENDED_HEADER_BYTES, MAX_TAR_EXTENDED_HEADERS, tar_members
from brainscan.scanners import VolumeLimits
from brainscan.storage import ScanStore
from tests.support import hostile
from tests.support.scanners import make_nifti

MIB = 1024 * 1024
LIMITS = IntakeLimits(
    max_archive_entries=50,
    max_expanded_bytes=64 * MIB,
    max_scan_bytes=4 * MIB,
    max_image_pixels=1_000_000,
    max_items_per_job=500,
)


@pytest.fixture
def store(tmp_path: Path) -> ScanStore:
    return ScanStore(tmp_path / "store")


def intake(
    store: ScanStore, tmp_path: Path, files: dict[str, bytes], limits: IntakeLimits = LIMITS
) -> Intake:
    job = Intake(store, limits)
    for i, (name, data) in enumerate(files.items()):
        path = tmp_path / f"upload-{i}"
        path.write_bytes(data)
        job.add_file(path, name)
    return job


def errors(job: Intake) -> dict[str, str | None]:
    return {e.filename: e.error for e in job.entries}


def stored_bytes(store: ScanStore) -> int:
    return sum(p.stat().st_size for p in store.root.rglob("*") if p.is_file())


# -- tar headers: our own linear parser ----------------------------------------------------------


def test_a_pax_header_of_60000_digits_fails_its_archive_alone(store: ScanStore, tmp_path: Path) -> None:
    # CVE-2024-6232: tarfile on this interpreter (3.11.7) spends seconds in a regex on this, holding
    # the GIL; intake used to read such headers up to 8 MiB, twice.
    job = intake(
        store, tmp_path, {"digits.tgz": hostile.pax_digits_tar_gz(60_000), "ok.jpg": hostile.small_jpeg()}
    )
    assert errors(job) == {
        "digits.tgz": "corrupt archive: tar extended header larger than "
        f"{MAX_TAR_EXTENDED_HEADER_BYTES} bytes; the rest of it was not read",
        "ok.jpg": None,
    }
    assert job.expanded_bytes < 4 * 1024  # the header block and its first bytes, never the digits


def test_a_pax_record_of_digits_under_the_size_cap_is_malformed(store: ScanStore, tmp_path: Path) -> None:
    job = intake(store, tmp_path, {"digits.tar": gzip.decompress(hostile.pax_digits_tar_gz(10_000))})
    assert errors(job) == {"digits.tar": "corrupt archive: malformed pax header; the rest of it was not read"}


def test_600_chained_pax_headers_fail_the_archive_not_the_request(store: ScanStore, tmp_path: Path) -> None:
    # tarfile recursed once per header: RecursionError, an HTTP 500, the request's other files lost.
    job = intake(store, tmp_path, {"chain.tar": hostile.chained_pax_tar(600), "ok.jpg": hostile.small_jpeg()})
    assert errors(job) == {
        "chain.tar": f"corrupt archive: more than {MAX_TAR_EXTENDED_HEADERS} tar extended headers in a row; "
        "the rest of it was not read",
        "ok.jpg": None,
    }


def test_a_few_chained_extended_headers_are_fine(store: ScanStore, tmp_path: Path) -> None:
    job = intake(store, tmp_path, {"chain.tar": hostile.chained_pax_tar(MAX_TAR_EXTENDED_HEADERS - 1)})
    assert errors(job) == {"chain.tar/scan.jpg": None}


def tarfile_view(data: bytes) -> list[tuple[str, str, int]]:
    kinds = []
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for info in archive:
            kind = (
                "dir"
                if info.isdir()
                else "link"
                if info.issym() or info.islnk()
                else "sparse"
                if info.issparse()
                else "file"
                if info.isreg()
                else "special"
            )
            kinds.append((info.name if kind != "dir" else info.name.rstrip("/"), kind, info.size))
    return kinds


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_our_tar_parser_reads_what_tarfile_reads(fmt: int) -> None:
    long_dir = "d" * 120  # past ustar's 100-character name: prefix, GNU long name or pax path
    names = [f"{long_dir}/scan.jpg", "plain.jpg", "sub/dir/x.png"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["ünïcödé/名前.jpg", "x" * 300]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        directory = tarfile.TarInfo("sub/dir")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            payload = bytes([i]) * (1000 + 700 * i)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "l" * 200 if fmt != tarfile.USTAR_FORMAT else "plain.jpg"
        archive.addfile(link)
        fifo = tarfile.TarInfo("fifo")
        fifo.type = tarfile.FIFOTYPE
        archive.addfile(fifo)
    data = out.getvalue()
    counted: list[int] = []
    ours = []
    for member, reader in tar_members(io.BytesIO(data), counted.append):
        content = reader.read()
        ours.append(
            (member.name.rstrip("/") if member.kind == "dir" else member.name, member.kind, member.size)
        )
        if member.kind == "file":
            assert len(content) == member.size and len(set(content)) == 1
    assert ours == tarfile_view(data)
    assert sum(counted) <= len(data)  # every byte read was counted, nothing more


def test_a_corrupt_header_checksum_is_refused(store: ScanStore, tmp_path: Path) -> None:
    data = bytearray(hostile.member("a.jpg", hostile.small_jpeg()) + hostile.end_of_tar())
    data[0] ^= 0x01  # the name changes, the checksum does not
    job = intake(store, tmp_path, {"bad.tar": bytes(data)})
    assert errors(job) == {"bad.tar": "corrupt archive: bad tar header checksum; the rest of it was not read"}


# -- one budget for every decompressed byte ------------------------------------------------------


def test_skipped_members_count_against_the_expansion_budget(store: ScanStore, tmp_path: Path) -> None:
    # A ._* member (skipped: macOS metadata) of 256 MiB of zeros: its bytes used to be decompressed
    # (twice) without being counted, so the scan after it was stored and the job succeeded.
    bomb = hostile.skipped_member_bomb_tar_gz(256 * MIB)
    job = intake(store, tmp_path, {"bomb.tgz": bomb})
    assert errors(job) == {
        "bomb.tgz": f"expansion stopped at the limit of {LIMITS.max_expanded_bytes} bytes for this request "
        "(BRAINSCAN_MAX_EXPANDED_BYTES); the rest of the archive was not read"
    }
    assert LIMITS.max_expanded_bytes < job.expanded_bytes <= LIMITS.max_expanded_bytes + MIB


def test_four_bombs_in_one_request_share_one_budget(store: ScanStore, tmp_path: Path) -> None:
    # 48 MiB skipped each: under the budget alone, so before, all four were read (twice) uncounted
    # and all four scans stored; now the request's 64 MiB is spent during the second one.
    bomb = hostile.skipped_member_bomb_tar_gz(48 * MIB)
    files = {f"bomb{i}.tgz": bomb for i in range(4)} | {"ok.jpg": hostile.small_jpeg(seed=1)}
    job = intake(store, tmp_path, files)
    reasons = errors(job)
    assert reasons["bomb0.tgz/scan.jpg"] is None
    assert reasons["bomb1.tgz"] == (
        f"expansion stopped at the limit of {LIMITS.max_expanded_bytes} bytes for this request "
        "(BRAINSCAN_MAX_EXPANDED_BYTES); the rest of the archive was not read"
    )
    for name in ("bomb2.tgz", "bomb3.tgz", "ok.jpg"):  # not read at all: the request's budget is spent
        assert reasons[name] == (
            f"expansion stopped at the limit of {LIMITS.max_expanded_bytes} bytes for this request "
            "(BRAINSCAN_MAX_EXPANDED_BYTES); not read"
        )
    assert len(job.entries) == 5
    assert job.expanded_bytes <= LIMITS.max_expanded_bytes + MIB


def test_a_small_upload_expands_at_most_its_ratio(store: ScanStore, tmp_path: Path) -> None:
    volume = VolumeLimits(max_image_pixels=10**6, max_slices=2048, max_voxels=10**8, max_bytes=8 * MIB)
    limits = IntakeLimits(**{**LIMITS.__dict__, "max_expanded_bytes": 2048 * MIB, "volume": volume})
    bomb = hostile.skipped_member_bomb_tar_gz(48 * MIB)  # ~50 KB: 64 times that is under the 8 MiB floor
    job = intake(store, tmp_path, {"bomb.tgz": bomb}, limits)
    assert errors(job) == {
        "bomb.tgz": f"expansion stopped at the limit of {8 * MIB} bytes for this request "
        "(64 times the upload: BRAINSCAN_MAX_EXPANSION_RATIO); the rest of the archive was not read"
    }
    assert job.expanded_bytes <= 9 * MIB


def test_entries_are_counted_per_request(store: ScanStore, tmp_path: Path) -> None:
    limits = IntakeLimits(**{**LIMITS.__dict__, "max_request_entries": 5})
    members = b"".join(hostile.member(f"{i}.jpg", hostile.small_jpeg(seed=i)) for i in range(4))
    archive = members + hostile.end_of_tar()
    job = intake(store, tmp_path, {"a.tar": archive, "b.tar": archive}, limits)
    reasons = errors(job)
    assert [reasons[f"a.tar/{i}.jpg"] for i in range(4)] == [None] * 4
    assert reasons["b.tar"] == (
        "archive entries over the limit of 5 for this request (BRAINSCAN_MAX_REQUEST_ENTRIES); "
        "the rest of the archive was not read"
    )


def test_the_cpu_budget_stops_the_request(store: ScanStore, tmp_path: Path) -> None:
    limits = IntakeLimits(**{**LIMITS.__dict__, "max_intake_cpu_s": 1e-9, "max_intake_cpu_s_per_mib": 0.0})
    archive = hostile.member("a.jpg", hostile.small_jpeg()) + hostile.end_of_tar()
    job = intake(store, tmp_path, {"a.tar": archive}, limits)
    assert errors(job) == {
        "a.tar": "intake reached its limit of CPU time for this request (BRAINSCAN_MAX_INTAKE_CPU_S, "
        "BRAINSCAN_MAX_INTAKE_CPU_S_PER_MIB); not read"
    }
    assert stored_bytes(store) == 0


def compressible_png(seed: int) -> bytes:
    pixels = np.zeros((200, 200), np.uint8)
    pixels[seed % 200, seed // 200] = 255  # distinct scans, each almost all one value
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=0)  # ~40 KB, gzips to ~1 KB
    return out.getvalue()


def test_stored_bytes_are_bounded_by_the_upload_size(store: ScanStore, tmp_path: Path) -> None:
    limits = IntakeLimits(**{**LIMITS.__dict__, "max_scan_bytes": 100_000, "max_stored_ratio": 2})
    members = b"".join(hostile.member(f"{i}.png", compressible_png(i)) for i in range(20))
    archive = gzip.compress(members + hostile.end_of_tar())
    job = intake(store, tmp_path, {"a.tgz": archive}, limits)
    stored = [e for e in job.entries if e.sha256]
    assert 0 < len(stored) < 20  # what was stored before the limit stays: the rest of the request survives
    reason = (
        "this request would store more than its limit of 2 times its upload size in scans "
        "(BRAINSCAN_MAX_STORED_RATIO)"
    )
    assert [e.error for e in job.entries[len(stored) :]] == [
        reason,  # the scan that did not fit: not stored
        f"{reason}; the rest of the archive was not read",
    ]
    limit = max(limits.max_scan_bytes, 2 * len(archive))
    assert sum(e.size for e in stored) <= limit == job.budget.stored_limit()
    assert stored_bytes(store) == sum(e.size for e in stored)


# -- junk refused at intake, before it is stored ------------------------------------------------


def test_jpeg_magic_and_zeros_are_refused_before_storage(store: ScanStore, tmp_path: Path) -> None:
    job = intake(store, tmp_path, {"junk.tgz": hostile.junk_jpeg_members_tar_gz(4, 2 * MIB)})
    assert {e.error for e in job.entries} == {"cannot decode image: not a readable JPEG or PNG"}
    assert len(job.entries) == 4 and stored_bytes(store) == 0


def test_a_real_jpeg_followed_by_padding_is_refused_before_storage(store: ScanStore, tmp_path: Path) -> None:
    limits = IntakeLimits(**{**LIMITS.__dict__, "max_scan_bytes": 64 * MIB, "max_expanded_bytes": 512 * MIB})
    job = intake(store, tmp_path, {"padded.tgz": hostile.padded_jpeg_members_tar_gz(2, 16 * MIB)}, limits)
    assert [e.error for e in job.entries] == [imaging.PADDED_IMAGE] * 2
    assert stored_bytes(store) == 0


def test_junk_that_is_not_an_image_header_fails_at_intake(store: ScanStore, tmp_path: Path) -> None:
    png = io.BytesIO()
    Image.new("L", (8, 8)).save(png, format="PNG")
    broken_png = png.getvalue()[:30]  # magic and a cut IHDR
    job = intake(store, tmp_path, {"cut.png": broken_png, "ok.png": png.getvalue()})
    assert errors(job)["ok.png"] is None
    assert errors(job)["cut.png"].startswith("cannot decode image:")


def test_the_worker_decode_is_bounded_too() -> None:
    padded = hostile.small_jpeg() + bytes(8 * MIB)
    with pytest.raises(imaging.ScanError, match=imaging.PADDED_IMAGE):
        imaging.open_image(padded, 10**6)
    junk = b"\xff\xd8\xff\xe0" + bytes(64 * MIB)  # PIL used to walk this a byte at a time (~11 s)
    with pytest.raises(imaging.ScanError) as refused:
        imaging.open_image(junk, 10**6)
    assert str(refused.value) == imaging.HEADER_NOT_IN_WINDOW


# -- NIfTI: the header decides what a .nii.gz may write ------------------------------------------


def test_a_small_nii_gz_cannot_write_a_large_temp_file(store: ScanStore, tmp_path: Path) -> None:
    volume = np.zeros((8, 8, 4), np.float32)
    volume[2:6, 2:6, 1:3] = np.arange(32, dtype=np.float32).reshape(4, 4, 2)
    declared = len(make_nifti(volume))
    # The declared volume, then 256 MiB more: one gzip stream that decompresses far past its header.
    data = gzip.compress(make_nifti(volume)) + hostile.gz_zeros(256 * MIB)
    job = intake(store, tmp_path, {"vol.nii.gz": data})
    assert [e.error for e in job.entries] == [None, None]
    assert job.expanded_bytes <= declared  # the loop it replaced read (and wrote) all 256 MiB


def test_a_nii_gz_whose_header_is_over_the_limits_writes_nothing(store: ScanStore, tmp_path: Path) -> None:
    limits = IntakeLimits(
        **{
            **LIMITS.__dict__,
            "volume": VolumeLimits(max_image_pixels=10**6, max_slices=2048, max_voxels=10**6, max_bytes=MIB),
        }
    )
    data = gzip.compress(make_nifti(np.ones((128, 128, 128), np.uint8)))
    job = intake(store, tmp_path, {"big.nii.gz": data}, limits)
    assert errors(job) == {
        "big.nii.gz": "NIfTI volume has more than 1000000 voxels (BRAINSCAN_MAX_VOLUME_VOXELS)"
    }
    assert job.expanded_bytes <= 1024  # the header only


def test_a_library_error_is_named_by_type_never_by_its_message() -> None:
    import gzip
    import zipfile

    from brainscan.intake.archives import BadArchive, short

    # zipfile and gzip quote member names and bytes of the upload in their messages.
    crc = zipfile.BadZipFile("Bad CRC-32 for file 'patient-SECRET.jpg'")
    assert short(crc) == "BadZipFile while reading it"
    assert "SECRET" not in short(gzip.BadGzipFile("Not a gzipped file (b'SECRET')"))
    # Our own reasons are fixed texts and stay as they are.
    assert short(BadArchive("bad tar header checksum")) == "bad tar header checksum"
