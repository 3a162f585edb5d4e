"""Hostile uploads, built in memory in milliseconds (used by the tests and by ``bench/hostile.py``).

Large decompressed sizes are made without compressing them: a gzip file may hold many members one
after another (RFC 1952), so gigabytes of zeros are one small compressed block repeated.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from functools import cache

from PIL import Image

BLOCK = 512
ZEROS_UNIT = 1024 * 1024  # the decompressed size of one repeated gzip member of zeros


@cache
def _gzipped_zeros() -> bytes:
    return gzip.compress(bytes(ZEROS_UNIT), compresslevel=9, mtime=0)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def gz_zeros(size: int) -> bytes:
    """``size`` zero bytes gzip-compressed (``size`` a multiple of 1 MiB, or small)."""
    whole, rest = divmod(size, ZEROS_UNIT)
    return _gzipped_zeros() * whole + (gz(bytes(rest)) if rest else b"")


def tar_header(name: str, size: int, typeflag: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, typeflag
    return info.tobuf(format=tarfile.GNU_FORMAT)  # GNU: base-256 sizes past 8 GiB


def padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def end_of_tar() -> bytes:
    return bytes(2 * BLOCK)


def small_jpeg(seed: int = 0, side: int = 32) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((side, side), 40 + seed).convert("RGB").save(out, format="JPEG")
    return out.getvalue()


def member(name: str, data: bytes) -> bytes:
    """One regular member (header, data, padding), uncompressed."""
    return tar_header(name, len(data)) + data + padding(len(data))


def pax_digits_tar_gz(digits: int, *, then: bytes = b"") -> bytes:
    """A tar.gz whose first member has a pax header of ``digits`` digits (CVE-2024-6232's input:
    CPython's tarfile before 3.11.10 parses it in time quadratic in the run)."""
    record = b"1" * digits
    header = tar_header("././@PaxHeader", len(record), tarfile.XHDTYPE)
    if digits > 4 * ZEROS_UNIT:  # large: digits as repeated gzip members, never built in memory whole
        unit = gz(b"1" * ZEROS_UNIT)
        whole, rest = divmod(digits, ZEROS_UNIT)
        body = unit * whole + gz(b"1" * rest + padding(digits))
        return gz(header) + body + gz(member("after.jpg", then or small_jpeg()) + end_of_tar())
    return gz(header + record + padding(digits) + member("after.jpg", then or small_jpeg()) + end_of_tar())


def chained_pax_tar(headers: int, *, data: bytes | None = None) -> bytes:
    """``headers`` pax extended headers in a row before one member (tarfile recurses once each)."""
    out = io.BytesIO()
    record = b"19 comment=chained\n"
    for _ in range(headers):
        out.write(tar_header("././@PaxHeader", len(record), tarfile.XHDTYPE) + record + padding(len(record)))
    payload = data if data is not None else small_jpeg()
    out.write(member("scan.jpg", payload) + end_of_tar())
    return out.getvalue()


def junk_jpeg_members_tar_gz(members: int, member_bytes: int) -> bytes:
    """``members`` distinct members that start with the JPEG magic and are zeros after it."""
    parts = []
    for i in range(members):
        magic = b"\xff\xd8\xff\xe0" + i.to_bytes(4, "big")  # distinct bytes: no deduplication
        parts.append(gz(tar_header(f"junk{i}.jpg", member_bytes) + magic))
        parts.append(gz_zeros(member_bytes - len(magic)))
        parts.append(gz(padding(member_bytes)))
    parts.append(gz(end_of_tar()))
    return b"".join(parts)


def padded_jpeg_members_tar_gz(members: int, member_bytes: int) -> bytes:
    """Like ``junk_jpeg_members_tar_gz`` but each member is a real JPEG followed by zeros."""
    parts = []
    for i in range(members):
        jpeg = small_jpeg(seed=i, side=512)
        parts.append(gz(tar_header(f"padded{i}.jpg", member_bytes) + jpeg))
        parts.append(gz_zeros(member_bytes - len(jpeg)))
        parts.append(gz(padding(member_bytes)))
    parts.append(gz(end_of_tar()))
    return b"".join(parts)


def skipped_member_bomb_tar_gz(skipped_bytes: int, *, scan: bytes | None = None) -> bytes:
    """A tar.gz whose only big member is macOS metadata (``._*``, skipped) of zeros, then one scan."""
    return b"".join(
        [
            gz(tar_header("._resource", skipped_bytes)),
            gz_zeros(skipped_bytes),
            gz(padding(skipped_bytes) + member("scan.jpg", scan or small_jpeg()) + end_of_tar()),
        ]
    )
