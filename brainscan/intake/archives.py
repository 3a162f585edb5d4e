"""Low-level guards for reading untrusted zip and tar archives as streams.

Nothing here stores anything: these bound what ``tarfile`` and ``zipfile`` may read or seek, and
count a zip's entries before ``zipfile`` builds one object per entry.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from typing import BinaryIO

from brainscan.intake.names import sanitize_filename

# A zip's central directory is read into memory by zipfile; legitimate ones are far smaller.
MAX_CENTRAL_DIRECTORY_BYTES = 64 * 1024 * 1024
# tarfile reads a pax or GNU long-name header in one read(); a real one is a few hundred bytes.
MAX_TAR_HEADER_READ = 8 * 1024 * 1024
# The zip records read to find the central directory (PKWARE APPNOTE 4.3.12, 4.3.14-16).
EOCD = struct.Struct("<4s4H2LH")  # end of central directory: ..., size, offset, comment length
ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # ..., entries here, entries, size, offset
ZIP64_LOCATOR_SIZE = 20
CENTRAL_HEADER = struct.Struct("<4s6H3L5H2L")  # one central directory file header (46 bytes)
MAX_ZIP_COMMENT = 0xFFFF


class ExpansionBudgetSpent(Exception):
    """The request's ``max_expanded_bytes`` is used up."""


class BadArchive(Exception):
    """The archive is malformed in a way the guards refuse to follow."""


class GuardedReader(io.RawIOBase):
    """A tar stream that refuses the two ways tarfile could be made to use unbounded resources.

    tarfile reads a pax or GNU long-name header with one ``read(size)`` of its declared size, and
    skips unread member data by seeking (which, in a gzip stream, means decompressing it). So: no
    single read over ``MAX_TAR_HEADER_READ``, and no position past the request's expansion budget
    plus room for headers.
    """

    def __init__(self, raw: BinaryIO, budget: int) -> None:
        self.raw = raw
        self.limit = max(budget, 0) + 64 * 1024 * 1024

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.raw.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET and offset > self.limit:
            raise ExpansionBudgetSpent
        return self.raw.seek(offset, whence)

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        if size is None or size < 0 or size > MAX_TAR_HEADER_READ:
            raise BadArchive("tar header or read larger than allowed")
        if self.raw.tell() + size > self.limit:
            raise ExpansionBudgetSpent
        return self.raw.read(size)


def zip_entry_count(f: BinaryIO, limit: int) -> int:
    """Count a zip's central-directory entries (up to ``limit + 1``) without building objects.

    zipfile parses the whole directory into ZipInfo objects when it opens; a crafted archive with
    millions of tiny entries (or a lying entry count) would exhaust memory before we could count.
    """
    start, size_cd = _central_directory(f)
    if size_cd > MAX_CENTRAL_DIRECTORY_BYTES:
        return limit + 1
    f.seek(start)
    remaining = size_cd
    count = 0
    while remaining >= CENTRAL_HEADER.size and count <= limit:
        header = f.read(CENTRAL_HEADER.size)
        if len(header) < CENTRAL_HEADER.size or header[:4] != b"PK\x01\x02":
            break
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", header, 28)
        skip = name_len + extra_len + comment_len
        f.seek(skip, os.SEEK_CUR)
        remaining -= CENTRAL_HEADER.size + skip
        count += 1
    return count


def _end_record_at(tail: bytes) -> int:
    """Where the end-of-central-directory record starts in ``tail`` (the file's last bytes).

    Searched from the end, since the archive comment may hold the signature too: the record whose
    comment runs exactly to the end wins, else the last one that is whole (as zipfile reads it).
    """
    whole = []
    at = len(tail)
    while (at := tail.rfind(b"PK\x05\x06", 0, at)) >= 0:
        if len(tail) - at >= EOCD.size:
            if at + EOCD.size + EOCD.unpack_from(tail, at)[7] == len(tail):
                return at
            whole.append(at)
    if not whole:
        raise zipfile.BadZipFile("no end of central directory record")
    return whole[0]


def _central_directory(f: BinaryIO) -> tuple[int, int]:
    """Where a zip's central directory starts and how long it is, from the end records (APPNOTE 4.3).

    The start is counted back from the end record, as zipfile does, so data prepended to the
    archive (a self-extractor stub) does not shift it.
    """
    f.seek(0, os.SEEK_END)
    end = f.tell()
    tail_len = min(end, EOCD.size + MAX_ZIP_COMMENT)
    f.seek(end - tail_len)
    tail = f.read(tail_len)
    at = _end_record_at(tail)
    eocd_at = end - tail_len + at
    size_cd = EOCD.unpack_from(tail, at)[5]
    start = eocd_at - size_cd
    record_at = eocd_at - ZIP64_LOCATOR_SIZE - ZIP64_EOCD.size
    if record_at >= 0:
        f.seek(eocd_at - ZIP64_LOCATOR_SIZE)
        if f.read(4) == b"PK\x06\x07":  # a zip64 archive: the real size is in the zip64 record
            f.seek(record_at)
            record = f.read(ZIP64_EOCD.size)
            if len(record) < ZIP64_EOCD.size or record[:4] != b"PK\x06\x06":
                raise zipfile.BadZipFile("corrupt zip64 end of central directory record")
            size_cd = ZIP64_EOCD.unpack(record)[8]
            start = record_at - size_cd
    if start < 0:
        raise zipfile.BadZipFile("bad offset for central directory")
    return start, size_cd


def is_system_error(exc: BaseException) -> bool:
    # Archive libraries raise OSError subclasses without an errno (BadGzipFile, "not a gzip file");
    # a real errno (ENOSPC, EIO, EACCES) is a fault of this machine and must not be blamed on the input.
    return isinstance(exc, OSError) and exc.errno is not None


def s_islnk(mode: int) -> bool:
    return (mode & 0o170000) == 0o120000


def s_isreg(mode: int) -> bool:
    return (mode & 0o170000) in (0o100000, 0)


def short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return sanitize_filename(text)[:200]
