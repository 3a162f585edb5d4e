"""Expanding uploads into job entries: scans stored by hash, archives read as streams, under budgets.

One :class:`Intake` collects the entries of one job from any number of files. Its cost is bounded by
one :class:`RequestBudget` per request: every decompressed byte (member data, skipped members, tar
headers and padding, ``.nii.gz`` voxels), every archive entry examined, the bytes of scans stored
and the CPU time of the thread doing the work. A spent budget stops the archive (or scanner file)
being read with one failed entry that names the setting which raises it; files after it are not
read; what was accepted before stays. Per-file limits (:class:`IntakeLimits`) truncate the same way.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from brainscan import imaging, scanners
from brainscan.intake.archives import (
    BadArchive,
    is_system_error,
    s_islnk,
    s_isreg,
    short,
    tar_members,
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
MIB = 1024 * 1024
_DEFAULTS = Settings.model_construct()  # the documented defaults, for limits built without settings


@dataclass(frozen=True)
class IntakeLimits:
    max_archive_entries: int
    max_expanded_bytes: int
    max_scan_bytes: int
    max_image_pixels: int
    max_items_per_job: int
    max_request_entries: int = _DEFAULTS.max_request_entries
    max_intake_cpu_s: float = _DEFAULTS.max_intake_cpu_s
    max_intake_cpu_s_per_mib: float = _DEFAULTS.max_intake_cpu_s_per_mib
    max_stored_ratio: int = _DEFAULTS.max_stored_ratio
    max_expansion_ratio: int = _DEFAULTS.max_expansion_ratio
    volume: scanners.VolumeLimits | None = None  # None: the default volume limits

    @classmethod
    def from_settings(cls, settings: Settings) -> IntakeLimits:
        return cls(
            max_archive_entries=settings.max_archive_entries,
            max_expanded_bytes=settings.max_expanded_bytes,
            max_scan_bytes=settings.max_scan_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_items_per_job=settings.max_items_per_job,
            max_request_entries=settings.max_request_entries,
            max_intake_cpu_s=settings.max_intake_cpu_s,
            max_intake_cpu_s_per_mib=settings.max_intake_cpu_s_per_mib,
            max_stored_ratio=settings.max_stored_ratio,
            max_expansion_ratio=settings.max_expansion_ratio,
            volume=scanners.VolumeLimits.from_settings(settings),
        )

    @property
    def volume_limits(self) -> scanners.VolumeLimits:
        if self.volume is not None:
            return self.volume
        return scanners.VolumeLimits.from_settings(_DEFAULTS, max_image_pixels=self.max_image_pixels)


class BudgetSpent(Exception):
    """A request-wide budget is used up; the message is the fixed reason (with its setting)."""


@dataclass
class RequestBudget:
    """What one request may still cost. Every ``spend_*`` raises :class:`BudgetSpent` once spent,
    and keeps raising: whatever comes after in the request is not read."""

    limits: IntakeLimits
    uploaded_bytes: int = 0
    expanded_bytes: int = 0
    entries: int = 0
    stored_bytes: int = 0
    cpu_start: float = field(default_factory=time.thread_time)
    spent: str | None = None

    def add_upload(self, size: int) -> None:
        self.uploaded_bytes += size

    def expanded_limit(self) -> int:
        """``max_expanded_bytes``, or less for a small upload: ``max_expansion_ratio`` times its size,
        but at least one scanner file's decoded size (``max_volume_bytes``)."""
        by_ratio = max(
            self.limits.volume_limits.max_bytes, self.limits.max_expansion_ratio * self.uploaded_bytes
        )
        return min(self.limits.max_expanded_bytes, by_ratio)

    def spend_expanded(self, n: int) -> None:
        """``n`` more bytes decompressed or examined (members, skipped data, headers)."""
        self.expanded_bytes += n
        limit = self.expanded_limit()
        if self.expanded_bytes > limit:
            if limit == self.limits.max_expanded_bytes:
                setting = "BRAINSCAN_MAX_EXPANDED_BYTES"
            else:
                setting = f"{self.limits.max_expansion_ratio} times the upload: BRAINSCAN_MAX_EXPANSION_RATIO"
            self._stop(f"expansion stopped at the limit of {limit} bytes for this request ({setting})")
        self.check()

    def spend_entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_request_entries:
            self._stop(
                f"archive entries over the limit of {self.limits.max_request_entries} for this request "
                "(BRAINSCAN_MAX_REQUEST_ENTRIES)"
            )
        self.check()

    def stored_limit(self) -> int:
        return max(self.limits.max_scan_bytes, self.limits.max_stored_ratio * self.uploaded_bytes)

    def stored_room(self) -> int:
        """Bytes of scans this request may still store: a scan larger than this is not stored."""
        return self.stored_limit() - self.stored_bytes

    def count_stored(self, n: int) -> None:
        self.stored_bytes += n

    def stop_storing(self) -> str:
        """A scan did not fit in :meth:`stored_room`: the request stops; returns the reason."""
        self._stop(
            f"this request would store more than its limit of {self.limits.max_stored_ratio} times its "
            "upload size in scans (BRAINSCAN_MAX_STORED_RATIO)"
        )
        return str(self.spent)

    def cpu_limit_s(self) -> float:
        return self.limits.max_intake_cpu_s + self.limits.max_intake_cpu_s_per_mib * self.uploaded_bytes / MIB

    def check(self) -> None:
        """Raise if a budget is spent; the CPU time of this thread is read here."""
        if self.spent is None and time.thread_time() - self.cpu_start > self.cpu_limit_s():
            self._stop(
                "intake reached its limit of CPU time for this request (BRAINSCAN_MAX_INTAKE_CPU_S, "
                "BRAINSCAN_MAX_INTAKE_CPU_S_PER_MIB)"
            )
        if self.spent is not None:
            raise BudgetSpent(self.spent)

    def _stop(self, reason: str) -> None:
        if self.spent is None:
            self.spent = reason


