"""Low-level readers for untrusted zip and tar archives, read as streams.

Nothing here stores anything. A tar stream is parsed by our own code (:func:`tar_members`), linear
in its size: ``tarfile``'s pax-header regex is quadratic on long digit runs on CPython before
3.11.10 / 3.12.6 (CVE-2024-6232), recurses once per chained extended header, and would read a header
of any declared size in one call. A zip's central directory is walked to count its entries before
``zipfile`` builds one object per entry.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal

from brainscan.imaging import ScanError
from brainscan.intake.names import sanitize_filename
from brainscan.scanners import VolumeError

# A zip's central directory is read into memory by zipfile; legitimate ones are far smaller.
MAX_CENTRAL_DIRECTORY_BYTES = 64 * 1024 * 1024
# The zip records read to find the central directory (PKWARE APPNOTE 4.3.12, 4.3.14-16).
EOCD = struct.Struct("<4s4H2LH")  # end of central directory: ..., size, offset, comment length
ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # ..., entries here, entries, size, offset
ZIP64_LOCATOR_SIZE = 20
CENTRAL_HEADER = struct.Struct("<4s6H3L5H2L")  # one central directory file header (46 bytes)
MAX_ZIP_COMMENT = 0xFFFF

TAR_BLOCK = 512
# A pax or GNU long-name header holds a path and a few attributes: a real one is a few hundred bytes.
MAX_TAR_EXTENDED_HEADER_BYTES = 16 * 1024
# Extended headers before one member: pax global + pax + GNU long link + GNU long name at most.
MAX_TAR_EXTENDED_HEADERS = 4
_TAR_FILE_TYPES = (b"0", b"\0", b"7")  # regular, old regular, contiguous
_TAR_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directory, fifo
_PAX_KEYS = (b"path", b"linkpath", b"size")  # the only pax records that matter here
TarKind = Literal["file", "dir", "link", "special", "sparse"]


class ExpansionBudgetSpent(Exception):
    """The request's ``max_expanded_bytes`` is used up."""


class BadArchive(Exception):
    """The archive is malformed in a way the readers refuse to follow (the message is a fixed reason)."""


@dataclass(frozen=True)
class TarMember:
    name: str
    kind: TarKind
    size: int  # bytes of data that follow the header


Spend = Callable[[int], None]


def tar_members(raw: BinaryIO, spend: Spend) -> Iterator[tuple[TarMember, BinaryIO]]:
    """Each member of a tar stream with a reader of its data, in one linear pass.

    Every byte read (headers, member data, padding, data a caller left unread) is passed to
    ``spend`` first, which may raise to stop the archive. Extended headers (pax ``x``/``g``, GNU
    ``L``/``K``) are refused over ``MAX_TAR_EXTENDED_HEADER_BYTES`` or more than
    ``MAX_TAR_EXTENDED_HEADERS`` in a row; a bad checksum, a malformed number or pax record, or a
    stream that ends inside a member is :class:`BadArchive`. The stream ends at its first zero block
    (or at its end, between members).
    """
    stream = _TarStream(raw, spend)
    global_pax: dict[bytes, bytes] = {}
    pending: dict[bytes, bytes] = {}
    extended = 0
    while True:
        block = stream.read_exact(TAR_BLOCK, at_boundary=True)
        if not block or not any(block):
            return
        typeflag, size = _checked_header(block)
        if typeflag in (b"x", b"g", b"L", b"K"):
            extended += 1
            if extended > MAX_TAR_EXTENDED_HEADERS:
                raise BadArchive(f"more than {MAX_TAR_EXTENDED_HEADERS} tar extended headers in a row")
            if size > MAX_TAR_EXTENDED_HEADER_BYTES:
                raise BadArchive(f"tar extended header larger than {MAX_TAR_EXTENDED_HEADER_BYTES} bytes")
            data = stream.read_exact(_padded(size))[:size]
            if typeflag == b"x":
                pending.update(_pax_records(data))
            elif typeflag == b"g":
                global_pax.update(_pax_records(data))
            else:
                pending[b"path" if typeflag == b"L" else b"linkpath"] = data.split(b"\0", 1)[0]
            continue
        extended = 0
        fields = {**global_pax, **pending}
        pending = {}
        member = _member(block, typeflag, size, fields)
        data_size = 0 if typeflag in _TAR_NO_DATA_TYPES else member.size
        reader = _MemberReader(stream, data_size)
        yield member, reader  # type: ignore[misc]
        stream.skip(reader.remaining + _padded(data_size) - data_size)


