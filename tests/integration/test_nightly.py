"""Nightly scoring: the inbox becomes jobs (``brainscan nightly --now``), then re-scoring after a promotion.

Its own model repository (two versions of ``nightly-model``) and worker, so promoting here never
changes what other modules' workers serve.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from brainscan.auth import KEY_PREFIX
from brainscan.db import ApiKey, Item, Job, session_scope
from brainscan.modelrepo import promote
from tests.support.archives import make_zip
from tests.support.backends import Backend
from tests.support.environment import wait_for
from tests.support.images import make_png, make_scans
from tests.support.processes import Service, start_worker
from tests.support.records import job_finished

pytestmark = pytest.mark.integration

MODEL = "nightly-model"


@pytest.fixture(scope="module")
def model_repo(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Per backend (see test_rollout.py): the re-score test promotes version 2.
    from tests.support.models import build_tiny_model

    model_dir = tmp_path_factory.mktemp("nightly-models")
    build_tiny_model(model_dir / MODEL / "1", name=MODEL, version="1", seed=1)
    build_tiny_model(model_dir / MODEL / "2", name=MODEL, version="2", seed=2)
    promote(model_dir, MODEL, "1")
    return model_dir


@pytest.fixture(scope="module")
def nightly_backend(backend: Backend, model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Backend:
    inbox = tmp_path_factory.mktemp("inbox")
    return dataclasses.replace(
        backend,
        model_dir=model_repo,
        extra_env={"BRAINSCAN_NIGHTLY_INBOX_DIR": str(inbox), "BRAINSCAN_NIGHTLY_SETTLE_S": "0"},
    )


@pytest.fixture(scope="module")
def nightly_worker(nightly_backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = start_worker(nightly_backend, tmp_path_factory.mktemp("logs"))
    yield service
    service.stop()


def items_of(backend: Backend, job_id: str) -> tuple[Job, list[Item]]:
    with backend.active(), session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job, list(session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.position)))


def test_inbox_files_become_jobs(nightly_backend: Backend, nightly_worker: Service) -> None:
    from brainscan_cli.main import app

    inbox = Path(nightly_backend.extra_env["BRAINSCAN_NIGHTLY_INBOX_DIR"])
    (inbox / "study.zip").write_bytes(make_zip(make_scans(4, prefix="study", seed=7)))
    (inbox / "corrupt.zip").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)  # not a readable zip
    (inbox / "upload.zip.part").write_bytes(b"still copying")  # left alone
    # A file modified within nightly_settle_s (0 here; the future mtime puts it inside) is still
    # being written: left for the next run.
    (inbox / "fresh.png").write_bytes(make_png(3))
    os.utime(inbox / "fresh.png", (time.time() + 3600, time.time() + 3600))

    with nightly_backend.active():
        result = CliRunner().invoke(app, ["nightly", "--now"])
    assert result.exit_code == 0, result.output
    assert "still being written, left for the next run: fresh.png" in result.output

    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == ["fresh.png", "upload.zip.part"]
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["study.zip", "study.zip.job.txt"]
    assert sorted(p.name for p in (inbox / "failed").iterdir()) == ["corrupt.zip", "corrupt.zip.reason.txt"]
    assert not any((inbox / "processing").iterdir())

    study_job = (inbox / "done" / "study.zip.job.txt").read_text().strip()
    reason = (inbox / "failed" / "corrupt.zip.reason.txt").read_text()
    assert "no scan in this file could be scored" in reason and "corrupt.zip:" in reason
    assert f"study.zip -> done/ (job {study_job}, 4 scan(s))" in result.output
    assert "corrupt.zip -> failed/" in result.output

    wait_for(lambda: job_finished(nightly_backend, study_job), what="the nightly job")
    job, items = items_of(nightly_backend, study_job)
    assert (job.source, job.status, job.total, job.done) == ("nightly", "succeeded", 4, 4)
    assert sorted(i.filename for i in items) == [
        f"study.zip/study_{i:04d}.{'png' if i % 3 == 0 else 'jpg'}" for i in range(4)
    ]
    assert all(i.model_version == "1" and i.label for i in items)
    with nightly_backend.active(), session_scope() as session:
        owner = session.get(ApiKey, job.owner_key_id)
        assert owner is not None and owner.name == "nightly"
    # The key's plaintext, once, for an operator to read nightly jobs over the API.
    assert (nightly_backend.root / "nightly-api-key").read_text().startswith(KEY_PREFIX)

    # The same inbox again: nothing new to take.
    with nightly_backend.active():
        again = CliRunner().invoke(app, ["nightly", "--now"])
    assert again.exit_code == 0 and "-> done/" not in again.output and "-> failed/" not in again.output
    # Its report sums up the job that finished since, flags included (the tiny model is uncalibrated:
    # raw confidences, so its flags can only be "uncertain").
    uncertain = sum(1 for item in items if item.flag == "uncertain")
    line = f"job {study_job} (nightly, succeeded): 4 scored, 0 failed, {uncertain} uncertain, 0 out of scope"
    assert line in again.output
    assert re.search(r"finished in the last 24 h: \d+ job\(s\)", again.output)


def test_rescore_with_a_newly_promoted_model(
    nightly_backend: Backend, nightly_worker: Service, model_repo: Path
) -> None:
    from worker.nightly import run_nightly

    inbox = Path(nightly_backend.extra_env["BRAINSCAN_NIGHTLY_INBOX_DIR"])
    done = inbox / "done" / "study.zip.job.txt"
    if not done.exists():
        pytest.skip("needs test_inbox_files_become_jobs")
    _, old_items = items_of(nightly_backend, done.read_text().strip())
    old = {i.sha256: i for i in old_items}

    promote(model_repo, MODEL, "2")
    with nightly_backend.active():
        report = run_nightly(rescore_days=1)
    assert report.rescore_model == f"{MODEL}/2" and len(report.rescore_jobs) == 1
    (rescore_job,) = report.rescore_jobs
    wait_for(lambda: job_finished(nightly_backend, rescore_job), what="the re-score job")

    job, items = items_of(nightly_backend, rescore_job)
    assert job.source == "rescore"
    mine = [i for i in items if i.sha256 in old]  # (other modules' results may share the database)
    assert sorted(i.sha256 for i in mine) == sorted(old)
    for item in mine:
        assert (item.status, item.model_name, item.model_version) == ("succeeded", MODEL, "2")
        assert item.filename == old[item.sha256].filename
        assert item.probabilities != old[item.sha256].probabilities
    # Already re-scored: the next night adds nothing for these scans.
    with nightly_backend.active():
        assert run_nightly(rescore_days=1).rescore_jobs == []
