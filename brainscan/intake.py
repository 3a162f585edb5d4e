"""Job submission without HTTP: sniff what was sent, expand archives safely, store scans, write the job.

The API, the nightly inbox scan and tests all go through here. The rules:

* The type of a file comes from its bytes, never its name. JPEG and PNG are scans; ZIP, TAR and
  gzip-compressed TAR are archives of scans; DICOM and NIfTI (``.nii``, ``.nii.gz``) files, alone
  or inside archives, are converted here into one 8-bit PNG per frame or axial slice
  (:mod:`brainscan.scanners`; the original scanner bytes are never stored); anything else becomes a
  failed item with the reason.
* Archives are read as streams, member by member. Nothing is ever extracted to a path: a member's
  name (``../../etc/passwd``, ``/abs``, control characters) is display data only, and each scan is
  stored under its SHA-256 by :class:`~brainscan.storage.ScanStore`.
* Every byte read out of an archive is counted as it is read (headers are not trusted), against
  ``max_scan_bytes`` per scan and ``max_expanded_bytes`` per request, so a zip bomb costs at most
  the limit. Entries per archive (``max_archive_entries``) are counted before a zip is opened (its
  central directory is walked without building objects) and while a tar streams.
* Limits truncate, they do not fail the request: whatever could not be read becomes one failed item
  that says which limit stopped it and which setting raises it.
* An archive over the entry limit, an empty archive, a nested archive, a link, a device file or an
  encrypted member each become one failed item; directories and OS metadata files
  (``__MACOSX/``, ``._*``, ``.DS_Store``, ``Thumbs.db``) are skipped silently.

Then :func:`create_job` writes the job and all its items in one transaction, and
:func:`submit_job` enqueues only after that commit (the reaper sends anything the broker missed).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import struct
import tarfile
import tempfile
import unicodedata
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal

from sqlalchemy import insert
from sqlalchemy.orm import Session

from brainscan import scanners
from brainscan.db import Item, ItemStatus, Job, JobStatus
from brainscan.settings import Settings
from brainscan.storage import ScanStore

log = logging.getLogger(__name__)

Kind = Literal["jpeg", "png", "zip", "tar", "gzip"]
SCAN_KINDS = ("jpeg", "png")
ARCHIVE_KINDS = ("zip", "tar", "gzip")

CHUNK = 1024 * 1024
HEAD_BYTES = 64 * 1024  # enough for every magic number and, usually, an image's size header
MAX_FILENAME_CHARS = 255
# A zip's central directory is read into memory by zipfile; legitimate ones are far smaller.
MAX_CENTRAL_DIRECTORY_BYTES = 64 * 1024 * 1024
# tarfile reads a pax or GNU long-name header in one read(); a real one is a few hundred bytes.
MAX_TAR_HEADER_READ = 8 * 1024 * 1024
OS_METADATA_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
SUPPORTED = "send JPEG, PNG, DICOM or NIfTI scans, or zip/tar archives of them"

# Other formats we can name in the error, so that a client learns what it actually sent.
_KNOWN_UNSUPPORTED = (
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"%PDF", "PDF"),
    (0, b"BZh", "bzip2"),
    (0, b"\xfd7zXZ\x00", "xz"),
    (0, b"7z\xbc\xaf\x27\x1c", "7z"),
    (0, b"Rar!", "RAR"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


# --------------------------------------------------------------------------------------------------
# Sniffing and names


def sniff(head: bytes) -> Kind | None:
    """The real type of a file from its first bytes (pass at least 1 KiB when there is that much)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):  # PK\5\6: an empty zip
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if _looks_like_tar(head):
        return "tar"
    return None


def _looks_like_tar(head: bytes) -> bool:
    if head[257:262] == b"ustar":  # POSIX and GNU tar
        return True
    # An empty tar is nothing but zero blocks (at least two).
    return len(head) >= 1024 and not any(head[:1024])


def describe_unsupported(head: bytes) -> str:
    if not head:
        return "empty file"
    for offset, magic, name in _KNOWN_UNSUPPORTED:
        if head[offset : offset + len(magic)] == magic:
            return f"unsupported file type ({name}): {SUPPORTED}"
    return f"unsupported file type: {SUPPORTED}"


