"""Alembic migrations build exactly the tables the SQLAlchemy models describe, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from brainscan.db import Base, make_engine
from brainscan.migrate import alembic_config, current, upgrade

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("database", ["sqlite_url", "postgres_url"])
def test_migrated_schema_matches_the_models(database: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(database)  # both fixtures run `alembic upgrade head`
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
            tables = set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    assert differences == []
    assert {"api_keys", "jobs", "items", "alembic_version"} <= tables
    assert current(url) == ScriptDirectory.from_config(alembic_config(url)).get_current_head()


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_0003_adds_flags_and_leaves_older_jobs_uncounted(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Down to 0002, a job scored there, then up again: its counts stay NULL (never checked), its
    item has no flag; and down again drops the new columns."""
    if database == "postgres":
        from tests.support.services import fresh_postgres, pg_reachable

        if not pg_reachable():
            pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (user postgres)")
        context = fresh_postgres()
        url = context.__enter__()
        request.addfinalizer(lambda: context.__exit__(None, None, None))
    else:
        url = f"sqlite:///{tmp_path / 'migrations.db'}"
        upgrade(url)
    config = alembic_config(url)
    command.downgrade(config, "0002")
    engine = make_engine(url)
    now = {"now": datetime.now(UTC)}
    try:
        assert "flag" not in {c["name"] for c in inspect(engine).get_columns("items")}
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO jobs (id, status, total, done, failed, model_name, model_version, source,"
                    " created_at) VALUES ('old', 'succeeded', 1, 1, 0, 'm', '1', 'api', :now)"
                ),
                now,
            )
            connection.execute(
                text(
                    "INSERT INTO items (job_id, position, filename, status, label, confidence, attempts,"
                    " created_at) VALUES ('old', 0, 'a.png', 'succeeded', 'glioma', 0.7, 1, :now)"
                ),
                now,
            )
        command.upgrade(config, "0003")
        with engine.connect() as connection:
            job = connection.execute(text("SELECT flagged_uncertain, flagged_out_of_scope FROM jobs")).one()
            item = connection.execute(
                text("SELECT label, flag, flag_reason, scope_score, worker_id FROM items")
            ).one()
        assert tuple(job) == (None, None)
        assert tuple(item) == ("glioma", None, None, None, None)
        command.downgrade(config, "0002")
        columns = {c["name"] for c in inspect(engine).get_columns("items")}
        assert not {"flag", "flag_reason", "scope_score", "worker_id"} & columns
        assert "flagged_uncertain" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
        command.upgrade(config, "head")
    finally:
        engine.dispose()