class _ScanTooLarge(Exception):
    def __init__(self, reason: str | None) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class UploadCharge:
    """What one uploaded file costs its key's daily byte quota (:mod:`brainscan.quotas`): the larger
    of the bytes received for it and the scan bytes it stored, so a file refused at intake (junk, a
    bad header, an archive of nothing usable) costs its size like a stored one.

    Spread over the file's entries as they are recorded (a chunk may be committed before the file
    ends): the first entry is charged up to the bytes received, each later one only what the stored
    scans add beyond that. Entries dropped meanwhile (a tar stream found over the entry limit) are
    no items: the sums are then taken again from the entries that remain.
    """

    start: int  # where the file's entries begin in ``Intake.entries``
    received: int
    stored: int = 0
    charged: int = 0
    recorded: int = 0  # len(entries) after the last entry charged

    def charge(self, entries: Sequence[IntakeEntry], entry: IntakeEntry) -> None:
        """Set ``entry.quota_bytes``; ``entry`` is about to be appended to ``entries``."""
        if len(entries) < self.recorded:
            remaining = entries[self.start :]
            self.stored = sum(e.size for e in remaining if e.sha256 is not None)
            self.charged = sum(e.quota_bytes or 0 for e in remaining)
        if entry.sha256 is not None:
            self.stored += entry.size
        entry.quota_bytes = max(self.received, self.stored) - self.charged
        self.charged += entry.quota_bytes
        self.recorded = len(entries) + 1


class _JobFull(Exception):
    pass


class _TooManyEntries(Exception):
    pass


