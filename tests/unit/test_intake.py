"""Intake: type sniffing from bytes, safe archive expansion, limits, and the job transaction."""

from __future__ import annotations

import gzip
import io
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from brainscan.db import Base, Item, Job, make_engine
from brainscan.intake import (
    IntakeLimits,
    expand_uploads,
    sanitize_filename,
    sniff,
    submit_job,
)
from brainscan.jobs import create_job
from brainscan.storage import ScanStore

LIMITS = IntakeLimits(
    max_archive_entries=50,
    max_expanded_bytes=8 * 1024 * 1024,
    max_scan_bytes=1024 * 1024,
    max_image_pixels=1_000_000,
    max_items_per_job=200,
)


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (32, 32), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]], gz: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w") as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> ScanStore:
    return ScanStore(tmp_path / "store")


def run(store: ScanStore, tmp_path: Path, files: dict[str, bytes], limits: IntakeLimits = LIMITS):
    paths = []
    for i, (name, data) in enumerate(files.items()):
        path = tmp_path / f"upload-{i}"
        path.write_bytes(data)
        paths.append((path, name))
    return expand_uploads(store, limits, paths)


def stored_files(store: ScanStore) -> list[Path]:
    return sorted(p for p in store.root.rglob("*") if p.is_file())


# -- sniffing ------------------------------------------------------------------------------------


def test_sniff_reads_bytes_not_names() -> None:
    assert sniff(image_bytes("JPEG")) == "jpeg"
    assert sniff(image_bytes("PNG")) == "png"
    assert sniff(zip_bytes({"a.jpg": b"x"})) == "zip"
    assert sniff(zip_bytes({})) == "zip"  # an empty zip is only its end record
    assert sniff(tar_bytes([("a", b"x")])) == "tar"
    assert sniff(tar_bytes([])) == "tar"  # zero blocks only
    assert sniff(tar_bytes([("a", b"x")], gz=True)) == "gzip"
    assert sniff(b"hello, I am text") is None
    assert sniff(b"") is None
    assert sniff(b"GIF89a....") is None


def test_text_named_jpg_and_zero_byte_fail_with_reasons(store: ScanStore, tmp_path: Path) -> None:
    entries = run(
        store,
        tmp_path,
        {"notes.jpg": b"just some text\n", "empty.png": b"", "anim.gif": b"GIF89a" + b"\0" * 100},
    )
    assert [(e.filename, e.sha256) for e in entries] == [
        ("notes.jpg", None),
        ("empty.png", None),
        ("anim.gif", None),
    ]
    assert entries[0].error.startswith("unsupported file type")
    assert entries[1].error == "empty file"
    assert "GIF" in entries[2].error
    assert stored_files(store) == []


def test_plain_images_are_stored_by_sha256(store: ScanStore, tmp_path: Path) -> None:
    jpeg, png = image_bytes("JPEG"), image_bytes("PNG", seed=1)
    entries = run(store, tmp_path, {"a.jpg": jpeg, "b.png": png, "same-as-a.jpeg": jpeg})
    assert [e.error for e in entries] == [None, None, None]
    assert entries[0].sha256 == entries[2].sha256  # same bytes, one copy
    for entry, data in zip(entries, (jpeg, png, jpeg), strict=True):
        assert store.path_for(entry.sha256).read_bytes() == data
        assert entry.size == len(data)
    assert len(stored_files(store)) == 2


