"""Issue 15 on real processes (a private Redis, SQLite, the API and a worker): what an operator sees.

- every scored batch is one JSON ``batch_scored`` line, every line of every log is a JSON object, and
  each item names the worker that scored it;
- storage that cannot be read is not a bad scan: the items wait (queued, attempts not counted), the
  worker says it is unhealthy (/readyz, /metrics) and logs why, then scores them once it can read;
- a worker SIGKILLed mid-job: its unacked messages come back through the heartbeats of the workers
  still alive, long before the visibility timeout (300 s here, as by default).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
from sqlalchemy import select

from brainscan.db import Item, Job, session_scope
from tests.support.backends import Backend
from tests.support.environment import wait_for
from tests.support.faults import RedisServer
from tests.support.images import make_jpeg
from tests.support.processes import Service, start_api, start_worker
from tests.support.records import create_job, job_finished, make_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Ops(NamedTuple):
    backend: Backend
    url: str
    headers: dict[str, str]
    api: Service
    worker: Service
    logs: Path


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Ops]:
    from brainscan.migrate import upgrade

    root = tmp_path_factory.mktemp("ops")
    redis = RedisServer(root / "redis")
    redis.start()
    database_url = f"sqlite:///{root / 'brainscan.db'}"
    upgrade(database_url)
    backend = Backend(
        "sqlite",
        database_url,
        redis.url,
        root / "var",
        tiny_model_dir,
        # Kombu's own redelivery as by default: only the heartbeats can bring messages back quickly.
        extra_env={"BRAINSCAN_VISIBILITY_TIMEOUT_S": "300", "BRAINSCAN_LOG_FORMAT": "json"},
    )
    logs = root / "logs"
    api, url = start_api(backend, logs)
    worker = start_worker(backend, logs)
    _, key = make_key(backend)
    try:
        yield Ops(backend, url, {"Authorization": f"Bearer {key}"}, api, worker, logs)
    finally:
        worker.stop()
        api.stop()
        redis.stop()


def submit(ops: Ops, count: int, seed: int = 0) -> str:
    files = [("files", (f"scan_{i}.jpg", make_jpeg(seed + i), "image/jpeg")) for i in range(count)]
    response = httpx.post(f"{ops.url}/v1/jobs", files=files, headers=ops.headers, timeout=60)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def finished_job(ops: Ops, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = httpx.get(f"{ops.url}/v1/jobs/{job_id}", headers=ops.headers, timeout=30).json()
        return job if job["finished"] else None

    return wait_for(done, what=f"job {job_id} to finish")  # type: ignore[return-value]


def json_lines(log: str) -> list[dict[str, Any]]:
    """Every non-empty line parsed; fails naming the first line that is not a JSON object."""
    parsed = []
    for line in log.splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line[:300]!r}") from None
        assert isinstance(value, dict), line[:300]
        parsed.append(value)
    return parsed


def items_of(backend: Backend, job_id: str) -> list[Item]:
    with backend.active(), session_scope() as session:
        items = list(session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.position)))
        session.expunge_all()
        return items


def readyz(ops: Ops) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{ops.url}/readyz", timeout=10)
    return response.status_code, response.json()


def test_each_batch_is_one_json_line_and_items_name_their_worker(ops: Ops) -> None:
    job_id = submit(ops, 6)
    job = finished_job(ops, job_id)
    assert job["status"] == "succeeded"
    assert {item["worker_id"] for item in job["items"]} == {ops.worker.hostname}

    worker_lines = json_lines(ops.worker.log())
    batches = [
        line for line in worker_lines if line.get("event") == "batch_scored" and job_id in line["job_ids"]
    ]
    assert batches, "no batch_scored line for the job"
    assert sum(line["items"] for line in batches) == 6
    for line in batches:
        assert line["level"] == "INFO" and line["worker_id"] == ops.worker.hostname
        assert line["model"] == "tiny/1" and line["jobs"] == len(line["job_ids"]) >= 1
        assert line["failed"] == 0
        assert all(line[stage] >= 0 for stage in ("decode_ms", "decode_wait_ms", "inference_ms", "write_ms"))
    started = [line for line in worker_lines if line.get("event") == "worker_started"]
    assert started and started[0]["worker_id"] == ops.worker.hostname
    # Celery's banner is not printed; TensorFlow's native lines, if any, are wrapped like the rest.
    assert not any(re.search(r"-{10,} celery@", line["msg"]) for line in worker_lines)
    json_lines(ops.api.log())


def test_unreadable_storage_leaves_items_queued_and_the_worker_unhealthy(ops: Ops) -> None:
    job_id = create_job(ops.backend, [(f"scan_{i}.jpg", make_jpeg(100 + i)) for i in range(4)])
    scans = ops.backend.storage_dir / "scans"
    offline = scans.with_name("scans.offline")
    scans.rename(offline)  # the volume is gone (a mount that failed looks the same)
    try:
        with ops.backend.active():
            from brainscan.queueing import enqueue_job

            assert enqueue_job(job_id)

        def unhealthy() -> dict[str, Any] | None:
            status, body = readyz(ops)
            return body if status == 503 and body["checks"]["workers"]["unhealthy"] == 1 else None

        body = wait_for(unhealthy, what="the worker to report unreadable storage")
        assert isinstance(body, dict)
        assert body["checks"]["workers"] == {
            "ok": False,
            "count": 0,
            "unhealthy": 1,
            "problems": {"storage: FileNotFoundError": 1},
        }
        metrics = httpx.get(f"{ops.url}/metrics", timeout=10).text
        assert 'brainscan_workers_unhealthy{reason="storage"} 1.0' in metrics

        items = items_of(ops.backend, job_id)
        assert [(item.status, item.attempts, item.error) for item in items] == [("queued", 0, None)] * 4
        lines = json_lines(ops.worker.log())
        (outage,) = [line for line in lines if line.get("event") == "storage_unreadable"]
        assert outage["level"] == "ERROR" and outage["error_type"] == "FileNotFoundError"
        assert outage["worker_id"] == ops.worker.hostname
        assert "share the storage volume and its owner" in outage["msg"]
    finally:
        offline.rename(scans)

    wait_for(lambda: job_finished(ops.backend, job_id), what="the job once storage is back")
    items = items_of(ops.backend, job_id)
    assert {item.status for item in items} == {"succeeded"}
    assert all(item.attempts == 1 for item in items)  # the unreadable tries did not count
    with ops.backend.active(), session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.status, job.done, job.failed) == ("succeeded", 4, 0)
    status, body = readyz(ops)
    assert status == 200 and body["checks"]["workers"]["count"] == 1
    assert any(line.get("event") == "storage_readable" for line in json_lines(ops.worker.log()))


def test_a_killed_workers_messages_come_back_before_the_visibility_timeout(ops: Ops) -> None:
    """SIGKILL mid-job; another worker finishes the job. Kombu alone would wait 300 s, the reaper
    600 s (stale_after_s): the hang guard (180 s) fails the test if only they brought them back."""
    from tests.integration.test_worker_crash import large_jpeg

    scans = [large_jpeg(seed) for seed in range(3)]
    job_id = create_job(ops.backend, [(f"big_{i}.jpg", scans[i % 3]) for i in range(64)])
    victim = start_worker(ops.backend, ops.logs)
    rescuer: Service | None = None
    try:
        ops.worker.stop()  # the module's worker must not take the job: the victim holds all of it
        with ops.backend.active():
            from brainscan.queueing import enqueue_job

            assert enqueue_job(job_id)
        wait_for(
            lambda: any(item.status == "running" for item in items_of(ops.backend, job_id)),
            what="the victim to start a batch",
        )
        victim.kill()
        assert not job_finished(ops.backend, job_id)
        rescuer = start_worker(ops.backend, ops.logs)
        wait_for(lambda: job_finished(ops.backend, job_id), what="the job to finish after the kill")
    finally:
        victim.stop()
        if rescuer is not None:
            rescuer.stop()
    items = items_of(ops.backend, job_id)
    assert {item.status for item in items} == {"succeeded"}
    assert rescuer is not None and rescuer.hostname in {item.worker_id for item in items}
    restored = [line for line in json_lines(rescuer.log()) if line.get("event") == "messages_restored"]
    assert restored and sum(line["messages"] for line in restored) >= 1
