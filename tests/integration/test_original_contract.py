"""The original project's export serves unchanged: a card-less SavedModel with exactly its architecture.

ResNet50 (include_top=False, random weights) + Flatten + Dense 512 relu + Dropout 0.5 + Dense 4
softmax, exported with ``model.export()`` (signature ``serve``, input ``keras_tensor``, output
``output_0``) and dropped into the model repository without a ``model.json``. The worker's scoring
path (``worker.tasks.score``: claim, decode, batch, score, write) must give ``model.predict``'s
probabilities on the same preprocessed images to 1e-5. Runs the worker's code in this process (no
broker needed) against a migrated SQLite database, so the heavy model is loaded only once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from brainscan import CLASSES
from brainscan.db import Item, Job, session_scope
from tests.support.backends import Backend
from tests.support.images import make_jpeg, make_png
from tests.support.records import create_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def original_model(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.support.models import build_original_resnet50

    model_dir = tmp_path_factory.mktemp("original-models")
    model = build_original_resnet50(model_dir / "original" / "1")
    return model_dir, model


def test_card_less_original_export_matches_model_predict(
    original_model, sqlite_url: str, tmp_path: Path
) -> None:
    import keras

    import worker.engine
    from brainscan.imaging import ORIGINAL_RESNET50, load_pixels
    from brainscan.modelrepo import resolve_model

    model_dir, model = original_model
    ref = resolve_model(model_dir)
    assert ref.card.card_less and ref.card.input_spec == ORIGINAL_RESNET50
    assert not (ref.path / "model.json").exists()

    scans = [(f"mri_{i}.jpg", make_jpeg(i, size=(300, 260))) for i in range(5)]
    scans += [(f"mri_{i}.png", make_png(i, size=(224, 224))) for i in range(5, 8)]
    backend = Backend("sqlite", sqlite_url, "redis://127.0.0.1:1/0", tmp_path / "var", model_dir)
    job_id = create_job(backend, scans)

    # The original project's preprocessing, done independently of brainscan.imaging.normalize.
    pixels = np.stack([load_pixels(data, ORIGINAL_RESNET50).astype(np.float32) for _, data in scans])
    inputs = keras.applications.resnet50.preprocess_input(pixels.copy())
    expected = model.predict(inputs, batch_size=8, verbose=0)

    with backend.active(BRAINSCAN_BATCH_SIZE="4", BRAINSCAN_TF_THREADS="0"):
        worker.engine._ENGINE = None  # a fresh engine for this model repository
        try:
            engine = worker.engine.get_engine()
            np.testing.assert_allclose(
                np.stack([engine.prepare(data) for _, data in scans]), inputs, rtol=0, atol=1e-4
            )
            from worker.tasks import score

            with session_scope() as session:
                ids = list(session.scalars(select(Item.id).where(Item.job_id == job_id)))
            assert score(ids) == len(scans)
        finally:
            worker.engine._ENGINE = None

        with session_scope() as session:
            job = session.get(Job, job_id)
            items = list(session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.position)))
            assert job is not None and (job.status, job.done, job.failed) == ("succeeded", len(scans), 0)
    got = np.array([[item.probabilities[name] for name in CLASSES] for item in items])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert [item.label for item in items] == [CLASSES[i] for i in expected.argmax(axis=1)]
    assert {(item.model_name, item.model_version) for item in items} == {("original", "1")}