class _TarStream:
    """The decompressed tar bytes, each counted by ``spend`` before it is read."""

    def __init__(self, raw: BinaryIO, spend: Spend) -> None:
        self.raw = raw
        self.spend = spend

    def read_exact(self, n: int, *, at_boundary: bool = False) -> bytes:
        self.spend(n)
        data = self.raw.read(n)
        while len(data) < n and (more := self.raw.read(n - len(data))):
            data += more
        if len(data) < n and not (at_boundary and not data):
            raise BadArchive("archive ends inside a member")
        return data

    def skip(self, n: int) -> None:
        while n > 0:
            step = min(n, 1024 * 1024)
            self.read_exact(step)
            n -= step


class _MemberReader:
    """A file-like view of one member's data; reads past its end return nothing."""

    def __init__(self, stream: _TarStream, size: int) -> None:
        self.stream = stream
        self.remaining = size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self.remaining:
            n = self.remaining
        if n == 0:
            return b""
        data = self.stream.read_exact(n)
        self.remaining -= n
        return data


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def _checked_header(block: bytes) -> tuple[bytes, int]:
    """(typeflag, size) of a header block whose checksum holds (unsigned or signed, as tar allows)."""
    stored = _number(block[148:156])
    unsigned = sum(block) - sum(block[148:156]) + 8 * 0x20
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b >= 0x80)
    if stored not in (unsigned, signed):
        raise BadArchive("bad tar header checksum")
    return block[156:157], _number(block[124:136])


def _number(field: bytes) -> int:
    """A numeric header field: octal digits (NUL/space padded) or GNU base-256."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise BadArchive("negative number in tar header")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not digits:
        return 0
    if not all(0x30 <= b <= 0x37 for b in digits):
        raise BadArchive("malformed number in tar header")
    return int(digits, 8)


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """The records of a pax header that matter here ("LENGTH KEY=VALUE\\n" each), parsed linearly.

    Any GNU sparse record marks the member as sparse; every other key is ignored.
    """
    records: dict[bytes, bytes] = {}
    at = 0
    while at < len(data):
        if not any(data[at:]):
            break  # NUL padding after the last record
        space = data.find(b" ", at, at + 8)  # a length of at most 7 digits fits any allowed header
        digits = data[at:space] if space > at else b""
        if not digits.isdigit():
            raise BadArchive("malformed pax header")
        end = at + int(digits)
        if end <= space + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise BadArchive("malformed pax header")
        key, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not equals:
            raise BadArchive("malformed pax header")
        if key in _PAX_KEYS:
            records[key] = value
        elif key.startswith(b"GNU.sparse."):
            records[b"sparse"] = b"1"
        at = end
    return records


def _member(block: bytes, typeflag: bytes, size: int, fields: dict[bytes, bytes]) -> TarMember:
    name = block[0:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0" and prefix:  # POSIX ustar splits long names into prefix/name
        name = prefix + b"/" + name
    name = fields.get(b"path", name)
    if b"size" in fields:
        if not fields[b"size"].isdigit() or len(fields[b"size"]) > 20:
            raise BadArchive("malformed pax header")
        size = int(fields[b"size"])
    text = name.decode("utf-8", "replace")
    kind: TarKind
    if typeflag == b"5" or (typeflag in (b"0", b"\0") and text.endswith("/")):
        kind = "dir"
    elif typeflag in (b"1", b"2"):
        kind = "link"
    elif typeflag == b"S" or b"sparse" in fields:
        kind = "sparse"
    elif typeflag in _TAR_FILE_TYPES:
        kind = "file"
    else:
        kind = "special"
    return TarMember(text, kind, size)


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
    """Why an archive or member failed, quoting nothing from inside the upload.

    Our own errors carry fixed texts; a library's message may quote member names or bytes of the file
    (zipfile's "Bad CRC-32 for file %r", gzip's "Not a gzipped file (b'..')"), so only its type is named.
    """
    if isinstance(exc, BadArchive | ExpansionBudgetSpent | VolumeError | ScanError):
        return sanitize_filename(str(exc) or type(exc).__name__)[:200]
    return f"{type(exc).__name__} while reading it"
