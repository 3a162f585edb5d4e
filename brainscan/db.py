"""SQLAlchemy models and sessions: jobs, their items (one per scan), and API keys.

Counts on a job are kept exact by the workers: an item is finalised by a guarded UPDATE (only from
``queued``/``running``), and the job's counters move by the number of rows that UPDATE really changed.
A redelivered item therefore never counts twice.
"""

from __future__ import annotations

import enum
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from brainscan.settings import get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus(enum.StrEnum):
    receiving = "receiving"  # intake still reading the upload: items (and total) still arriving
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    partial = "partial"


class ItemStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a real bigint.
BigId = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))  # shown to operators, never enough to authenticate
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    owner_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value)
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    model_name: Mapped[str] = mapped_column(String(200), default="")
    model_version: Mapped[str] = mapped_column(String(100), default="")
    source: Mapped[str] = mapped_column(String(32), default="api")  # api | nightly | cli
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    # The webhook outbox (worker/notify.py): a job with a callback_url and a finished_at (committed
    # with its final results) owes its webhook until webhook_done_at is set (delivered, refused or
    # given up). webhook_queued_at: when its task was last queued or ran; the webhook reaper
    # re-queues one never queued, or whose task stopped running (a crash, a lost message).
    webhook_queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    webhook_done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Items flagged "uncertain" / "out_of_scope", moved with done/failed (issue 11). NULL: a job from
    # before flags existed (migration 0003), whose items were never checked.
    flagged_uncertain: Mapped[int | None] = mapped_column(Integer, nullable=True, default=0)
    flagged_out_of_scope: Mapped[int | None] = mapped_column(Integer, nullable=True, default=0)

    items: Mapped[list[Item]] = relationship(back_populates="job", order_by="Item.position")

    __table_args__ = (Index("ix_jobs_owner_created", "owner_key_id", "created_at"),)


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)  # order within the job, as uploaded
    filename: Mapped[str] = mapped_column(Text)  # client data: display only, never a path
    source_ref: Mapped[str | None] = mapped_column(Text, nullable=True)  # frame / slice reference
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # None: nothing stored
    # Bytes intake charged this item toward its key's daily quota (brainscan.quotas): its share of the
    # larger of its file's bytes received and scan bytes stored; a failed item's file counts too.
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=ItemStatus.queued.value)
    label: Mapped[str | None] = mapped_column(String(32), nullable=True)
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)  # None when out of scope
    flag: Mapped[str | None] = mapped_column(String(16), nullable=True)  # None | uncertain | out_of_scope
    flag_reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # why, for people
    scope_score: Mapped[float | None] = mapped_column(Float, nullable=True)  # None: model has no detector
    prob_glioma: Mapped[float | None] = mapped_column(Float, nullable=True)
    prob_meningioma: Mapped[float | None] = mapped_column(Float, nullable=True)
    prob_notumor: Mapped[float | None] = mapped_column(Float, nullable=True)
    prob_pituitary: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    model_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(100), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    preprocess_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    inference_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)  # the process that scored it

    job: Mapped[Job] = relationship(back_populates="items")

    __table_args__ = (
        Index("ix_items_job_position", "job_id", "position"),
        Index("ix_items_status_enqueued", "status", "enqueued_at"),
    )

    @property
    def probabilities(self) -> dict[str, float] | None:
        if self.prob_glioma is None:
            return None
        return {
            "glioma": self.prob_glioma,
            "meningioma": self.prob_meningioma or 0.0,
            "notumor": self.prob_notumor or 0.0,
            "pituitary": self.prob_pituitary or 0.0,
        }


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # WAL lets the API read while a worker writes; the busy timeout turns "database is locked"
    # into a short wait, which is what several embedded processes sharing one file need.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _private_sqlite_file(url: str) -> None:
    """Create the SQLite file owner-only (0600), and tighten one created looser before.

    It holds key hashes, file names and results. SQLite gives its -wal and -shm files the database
    file's permissions, so they follow.
    """
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if not path.parent.is_dir():
        return
    if not path.exists():
        # Never open (and close) a file that may already be open through SQLite in this process:
        # close() drops every POSIX lock the process holds on it, and the next concurrent writer
        # corrupts the database (sqlite.org/howtocorrupt.html, 2.2). A file that does not exist yet
        # has no such connection.
        # (FileExistsError: another process created it meanwhile; then only tighten it below.)
        with suppress(FileExistsError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    if path.stat().st_mode & 0o077:
        try:
            path.chmod(0o600)
        except OSError:  # not ours to change: say so, do not refuse to run
            log.warning("the SQLite database file is readable by others; could not make it 0600")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        _private_sqlite_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


# ---- the process's default engine (workers, the CLI, scripts) -----------------------------------
# The API builds its own engine in ``api.app.create_app(settings)``; processes without a constructor
# to inject into share this one, cached per URL (tests switch databases by URL).


@lru_cache(maxsize=4)
def default_engine(url: str | None = None) -> Engine:
    return make_engine(url or get_settings().resolved_database_url)


def default_sessions(url: str | None = None) -> sessionmaker[Session]:
    # Resolve before the cached default_engine: caching under None would pin the first URL forever.
    return sessionmaker(
        bind=default_engine(url or get_settings().resolved_database_url), expire_on_commit=False
    )


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on any exception."""
    session = default_sessions(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# ---- retries -------------------------------------------------------------------------------------


def with_db_retry(operation: Callable[[], T], what: str, retry_s: float) -> T:
    """Run ``operation`` (one transaction), retrying connection-level failures with backoff.

    Gives up (re-raises) after ``retry_s`` seconds; errors that a retry cannot fix (integrity,
    programming) are raised at once.
    """
    deadline = time.monotonic() + retry_s
    delay = 0.2
    while True:
        try:
            return operation()
        except DBAPIError as exc:
            if not exc.connection_invalidated and not _transient(exc):
                raise
            if time.monotonic() + delay > deadline:
                log.error("database still failing after %ss while %s; giving up", retry_s, what)
                raise
            log.warning(
                "database error while %s, retrying in %.1fs: %s", what, delay, type(exc.orig).__name__
            )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _transient(exc: DBAPIError) -> bool:
    # Connection refused/reset, server shutting down, SQLite "database is locked": worth a retry.
    # Integrity and programming errors are not.
    return isinstance(exc, OperationalError) or "connection" in str(exc.orig).lower()
