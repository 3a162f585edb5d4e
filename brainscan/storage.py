"""Content-addressed scan storage and its lifecycle: a scan's path is derived from its SHA-256 only.

Client filenames never reach the file system, so no upload can name a path outside the store.
Writes go to a temporary file under ``<root>/tmp`` first and are renamed into place, so a reader
never sees half a scan, and storing the same bytes twice keeps one copy.

Lifecycle (nothing here schedules itself; the callers are named in the README):

* :func:`purge_expired` - retention: jobs finished more than ``BRAINSCAN_RETENTION_DAYS`` ago are
  deleted with their items (the results) and Grad-CAM overlays, then every scan no item references
  any more and not stored within that period is removed.
* :func:`purge_job_scans` - an operator's purge of one finished job's scans (the results stay).
* :func:`sweep_tmp` - temporary files left behind by a process that stopped mid-upload.

A scan is shared by every job that sent the same bytes, so a scan is removed only when no item of
any job references it, checked after the database change that released it has committed. Storing a
scan always renames a fresh copy into place, which also renews its modification time: retention
leaves alone a scan stored within the retention period, such as one an upload still in flight
(not yet committed as a job) has just stored again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from brainscan.db import Item, ItemStatus, Job
from brainscan.heatmaps import HeatmapStore


def _libc_with_syncfs() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.syncfs  # noqa: B018 - Linux only
    except (OSError, AttributeError, TypeError):
        return None
    return libc


_SHA256 = re.compile(r"[0-9a-f]{64}")
_LIBC = _libc_with_syncfs()
CHUNK = 1024 * 1024
BATCH = 500  # ids per statement (well under SQLite's and PostgreSQL's parameter limits)
TMP_LEFTOVER_AGE = timedelta(hours=1)  # no live upload or conversion keeps a temporary file this long
HEATMAP_SUFFIXES = (".png", ".failed", ".pending")


class StorageUnavailable(OSError):
    """The store cannot be read here (permissions, a missing or failing volume): not the scan's fault.

    A worker that gets this leaves the item for another worker and reports itself unhealthy
    (worker/tasks.py); the API and the workers must share the storage volume and its owner.
    ``str(exc)`` names the storage root, for operators; clients get ``public_message``.
    """

    public_message = "scan storage unavailable, retry shortly"


class ScanStore:
    def __init__(self, root: Path, *, defer_sync: bool = False) -> None:
        self.root = Path(root)
        self.scans_dir = self.root / "scans"
        self.tmp_dir = self.root / "tmp"
        # True: writes skip their own fsync and the writer calls sync() before it commits rows that
        # reference them (one flush for a chunk of scans instead of one per scan; see deferring_sync).
        self.defer_sync = defer_sync

    def deferring_sync(self) -> ScanStore:
        """The same store for a writer that calls :meth:`sync` itself before it commits a chunk.

        A per-file fsync costs milliseconds (it was ~70% of intake's time per scan); one ``syncfs``
        per chunk of 64 scans costs about as much as one of them, and a scan is still on disk before
        any committed row names it.
        """
        return ScanStore(self.root, defer_sync=True)

    def sync(self) -> None:
        """Make every scan written so far durable: one ``syncfs`` of the store's file system."""
        self.scans_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.scans_dir, os.O_RDONLY)
        try:
            if _LIBC is None or _LIBC.syncfs(fd) != 0:
                os.sync()  # no syncfs (not Linux) or it failed: flush everything instead
        finally:
            os.close(fd)

    def path_for(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError("not a SHA-256 hex digest")
        return self.scans_dir / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).exists()

    def _temp_file(self) -> tuple[int, str]:
        """A new private temporary file in the store (its folder made when it is missing).

        Folders are made only when a write finds them missing: two ``mkdir`` calls per scan were a
        tenth of the API's intake time.
        """
        try:
            return tempfile.mkstemp(dir=self.tmp_dir)
        except FileNotFoundError:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            return tempfile.mkstemp(dir=self.tmp_dir)

    def put_bytes(self, data: bytes) -> str:
        sha256, _size = self.put_chunks([data])
        return sha256

    def put_chunks(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Store a stream of chunks, hashing while writing; returns (sha256, size).

        Nothing is held in memory beyond one chunk, so the caller bounds a stream simply by raising
        from its iterator (the partial temporary file is removed and nothing is stored). The copy is
        renamed into place even when the scan is already stored: same bytes, and a fresh
        modification time that keeps retention off a scan an upload is about to reference.
        """
        digest = hashlib.sha256()
        size = 0
        fd, tmp = self._temp_file()
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                f.flush()
                if not self.defer_sync:
                    os.fsync(f.fileno())
            sha256 = digest.hexdigest()
            target = self.path_for(sha256)
            try:
                os.replace(tmp, target)
            except FileNotFoundError:  # the first scan in its folder (folders are made when needed)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)
            return sha256, size
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read(self, sha256: str) -> bytes:
        """The scan's bytes. FileNotFoundError: this scan is gone (the store is fine); StorageUnavailable:
        the store itself cannot be read (no ``scans/`` folder: a missing or empty volume; any other
        I/O error: permissions, EIO)."""
        path = self.path_for(sha256)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            if not self.scans_dir.is_dir():
                raise StorageUnavailable(
                    f"FileNotFoundError: no scans folder under the storage root {self.root}"
                ) from None
            raise
        except OSError as exc:
            raise StorageUnavailable(
                f"{type(exc).__name__}: cannot read the storage under {self.root}"
            ) from exc

    def stored(self) -> Iterator[tuple[str, Path]]:
        """Every stored scan as (sha256, path); anything else under ``scans/`` is ignored."""
        if not self.scans_dir.is_dir():
            return
        for path in self.scans_dir.glob("??/??/*"):
            if _SHA256.fullmatch(path.name) and path.parent.parts[-2:] == (path.name[:2], path.name[2:4]):
                yield path.name, path


# --------------------------------------------------------------------------------------------------
# Lifecycle


@dataclass(frozen=True)
class PurgeReport:
    """What a purge removed: jobs (with their items) from the database, scan files from the store."""

    jobs: int = 0
    items: int = 0
    scans: int = 0
    scan_bytes: int = 0

    def __add__(self, other: PurgeReport) -> PurgeReport:
        return PurgeReport(
            self.jobs + other.jobs,
            self.items + other.items,
            self.scans + other.scans,
            self.scan_bytes + other.scan_bytes,
        )


class JobNotFinished(Exception):
    """A purge asked for a job whose items are still queued or running."""


def purge_expired(
    session: Session, store: ScanStore, *, retention_days: int, now: datetime | None = None
) -> PurgeReport:
    """Retention: delete jobs finished before ``now - retention_days`` with their items and overlays,
    then remove every scan that no item references and that was not stored within that period.

    ``retention_days`` 0 keeps everything. Commits the session after each batch of jobs (the files
    go only after the rows that referenced them are gone for good); the caller owns the session.
    """
    if retention_days <= 0:
        return PurgeReport()
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    report = PurgeReport()
    heatmaps = HeatmapStore(store.root)
    while job_ids := list(session.scalars(select(Job.id).where(Job.finished_at < cutoff).limit(BATCH))):
        item_ids = list(session.scalars(select(Item.id).where(Item.job_id.in_(job_ids))))
        session.execute(delete(Item).where(Item.job_id.in_(job_ids)))
        session.execute(delete(Job).where(Job.id.in_(job_ids)))
        session.commit()
        _remove_heatmaps(heatmaps, item_ids)
        report += PurgeReport(jobs=len(job_ids), items=len(item_ids))
    stale = (sha256 for sha256, path in store.stored() if _stored_before(path, cutoff))
    return report + _remove_unreferenced(session, store, stale, stored_before=cutoff)


def purge_job_scans(session: Session, store: ScanStore, job_id: str) -> PurgeReport:
    """Remove one finished job's scans (and Grad-CAM overlays); its results stay, without a scan.

    The job's items stop referencing their scans (``sha256`` becomes NULL) and that is committed;
    then each scan that no other job's item references is removed. Raises ``LookupError`` for an
    unknown job and :class:`JobNotFinished` while any of its items is queued or running.

    Unlike retention this does not spare recently stored files (a purge must remove the scans), so
    an upload of the very same bytes that is still in flight (its job not yet committed) may lose
    its copy: that item then fails as a missing scan.
    """
    if session.get(Job, job_id) is None:
        raise LookupError("no such job")
    pending = session.scalar(
        select(Item.id)
        .where(Item.job_id == job_id, Item.status.in_((ItemStatus.queued.value, ItemStatus.running.value)))
        .limit(1)
    )
    if pending is not None:
        raise JobNotFinished("the job still has queued or running items")
    rows = session.execute(select(Item.id, Item.sha256).where(Item.job_id == job_id)).all()
    session.execute(update(Item).where(Item.job_id == job_id).values(sha256=None))
    session.commit()
    _remove_heatmaps(HeatmapStore(store.root), [item_id for item_id, _ in rows])
    released = {sha256 for _, sha256 in rows if sha256 is not None}
    return _remove_unreferenced(session, store, released, stored_before=None)


@dataclass(frozen=True)
class SweepReport:
    files: int = 0
    bytes: int = 0


def sweep_tmp(store: ScanStore, *, older_than: timedelta = TMP_LEFTOVER_AGE) -> SweepReport:
    """Remove files under ``<root>/tmp`` not modified for ``older_than``: leftovers of a process that
    stopped mid-upload or mid-conversion (a live one keeps its files for far less than the default).

    ``older_than=timedelta(0)`` removes everything: for a start-up where no other process shares
    the store. Links are removed, never followed.
    """
    removed, size = 0, 0
    limit = time.time() - older_than.total_seconds()
    if not store.tmp_dir.is_dir():
        return SweepReport()
    for path in sorted(store.tmp_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        try:
            info = path.lstat()
            if path.is_dir() and not path.is_symlink():
                if info.st_mtime <= limit and not any(path.iterdir()):
                    path.rmdir()
                continue
            if info.st_mtime <= limit:
                path.unlink()
                removed, size = removed + 1, size + info.st_size
        except FileNotFoundError:  # removed meanwhile by its owner
            continue
    return SweepReport(removed, size)


def _stored_before(path: Path, cutoff: datetime) -> bool:
    try:
        return path.stat().st_mtime < cutoff.timestamp()
    except FileNotFoundError:
        return False


def _remove_unreferenced(
    session: Session, store: ScanStore, candidates: Iterable[str], *, stored_before: datetime | None
) -> PurgeReport:
    """Remove the candidate scans that no item references (checked in batches, after the commit
    that released them); with ``stored_before``, only those whose file is older than that."""
    report = PurgeReport()
    batch: list[str] = []
    for sha256 in candidates:
        batch.append(sha256)
        if len(batch) == BATCH:
            report += _remove_batch(session, store, batch, stored_before)
            batch = []
    if batch:
        report += _remove_batch(session, store, batch, stored_before)
    return report


def _remove_batch(
    session: Session, store: ScanStore, batch: list[str], stored_before: datetime | None
) -> PurgeReport:
    referenced = set(session.scalars(select(Item.sha256).where(Item.sha256.in_(batch)).distinct()))
    session.rollback()  # end the read transaction: nothing is held while files are removed
    removed, size = 0, 0
    for sha256 in batch:
        if sha256 in referenced:
            continue
        path = store.path_for(sha256)
        # Re-checked just before removal: an upload may have stored these bytes again meanwhile.
        if stored_before is not None and not _stored_before(path, stored_before):
            continue
        try:
            file_size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        removed, size = removed + 1, size + file_size
    return PurgeReport(scans=removed, scan_bytes=size)


def _remove_heatmaps(heatmaps: HeatmapStore, item_ids: Iterable[int]) -> None:
    # Item ids can be reused once rows are deleted (SQLite): no overlay may outlive its item.
    for item_id in item_ids:
        png = heatmaps.png_path(item_id)
        for suffix in HEATMAP_SUFFIXES:
            png.with_suffix(suffix).unlink(missing_ok=True)
