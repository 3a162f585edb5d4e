"""Expanding uploads into job entries: scans stored by hash, archives read as streams, under budgets.

One :class:`Intake` collects the entries of one job from any number of files; every limit
(:class:`IntakeLimits`) truncates instead of failing the request, and whatever it stopped becomes one
failed entry that names the setting which raises it.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from brainscan import scanners
from brainscan.intake.archives import (
    BadArchive,
    ExpansionBudgetSpent,
    GuardedReader,
    is_system_error,
    s_islnk,
    s_isreg,
    short,
    zip_entry_count,
)
from brainscan.intake.names import is_os_metadata, member_name, sanitize_filename
from brainscan.intake.sniffing import (
    ARCHIVE_KINDS,
    HEAD_BYTES,
    SCAN_KINDS,
    Kind,
    describe_unsupported,
    looks_like_tar,
    sniff,
)
from brainscan.jobs import IntakeEntry
from brainscan.settings import Settings
from brainscan.storage import ScanStore

CHUNK = 1024 * 1024


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


class _JobFull(Exception):
    pass


class _TooManyEntries(Exception):
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
                if self._add_image(name, kind, head, f, path=path, budgeted=False):
                    pass
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

    def _add_image(
        self, name: str, kind: Kind | None, head: bytes, rest: BinaryIO, *, path: Path | None, budgeted: bool
    ) -> bool:
        """Store the file if it is a scan (JPEG, PNG) or a scanner file (DICOM, NIfTI); False if not."""
        scanner = scanners.sniff_scanner(head) if kind in (None, "gzip") else None
        if scanner is not None:
            self._add_scanner_file(name, scanner, head, rest, path=path, budgeted=budgeted)
        elif kind in SCAN_KINDS:
            self._add_scan(name, head, rest, budgeted=budgeted)
        else:
            return False
        return True

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
            raise ExpansionBudgetSpent

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
        except ExpansionBudgetSpent:
            self._fail(
                name,
                f"volume expands past {self.limits.max_expanded_bytes} bytes for this request "
                "(BRAINSCAN_MAX_EXPANDED_BYTES); not read",
            )
        except scanners.VolumeError as exc:
            self._fail(name, str(exc))
        except (EOFError, zlib.error, OSError) as exc:
            if is_system_error(exc):
                raise  # our disk, not the client's file
            self._fail(name, f"corrupt gzip-compressed NIfTI: {short(exc)}")
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
        name = member_name(archive, member)
        head = _read_head(reader, self)
        kind = sniff(head)
        if self._add_image(name, kind, head, reader, path=None, budgeted=True):
            pass
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
        except ExpansionBudgetSpent:
            self._fail(
                name,
                f"expansion stopped after {self.limits.max_expanded_bytes} bytes "
                "(BRAINSCAN_MAX_EXPANDED_BYTES); the rest of the archive was not read",
            )
        except BadArchive as exc:
            self._fail(name, f"corrupt archive: {exc}; the rest of it was not read")
        except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError, ValueError) as exc:
            if is_system_error(exc):
                raise  # our disk, not the client's archive
            self._fail(name, f"corrupt archive: {short(exc)}; the rest of it was not read")

    def _add_zip(self, name: str, f: BinaryIO) -> None:
        def expand() -> int:
            count = zip_entry_count(f, self.limits.max_archive_entries)
            if count > self.limits.max_archive_entries:
                raise _TooManyEntries
            f.seek(0)
            seen = 0
            with zipfile.ZipFile(f) as archive:
                for info in archive.infolist():
                    # Not info.is_dir(): it raises IndexError on an empty member name.
                    if info.filename.endswith("/") or is_os_metadata(info.filename):
                        continue
                    seen += 1
                    member = member_name(name, info.filename)
                    mode = info.external_attr >> 16
                    if s_islnk(mode):
                        self._fail(member, "symbolic link in archive: not followed")
                    elif mode and not s_isreg(mode):
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
            if is_system_error(exc):
                raise
            # One damaged entry (bad CRC, unknown compression) fails alone; the others still count.
            self._fail(member_name(archive_name, info.filename), f"unreadable entry: {short(exc)}")

    def _add_gzip(self, name: str, f: BinaryIO) -> None:
        f.seek(0)
        try:
            with gzip.GzipFile(fileobj=f, mode="rb") as probe:
                inner = probe.read(1024)
        except (OSError, EOFError, zlib.error) as exc:
            self._fail(name, f"corrupt gzip file: {short(exc)}")
            return
        if not looks_like_tar(inner):
            self._fail(name, "unsupported file type: gzip file that is not a tar archive")
            return
        f.seek(0)
        self._add_tar(name, f, compressed=True)

    def _add_tar(self, name: str, f: BinaryIO, *, compressed: bool) -> None:
        budget = self.limits.max_expanded_bytes - self.expanded_bytes

        @contextlib.contextmanager
        def members() -> Iterator[tarfile.TarFile]:
            # Bounded reads and seeks (see GuardedReader); plain "r" mode, so tarfile reads from it
            # directly rather than through its own stream buffering.
            f.seek(0)
            with contextlib.ExitStack() as stack:
                raw: BinaryIO = f
                if compressed:
                    raw = stack.enter_context(gzip.GzipFile(fileobj=f, mode="rb"))  # type: ignore[assignment]
                yield stack.enter_context(tarfile.TarFile(fileobj=GuardedReader(raw, budget), mode="r"))  # type: ignore[call-overload]

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
                    if info.isdir() or is_os_metadata(info.name):
                        continue
                    seen += 1
                    member = member_name(name, info.name)
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


def expand_uploads(
    store: ScanStore, limits: IntakeLimits, files: Sequence[tuple[Path, str | bytes | None]]
) -> list[IntakeEntry]:
    """Every scan in these files (path, client file name), stored; failures as entries with errors."""
    intake = Intake(store, limits)
    for path, filename in files:
        intake.add_file(path, filename)
    return intake.entries
