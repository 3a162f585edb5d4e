"""The app over a real database and a real Redis broker, in process (``fastapi.testclient``).

The databases come from the ``sqlite_url`` / ``postgres_url`` fixtures (fresh and migrated with
Alembic per test session); the broker is the local Redis on a db number of the caller's
(``tests.support.services.flushed_broker``), so messages these tests publish never reach the worker
processes other tests start.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from brainscan.auth import create_key
from brainscan.db import Item, Job, default_engine
from brainscan.settings import Settings, get_settings
from brainscan.storage import ScanStore


@dataclass
class Api:
    client: TestClient
    settings: Settings
    sessions: sessionmaker[Session]
    store: ScanStore
    key: str
    key_id: int
    other_key: str

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}


def item_count(api: Api) -> int:
    """Items of every job the API's main key owns."""
    with api.sessions() as session:
        return session.scalar(
            select(func.count()).select_from(Item).join(Job).where(Job.owner_key_id == api.key_id)
        )


def make_api(
    database_url: str, broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: object
) -> Iterator[Api]:
    # brainscan.queueing reads the global settings: point them at the same database and broker.
    env = {
        "BRAINSCAN_DATABASE_URL": database_url,
        "BRAINSCAN_BROKER_URL": broker_url,
        "BRAINSCAN_VAR_DIR": str(tmp_path / "var"),
        "BRAINSCAN_STORAGE_DIR": str(tmp_path / "storage"),
        "BRAINSCAN_MODEL_DIR": str(tmp_path / "models"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name, value in overrides.items():
        monkeypatch.setenv(f"BRAINSCAN_{name.upper()}", str(value))
    _reset_cached_globals()
    settings = get_settings()
    _use_test_broker(settings, monkeypatch)

    from api.app import create_app

    app = create_app(settings)
    sessions = app.state.sessions
    with sessions() as session:
        key, plaintext = create_key(session, f"test-{uuid.uuid4().hex[:6]}")
        _other, other_plaintext = create_key(session, "someone-else")
        session.commit()
        key_id = key.id
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, settings, sessions, app.state.store, plaintext, key_id, other_plaintext)
    _reset_cached_globals()


def _reset_cached_globals() -> None:
    # Settings and the default engine (used by brainscan.queueing) are cached per process.
    get_settings.cache_clear()
    default_engine.cache_clear()


def _use_test_broker(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Publish through a Celery app bound to the test broker (worker.celery binds at import)."""
    try:
        import brainscan.queueing as queueing
        from worker.celery import create_app as create_celery
    except ImportError:
        return
    celery_app = create_celery(settings, set_as_current=False)
    monkeypatch.setattr(queueing, "_celery", lambda: celery_app)
