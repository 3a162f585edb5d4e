"""The local PostgreSQL and Redis the tests use.

PostgreSQL: a fresh database per use on 127.0.0.1:5432 (user postgres, trust), migrated with Alembic
(``brainscan.migrate.upgrade``, never ``create_all``) and dropped afterwards. Redis: 127.0.0.1:6379
on db numbers of the tests' own, flushed before use.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get(
    "BRAINSCAN_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_TEST_URL = os.environ.get("BRAINSCAN_TEST_REDIS", "redis://127.0.0.1:6379/11")
API_REDIS_URL = "redis://127.0.0.1:6379/12"  # the in-process API tests' broker: no worker reads it


def pg_reachable() -> bool:
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", connect_timeout=2):
            return True
    except Exception:
        return False


@contextlib.contextmanager
def fresh_postgres() -> Iterator[str]:
    """A new, migrated database on the local PostgreSQL; dropped afterwards."""
    from sqlalchemy import create_engine, text

    from brainscan.db import default_engine
    from brainscan.migrate import upgrade

    name = f"brainscan_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        default_engine.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def own_database(kind: str, folder: Path) -> Iterator[str]:
    """A fresh migrated database of one test's own ("sqlite" in ``folder``, or "postgres"; skips if the
    server is not reachable), for tests whose figures or purges span every row of the database."""
    from brainscan.migrate import upgrade

    if kind == "sqlite":
        url = f"sqlite:///{folder / 'brainscan.db'}"
        upgrade(url)
        yield url
        return
    if not pg_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (user postgres)")
    with fresh_postgres() as url:
        yield url


def flushed_broker(url: str = API_REDIS_URL) -> Iterator[str]:
    """The local Redis on the given db number, flushed before and after (skips if unreachable)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as exc:
        pytest.skip(f"Redis at {url} unreachable: {exc}")
    client.flushdb()
    yield url
    client.flushdb()
    client.close()
