"""Real worker, API and beat processes, each in its own process group with its output in a log file."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.support.backends import Backend
from tests.support.environment import ROOT, wait_for


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
        [sys.executable, "-m", "brainscan_cli.main", "worker", "--hostname", hostname, "--loglevel", "INFO"],
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


def start_api(backend: Backend, log_dir: Path, **env: str) -> tuple[Service, str]:
    """A real API process (``brainscan api``: uvicorn) on a free port, up and answering /healthz."""
    import httpx

    from brainscan_cli.embedded import free_port

    port = free_port()
    service = spawn_service(
        "api",
        [sys.executable, "-m", "brainscan_cli.main", "api", "--host", "127.0.0.1", "--port", str(port)],
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


def start_beat(backend: Backend, log_dir: Path, **env: str) -> Service:
    """``brainscan beat`` (the reaper's and the nightly run's scheduler); not waited for."""
    return spawn_service(
        "beat",
        [sys.executable, "-m", "brainscan_cli.main", "beat", "--loglevel", "INFO"],
        backend.env(**env),
        log_dir,
    )
