"""Issue 3: faults the system must survive, on real processes over PostgreSQL and Redis.

One stack per module: a fresh PostgreSQL database reached through a TCP proxy that the tests can
cut (PostgreSQL itself stays up for everyone else), a private non-persistent ``redis-server`` that
the tests stop and start on the same port, the API and beat as processes, and real workers.
The reaper runs every 2 s and treats an item as stranded after 10 s, so recovery takes seconds.

Already covered elsewhere: SIGKILL mid-batch (test_worker_crash.py), duplicate delivery and the
function-level broker-down case (test_worker.py), ``brainscan up`` stopping every child on Ctrl-C
(tests/e2e/test_embedded_up.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from brainscan.db import Item, Job, session_scope
from tests.support.backends import Backend
from tests.support.environment import wait_for
from tests.support.faults import RedisServer, TcpProxy
from tests.support.images import make_jpeg
from tests.support.models import build_poison_model
from tests.support.processes import Service, start_api, start_beat, start_worker
from tests.support.records import create_job, job_finished, make_key
from tests.support.services import fresh_postgres, pg_reachable

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST_REAPER = {
    "BRAINSCAN_REAPER_INTERVAL_S": "2",
    "BRAINSCAN_STALE_AFTER_S": "10",
    "BRAINSCAN_MAX_ATTEMPTS": "2",
    "BRAINSCAN_DB_RETRY_S": "120",
}
DB_DOWN = {"detail": "database unavailable, retry shortly"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def pg_direct() -> Iterator[str]:
    if not pg_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    with fresh_postgres() as url:
        yield url


@pytest.fixture(scope="module")
def proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy("127.0.0.1", 5432)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def broker(root: Path) -> Iterator[RedisServer]:
    server = RedisServer(root / "redis", persist=False)  # a restart loses every message
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(pg_direct: str, proxy: TcpProxy, broker: RedisServer, root: Path, tiny_model_dir: Path) -> Backend:
    """What the services use: the database through the proxy."""
    via_proxy = pg_direct.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert via_proxy != pg_direct
    return Backend("postgres", via_proxy, broker.url, root / "var", tiny_model_dir, extra_env=FAST_REAPER)


@pytest.fixture(scope="module")
def direct(stack: Backend, pg_direct: str) -> Backend:
    """What the test itself uses: the same stack, but straight to the database (never cut)."""
    return Backend(
        "postgres", pg_direct, stack.broker_url, stack.root, stack.model_dir, dict(stack.extra_env)
    )


@pytest.fixture(scope="module")
def logs(root: Path) -> Path:
    return root / "logs"


class Api(NamedTuple):
    url: str
    headers: dict[str, str]
    key_id: int


@pytest.fixture(scope="module")
def api(stack: Backend, direct: Backend, logs: Path) -> Iterator[Api]:
    service, url = start_api(stack, logs)
    key_id, key = make_key(direct)
    yield Api(url, {"Authorization": f"Bearer {key}"}, key_id)
    service.stop()


@pytest.fixture(scope="module")
def beat(stack: Backend, logs: Path) -> Iterator[Service]:
    service = start_beat(stack, logs)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def worker(stack: Backend, logs: Path, beat: Service) -> Iterator[Service]:
    service = start_worker(stack, logs)
    yield service
    service.stop()


# ---- helpers ----------------------------------------------------------------------------------
def big_jpeg(seed: int, side: int = 1200) -> bytes:
    # Noisy, large scans: decoding takes long enough that "while a batch runs" is a wide window.
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def item_counts(backend: Backend, job_id: str) -> dict[str, int]:
    with backend.active(), session_scope() as session:
        return dict(
            session.execute(
                select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status)
            ).all()
        )


def running_ids(backend: Backend, job_id: str) -> list[int]:
    with backend.active(), session_scope() as session:
        return list(session.scalars(select(Item.id).where(Item.job_id == job_id, Item.status == "running")))


def job_row(backend: Backend, job_id: str) -> tuple[str, int, int, int]:
    with backend.active(), session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.status, job.total, job.done, job.failed


def assert_exact(backend: Backend, job_id: str, done: int, failed: int = 0) -> None:
    """Every item final exactly once: item statuses and the job's counters agree."""
    wait_for(lambda: job_finished(backend, job_id), what=f"job {job_id} to finish")
    status = "succeeded" if failed == 0 else ("failed" if done == 0 else "partial")
    assert job_row(backend, job_id) == (status, done + failed, done, failed)
    expected = {k: v for k, v in (("succeeded", done), ("failed", failed)) if v}
    assert item_counts(backend, job_id) == expected
    with backend.active(), session_scope() as session:
        unscored = session.scalar(
            select(func.count()).where(
                Item.job_id == job_id, Item.status == "succeeded", Item.prob_glioma.is_(None)
            )
        )
    assert unscored == 0


