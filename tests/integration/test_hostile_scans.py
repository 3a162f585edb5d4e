"""Issue 3: hostile and broken scans, judged by a real worker after a real API took them in.

PostgreSQL (a fresh database), a private Redis, the API and a worker as processes. Each bad scan
ends failed with a clear reason while the good ones in the same job are scored; images that are
unusual but legitimate (16-bit, CMYK, RGBA, palette, grey) are scored, not failed.

Covered elsewhere and not repeated here: zero-byte files, zip-slip and absolute paths, tar links
and devices, zip bombs, nested and empty archives, the expansion budget (tests/unit/test_intake.py);
control characters and 10 KB file names, malformed multipart bodies and the 413 size cap
(tests/integration/test_api.py).
"""

from __future__ import annotations

import io
import struct
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from brainscan.db import Item, session_scope
from brainscan.intake import describe_unsupported
from tests.support.backends import Backend
from tests.support.environment import wait_for
from tests.support.faults import PrivateStack, private_stack
from tests.support.images import make_jpeg
from tests.support.records import create_job, job_finished

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[PrivateStack]:
    with private_stack(tmp_path_factory.mktemp("hostile"), tiny_model_dir) as running:
        yield running


# ---- the hostile and unusual scans ---------------------------------------------------------------
def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def base_pixels(seed: int = 0, side: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def pixel_bomb_png(side: int = 30_000) -> bytes:
    """A real, valid 30000x30000 1-bit PNG (900 Mpx): ~110 KB on the wire, ~900 MB as 8-bit pixels."""
    row = 1 + (side + 7) // 8  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    block = bytes(row * 1000)
    idat = b"".join([compressor.compress(block) for _ in range(side // 1000)] + [compressor.flush()])
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(base_pixels(seed)) for seed in range(3)]
    if fmt == "GIF":
        frames = [frame.convert("P") for frame in frames]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def sixteen_bit_png() -> bytes:
    ramp = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40).astype(np.uint16)
    image = Image.fromarray(ramp)  # uint16 -> mode I;16
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16 bits per pixel
    return data


def palette_png() -> bytes:
    image = Image.fromarray(base_pixels(4)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 0
    return encode(image, "PNG", transparency=0)


SCORED = {
    "rgb.jpg": lambda: make_jpeg(1),
    "grey.jpg": lambda: encode(Image.fromarray(base_pixels(2)).convert("L"), "JPEG"),
    "cmyk.jpg": lambda: encode(Image.fromarray(base_pixels(3)).convert("CMYK"), "JPEG"),
    "sixteen-bit.png": sixteen_bit_png,
    "rgba.png": lambda: encode(Image.fromarray(base_pixels(5)).convert("RGBA"), "PNG"),
    "palette.png": palette_png,
}


def items_of(backend: Backend, job_id: str) -> dict[str, Item]:
    with backend.active(), session_scope() as session:
        return {i.filename: i for i in session.scalars(select(Item).where(Item.job_id == job_id))}


def post(stack: PrivateStack, files: list[tuple[str, bytes]]) -> dict:  # type: ignore[type-arg]
    response = httpx.post(
        f"{stack.url}/v1/jobs",
        headers=stack.headers,
        files=[("files", (name, data, "application/octet-stream")) for name, data in files],
        timeout=120,
    )
    assert response.status_code == 202, response.text
    return response.json()


def finished_job(stack: PrivateStack, job_id: str) -> dict:  # type: ignore[type-arg]
    wait_for(lambda: job_finished(stack.backend, job_id), what="the job to finish")
    response = httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers=stack.headers, timeout=30)
    assert response.status_code == 200
    return response.json()


# ---- tests -------------------------------------------------------------------------------------------
def test_one_job_of_hostile_and_unusual_scans(stack: PrivateStack) -> None:
    good = {name: make() for name, make in SCORED.items()}
    truncated = make_jpeg(9, size=(64, 64))
    bad = {
        "truncated.jpg": truncated[: len(truncated) // 2],
        "notes.jpg": b"Patient notes, plain text, not an image.\n",
        "bomb.png": pixel_bomb_png(),
        "animated.gif": animated("GIF"),
        "animated.png": animated("PNG"),  # APNG: a PNG signature; its header (acTL) says it is animated
    }
    body = post(stack, list(good.items()) + list(bad.items()))
    assert (body["total"], body["failed"]) == (11, 4)  # text, bomb, GIF and APNG are refused at intake
    job = finished_job(stack, body["id"])
    assert (job["status"], job["total"], job["done"], job["failed"], job["pending"]) == (
        "partial",
        11,
        6,
        5,
        0,
    )
    items = {item["filename"]: item for item in job["items"]}

    for name in good:
        item = items[name]
        assert item["status"] == "succeeded", (name, item["error"])
        assert item["label"] in ("glioma", "meningioma", "notumor", "pituitary")
        assert sum(item["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    errors = {name: items[name]["error"] for name in bad}
    assert all(items[name]["status"] == "failed" and items[name]["probabilities"] is None for name in bad)
    assert errors["truncated.jpg"].startswith("cannot decode image: image file is truncated")
    # Intake's wording names the formats it takes (which may grow): compare with intake itself.
    assert errors["notes.jpg"] == describe_unsupported(bad["notes.jpg"])
    assert errors["notes.jpg"].startswith("unsupported file type: send JPEG")
    assert errors["bomb.png"] == "image too large to decode safely (decompression bomb guard)"
    assert errors["animated.gif"] == describe_unsupported(bad["animated.gif"])
    assert errors["animated.gif"].startswith("unsupported file type (GIF): send JPEG")
    assert errors["animated.png"] == "animated or multi-frame image: one frame per scan expected"
    # Refused at intake: nothing stored for them, so no worker ever opens them.
    refused = ("notes.jpg", "bomb.png", "animated.gif", "animated.png")
    assert [items[n]["sha256"] for n in refused] == [None] * 4
    assert stack.worker.alive()


def test_worker_judges_hostile_scans_that_bypassed_intake(stack: PrivateStack) -> None:
    """Defence in depth: scans stored without intake (e.g. another intake path) meet the worker's checks."""
    from brainscan.queueing import enqueue_job

    scans = [
        ("bomb.png", pixel_bomb_png()),
        ("animated.gif", animated("GIF")),
        ("ok.jpg", make_jpeg(11)),
    ]
    job_id = create_job(stack.backend, scans)
    with stack.backend.active():
        assert enqueue_job(job_id)
    wait_for(lambda: job_finished(stack.backend, job_id), what="the job to finish")
    items = items_of(stack.backend, job_id)
    # Refused from its header (PIL's own bomb guard fires at open, before any pixel is decoded).
    assert items["bomb.png"].error == "image too large to decode safely (decompression bomb guard)"
    assert items["animated.gif"].error.startswith("unsupported image format GIF")
    assert items["ok.jpg"].status == "succeeded"
    assert stack.worker.alive()  # never decoded: no 900 MB allocation, no crash


def many_entries_zip(entries: int) -> bytes:
    """A stored zip of ``entries`` one-byte members, written straight from struct (fast)."""
    local, central = io.BytesIO(), io.BytesIO()
    crc = zlib.crc32(b"x")
    for index in range(entries):
        name = f"{index:06d}.jpg".encode()
        offset = local.tell()
        local.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, 1, 1, len(name), 0))
        local.write(name + b"x")
        central.write(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                20,
                20,
                0,
                0,
                0,
                0,
                crc,
                1,
                1,
                len(name),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
        )
        central.write(name)
    directory = central.getvalue()
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, len(directory), local.tell(), 0)
    # More than 65535 entries: the counts need ZIP64 records, as real tools write them.
    zip64_end = struct.pack(
        "<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, entries, entries, len(directory), local.tell()
    )
    locator = struct.pack("<IIQI", 0x07064B50, 0, local.tell() + len(directory), 1)
    return local.getvalue() + directory + zip64_end + locator + end


def test_archive_with_100000_entries_is_refused_whole(stack: PrivateStack) -> None:
    data = many_entries_zip(100_000)
    with zipfile.ZipFile(io.BytesIO(data)) as check:  # a valid archive, as the standard library sees it
        assert len(check.infolist()) == 100_000
    scans_dir = stack.backend.storage_dir / "scans"
    before = sum(1 for p in scans_dir.rglob("*") if p.is_file())
    started = time.monotonic()
    body = post(stack, [("huge.zip", data), ("ok.jpg", make_jpeg(12))])
    took = time.monotonic() - started
    assert (body["total"], body["failed"]) == (2, 1)
    job = finished_job(stack, body["id"])
    huge, ok = job["items"]
    assert huge["filename"] == "huge.zip" and huge["sha256"] is None
    assert huge["error"] == ("archive has more than 20000 entries (BRAINSCAN_MAX_ARCHIVE_ENTRIES): split it")
    assert ok["status"] == "succeeded"
    after = sum(1 for p in scans_dir.rglob("*") if p.is_file())
    assert after == before + 1  # ok.jpg; nothing of the refused archive
    print(f"100,000-entry zip ({len(data) / 1e6:.1f} MB) refused in {took:.1f}s")  # a figure, not a check
