"""Rows written straight into a backend's database: jobs with their items (worker tests without the
API) and API keys; and whether a job has finished."""

from __future__ import annotations

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
