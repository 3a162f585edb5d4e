"""Issue 3, security: no secret, key or scan content in logs; storage paths from hashes only;
a revoked key is refused at once by the running API.

A job goes through the real API and worker processes (PostgreSQL, a private Redis), with marker
strings hidden in a scan's bytes (a JPEG comment), in a failing text file, and in a file name built
like a path; then every line the API and the worker logged is searched for them.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.support.environment import ROOT, wait_for
from tests.support.faults import PrivateStack, private_stack
from tests.support.images import make_jpeg
from tests.support.records import job_finished, make_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MARK = uuid.uuid4().hex[:12]
CONTENT_MARKER = f"SCAN-CONTENT-{MARK}"
TEXT_MARKER = f"PATIENT-NAME-{MARK}"
NAME_MARKER = f"FILENAME-{MARK}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[PrivateStack]:
    with private_stack(tmp_path_factory.mktemp("hygiene"), tiny_model_dir) as running:
        yield running


def jpeg_with_comment(comment: str) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(make_jpeg(3))).save(out, format="JPEG", comment=comment.encode())
    data = out.getvalue()
    assert comment.encode() in data
    return data


def test_logs_hold_no_key_no_scan_content_no_file_names(stack: PrivateStack) -> None:
    _, key = make_key(stack.backend)
    headers = {"Authorization": f"Bearer {key}"}
    marked = jpeg_with_comment(CONTENT_MARKER)
    files = [
        ("files", (f"../../{NAME_MARKER}/etc/passwd.jpg", marked, "image/jpeg")),
        ("files", (f"{NAME_MARKER}-notes.jpg", f"{TEXT_MARKER}\nnot an image".encode(), "image/jpeg")),
        ("files", ("cut.jpg", marked[: len(marked) // 2], "image/jpeg")),
    ]
    response = httpx.post(f"{stack.url}/v1/jobs", headers=headers, files=files, timeout=60)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    wait_for(lambda: job_finished(stack.backend, job_id), what="the job to finish")
    job = httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
    assert [i["status"] for i in job["items"]] == ["succeeded", "failed", "failed"]
    # The file name is data: kept (sanitised) for the client, never a path.
    assert job["items"][0]["filename"] == f"../../{NAME_MARKER}/etc/passwd.jpg"
    # Failing calls log too (401 with a wrong key, 404 for a job id): still nothing secret.
    assert httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": f"Bearer {key}x"}).status_code == 401

    logs = stack.api.log() + stack.worker.log()
    assert "job " in logs and "stored" in logs  # the logs are there and say something
    for secret in (key, key[12:], CONTENT_MARKER, TEXT_MARKER, NAME_MARKER, "passwd"):
        assert secret not in logs, f"{secret!r} leaked into a log"
    assert hashlib.sha256(key.encode()).hexdigest() not in logs

    # Storage: every file is scans/aa/bb/<sha256 of its own bytes>; nothing named after the client.
    storage = stack.backend.storage_dir
    stored = [p for p in storage.rglob("*") if p.is_file()]
    assert stored, "the scans should be stored"
    for path in stored:
        relative = path.relative_to(storage).as_posix()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert relative == f"scans/{digest[:2]}/{digest[2:4]}/{digest}", relative
    everything = [p.as_posix() for p in stack.root.rglob("*")]
    assert not any(NAME_MARKER in p or "passwd" in p for p in everything)


def test_revoked_key_is_refused_immediately_by_the_running_api(stack: PrivateStack) -> None:
    name = f"to-revoke-{uuid.uuid4().hex[:6]}"
    _, key = make_key(stack.backend, name)
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{stack.url}/v1/jobs", headers=headers, timeout=30).status_code == 200
    result = subprocess.run(
        [sys.executable, "-m", "brainscan_cli.main", "keys", "revoke", name],
        env={**os.environ, **stack.backend.env()},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(rf"revoked \S+\.\.\. \({name}\)", result.stdout), result.stdout
    assert key not in result.stdout + result.stderr  # the CLI prints the prefix, never the key
    # The very next request, no restart, no cache expiry to wait for.
    refused = httpx.get(f"{stack.url}/v1/jobs", headers=headers, timeout=30)
    assert refused.status_code == 401
    assert refused.json() == {"detail": "missing or invalid API key: send 'Authorization: Bearer <key>'"}
