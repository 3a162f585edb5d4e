"""Per-key daily quotas: the intake work one API key may cause per UTC day, in items and bytes.

Checked when a request starts (before anything is read or stored); counted at commit: the day's
usage is every item the key's jobs created today, and the bytes charged to them at intake
(``items.size_bytes``, written with the items). A file that fails at intake costs the service work
too (it was received, spooled, sniffed, its header or archive parsed), so it counts like a stored
scan: its items count, failed or not, and each uploaded file is charged the larger of its bytes
received and the scan bytes it stored (``brainscan.intake.expansion.UploadCharge``). A request that
starts under the quota is taken whole, so one key can pass a quota by at most one request (bounded
by ``BRAINSCAN_MAX_REQUEST_BYTES`` and ``BRAINSCAN_MAX_ITEMS_PER_JOB``). Past it, the API answers
429 with ``Retry-After`` (the seconds to the next UTC midnight, when the day's usage starts again
from zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from brainscan.db import Item, Job


@dataclass(frozen=True)
class Usage:
    scans: int
    bytes: int


@dataclass(frozen=True)
class QuotaExceeded:
    reason: str  # names the limit and its setting, never anything a client sent
    retry_after_s: int


def day_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def usage_today(session: Session, key_id: int, now: datetime | None = None) -> Usage:
    """The items of the key's jobs created since the start of this UTC day, and their bytes.

    Every item counts, whatever its status: one that failed at intake (not an image, a refused
    header, a damaged archive member, an upload cut short) cost intake work like a stored scan.
    The bytes are what intake charged (``items.size_bytes``): per uploaded file, the larger of the
    bytes received and the scan bytes stored, so a refused file's bytes count as well. Items from
    before this accounting (or written by the service itself) may have no charge: they add 0 bytes.
    """
    since = day_start(now or datetime.now(UTC))
    scans, size = session.execute(
        select(func.count(Item.id), func.coalesce(func.sum(Item.size_bytes), 0))
        .join(Job, Item.job_id == Job.id)
        .where(Job.owner_key_id == key_id, Job.created_at >= since)
    ).one()
    return Usage(int(scans), int(size))


def quota_exceeded(
    session: Session,
    key_id: int,
    *,
    scans_per_day: int,
    bytes_per_day: int,
    now: datetime | None = None,
) -> QuotaExceeded | None:
    """Why the key may submit nothing more today, else None. A limit of 0 is no limit.

    Usage is :func:`usage_today`: failed items and the bytes of refused files count too.
    """
    if scans_per_day <= 0 and bytes_per_day <= 0:
        return None
    now = now or datetime.now(UTC)
    used = usage_today(session, key_id, now)
    retry_after = max(1, math.ceil((day_start(now) + timedelta(days=1) - now).total_seconds()))
    if 0 < scans_per_day <= used.scans:
        reason = f"daily quota reached: {scans_per_day} scans per UTC day (BRAINSCAN_QUOTA_SCANS_PER_DAY)"
        return QuotaExceeded(reason, retry_after)
    if 0 < bytes_per_day <= used.bytes:
        reason = (
            f"daily quota reached: {bytes_per_day} upload bytes per UTC day (BRAINSCAN_QUOTA_BYTES_PER_DAY)"
        )
        return QuotaExceeded(reason, retry_after)
    return None