def submit_big_job(backend: Backend, prefix: str, total: int, owner_key_id: int | None = None) -> str:
    from brainscan.queueing import enqueue_job

    scans = [big_jpeg(seed) for seed in range(3)]
    job_id = create_job(backend, [(f"{prefix}_{i}.jpg", scans[i % 3]) for i in range(total)], owner_key_id)
    with backend.active():
        assert enqueue_job(job_id) is True
    return job_id


def post_scans(api: Api, names: list[str], seed: int) -> httpx.Response:
    url, headers, _ = api
    files = [("files", (name, make_jpeg(seed + i), "image/jpeg")) for i, name in enumerate(names)]
    return httpx.post(f"{url}/v1/jobs", headers=headers, files=files, timeout=60)


@contextlib.contextmanager
def paused(backend: Backend, service: Service) -> Iterator[None]:
    """The worker stops taking messages (it stays alive), so another worker gets the job."""
    from brainscan.queueing import _celery

    with backend.active():
        control = _celery().control
        control.cancel_consumer("brainscan", destination=[service.hostname], reply=True, timeout=10)
    try:
        yield
    finally:
        with backend.active():
            control.add_consumer("brainscan", destination=[service.hostname], reply=True, timeout=10)


# ---- broker -------------------------------------------------------------------------------------
def test_broker_restart_with_jobs_queued_and_broker_down_at_submit(
    api: Api, beat: Service, broker: RedisServer, direct: Backend,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    import redis

    # 1. Queued, no worker yet: the message is in Redis, then Redis restarts without persistence.
    queued = post_scans(api, ["q0.jpg", "q1.jpg", "q2.jpg"], seed=10)
    assert queued.status_code == 202, queued.text
    assert (queued.json()["enqueued"], queued.json()["total"]) == (True, 3)
    broker.stop()

    # 2. Broker down at submit: still 202 with the job id; the job is stored, not enqueued.
    stranded = post_scans(api, ["s0.jpg", "s1.jpg"], seed=20)
    assert stranded.status_code == 202, stranded.text
    body = stranded.json()
    assert (body["status"], body["total"], body["failed"], body["enqueued"]) == ("queued", 2, 0, False)
    assert body["status_url"].endswith(f"/v1/jobs/{body['id']}")
    with direct.active(), session_scope() as session:
        enqueued_at = list(session.scalars(select(Item.enqueued_at).where(Item.job_id == body["id"])))
    assert enqueued_at == [None, None]

    broker.start()
    client = redis.Redis.from_url(broker.url)
    assert client.llen("brainscan") == 0  # the queued message died with the old Redis
    client.close()

    # 3. The API reconnects by itself: a job posted after the restart is enqueued.
    after = post_scans(api, ["a0.jpg"], seed=30)
    assert after.status_code == 202 and after.json()["enqueued"] is True

    request.getfixturevalue("worker")  # a worker starts only now
    for job_id, done in ((queued.json()["id"], 3), (body["id"], 2), (after.json()["id"], 1)):
        assert_exact(direct, job_id, done)
    polled = httpx.get(body["status_url"], headers=api.headers, timeout=30).json()
    assert (polled["status"], polled["done"], polled["pending"]) == ("succeeded", 2, 0)
    assert all(item["label"] and item["attempts"] == 1 for item in polled["items"])


def test_broker_restart_while_a_job_is_running(
    worker: Service, broker: RedisServer, direct: Backend, api: Api
) -> None:
    total = 64
    job_id = submit_big_job(direct, "restart", total)
    wait_for(lambda: running_ids(direct, job_id), what="the worker to start a batch")
    broker.stop()
    time.sleep(2)  # the worker and beat see the broker gone (not an assertion)
    broker.start()

    assert_exact(direct, job_id, total)
    assert worker.alive(), "the worker must reconnect, not exit"
    # And the reconnected worker keeps consuming: a new job through the API completes.
    later = post_scans(api, ["later.jpg"], seed=40)
    assert later.status_code == 202 and later.json()["enqueued"] is True
    assert_exact(direct, later.json()["id"], 1)
    assert "Connection to broker lost" in worker.log() or "Cannot connect" in worker.log()


# ---- database -----------------------------------------------------------------------------------
def test_database_cut_during_scoring_worker_retries_and_api_says_503(
    worker: Service, proxy: TcpProxy, direct: Backend, api: Api
) -> None:
    url, headers, key_id = api
    total = 64
    job_id = submit_big_job(direct, "dbcut", total, key_id)
    wait_for(lambda: running_ids(direct, job_id), what="the worker to start a batch")
    proxy.cut()
    try:
        # The worker meets the outage when it writes the batch it is scoring (or claims the next).
        wait_for(lambda: "database error while" in worker.log(), what="the worker to hit the outage")
        for method, path in (("GET", f"/v1/jobs/{job_id}"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs")):
            response = httpx.request(
                method, url + path, headers=headers, timeout=30,
                files=[("files", ("x.jpg", make_jpeg(1)))] if method == "POST" else None,
            )  # fmt: skip
            assert response.status_code == 503, (path, response.text)
            assert response.json() == DB_DOWN
            assert response.headers["retry-after"] == "5"
        ready = httpx.get(url + "/readyz", timeout=30)
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == {"ok": False, "error": "OperationalError"}
        time.sleep(3)  # a few seconds of outage, with the worker retrying (not an assertion)
    finally:
        proxy.restore()

    assert_exact(direct, job_id, total)
    assert worker.alive()
    log = worker.log()
    assert "retrying in" in log and "giving up" not in log
    assert "Traceback" not in log.split("database error while", 1)[1]  # retried quietly, not crashed
    polled = httpx.get(f"{url}/v1/jobs/{job_id}?limit=0", headers=headers, timeout=30)
    assert polled.status_code == 200 and polled.json()["done"] == total
    # Nothing submitted during the outage was half-stored: the POST was refused before intake.
    with direct.active(), session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Item).where(Item.filename == "x.jpg")) == 0


# ---- graceful shutdown ----------------------------------------------------------------------------
def test_sigterm_mid_batch_finishes_the_batch_and_returns_the_rest(
    worker: Service, direct: Backend, stack: Backend, logs: Path
) -> None:
    total = 96
    with paused(direct, worker):
        victim = start_worker(stack, logs)
        try:
            job_id = submit_big_job(direct, "sigterm", total)
            in_flight = wait_for(lambda: running_ids(direct, job_id), what="the victim to start a batch")
            os.killpg(victim.process.pid, signal.SIGTERM)
            code = victim.process.wait(120)
        finally:
            victim.stop()
        assert code == 0, victim.log()[-3000:]
        # Warm shutdown: the batch it was scoring was written before it exited...
        with direct.active(), session_scope() as session:
            statuses = set(session.scalars(select(Item.status).where(Item.id.in_(in_flight))))  # type: ignore[arg-type]
        assert statuses == {"succeeded"}
        assert running_ids(direct, job_id) == []  # ...and nothing it held is left running
        assert job_row(direct, job_id)[0] == "running"  # the rest went back to the queue
    # Another worker finishes the job from the returned messages; nothing scored twice.
    assert_exact(direct, job_id, total)
    with direct.active(), session_scope() as session:
        attempts = set(session.scalars(select(Item.attempts).where(Item.job_id == job_id)))
    assert attempts == {1}


# ---- poison scan ---------------------------------------------------------------------------------
def test_poison_scan_fails_after_max_attempts_and_the_rest_completes(
    worker: Service, direct: Backend, stack: Backend, logs: Path, root: Path
) -> None:
    from brainscan.queueing import enqueue_job

    poison_models = root / "poison-models"
    build_poison_model(poison_models / "poisonable" / "1")
    white = io.BytesIO()
    Image.new("RGB", (32, 32), (255, 255, 255)).save(white, format="PNG")
    scans = [(f"ok_{i}.jpg", make_jpeg(500 + i)) for i in range(6)]
    scans.insert(3, ("white.png", white.getvalue()))

    with paused(direct, worker):  # the tiny model would score the white scan happily
        poisonable = start_worker(stack, logs, BRAINSCAN_MODEL_DIR=str(poison_models))
        try:
            job_id = create_job(direct, scans)
            with direct.active():
                assert enqueue_job(job_id)
            assert_exact(direct, job_id, done=6, failed=1)
        finally:
            poisonable.stop()
    with direct.active(), session_scope() as session:
        items = list(session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.position)))
    poison = items[3]
    assert (poison.filename, poison.status, poison.attempts) == ("white.png", "failed", 3)
    assert poison.error == (
        "gave up after 2 attempts; last error: model call failed on this scan: InvalidArgumentError"
    )
    # Its batch-mates were scored on the first attempt, not dragged down with it.
    others = items[:3] + items[4:]
    assert [(i.status, i.attempts, i.error) for i in others] == [("succeeded", 1, None)] * 6
    assert all(i.model_name == "poisonable" for i in others)


# ---- persistence of the embedded Redis ----------------------------------------------------------
def test_embedded_redis_keeps_queued_messages_across_a_restart(direct: Backend, root: Path) -> None:
    """``brainscan up`` runs Redis with an append-only file: a restart does not even need the reaper."""
    import redis

    from brainscan.queueing import enqueue_job
    from brainscan_cli.embedded import free_port, start_redis, stop_all

    port, data_dir = free_port(), root / "embedded-redis"
    child, url = start_redis(data_dir, port=port, persist=True)  # exactly what `brainscan up` starts
    try:
        job_id = create_job(direct, [(f"kept_{i}.jpg", make_jpeg(600 + i)) for i in range(3)])
        with direct.active(BRAINSCAN_BROKER_URL=url):
            assert enqueue_job(job_id) is True
        stop_all([child], timeout_s=30)  # SIGTERM: Redis writes its AOF and exits
        child, url = start_redis(data_dir, port=port, persist=True)
        client = redis.Redis.from_url(url)
        messages = [m for m in client.lrange("brainscan", 0, -1) if b"brainscan.score_items" in m]
        client.close()
        assert len(messages) == 1  # the job's one message (3 ids, one chunk) is still queued
    finally:
        stop_all([child], timeout_s=30)