def test_truncated_jpeg_passes_intake_for_the_worker_to_judge(store: ScanStore, tmp_path: Path) -> None:
    whole = image_bytes("JPEG", size=(64, 64))
    data = whole[: len(whole) // 2]  # the header is whole, the pixels are cut: the worker decides
    [entry] = run(store, tmp_path, {"cut.jpg": data})
    assert entry.error is None and store.read(entry.sha256) == data


def test_a_jpeg_cut_inside_its_header_is_refused_at_intake(store: ScanStore, tmp_path: Path) -> None:
    [entry] = run(store, tmp_path, {"cut.jpg": image_bytes("JPEG")[:200]})
    assert entry.error == "cannot decode image: damaged image data (OSError)"
    assert stored_files(store) == []


def test_declared_pixel_bomb_is_refused_from_its_header(store: ScanStore, tmp_path: Path) -> None:
    big = io.BytesIO()
    Image.new("L", (2000, 1000)).save(big, format="PNG")  # 2 Mpx > the 1 Mpx limit in LIMITS
    [entry] = run(store, tmp_path, {"bomb.png": big.getvalue()})
    assert entry.sha256 is None
    # Our limit is quoted, never the file's own dimensions.
    assert entry.error == "image has more pixels than the limit of 1000000 (BRAINSCAN_MAX_IMAGE_PIXELS)"


def test_scan_over_size_limit(store: ScanStore, tmp_path: Path) -> None:
    limits = IntakeLimits(**{**LIMITS.__dict__, "max_scan_bytes": 1000})
    [entry] = run(store, tmp_path, {"big.png": image_bytes("PNG", (64, 64))}, limits)
    assert "BRAINSCAN_MAX_SCAN_BYTES" in entry.error
    assert stored_files(store) == []  # the partial temp file is gone too


# -- archives ------------------------------------------------------------------------------------


def test_zip_members_become_items_named_by_archive_path(store: ScanStore, tmp_path: Path) -> None:
    a, b = image_bytes("JPEG"), image_bytes("PNG", seed=2)
    data = zip_bytes(
        {
            "study/": b"",
            "study/glioma/a.jpg": a,
            "study/b.png": b,
            "__MACOSX/study/._a.jpg": b"junk",
            "study/.DS_Store": b"junk",
            "study/readme.txt": b"hello",
        }
    )
    entries = run(store, tmp_path, {"study.zip": data})
    assert [(e.filename, e.error is None) for e in entries] == [
        ("study.zip/study/glioma/a.jpg", True),
        ("study.zip/study/b.png", True),
        ("study.zip/study/readme.txt", False),
    ]
    assert store.read(entries[0].sha256) == a and store.read(entries[1].sha256) == b
    assert entries[2].error.startswith("unsupported file type")


def test_zip_slip_and_absolute_names_are_only_data(store: ScanStore, tmp_path: Path) -> None:
    jpeg = image_bytes("JPEG")
    data = zip_bytes({"../../evil.jpg": jpeg, "/etc/passwd.jpg": jpeg, "C:\\win\\x.jpg": jpeg})
    entries = run(store, tmp_path, {"slip.zip": data})
    assert [e.filename for e in entries] == [
        "slip.zip/../../evil.jpg",
        "slip.zip//etc/passwd.jpg",
        "slip.zip/C:\\win\\x.jpg",
    ]
    assert all(e.sha256 for e in entries)
    # Nothing exists anywhere but the store's hash path.
    assert stored_files(store) == [store.path_for(entries[0].sha256)]
    assert not (tmp_path.parent / "evil.jpg").exists()


def test_zip_symlink_member_fails(store: ScanStore, tmp_path: Path) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        link = zipfile.ZipInfo("link.jpg")
        link.external_attr = (0o120777 << 16) | 0
        archive.writestr(link, "/etc/passwd")
        archive.writestr("ok.jpg", image_bytes())
    entries = run(store, tmp_path, {"links.zip": out.getvalue()})
    assert (entries[0].filename, entries[0].error) == (
        "links.zip/link.jpg",
        "symbolic link in archive: not followed",
    )
    assert entries[1].error is None


def test_tar_links_and_devices_fail_regular_files_pass(store: ScanStore, tmp_path: Path) -> None:
    sym = tarfile.TarInfo("sym.jpg")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("hard.jpg")
    hard.type, hard.linkname = tarfile.LNKTYPE, "ok.jpg"
    dev = tarfile.TarInfo("dev.jpg")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    fifo = tarfile.TarInfo("fifo.jpg")
    fifo.type = tarfile.FIFOTYPE
    directory = tarfile.TarInfo("dir")
    directory.type = tarfile.DIRTYPE
    jpeg = image_bytes()
    for gz in (False, True):
        entries = run(
            store, tmp_path, {"t.tar": tar_bytes([directory, ("ok.jpg", jpeg), sym, hard, dev, fifo], gz=gz)}
        )
        assert [(e.filename, e.error) for e in entries] == [
            ("t.tar/ok.jpg", None),
            ("t.tar/sym.jpg", "link in archive: not followed"),
            ("t.tar/hard.jpg", "link in archive: not followed"),
            ("t.tar/dev.jpg", "special file in archive (device, fifo): not read"),
            ("t.tar/fifo.jpg", "special file in archive (device, fifo): not read"),
        ]
        assert store.read(entries[0].sha256) == jpeg


def test_zip_bomb_member_stops_at_the_scan_limit(store: ScanStore, tmp_path: Path) -> None:
    # A real JPEG header, then 64 MiB of zeros: compresses to ~64 KiB; the limit is 1 MiB per scan.
    bomb = image_bytes() + bytes(64 * 1024 * 1024)
    data = zip_bytes({"bomb.jpg": bomb, "ok.png": image_bytes("PNG")})
    assert len(data) < 200_000
    entries = run(store, tmp_path, {"bomb.zip": data})
    assert "BRAINSCAN_MAX_SCAN_BYTES" in entries[0].error
    assert entries[1].error is None
    assert len(stored_files(store)) == 1


def test_expansion_budget_stops_the_archive(store: ScanStore, tmp_path: Path) -> None:
    limits = IntakeLimits(**{**LIMITS.__dict__, "max_expanded_bytes": 300_000, "max_scan_bytes": 10**8})
    members = {f"m{i}.png": image_bytes("PNG", (180, 180), seed=i) for i in range(10)}  # ~100 KB each
    for name, data in (
        ("bomb.zip", zip_bytes(members)),
        ("bomb.tgz", tar_bytes(list(members.items()), True)),
    ):
        entries = run(store, tmp_path, {name: data}, limits)
        stored = [e for e in entries if e.error is None]
        assert 0 < len(stored) < len(members) and sum(e.size for e in stored) <= 300_000, entries
        assert "BRAINSCAN_MAX_EXPANDED_BYTES" in entries[-1].error
        assert entries[-1].filename == name


def test_lying_zip_header_does_not_buy_more_bytes(store: ScanStore, tmp_path: Path) -> None:
    data = bytearray(zip_bytes({"a.jpg": b"\xff\xd8\xff\xe0" + bytes(2_000_000)}))
    # Patch the declared uncompressed size (local and central headers) down to 10 bytes.
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(sig)
        data[at + offset : at + offset + 4] = (10).to_bytes(4, "little")
    [entry] = run(store, tmp_path, {"liar.zip": bytes(data)})
    assert entry.error is not None and entry.sha256 is None


def test_too_many_entries_refuses_the_whole_archive(store: ScanStore, tmp_path: Path) -> None:
    members = {f"{i}.jpg": image_bytes(seed=i) for i in range(LIMITS.max_archive_entries + 1)}
    for name, data in (("many.zip", zip_bytes(members)), ("many.tar", tar_bytes(list(members.items())))):
        [entry] = run(store, tmp_path, {name: data})
        assert entry.filename == name and "BRAINSCAN_MAX_ARCHIVE_ENTRIES" in entry.error


def test_nested_and_empty_archives(store: ScanStore, tmp_path: Path) -> None:
    inner = zip_bytes({"a.jpg": image_bytes()})
    entries = run(
        store,
        tmp_path,
        {
            "outer.zip": zip_bytes({"inner.zip": inner, "inner.tar.gz": tar_bytes([("a", b"x")], gz=True)}),
            "empty.zip": zip_bytes({}),
            "empty.tar": tar_bytes([]),
            "dirs-only.zip": zip_bytes({"a/": b"", "b/": b""}),
        },
    )
    assert [(e.filename, e.error) for e in entries] == [
        ("outer.zip/inner.zip", "nested archive not supported: put scans directly in the archive"),
        ("outer.zip/inner.tar.gz", "nested archive not supported: put scans directly in the archive"),
        ("empty.zip", "empty archive: no files in it"),
        ("empty.tar", "empty archive: no files in it"),
        ("dirs-only.zip", "empty archive: no files in it"),
    ]


def test_corrupt_archives_fail_without_losing_the_rest(store: ScanStore, tmp_path: Path) -> None:
    good = tar_bytes([("a.jpg", image_bytes())], gz=True)
    entries = run(
        store,
        tmp_path,
        {
            "cut.tar.gz": good[: len(good) // 2],
            "plain.gz": gzip.compress(b"not a tar at all" * 100),
            "bad.zip": b"PK\x03\x04" + b"\0" * 100,
            "fine.jpg": image_bytes(seed=5),
        },
    )
    assert entries[0].filename.startswith("cut.tar.gz") and entries[0].error
    assert entries[1].error == "unsupported file type: gzip file that is not a tar archive"
    assert entries[2].error.startswith("corrupt archive")
    assert entries[3].error is None


def test_items_per_job_limit_truncates_with_a_failed_item(store: ScanStore, tmp_path: Path) -> None:
    limits = IntakeLimits(**{**LIMITS.__dict__, "max_items_per_job": 3})
    members = {f"{i}.jpg": image_bytes(seed=i) for i in range(5)}
    entries = run(store, tmp_path, {"a.zip": zip_bytes(members), "b.jpg": image_bytes(seed=9)}, limits)
    assert len(entries) == 4
    assert [e.error is None for e in entries[:3]] == [True, True, True]
    assert "BRAINSCAN_MAX_ITEMS_PER_JOB" in entries[3].error


def test_sanitize_filename() -> None:
    assert sanitize_filename("a\x00b\x1b[31mc\r\n.jpg") == "ab[31mc.jpg"
    assert sanitize_filename("x\u202egpj.exe") == "xgpj.exe"
    assert sanitize_filename(None) == "unnamed"
    assert sanitize_filename("\x01\x02") == "unnamed"
    assert sanitize_filename(b"caf\xc3\xa9.png") == "café.png"
    long = sanitize_filename("d/" * 5000 + "end.jpg")
    assert len(long) == 255 and long.endswith("end.jpg")
    assert sanitize_filename("bad\udcff.jpg") == "bad\ufffd.jpg"


# -- the job transaction -------------------------------------------------------------------------


def test_create_and_submit_job(store: ScanStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    from sqlalchemy.orm import Session

    enqueued: list[str] = []
    stub = types.ModuleType("brainscan.queueing")
    stub.enqueue_job = lambda job_id: enqueued.append(job_id) or False  # broker down: still stored
    monkeypatch.setitem(sys.modules, "brainscan.queueing", stub)
    import brainscan

    monkeypatch.setattr(brainscan, "queueing", stub, raising=False)

    upload = tmp_path / "u"
    upload.write_bytes(zip_bytes({"a.jpg": image_bytes(), "b.txt": b"text"}))
    with Session(engine) as session:
        result = submit_job(
            session,
            store,
            LIMITS,
            None,
            [(upload, "s.zip")],
            callback_url="http://x/y",
            enqueue=stub.enqueue_job,
            notify=lambda job_ids: None,  # not final at submit: no webhook yet
        )
        assert result.enqueued is False and enqueued == [result.job.id]
    with Session(engine) as session:
        job = session.get(Job, result.job.id)
        assert (job.status, job.total, job.done, job.failed, job.callback_url) == (
            "queued",
            2,
            0,
            1,
            "http://x/y",
        )
        items = session.scalars(select(Item).order_by(Item.position)).all()
        assert [(i.filename, i.status, i.position) for i in items] == [
            ("s.zip/a.jpg", "queued", 0),
            ("s.zip/b.txt", "failed", 1),
        ]
        assert items[1].error.startswith("unsupported") and items[1].finished_at is not None

        bad = create_job(session, None, run(store, tmp_path, {"x.txt": b"text"}))
        assert (bad.status, bad.total, bad.failed) == ("failed", 1, 1) and bad.finished_at is not None
