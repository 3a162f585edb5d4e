"""Model rollout: a running worker picks up ``brainscan models promote`` at its next batch, no restart.

Its own model repository (two tiny versions of one model), so promoting here never changes what
other test modules' workers serve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from brainscan import CLASSES
from brainscan.db import Item, Job, session_scope
from brainscan.modelrepo import promote, promoted
from tests.support.backends import Backend
from tests.support.environment import wait_for
from tests.support.images import make_jpeg
from tests.support.processes import Service, start_worker
from tests.support.records import create_job, job_finished

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_versions(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Depends on ``backend`` so that each backend gets a fresh repository: the first backend's test
    # promotes version 2, which the second must not inherit.
    from tests.support.models import build_tiny_model

    model_dir = tmp_path_factory.mktemp("rollout-models")
    build_tiny_model(model_dir / "tiny" / "1", version="1", seed=1)
    build_tiny_model(model_dir / "tiny" / "2", version="2", seed=2)
    promote(model_dir, "tiny", "1")  # without it the newest (2) would serve
    return model_dir


@pytest.fixture(scope="module")
def rollout_backend(backend: Backend, two_versions: Path) -> Backend:
    return dataclasses.replace(backend, model_dir=two_versions)


@pytest.fixture(scope="module")
def rollout_worker(rollout_backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = start_worker(rollout_backend, tmp_path_factory.mktemp("logs"))
    yield service
    service.stop()


def score_job(backend: Backend, seed: int) -> tuple[Job, list[Item]]:
    from brainscan.queueing import enqueue_job

    job_id = create_job(backend, [(f"r_{seed}_{i}.jpg", make_jpeg(seed + i)) for i in range(3)])
    with backend.active():
        assert enqueue_job(job_id)
    wait_for(lambda: job_finished(backend, job_id), what="the job to finish")
    with backend.active(), session_scope() as session:
        job = session.get(Job, job_id)
        items = list(session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.position)))
    assert job is not None
    return job, items


def expected(model_folder: Path, items: list[Item], backend: Backend) -> np.ndarray:
    from brainscan.imaging import prepare
    from brainscan.modelrepo import resolve_model
    from brainscan.runtime import load_scorer
    from brainscan.storage import ScanStore

    ref = resolve_model(model_folder)
    store = ScanStore(backend.storage_dir)
    batch = np.stack([prepare(store.read(item.sha256), ref.card.input_spec) for item in items])
    return load_scorer(ref, model_format="savedmodel").predict(batch)


def probabilities(items: list[Item]) -> np.ndarray:
    return np.array([[item.probabilities[name] for name in CLASSES] for item in items])


def test_promotion_reaches_a_running_worker(
    rollout_backend: Backend, rollout_worker: Service, two_versions: Path
) -> None:
    from brainscan_cli.main import app

    job, items = score_job(rollout_backend, 500)
    assert (job.model_name, job.model_version) == ("tiny", "1")
    assert all((i.status, i.model_name, i.model_version) == ("succeeded", "tiny", "1") for i in items)
    np.testing.assert_allclose(
        probabilities(items), expected(two_versions / "tiny" / "1", items, rollout_backend), atol=1e-5
    )

    with rollout_backend.active():
        result = CliRunner().invoke(app, ["models", "promote", "tiny", "2"])
    assert result.exit_code == 0, result.output
    assert "promoted tiny/2 (was tiny/1)" in result.output
    assert promoted(two_versions) == ("tiny", "2")

    job, items = score_job(rollout_backend, 600)
    assert rollout_worker.alive()  # the same process: no restart
    assert (job.model_name, job.model_version) == ("tiny", "2")
    assert all((i.status, i.model_name, i.model_version) == ("succeeded", "tiny", "2") for i in items)
    # The results really are version 2's (the two versions have different weights).
    got = probabilities(items)
    np.testing.assert_allclose(got, expected(two_versions / "tiny" / "2", items, rollout_backend), atol=1e-5)
    assert not np.allclose(got, expected(two_versions / "tiny" / "1", items, rollout_backend), atol=1e-5)
    assert "serving tiny/2" in rollout_worker.log()
