"""Bounded cost (issue 13): lifecycle indexes, the webhook outbox, per-key quota accounting.

* ``ix_items_sha256``: retention and job purges ask "does any item still reference this scan?".
* ``ix_jobs_finished_at``: retention selects jobs finished before a cut-off.
* ``jobs.webhook_queued_at`` / ``jobs.webhook_done_at``: the webhook outbox. A job that has a
  ``callback_url`` and a ``finished_at`` (set in the transaction that commits its final results)
  and no ``webhook_done_at`` still owes its webhook; the webhook reaper re-queues one that was never
  queued, or whose task stopped running, so a crash between the commit and the send loses nothing.
  Jobs finished before this revision are marked done (their webhooks went out, or never will).
* ``items.size_bytes``: bytes stored for the item at intake, summed for the per-key daily quota.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_index("ix_items_sha256", "items", ["sha256"])
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("webhook_queued_at", Timestamp, nullable=True))
        batch.add_column(sa.Column("webhook_done_at", Timestamp, nullable=True))
    jobs = sa.table("jobs", sa.column("finished_at", Timestamp), sa.column("webhook_done_at", Timestamp))
    op.execute(
        jobs.update().where(jobs.c.finished_at.is_not(None)).values(webhook_done_at=jobs.c.finished_at)
    )
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.drop_column("size_bytes")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("webhook_done_at")
        batch.drop_column("webhook_queued_at")
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
    op.drop_index("ix_items_sha256", table_name="items")