def sanitize_filename(name: str | bytes | None) -> str:
    """A client's file name made safe to display: no control characters, at most 255 characters.

    It stays data: nothing ever opens a path built from it.
    """
    if name is None:
        return "unnamed"
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    out = []
    for ch in name:
        category = unicodedata.category(ch)
        if category == "Cs":  # lone surrogates (tar's surrogateescape) cannot be encoded anywhere
            out.append("\ufffd")
        elif category == "Cc" or ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069":
            continue  # control characters, and bidi overrides that make names lie about extensions
        else:
            out.append(ch)
    clean = "".join(out).strip()
    if not clean:
        return "unnamed"
    if len(clean) > MAX_FILENAME_CHARS:
        # Keep the start (folders) and the end (file name and extension) of a long name.
        keep_head = 100
        keep_tail = MAX_FILENAME_CHARS - keep_head - 1
        clean = clean[:keep_head] + "\u2026" + clean[-keep_tail:]
    return clean


def _member_name(archive_name: str, member: str) -> str:
    return sanitize_filename(f"{archive_name}/{sanitize_filename(member)}")


def _is_os_metadata(member: str) -> bool:
    parts = [p for p in member.replace("\\", "/").split("/") if p]
    if not parts:
        return False
    base = parts[-1]
    return parts[0] == "__MACOSX" or base.startswith("._") or base.lower() in OS_METADATA_NAMES


# --------------------------------------------------------------------------------------------------
# Intake


@dataclass
class IntakeEntry:
    """One future item: a stored scan (sha256 set) or a failure (error set)."""

    filename: str
    sha256: str | None = None
    error: str | None = None
    size: int = 0
    source_ref: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass(frozen=True)
class IntakeLimits:
    max_archive_entries: int
    max_expanded_bytes: int
    max_scan_bytes: int
    max_image_pixels: int
    max_items_per_job: int

    @classmethod
    def from_settings(cls, settings: Settings) -> IntakeLimits:
        return cls(
            max_archive_entries=settings.max_archive_entries,
            max_expanded_bytes=settings.max_expanded_bytes,
            max_scan_bytes=settings.max_scan_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_items_per_job=settings.max_items_per_job,
        )


class _ScanTooLarge(Exception):
    pass


class _ExpansionBudgetSpent(Exception):
    pass


class _JobFull(Exception):
    pass


class _TooManyEntries(Exception):
    pass


class _BadArchive(Exception):
    pass


