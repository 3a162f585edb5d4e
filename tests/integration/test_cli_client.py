"""``brainscan submit|status|keys`` against the real app and database (in-process HTTP transport)."""

from __future__ import annotations

import io
import json
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select, update
from typer.testing import CliRunner

from brainscan.db import Item, Job
from brainscan_cli.commands import client as client_commands
from brainscan_cli.main import app as cli
from tests.support.api import Api, make_api
from tests.support.services import flushed_broker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cli_broker() -> Iterator[str]:
    yield from flushed_broker("redis://127.0.0.1:6379/13")


@pytest.fixture
def api(sqlite_url: str, cli_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    # SQLite only: test_api.py covers both databases; these tests are about the CLI's behaviour.
    yield from make_api(sqlite_url, cli_broker, tmp_path, monkeypatch)


@pytest.fixture
def run(api: Api, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def http_client(url: str | None, key: str | None, timeout: float = 60.0) -> TestClient:
        resolved = client_commands._resolve_key(key)
        return TestClient(api.client.app, headers={"Authorization": f"Bearer {resolved}"})

    monkeypatch.setattr(client_commands, "_client", http_client)
    monkeypatch.setenv("BRAINSCAN_API_KEY", api.key)
    runner = CliRunner()
    return lambda *args: runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def write_jpeg(path: Path, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    path.write_bytes(out.getvalue())
    return path


def test_submit_then_status(api: Api, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "scans"
    folder.mkdir()
    write_jpeg(folder / "a.jpg", 1)
    write_jpeg(folder / "b.jpg", 2)
    (folder / "notes.txt").write_text("not a scan")
    result = run("submit", folder)
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    with api.sessions() as session:
        assert session.get(Job, job_id).total == 3

    status = run("status", job_id, "--json")
    assert status.exit_code == 0
    job = json.loads(status.stdout)
    assert [(i["filename"], i["status"]) for i in job["items"]] == [
        ("a.jpg", "queued"),
        ("b.jpg", "queued"),
        ("notes.txt", "failed"),
    ]
    table = run("status", job_id)
    assert "notes.txt" in table.stdout and "unsupported file type" in table.stdout


def test_submit_wait_shows_results(api: Api, run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    scan = write_jpeg(tmp_path / "scan.jpg")

    def score_everything(_seconds: float) -> None:
        # Stands in for a worker between two polls: every queued item gets a result.
        with api.sessions() as session:
            for job in session.scalars(select(Job).where(Job.status == "queued")):
                session.execute(
                    update(Item)
                    .where(Item.job_id == job.id, Item.status == "queued")
                    .values(
                        status="succeeded",
                        label="notumor",
                        confidence=0.8,
                        prob_glioma=0.1,
                        prob_meningioma=0.05,
                        prob_notumor=0.8,
                        prob_pituitary=0.05,
                    )
                )
                job.done, job.status = job.total - job.failed, "succeeded"
            session.commit()

    monkeypatch.setattr(client_commands, "time", types.SimpleNamespace(sleep=score_everything))
    result = run("submit", scan, "--wait", "--json")
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert job["status"] == "succeeded" and job["done"] == 1
    [item] = job["items"]
    assert (item["filename"], item["label"], item["probabilities"]["notumor"]) == ("scan.jpg", "notumor", 0.8)


def test_submit_wait_on_a_failed_job_exits_1(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.jpg"
    bad.write_text("text")
    result = run("submit", bad, "--wait")
    assert result.exit_code == 1
    assert "bad.jpg" in result.stdout and "failed" in result.stdout


def test_keys_create_list_revoke(api: Api, run) -> None:  # type: ignore[no-untyped-def]
    created = run("keys", "create", "radiology")
    assert created.exit_code == 0
    key = created.stdout.strip()
    assert key.startswith("bs_")
    assert api.client.get("/v1/jobs", headers=api.auth(key)).status_code == 200

    listing = run("keys", "list").stdout
    assert "radiology" in listing and key[:11] in listing and key not in listing

    assert run("keys", "revoke", "radiology").exit_code == 0
    assert api.client.get("/v1/jobs", headers=api.auth(key)).status_code == 401
    assert run("keys", "revoke", "radiology").exit_code == 1  # nothing active left by that name


def test_missing_key_is_a_clear_error(run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("BRAINSCAN_API_KEY")
    result = run("status", "some-job")
    assert result.exit_code == 2 and "no API key" in result.output