@dataclass
class Intake:
    """Collects the entries of one job from any number of files, under one request budget."""

    store: ScanStore
    limits: IntakeLimits
    entries: list[IntakeEntry] = field(default_factory=list)
    full: bool = False
    budget: RequestBudget = field(init=False)
    # Called after each recorded entry: submit's chunked writer commits and enqueues from here, so
    # scoring starts while the rest is read. A zip over the entry limit is refused before any of its
    # members is recorded; a tar stream (read once) can be found over it half way, and then its
    # recorded entries are dropped from ``entries``, except those already committed.
    on_record: Callable[[], None] | None = None
    # ``entries[:committed]`` are items of a committed job already (submit's chunk writer sets it):
    # they may be scored already, so nothing drops them, and ``len(entries)`` is always the job's
    # item count (what ``max_items_per_job`` is checked against) and ``entries[committed:]`` the
    # next chunk.
    committed: int = 0
    upload: UploadCharge | None = field(default=None, init=False, repr=False)  # the file being read

    def __post_init__(self) -> None:
        self.budget = RequestBudget(self.limits)

    @property
    def expanded_bytes(self) -> int:
        return self.budget.expanded_bytes

    # -- public ------------------------------------------------------------------------------------

    def add_file(self, path: Path, filename: str | bytes | None) -> None:
        """Add one uploaded (or dropped) file: a scan, an archive of scans, or a failed item."""
        name = sanitize_filename(filename)
        if self.full:
            return
        try:
            received = path.stat().st_size
            self.budget.add_upload(received)
            self.upload = UploadCharge(start=len(self.entries), received=received)
            try:
                self.budget.check()
            except BudgetSpent as exc:
                self._fail(name, f"{exc}; not read")
                return
            with open(path, "rb") as f:
                head = f.read(HEAD_BYTES)
                kind = sniff(head)
                if self._add_image(name, kind, head, f, path=path):
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
        self, name: str, kind: Kind | None, head: bytes, rest: BinaryIO, *, path: Path | None
    ) -> bool:
        """Store the file if it is a scan (JPEG, PNG) or a scanner file (DICOM, NIfTI); False if not."""
        scanner = scanners.sniff_scanner(head) if kind in (None, "gzip") else None
        if scanner is not None:
            self._add_scanner_file(name, scanner, head, rest, path=path)
        elif kind in SCAN_KINDS:
            self._add_scan(name, head, rest)
        else:
            return False
        return True

    # -- scans -------------------------------------------------------------------------------------

    def _add_scan(self, name: str, head: bytes, rest: BinaryIO) -> None:
        """Store a scan whose header parses (format, dimensions, mode) and whose size its pixels
        justify; junk is refused here, before anything is stored. ``head`` is already read."""
        head += _read_up_to(rest, imaging.HEADER_WINDOW_BYTES - len(head))
        try:
            header = imaging.scan_header(head, self.limits.max_image_pixels)
        except imaging.ScanError as exc:
            self._fail(name, str(exc))
            return
        self._reserve_item(name)
        # The tightest of three bounds, each with its own reason (None: the request's storage room).
        limit, too_large = min(
            (
                self.limits.max_scan_bytes,
                f"scan larger than {self.limits.max_scan_bytes} bytes (BRAINSCAN_MAX_SCAN_BYTES)",
            ),
            (header.max_file_bytes, imaging.PADDED_IMAGE),
            (self.budget.stored_room(), None),
            key=lambda bound: bound[0],
        )
        try:
            sha256, size = self.store.put_chunks(_bounded(head, rest, limit, too_large))
        except _ScanTooLarge as exc:
            self._record(IntakeEntry(name, error=exc.reason or self.budget.stop_storing()))
            return
        self._record(IntakeEntry(name, sha256=sha256, size=size))
        self.budget.count_stored(size)

    # -- scanner files (DICOM, NIfTI) ----------------------------------------------------------------

    def _add_scanner_file(
        self,
        name: str,
        kind: scanners.ScannerKind,
        head: bytes,
        rest: BinaryIO,
        *,
        path: Path | None,
    ) -> None:
        """Convert a DICOM/NIfTI file into one stored PNG item per frame or axial slice.

        Only the derived pixels are stored: the file itself is read from ``path`` (an upload already
        spooled to disk) or from a temporary copy under the store's tmp dir, deleted afterwards.
        Every frame or slice is one item (``max_items_per_job``); a ``.nii.gz`` is decompressed by
        :func:`scanners.gunzip_nifti` to exactly the size its header declares (after the header
        passed the volume limits), every byte counted against the request's budget.
        """
        limit = self.limits.max_scan_bytes
        volume = self.limits.volume_limits
        temps: list[Path] = []
        try:
            if path is not None and path.stat().st_size > limit:
                raise _ScanTooLarge(f"scan larger than {limit} bytes (BRAINSCAN_MAX_SCAN_BYTES)")
            source = path if path is not None else self._spool(head, rest, temps)
            if kind == "nifti-gz":
                source = self._gunzip(source, volume, temps)
            if kind == "dicom":
                derived = scanners.dicom_frames(
                    source,
                    max_image_pixels=self.limits.max_image_pixels,
                    limits=volume,
                    spend=self.budget.spend_expanded,
                )
            else:
                derived = scanners.nifti_slices(
                    source, max_image_pixels=self.limits.max_image_pixels, limits=volume
                )
            with contextlib.closing(derived):
                for scan in derived:
                    self.budget.check()  # PNG encoding is the CPU-heavy part: checked per slice
                    if len(scan.png) > self.budget.stored_room():
                        raise BudgetSpent(self.budget.stop_storing())
                    self._reserve_item(name)
                    sha256 = self.store.put_bytes(scan.png)
                    self._record(IntakeEntry(name, sha256=sha256, size=len(scan.png), source_ref=scan.ref))
                    self.budget.count_stored(len(scan.png))
        except _ScanTooLarge as exc:
            self._fail(name, str(exc.reason))
        except BudgetSpent as exc:
            self._fail(name, f"{exc}; the rest of this file was not read")
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

    def _spool(self, head: bytes, rest: BinaryIO, temps: list[Path]) -> Path:
        """Copy an archive member to a temporary file (pydicom and nibabel read from disk)."""
        fd, path = self._temp_file(".bin", temps)
        limit = self.limits.max_scan_bytes
        too_large = f"scan larger than {limit} bytes (BRAINSCAN_MAX_SCAN_BYTES)"
        with os.fdopen(fd, "wb") as out:
            for chunk in _bounded(head, rest, limit, too_large):
                out.write(chunk)
        return path

    def _gunzip(self, source: Path, volume: scanners.VolumeLimits, temps: list[Path]) -> Path:
        """Decompress a .nii.gz to a temporary .nii no larger than its (checked) header declares."""
        fd, path = self._temp_file(".nii", temps)
        with os.fdopen(fd, "wb") as out:
            scanners.gunzip_nifti(
                source,
                out,
                max_image_pixels=self.limits.max_image_pixels,
                limits=volume,
                spend=self.budget.spend_expanded,
            )
        return path

    # -- archives ----------------------------------------------------------------------------------

    def _add_member(self, archive: str, member: str, reader: BinaryIO) -> None:
        """One regular file inside an archive: sniff it from its own first bytes, then store it."""
        name = member_name(archive, member)
        head = _read_up_to(reader, HEAD_BYTES)
        kind = sniff(head)
        if self._add_image(name, kind, head, reader, path=None):
            pass
        elif kind in ARCHIVE_KINDS:
            self._fail(name, "nested archive not supported: put scans directly in the archive")
        else:
            self._fail(name, describe_unsupported(head))

    def _run_archive(self, name: str, expand: Callable[[Callable[[], None]], int]) -> None:
        """Run one archive's expansion and turn every way it can stop into a clear failed item.

        ``expand(count_entry)`` calls ``count_entry()`` once per entry examined, before reading it.
        """
        start = len(self.entries)
        entries = 0

        def count_entry() -> None:
            nonlocal entries
            entries += 1
            if entries > self.limits.max_archive_entries:
                raise _TooManyEntries
            self.budget.spend_entry()

        try:
            seen = expand(count_entry)
            if seen == 0:
                self._fail(name, "empty archive: no files in it")
        except _TooManyEntries:
            # Refused whole where it can be: a job never holds an arbitrary first part of a huge
            # archive. A zip is counted before anything of it is read. A tar stream is read once: the
            # scans it stored before the limit stay unreferenced until retention removes them, but
            # the entries already committed (chunked intake) are items of the job, perhaps scored
            # already: they stay, and the reason says so.
            kept = max(start, self.committed)
            del self.entries[kept:]
            too_many = (
                f"archive has more than {self.limits.max_archive_entries} entries "
                "(BRAINSCAN_MAX_ARCHIVE_ENTRIES)"
            )
            if kept > start:
                reason = (
                    f"{too_many}: its first {kept - start} item(s) were stored before that was found "
                    "and are scored, the rest of it was not read; split it"
                )
            else:
                reason = f"{too_many}: split it"
            # The reason is recorded even in a full job: it is then the one item over
            # max_items_per_job (like the "job reached its limit" item), and says that too.
            self.full = len(self.entries) >= self.limits.max_items_per_job
            if self.full:
                reason += (
                    f"; the job reached its limit of {self.limits.max_items_per_job} scans "
                    "(BRAINSCAN_MAX_ITEMS_PER_JOB): submit the rest as another job"
                )
            self._record(IntakeEntry(name, error=reason))
        except BudgetSpent as exc:
            self._fail(name, f"{exc}; the rest of the archive was not read")
        except BadArchive as exc:
            self._fail(name, f"corrupt archive: {exc}; the rest of it was not read")
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
            if is_system_error(exc):
                raise  # our disk, not the client's archive
            self._fail(name, f"corrupt archive: {short(exc)}; the rest of it was not read")

    def _add_zip(self, name: str, f: BinaryIO) -> None:
        def expand(count_entry: Callable[[], None]) -> int:
            count = zip_entry_count(f, self.limits.max_archive_entries)
            if count > self.limits.max_archive_entries:
                raise _TooManyEntries
            f.seek(0)
            seen = 0
            with zipfile.ZipFile(f) as archive:
                for info in archive.infolist():
                    count_entry()
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
                counted = _CountingReader(reader, self.budget.spend_expanded)  # type: ignore[arg-type]
                self._add_member(archive_name, info.filename, counted)  # type: ignore[arg-type]
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
        def expand(count_entry: Callable[[], None]) -> int:
            # One pass over the stream with our own header parser (archives.tar_members): every byte
            # of it, skipped members and headers included, is counted before it is read.
            f.seek(0)
            with contextlib.ExitStack() as stack:
                raw: BinaryIO = f
                if compressed:
                    raw = stack.enter_context(gzip.GzipFile(fileobj=f, mode="rb"))  # type: ignore[assignment]
                seen = 0
                for info, reader in tar_members(raw, self.budget.spend_expanded):
                    count_entry()
                    if info.kind == "dir" or is_os_metadata(info.name):
                        continue
                    seen += 1
                    member = member_name(name, info.name)
                    if info.kind == "link":
                        self._fail(member, "link in archive: not followed")
                    elif info.kind == "special":
                        self._fail(member, "special file in archive (device, fifo): not read")
                    elif info.kind == "sparse":
                        self._fail(member, "sparse file in archive: not supported")
                    else:
                        self._add_member(name, info.name, reader)
                return seen

        self._run_archive(name, expand)

    # -- bookkeeping -------------------------------------------------------------------------------

    def _reserve_item(self, name: str) -> None:
        """Room for one more item, or the job is full: then the entry that says so is the one item
        over ``max_items_per_job`` (a job holds at most that many, plus this explanation), and
        nothing after it is read."""
        if len(self.entries) >= self.limits.max_items_per_job:
            self.full = True
            full = IntakeEntry(
                name,
                error=f"not read: the job reached its limit of {self.limits.max_items_per_job} scans "
                "(BRAINSCAN_MAX_ITEMS_PER_JOB); submit the rest as another job",
            )
            self._charge(full)
            self.entries.append(full)
            raise _JobFull

    def _record(self, entry: IntakeEntry) -> None:
        self._charge(entry)
        self.entries.append(entry)
        if self.on_record is not None:
            self.on_record()

    def _charge(self, entry: IntakeEntry) -> None:
        if self.upload is not None:
            self.upload.charge(self.entries, entry)

    def _fail(self, name: str, error: str) -> None:
        self._reserve_item(name)
        self._record(IntakeEntry(name, error=error))