@dataclass
class Intake:
    """Collects the entries of one job from any number of files, under one set of budgets."""

    store: ScanStore
    limits: IntakeLimits
    entries: list[IntakeEntry] = field(default_factory=list)
    expanded_bytes: int = 0
    full: bool = False

    # -- public ------------------------------------------------------------------------------------

    def add_file(self, path: Path, filename: str | bytes | None) -> None:
        """Add one uploaded (or dropped) file: a scan, an archive of scans, or a failed item."""
        name = sanitize_filename(filename)
        if self.full:
            return
        try:
            with open(path, "rb") as f:
                head = f.read(HEAD_BYTES)
                kind = sniff(head)
                scanner = scanners.sniff_scanner(head) if kind in (None, "gzip") else None
                if scanner is not None:
                    self._add_scanner_file(name, scanner, head, f, path=path, budgeted=False)
                elif kind in SCAN_KINDS:
                    self._add_scan(name, head, f, budgeted=False)
                elif kind == "zip":
                    self._add_zip(name, f)
                elif kind == "tar":
                    f.seek(0)
                    self._add_tar(name, f, compressed=False)
                elif kind == "gzip":
                    self._add_gzip(name, f)
                else:
                    self._fail(name, describe_unsupported(head))
        except _JobFull:
            pass

    # -- scans -------------------------------------------------------------------------------------

    def _add_scan(self, name: str, head: bytes, rest: BinaryIO, *, budgeted: bool) -> None:
        """Store a scan: ``head`` (its first bytes, already read) then whatever ``rest`` yields."""
        reason = self._image_header_problem(head)
        if reason:
            self._fail(name, reason)
            return
        self._reserve_item(name)
        limit = self.limits.max_scan_bytes
        try:
            sha256, size = self.store.put_chunks(self._bounded(head, rest, limit, budgeted))
        except _ScanTooLarge:
            self._record(
                IntakeEntry(name, error=f"scan larger than {limit} bytes (BRAINSCAN_MAX_SCAN_BYTES)")
            )
            return
        self._record(IntakeEntry(name, sha256=sha256, size=size))

    def _bounded(self, head: bytes, rest: BinaryIO, limit: int, budgeted: bool) -> Iterator[bytes]:
        """``head`` then chunks of ``rest``, counted as they are read: headers are never trusted."""
        size = len(head)
        if size > limit:
            raise _ScanTooLarge
        yield head
        while chunk := rest.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise _ScanTooLarge
            if budgeted:
                self._spend(len(chunk))
            yield chunk

    def _spend(self, n: int) -> None:
        self.expanded_bytes += n
        if self.expanded_bytes > self.limits.max_expanded_bytes:
            raise _ExpansionBudgetSpent

    def _image_header_problem(self, head: bytes) -> str | None:
        """Refuse a declared decompression bomb now, from the header alone (PIL reads no pixels)."""
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(head)) as image:
                    width, height = image.size
        except Image.DecompressionBombError as exc:
            return f"image too large to decode safely: {exc}"
        except Exception:
            return None  # header not within the first bytes, or damaged: the worker decides
        if width * height > self.limits.max_image_pixels:
            return (
                f"image is {width}x{height} pixels, over the limit of {self.limits.max_image_pixels} "
                "(BRAINSCAN_MAX_IMAGE_PIXELS)"
            )
        return None

    # -- scanner files (DICOM, NIfTI) ----------------------------------------------------------------

    def _add_scanner_file(
        self,
        name: str,
        kind: scanners.ScannerKind,
        head: bytes,
        rest: BinaryIO,
        *,
        path: Path | None,
        budgeted: bool,
    ) -> None:
        """Convert a DICOM/NIfTI file into one stored PNG item per frame or axial slice.

        Only the derived pixels are stored: the file itself is read from ``path`` (an upload already
        spooled to disk) or from a temporary copy under the store's tmp dir, deleted afterwards.
        Every frame or slice is one item (``max_items_per_job``); a ``.nii.gz`` is decompressed to
        disk with every decompressed byte counted against ``max_expanded_bytes``.
        """
        limit = self.limits.max_scan_bytes
        temps: list[Path] = []
        try:
            if path is not None and path.stat().st_size > limit:
                raise _ScanTooLarge
            source = path if path is not None else self._spool(head, rest, budgeted, temps)
            if kind == "nifti-gz":
                source = self._gunzip(source, temps)
            if kind == "dicom":
                derived = scanners.dicom_frames(
                    source, max_image_pixels=self.limits.max_image_pixels, spend=self._spend
                )
            else:
                derived = scanners.nifti_slices(source, max_image_pixels=self.limits.max_image_pixels)
            with contextlib.closing(derived):
                for scan in derived:
                    self._reserve_item(name)
                    sha256 = self.store.put_bytes(scan.png)
                    self._record(IntakeEntry(name, sha256=sha256, size=len(scan.png), source_ref=scan.ref))
        except _ScanTooLarge:
            self._fail(name, f"scan larger than {limit} bytes (BRAINSCAN_MAX_SCAN_BYTES)")
        except _ExpansionBudgetSpent:
            self._fail(
                name,
                f"volume expands past {self.limits.max_expanded_bytes} bytes for this request "
                "(BRAINSCAN_MAX_EXPANDED_BYTES); not read",
            )
        except scanners.VolumeError as exc:
            self._fail(name, str(exc))
        except (EOFError, zlib.error, OSError) as exc:
            if _is_system_error(exc):
                raise  # our disk, not the client's file
            self._fail(name, f"corrupt gzip-compressed NIfTI: {_short(exc)}")
        finally:
            for temp in temps:
                temp.unlink(missing_ok=True)

    def _temp_file(self, suffix: str, temps: list[Path]) -> tuple[int, Path]:
        self.store.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.store.tmp_dir, suffix=suffix)
        temps.append(Path(name))
        return fd, Path(name)

    def _spool(self, head: bytes, rest: BinaryIO, budgeted: bool, temps: list[Path]) -> Path:
        """Copy an archive member to a temporary file (pydicom and nibabel read from disk)."""
        fd, path = self._temp_file(".bin", temps)
        with os.fdopen(fd, "wb") as out:
            for chunk in self._bounded(head, rest, self.limits.max_scan_bytes, budgeted):
                out.write(chunk)
        return path

    def _gunzip(self, source: Path, temps: list[Path]) -> Path:
        """Decompress a .nii.gz to a temporary .nii, counting every byte against the budget."""
        fd, path = self._temp_file(".nii", temps)
        with os.fdopen(fd, "wb") as out, gzip.open(source, "rb") as compressed:
            while chunk := compressed.read(CHUNK):
                self._spend(len(chunk))
                out.write(chunk)
        return path

    # -- archives ----------------------------------------------------------------------------------

    def _add_member(self, archive: str, member: str, reader: BinaryIO) -> None:
        """One regular file inside an archive: sniff it from its own first bytes, then store it."""
        name = _member_name(archive, member)
        head = _read_head(reader, self)
        kind = sniff(head)
        scanner = scanners.sniff_scanner(head) if kind in (None, "gzip") else None
        if scanner is not None:
            self._add_scanner_file(name, scanner, head, reader, path=None, budgeted=True)
        elif kind in SCAN_KINDS:
            self._add_scan(name, head, reader, budgeted=True)
        elif kind in ARCHIVE_KINDS:
            self._fail(name, "nested archive not supported: put scans directly in the archive")
        else:
            self._fail(name, describe_unsupported(head))

    def _run_archive(self, name: str, expand) -> None:  # type: ignore[no-untyped-def]
        """Run one archive's expansion and turn every way it can stop into a clear failed item."""
        start = len(self.entries)
        try:
            seen = expand()
            if seen == 0:
                self._fail(name, "empty archive: no files in it")
        except _TooManyEntries:
            # Refused whole (counted before anything is stored), so a job never holds an arbitrary
            # first part of a huge archive.
            del self.entries[start:]
            self._fail(
                name,
                f"archive has more than {self.limits.max_archive_entries} entries "
                "(BRAINSCAN_MAX_ARCHIVE_ENTRIES): split it",
            )
        except _ExpansionBudgetSpent:
            self._fail(
                name,
                f"expansion stopped after {self.limits.max_expanded_bytes} bytes "
                "(BRAINSCAN_MAX_EXPANDED_BYTES); the rest of the archive was not read",
            )
        except _BadArchive as exc:
            self._fail(name, f"corrupt archive: {exc}; the rest of it was not read")
        except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError, ValueError) as exc:
            if _is_system_error(exc):
                raise  # our disk, not the client's archive
            self._fail(name, f"corrupt archive: {_short(exc)}; the rest of it was not read")

    def _add_zip(self, name: str, f: BinaryIO) -> None:
        def expand() -> int:
            count = _zip_entry_count(f, self.limits.max_archive_entries)
            if count > self.limits.max_archive_entries:
                raise _TooManyEntries
            f.seek(0)
            seen = 0
            with zipfile.ZipFile(f) as archive:
                for info in archive.infolist():
                    if info.is_dir() or _is_os_metadata(info.filename):
                        continue
                    seen += 1
                    member = _member_name(name, info.filename)
                    mode = info.external_attr >> 16
                    if _s_islnk(mode):
                        self._fail(member, "symbolic link in archive: not followed")
                    elif mode and not _s_isreg(mode):
                        self._fail(member, "special file in archive: not read")
                    elif info.flag_bits & 0x1:
                        self._fail(member, "encrypted archive entry: not supported")
                    else:
                        self._add_zip_member(archive, info, name)
            return seen

        self._run_archive(name, expand)

    def _add_zip_member(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, archive_name: str) -> None:
        try:
            with archive.open(info) as reader:
                self._add_member(archive_name, info.filename, reader)  # type: ignore[arg-type]
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as exc:
            if _is_system_error(exc):
                raise
            # One damaged entry (bad CRC, unknown compression) fails alone; the others still count.
            self._fail(_member_name(archive_name, info.filename), f"unreadable entry: {_short(exc)}")

    def _add_gzip(self, name: str, f: BinaryIO) -> None:
        f.seek(0)
        try:
            with gzip.GzipFile(fileobj=f, mode="rb") as probe:
                inner = probe.read(1024)
        except (OSError, EOFError, zlib.error) as exc:
            self._fail(name, f"corrupt gzip file: {_short(exc)}")
            return
        if not _looks_like_tar(inner):
            self._fail(name, "unsupported file type: gzip file that is not a tar archive")
            return
        f.seek(0)
        self._add_tar(name, f, compressed=True)

    def _add_tar(self, name: str, f: BinaryIO, *, compressed: bool) -> None:
        budget = self.limits.max_expanded_bytes - self.expanded_bytes

        @contextlib.contextmanager
        def members() -> Iterator[tarfile.TarFile]:
            # Bounded reads and seeks (see _GuardedReader); plain "r" mode, so tarfile reads from it
            # directly rather than through its own stream buffering.
            f.seek(0)
            with contextlib.ExitStack() as stack:
                raw: BinaryIO = f
                if compressed:
                    raw = stack.enter_context(gzip.GzipFile(fileobj=f, mode="rb"))  # type: ignore[assignment]
                yield stack.enter_context(tarfile.TarFile(fileobj=_GuardedReader(raw, budget), mode="r"))  # type: ignore[call-overload]

        def expand() -> int:
            # First count the entries (headers only: tarfile seeks over the data), so that an archive
            # over the limit is refused before anything of it is stored, as a zip is.
            with members() as archive:
                entries = 0
                while archive.next() is not None:
                    archive.members.clear()  # tarfile remembers members; we never need them again
                    entries += 1
                    if entries > self.limits.max_archive_entries:
                        raise _TooManyEntries
            seen = 0
            with members() as archive:
                while (info := archive.next()) is not None:
                    archive.members.clear()
                    if info.isdir() or _is_os_metadata(info.name):
                        continue
                    seen += 1
                    member = _member_name(name, info.name)
                    if info.issym() or info.islnk():
                        self._fail(member, "link in archive: not followed")
                    elif not info.isreg():
                        self._fail(member, "special file in archive (device, fifo): not read")
                    elif info.issparse():
                        self._fail(member, "sparse file in archive: not supported")
                    else:
                        reader = archive.extractfile(info)
                        assert reader is not None  # a regular file always has a reader
                        with reader:
                            self._add_member(name, info.name, reader)  # type: ignore[arg-type]
            return seen

        self._run_archive(name, expand)

    # -- bookkeeping -------------------------------------------------------------------------------

    def _reserve_item(self, name: str) -> None:
        if len(self.entries) >= self.limits.max_items_per_job:
            self.full = True
            self.entries.append(
                IntakeEntry(
                    name,
                    error=f"not read: the job reached its limit of {self.limits.max_items_per_job} scans "
                    "(BRAINSCAN_MAX_ITEMS_PER_JOB); submit the rest as another job",
                )
            )
            raise _JobFull

    def _record(self, entry: IntakeEntry) -> None:
        self.entries.append(entry)

    def _fail(self, name: str, error: str) -> None:
        self._reserve_item(name)
        self._record(IntakeEntry(name, error=error))


