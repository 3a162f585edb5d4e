"""Alembic migrations build exactly the tables the SQLAlchemy models describe, on both databases."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from brainscan.db import Base, make_engine
from brainscan.migrate import current

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
    assert current(url) == "0001"