class _CountingReader:
    """A zip member's decompressed bytes, each read counted by ``spend`` (tar streams count their
    own, headers and skipped data included: archives.tar_members)."""

    def __init__(self, raw: BinaryIO, spend: Callable[[int], None]) -> None:
        self.raw = raw
        self.spend = spend

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(min(n, CHUNK) if n is not None and n >= 0 else CHUNK)
        self.spend(len(data))
        return data


def _bounded(head: bytes, rest: BinaryIO, limit: int, too_large: str | None) -> Iterator[bytes]:
    """``head`` then chunks of ``rest``, counted as they are read: headers are never trusted."""
    size = len(head)
    if size > limit:
        raise _ScanTooLarge(too_large)
    yield head
    while chunk := rest.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise _ScanTooLarge(too_large)
        yield chunk


def _read_up_to(reader: BinaryIO, n: int) -> bytes:
    """Up to ``n`` more bytes of ``reader`` (fewer only at its end)."""
    data = b""
    while len(data) < n:
        chunk = reader.read(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def expand_uploads(
    store: ScanStore, limits: IntakeLimits, files: Sequence[tuple[Path, str | bytes | None]]
) -> list[IntakeEntry]:
    """Every scan in these files (path, client file name), stored; failures as entries with errors."""
    intake = Intake(store, limits)
    for path, filename in files:
        intake.add_file(path, filename)
    return intake.entries
