"""Rows written straight into a backend's database: jobs with their items (worker tests without the
API) and API keys; whether a job has finished; and which items wait in the broker's lists."""

from __future__ import annotations

import base64
import json
import uuid

from tests.support.backends import Backend


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


def make_key(backend: Backend, name: str = "") -> tuple[int, str]:
    """A real API key (hashed in the backend's database): its id and its plaintext."""
    from brainscan import auth
    from brainscan.db import session_scope

    with backend.active(), session_scope() as session:
        key, plaintext = auth.create_key(session, name or f"test-{uuid.uuid4().hex[:6]}")
        session.flush()
        return key.id, plaintext


def queued_ids(backend: Backend, key: str) -> set[int]:
    """Item ids in the score messages waiting in one of the queue's Redis lists."""
    import redis

    client = redis.Redis.from_url(backend.broker_url)
    try:
        raw = client.lrange(key, 0, -1)
    finally:
        client.close()
    ids: set[int] = set()
    for message in raw:
        envelope = json.loads(message)
        if envelope.get("headers", {}).get("task") != "brainscan.score_items":
            continue
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        ids.update(int(i) for i in args[0])
    return ids
