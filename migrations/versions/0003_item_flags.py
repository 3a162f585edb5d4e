"""Flags (issue 11) and the worker per item (issue 15).

* ``items.flag`` (``uncertain`` | ``out_of_scope`` | NULL), ``items.flag_reason`` (text for people),
  ``items.scope_score`` (distance from the training data over the model's threshold; NULL when the
  model has no scope detector): what the worker decided about each scored scan.
* ``jobs.flagged_uncertain`` / ``jobs.flagged_out_of_scope``: per-flag counts kept by the workers in
  the transaction that writes the items, like ``done`` and ``failed``. Jobs that exist when this
  migration runs keep NULL ("scored before flags existed"): counting their items now would claim
  they were checked when they were not. New jobs start at 0 (the model's default).
* ``items.worker_id``: which worker process scored the item (filled by the worker, issue 15).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("flag", sa.String(16), nullable=True))
        batch.add_column(sa.Column("flag_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("scope_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("worker_id", sa.String(200), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("flagged_uncertain", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("flagged_out_of_scope", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("flagged_out_of_scope")
        batch.drop_column("flagged_uncertain")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("worker_id")
        batch.drop_column("scope_score")
        batch.drop_column("flag_reason")
        batch.drop_column("flag")