def _read_head(reader: BinaryIO, intake: Intake) -> bytes:
    head = b""
    while len(head) < HEAD_BYTES:
        chunk = reader.read(HEAD_BYTES - len(head))
        if not chunk:
            break
        intake._spend(len(chunk))
        head += chunk
    return head


class _GuardedReader(io.RawIOBase):
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
            raise _ExpansionBudgetSpent
        return self.raw.seek(offset, whence)

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        if size is None or size < 0 or size > MAX_TAR_HEADER_READ:
            raise _BadArchive("tar header or read larger than allowed")
        if self.raw.tell() + size > self.limit:
            raise _ExpansionBudgetSpent
        return self.raw.read(size)


def _zip_entry_count(f: BinaryIO, limit: int) -> int:
    """Count a zip's central-directory entries (up to ``limit + 1``) without building objects.

    zipfile parses the whole directory into ZipInfo objects when it opens; a crafted archive with
    millions of tiny entries (or a lying entry count) would exhaust memory before we could count.
    """
    endrec = zipfile._EndRecData(f)  # type: ignore[attr-defined]  # stable private helper since 2.x
    if not endrec:
        raise zipfile.BadZipFile("no end of central directory record")
    size_cd = endrec[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if size_cd > MAX_CENTRAL_DIRECTORY_BYTES:
        return limit + 1
    start = endrec[zipfile._ECD_LOCATION] - size_cd  # type: ignore[attr-defined]
    if endrec[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
        start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
    if start < 0:
        raise zipfile.BadZipFile("bad offset for central directory")
    f.seek(start)
    remaining = size_cd
    count = 0
    while remaining >= 46 and count <= limit:
        header = f.read(46)
        if len(header) < 46 or header[:4] != b"PK\x01\x02":
            break
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", header, 28)
        skip = name_len + extra_len + comment_len
        f.seek(skip, os.SEEK_CUR)
        remaining -= 46 + skip
        count += 1
    return count


def _is_system_error(exc: BaseException) -> bool:
    # Archive libraries raise OSError subclasses without an errno (BadGzipFile, "not a gzip file");
    # a real errno (ENOSPC, EIO, EACCES) is a fault of this machine and must not be blamed on the input.
    return isinstance(exc, OSError) and exc.errno is not None


def _s_islnk(mode: int) -> bool:
    return (mode & 0o170000) == 0o120000


def _s_isreg(mode: int) -> bool:
    return (mode & 0o170000) in (0o100000, 0)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return sanitize_filename(text)[:200]


def expand_uploads(
    store: ScanStore, limits: IntakeLimits, files: Sequence[tuple[Path, str | bytes | None]]
) -> list[IntakeEntry]:
    """Every scan in these files (path, client file name), stored; failures as entries with errors."""
    intake = Intake(store, limits)
    for path, filename in files:
        intake.add_file(path, filename)
    return intake.entries


# --------------------------------------------------------------------------------------------------
# Jobs


def create_job(
    session: Session,
    owner_key_id: int | None,
    entries: Sequence[IntakeEntry],
    *,
    source: str = "api",
    callback_url: str | None = None,
) -> Job:
    """Write the job and all its items in one transaction and commit it.

    Items that failed at intake are written already failed (and counted), so a client sees exactly
    what it sent. A job whose every item failed is final at once.
    """
    now = datetime.now(UTC)
    failed = sum(1 for e in entries if e.failed)
    all_failed = failed == len(entries)
    job = Job(
        owner_key_id=owner_key_id,
        status=JobStatus.failed.value if all_failed else JobStatus.queued.value,
        total=len(entries),
        done=0,
        failed=failed,
        source=source,
        callback_url=callback_url,
        created_at=now,
        finished_at=now if all_failed else None,
    )
    try:
        session.add(job)
        session.flush()
        rows = [
            {
                "job_id": job.id,
                "position": position,
                "filename": entry.filename,
                "source_ref": entry.source_ref,
                "sha256": entry.sha256,
                "status": ItemStatus.failed.value if entry.failed else ItemStatus.queued.value,
                "error": entry.error,
                "created_at": now,
                "finished_at": now if entry.failed else None,
            }
            for position, entry in enumerate(entries)
        ]
        if rows:
            session.execute(insert(Item), rows)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return job


@dataclass
class Submitted:
    job: Job
    enqueued: bool


def submit_job(
    session: Session,
    store: ScanStore,
    limits: IntakeLimits,
    owner_key_id: int | None,
    files: Sequence[tuple[Path, str | bytes | None]],
    *,
    source: str = "api",
    callback_url: str | None = None,
) -> Submitted:
    """Expand and store ``files``, write the job, then (only after the commit) enqueue it.

    ``enqueued`` is False when the broker was unreachable: the job is safely stored and the reaper
    sends its items later, so the caller still answers with the job id.
    """
    entries = expand_uploads(store, limits, files)
    job = create_job(session, owner_key_id, entries, source=source, callback_url=callback_url)
    enqueued = True
    if job.status == JobStatus.queued.value:
        from brainscan.queueing import enqueue_job

        enqueued = enqueue_job(job.id)
    elif job.callback_url:  # final at submit (every file failed at intake): the webhook fires now
        from worker.notify import enqueue_notifications

        enqueue_notifications([job.id])
    log.info(
        "job %s stored: %d item(s), %d failed at intake, enqueued=%s",
        job.id,
        job.total,
        job.failed,
        enqueued,
        extra={"job_id": job.id},
    )
    return Submitted(job, enqueued)
