"""Nightly batch scoring: every file dropped in the inbox becomes one job; optional re-scoring.

Celery beat sends ``brainscan.nightly`` on ``settings.nightly_cron`` (UTC); ``brainscan nightly
--now`` runs :func:`run_nightly` in-process. The inbox (``settings.resolved_nightly_inbox_dir``):

    inbox/            drop scans or archives here (dotfiles, *.part, *.tmp and files modified in the
                      last ``nightly_settle_s`` seconds are left alone: they are still being copied)
    inbox/processing/ a file is claimed by an atomic rename into here before anything reads it, so two
                      runs (two beats, or beat and --now) never take the same file
    inbox/done/       the file once its job is stored, with ``<name>.job.txt`` (the job id)
    inbox/failed/     the file when nothing in it could be scored, with ``<name>.reason.txt``

Each file goes through ``brainscan.intake.submit_job`` exactly like an upload (same sniffing, archive
limits and storage), ``source="nightly"``, owned by the ``nightly`` API key (created on demand; its
plaintext is written once to ``var_dir/nightly-api-key`` so an operator can read the jobs over the
API). A run interrupted between a claim and the move leaves the file in ``processing/``; runs report
such files rather than guess whether their job was stored.

The report also sums up the nightly and re-score jobs that finished in the last
``REPORT_WINDOW`` (24 h: the previous run's work, scored since): scans scored, failed, and flagged
``uncertain`` / ``out_of_scope`` (issue 11), per job and in total.

Re-scoring (``nightly_rescore_days`` > 0): succeeded items of the last N days whose result was not
made by the promoted model become one new job (``source="rescore"``) over the same stored scans
(sha256), once per scan: a scan already scored by the promoted model, or waiting in an open re-score
job, is skipped, so nightly runs do not pile up duplicates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from brainscan.settings import Settings, get_settings
from worker.celery import NIGHTLY_TASK, app

log = logging.getLogger(__name__)

NIGHTLY_KEY_NAME = "nightly"
NIGHTLY_KEY_FILE = "nightly-api-key"
SKIP_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload")
REPORT_WINDOW = timedelta(hours=24)
REPORTED_SOURCES = ("nightly", "rescore")


@dataclass
class FileOutcome:
    name: str
    moved_to: str  # "done" | "failed"
    job_id: str | None
    items: int = 0
    failed_items: int = 0
    reason: str | None = None


@dataclass
class FinishedJob:
    """A nightly or re-score job that finished within the report window, with its counts."""

    job_id: str
    source: str
    status: str
    total: int
    done: int
    failed: int
    flags: dict[str, int] | None  # None: scored before flags existed

    def line(self) -> str:
        text = f"job {self.job_id} ({self.source}, {self.status}): {self.done} scored, {self.failed} failed"
        if self.flags is not None:
            text += f", {self.flags['uncertain']} uncertain, {self.flags['out_of_scope']} out of scope"
        return text


@dataclass
class NightlyReport:
    inbox: Path
    files: list[FileOutcome] = field(default_factory=list)
    skipped_settling: list[str] = field(default_factory=list)
    left_in_processing: list[str] = field(default_factory=list)
    rescore_jobs: list[str] = field(default_factory=list)
    rescore_items: int = 0
    rescore_model: str | None = None
    finished: list[FinishedJob] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"inbox {self.inbox}: {len(self.files)} file(s)"]
        for f in self.files:
            what = f"job {f.job_id}, {f.items} scan(s)" if f.job_id else "no job"
            if f.failed_items:
                what += f", {f.failed_items} failed at intake"
            out.append(f"  {f.name} -> {f.moved_to}/ ({what}){': ' + f.reason if f.reason else ''}")
        if self.skipped_settling:
            out.append(f"  still being written, left for the next run: {', '.join(self.skipped_settling)}")
        if self.left_in_processing:
            out.append(
                f"  in processing/ from an interrupted run (move back to the inbox to retry): "
                f"{', '.join(self.left_in_processing)}"
            )
        if self.rescore_model is not None:
            out.append(
                f"re-score with {self.rescore_model}: {self.rescore_items} scan(s) in "
                f"{len(self.rescore_jobs)} job(s) {' '.join(self.rescore_jobs)}".rstrip()
            )
        if self.finished:
            out.append(self.finished_summary())
            out.extend(f"  {job.line()}" for job in self.finished)
        return out

    def finished_summary(self) -> str:
        hours = int(REPORT_WINDOW.total_seconds() // 3600)
        done = sum(job.done for job in self.finished)
        failed = sum(job.failed for job in self.finished)
        uncertain = sum(job.flags["uncertain"] for job in self.finished if job.flags)
        out_of_scope = sum(job.flags["out_of_scope"] for job in self.finished if job.flags)
        return (
            f"finished in the last {hours} h: {len(self.finished)} job(s), {done} scans scored, "
            f"{failed} failed, {uncertain} uncertain, {out_of_scope} out of scope"
        )


# ---- the nightly key -------------------------------------------------------------------------------
def nightly_owner(session: Any, settings: Settings) -> int:
    """The id of the ``nightly`` API key, created on first use (plaintext saved to var_dir once)."""
    from sqlalchemy import select

    from brainscan import auth
    from brainscan.db import ApiKey

    existing = session.scalar(
        select(ApiKey.id)
        .where(ApiKey.name == NIGHTLY_KEY_NAME, ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.id)
        .limit(1)
    )
    if existing is not None:
        return int(existing)
    key, plaintext = auth.create_key(session, NIGHTLY_KEY_NAME)
    session.commit()
    path = settings.var_dir / NIGHTLY_KEY_FILE
    with contextlib.suppress(OSError):
        settings.var_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(plaintext + "\n")
    log.info("created the nightly API key (prefix %s); its plaintext is in %s", key.prefix, path)
    return int(key.id)


# ---- the inbox -------------------------------------------------------------------------------------
def _unique(folder: Path, name: str) -> Path:
    target = folder / name
    counter = 1
    while target.exists() or target.with_name(target.name + ".reason.txt").exists():
        target = folder / f"{name}.{counter}"
        counter += 1
    return target


def claim_files(inbox: Path, settle_s: float) -> tuple[list[Path], list[str]]:
    """Rename each ready file into ``processing/``; returns the claimed paths and the settling names."""
    processing = inbox / "processing"
    processing.mkdir(parents=True, exist_ok=True)
    claimed: list[Path] = []
    settling: list[str] = []
    now = time.time()
    for path in sorted(inbox.iterdir()):
        name = path.name
        if name.startswith(".") or name.lower().endswith(SKIP_SUFFIXES):
            continue
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue  # another run took it
        if not path.is_file() or path.is_symlink():
            continue  # done/, failed/, processing/, links: never followed
        if now - st.st_mtime < settle_s:
            settling.append(name)
            continue
        target = processing / name
        if target.exists():
            continue  # a file of that name is being processed by another run
        try:
            os.rename(path, target)  # atomic on one filesystem: exactly one run wins the file
        except FileNotFoundError:
            continue
        claimed.append(target)
    return claimed, settling


def _move(path: Path, folder: Path, sidecar_suffix: str, sidecar_text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    target = _unique(folder, path.name)
    os.replace(path, target)
    target.with_name(target.name + sidecar_suffix).write_text(sidecar_text)


def score_inbox(settings: Settings, report: NightlyReport) -> None:
    from brainscan.db import session_scope
    from brainscan.intake import IntakeLimits, submit_job
    from brainscan.queueing import default_publisher
    from brainscan.storage import ScanStore

    inbox = report.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    claimed, report.skipped_settling = claim_files(inbox, settings.nightly_settle_s)
    store = ScanStore(settings.resolved_storage_dir)
    limits = IntakeLimits.from_settings(settings)
    publisher = default_publisher()
    for path in claimed:
        try:
            with session_scope() as session:
                owner = nightly_owner(session, settings)
                job = submit_job(
                    session,
                    store,
                    limits,
                    owner,
                    [(path, path.name)],
                    enqueue=publisher.enqueue_job,
                    notify=publisher.notify_jobs,
                    source="nightly",
                ).job
                job_id, total, failed = job.id, job.total, job.failed
                reasons = _intake_errors(session, job_id) if failed else []
        except Exception as exc:  # storage or database down: the file waits in failed/ with why
            log.exception("nightly: could not store %s", path.name)
            reason = f"could not store a job for this file: {type(exc).__name__}"
            _move(path, inbox / "failed", ".reason.txt", reason + "\n")
            report.files.append(FileOutcome(path.name, "failed", None, reason=reason))
            continue
        if failed == total:
            reason = "; ".join(reasons[:5]) or "nothing to score"
            text = f"job {job_id}: no scan in this file could be scored\n" + "".join(
                f"{r}\n" for r in reasons
            )
            _move(path, inbox / "failed", ".reason.txt", text)
            report.files.append(FileOutcome(path.name, "failed", job_id, total, failed, reason))
        else:
            _move(path, inbox / "done", ".job.txt", f"{job_id}\n")
            report.files.append(FileOutcome(path.name, "done", job_id, total, failed))
    processing = inbox / "processing"
    report.left_in_processing = sorted(p.name for p in processing.iterdir() if p.is_file())


def _intake_errors(session: Any, job_id: str) -> list[str]:
    from sqlalchemy import select

    from brainscan.db import Item

    rows = session.execute(
        select(Item.filename, Item.error).where(Item.job_id == job_id, Item.error.is_not(None)).limit(50)
    ).all()
    return [f"{row.filename}: {row.error}" for row in rows]


# ---- re-scoring ------------------------------------------------------------------------------------
def rescore(settings: Settings, days: int, report: NightlyReport) -> None:
    """One job (per ``max_items_per_job`` scans) re-scoring recent results of other models."""
    from sqlalchemy import and_, exists, or_, select
    from sqlalchemy.orm import aliased

    from brainscan.db import Item, ItemStatus, Job, session_scope, utcnow
    from brainscan.jobs import IntakeEntry, create_job
    from brainscan.modelrepo import resolve_model
    from brainscan.queueing import default_publisher

    card = resolve_model(settings.model_dir, settings.model_name, settings.model_version).card
    report.rescore_model = f"{card.name}/{card.version}"
    since = utcnow() - timedelta(days=days)
    other = aliased(Item)
    other_job = aliased(Job)
    by_promoted = and_(other.model_name == card.name, other.model_version == card.version)
    open_rescore = and_(
        other.status.in_((ItemStatus.queued.value, ItemStatus.running.value)),
        other.job_id == other_job.id,
        other_job.source == "rescore",
    )
    already = exists().where(other.sha256 == Item.sha256, or_(by_promoted, open_rescore))
    with session_scope() as session:
        rows = session.execute(
            select(Item.sha256, Item.filename, Item.source_ref)
            .where(
                Item.status == ItemStatus.succeeded.value,
                Item.finished_at >= since,
                Item.sha256.is_not(None),
                or_(Item.model_name != card.name, Item.model_version != card.version),
                ~already,
            )
            .order_by(Item.finished_at.desc(), Item.id.desc())
        ).all()
        seen: set[str] = set()
        entries = []
        for row in rows:
            if row.sha256 not in seen:
                seen.add(row.sha256)
                entries.append(IntakeEntry(row.filename, sha256=row.sha256, source_ref=row.source_ref))
        if not entries:
            return
        owner = nightly_owner(session, settings)
        size = settings.max_items_per_job
        for start in range(0, len(entries), size):
            job = create_job(session, owner, entries[start : start + size], source="rescore")
            report.rescore_jobs.append(job.id)
    report.rescore_items = len(entries)
    publisher = default_publisher()
    for job_id in report.rescore_jobs:
        publisher.enqueue_job(job_id)  # after commit; the reaper sends them if the broker is down


# ---- what finished since the last run ---------------------------------------------------------------
def finished_jobs(since: Any) -> list[FinishedJob]:
    """Nightly and re-score jobs that finished at or after ``since``, oldest first."""
    from sqlalchemy import select

    from brainscan.db import Job, session_scope
    from brainscan.results import flag_counts

    with session_scope() as session:
        jobs = session.scalars(
            select(Job)
            .where(Job.source.in_(REPORTED_SOURCES), Job.finished_at >= since)
            .order_by(Job.finished_at, Job.id)
        )
        return [
            FinishedJob(job.id, job.source, job.status, job.total, job.done, job.failed, flag_counts(job))
            for job in jobs
        ]


# ---- entry points ----------------------------------------------------------------------------------
def run_nightly(settings: Settings | None = None, rescore_days: int | None = None) -> NightlyReport:
    from brainscan.db import utcnow

    settings = settings or get_settings()
    report = NightlyReport(settings.resolved_nightly_inbox_dir)
    report.finished = finished_jobs(utcnow() - REPORT_WINDOW)
    score_inbox(settings, report)
    days = settings.nightly_rescore_days if rescore_days is None else rescore_days
    if days > 0:
        rescore(settings, days, report)
    for line in report.lines():
        log.info("nightly: %s", line.strip())
    return report


@app.task(name=NIGHTLY_TASK, ignore_result=True, acks_late=False)
def nightly() -> int:
    """Celery beat entry point; returns the number of jobs created."""
    report = run_nightly()
    return len([f for f in report.files if f.job_id]) + len(report.rescore_jobs)
