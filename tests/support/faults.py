"""Tools for fault tests on real processes: a restartable Redis, a cuttable TCP proxy, and a whole
private stack (Redis, a fresh PostgreSQL database, the API and a worker as processes).

Imported by tests/integration/test_faults.py, test_hostile_scans.py and test_log_hygiene.py.
Nothing here is shared with other test modules' processes: each test module gets its own Redis
server (on a free port) and its own PostgreSQL database, so its reaper and workers never touch
another module's jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from brainscan.queueing import redis_ping
from brainscan_cli.embedded import Child, find_redis_server, free_port, spawn
from tests.support.backends import Backend
from tests.support.environment import wait_for
from tests.support.processes import Service, start_api, start_worker
from tests.support.records import make_key
from tests.support.services import fresh_postgres, pg_reachable


# ---- Redis that can be stopped and started on the same port ------------------------------------
class RedisServer:
    """A private ``redis-server`` on a fixed free port; ``stop()``/``start()`` model a restart."""

    def __init__(self, data_dir: Path, persist: bool = False) -> None:
        self.data_dir = data_dir
        self.persist = persist
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.child: Child | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--dir", str(self.data_dir.resolve()),
            "--loglevel", "warning",
        ]  # fmt: skip
        self.child = spawn("redis", argv, {}, self.data_dir / "redis.log")
        wait_for(lambda: redis_ping(self.url), timeout_s=30, what="redis-server to start")

    def stop(self) -> None:
        if self.child is not None and self.child.alive():
            self.child.signal_group(signal.SIGTERM)
            self.child.process.wait(30)
        self.child = None
        wait_for(lambda: not redis_ping(self.url), timeout_s=10, what="redis-server to stop")


# ---- a TCP proxy in front of PostgreSQL that can be cut --------------------------------------
class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops every connection and refuses new ones,
    ``freeze()`` keeps them open but forwards nothing (a hung server) until ``thaw()``.

    The database stays up for everyone else; only the processes that go through the proxy see an
    outage, exactly as they would see a PostgreSQL restart (reset connections, then refusals).
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.flowing = asyncio.Event()  # cleared by freeze(): connections stay open, nothing moves
        self.flowing.set()
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tcp-proxy", daemon=True)
        self.thread.start()
        self.restore()

    def _call(self, coroutine):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        self.writers.update((client_writer, upstream_writer))
        try:
            await asyncio.gather(
                self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer)
            )
        finally:
            self.writers.discard(client_writer)
            self.writers.discard(upstream_writer)

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            with contextlib.suppress(Exception):
                transport = writer.transport
                transport.abort()  # RST, as a crashed server's connections look
        self.writers.clear()

    def restore(self) -> None:
        self._call(self._start())

    def cut(self) -> None:
        self._call(self._cut())

    def freeze(self) -> None:
        """A hung peer: connections are accepted and stay open, but no byte is forwarded either way."""
        self.loop.call_soon_threadsafe(self.flowing.clear)

    def thaw(self) -> None:
        """Forward again (bytes held during the freeze go through first)."""
        self.loop.call_soon_threadsafe(self.flowing.set)

    def close(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# ---- a whole private stack for one test module ---------------------------------------------------
class PrivateStack(NamedTuple):
    backend: Backend
    url: str
    headers: dict[str, str]  # an API key's Authorization header
    api: Service
    worker: Service
    root: Path


@contextlib.contextmanager
def private_stack(root: Path, model_dir: Path) -> Iterator[PrivateStack]:
    """Its own Redis, a fresh PostgreSQL database, the API and one worker as processes, and a key."""
    if not pg_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    redis = RedisServer(root / "redis")
    redis.start()
    try:
        with fresh_postgres() as database_url:
            backend = Backend("postgres", database_url, redis.url, root / "var", model_dir)
            api, url = start_api(backend, root / "logs")
            worker = start_worker(backend, root / "logs")
            _, key = make_key(backend)
            try:
                yield PrivateStack(backend, url, {"Authorization": f"Bearer {key}"}, api, worker, root)
            finally:
                worker.stop()
                api.stop()
    finally:
        redis.stop()
