"""Grad-CAM: the maps themselves (compact net, ResNet50, saliency fallback), then the API + worker flow.

The maps are checked for what makes them usable: the model's input size, values in [0, 1], and not
constant (a map of zeros or ones would mean the gradients never reached the feature layer).
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Backend, Service, make_png, wait_for
from PIL import Image

from brainscan.modelrepo import ModelCard, resolve_model

pytestmark = pytest.mark.integration


def assert_usable(heat: np.ndarray, size: int) -> None:
    assert heat.shape == (size, size)
    assert heat.dtype == np.float32
    assert float(heat.min()) >= 0.0 and float(heat.max()) <= 1.0
    assert float(heat.max()) == pytest.approx(1.0) and float(heat.std()) > 0.01  # not constant


@pytest.fixture(scope="module")
def compact_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny compact net (32 px, one channel) exported as ``brainscan train`` does: SavedModel,
    ``model.keras`` and a card."""
    import keras

    from training.architectures import build_compact

    keras.utils.set_random_seed(3)
    folder = tmp_path_factory.mktemp("compact") / "compact" / "1"
    folder.parent.mkdir(parents=True)
    model = build_compact(32, channels=1)
    model.export(str(folder), verbose=False)
    model.save(str(folder / "model.keras"))
    ModelCard(
        name="compact",
        version="1",
        input_size=(32, 32),
        channels=1,
        preprocessing="none",
        crop="brain",
        architecture="compact",
    ).write(folder)
    return folder.parent.parent


def test_gradcam_of_the_compact_net(compact_repo: Path) -> None:
    from brainscan.imaging import prepare
    from worker.gradcam import GRADCAM, explain_scan, load_explainer

    explainer = load_explainer(resolve_model(compact_repo))
    assert explainer.kind == GRADCAM
    pixels = prepare(make_png(5, size=(48, 48)), explainer.ref.card.input_spec)  # the serving path
    heat, best, probability = explainer.explain(pixels)
    assert_usable(heat, 32)
    assert 0 <= best < 4 and 0.0 < probability <= 1.0
    # At 32 px the last stage is 1x1, so the last *spatial* map explains (never a 1x1 one).
    assert explainer.layer == "stage3_block2_out"

    png = explain_scan(explainer, make_png(6, size=(48, 48)), 10**7)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (256, 256)
        assert image.text["explainer"] == "gradcam" and image.text["model"] == "compact/1"
        assert np.asarray(image).std() > 1.0


def test_gradcam_layer_named_in_the_card(compact_repo: Path) -> None:
    import keras

    from worker.gradcam import gradcam

    model = keras.models.load_model(compact_repo / "compact" / "1" / "model.keras", compile=False)
    batch = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype(np.float32)
    maps, probabilities, layer = gradcam(model, batch, "stage2_block2_out")
    assert layer == "stage2_block2_out" and maps.shape == (2, 32, 32) and probabilities.shape == (2, 4)
    for heat in maps:
        assert_usable(heat, 32)


def test_gradcam_of_resnet50() -> None:
    """The original recipe's network (ResNet50 backbone nested in the model), random weights; one
    224 px call. The map is the backbone's last block, ``conv5_block3_out`` (7x7, upsampled)."""
    import keras

    from training.architectures import build_resnet50
    from worker.gradcam import gradcam

    keras.utils.set_random_seed(0)
    model, _ = build_resnet50(None, 224)
    x = np.random.default_rng(1).uniform(-120, 130, (1, 224, 224, 3)).astype(np.float32)
    maps, probabilities, layer = gradcam(model, x)
    assert layer == "conv5_block3_out"
    assert probabilities.shape == (1, 4)
    assert_usable(maps[0], 224)


def test_saliency_when_the_model_has_no_keras_file(tiny_model_dir: Path) -> None:
    from worker.gradcam import SALIENCY, load_explainer

    explainer = load_explainer(resolve_model(tiny_model_dir))
    assert explainer.kind == SALIENCY
    pixels = np.random.default_rng(2).uniform(-100, 150, (32, 32, 3)).astype(np.float32)
    heat, best, _ = explainer.explain(pixels)
    assert_usable(heat, 32)
    assert 0 <= best < 4


# ---- API + worker ---------------------------------------------------------------------------------
def submit(api_server: str, api_key: str, files: list[tuple[str, bytes]], **fields: str) -> dict:
    response = httpx.post(
        f"{api_server}/v1/jobs",
        headers={"Authorization": f"Bearer {api_key}"},
        files=[("files", (name, data)) for name, data in files],
        data=fields,
        timeout=60,
    )
    assert response.status_code == 202, response.text
    return response.json()


def finished_job(api_server: str, api_key: str, job_id: str) -> dict | None:
    body = httpx.get(
        f"{api_server}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    ).json()
    return body if body["finished"] else None


def test_gradcam_png_is_computed_on_request(
    backend: Backend, worker_process: Service, api_server: str, api_key: str
) -> None:
    from brainscan import auth
    from brainscan.db import session_scope

    headers = {"Authorization": f"Bearer {api_key}"}
    job = submit(api_server, api_key, [("brain.png", make_png(11, size=(64, 64)))])
    body = wait_for(lambda: finished_job(api_server, api_key, job["id"]), what="the job")
    (item,) = body["items"]
    url = f"{api_server}/v1/items/{item['id']}/gradcam.png"

    with backend.active(), session_scope() as session:
        _, other_key = auth.create_key(session, "someone-else")
    assert httpx.get(url, headers={"Authorization": f"Bearer {other_key}"}).status_code == 404

    first = httpx.get(url, headers=headers, timeout=30)
    assert first.status_code == 202
    assert first.json() == {"status": "pending", "retry_after": 2}
    assert first.headers["Retry-After"] == "2"

    def ready() -> httpx.Response | None:
        response = httpx.get(url, headers=headers, timeout=30)
        assert response.status_code in (200, 202), response.text
        return response if response.status_code == 200 else None

    done = wait_for(ready, what="the Grad-CAM overlay")
    assert done.headers["content-type"] == "image/png"
    # The test repository's tiny model has no model.keras: the saliency fallback, labelled so.
    assert done.headers["X-Brainscan-Explainer"] == "saliency"
    assert done.headers["X-Brainscan-Model"] == "tiny/1"
    with Image.open(io.BytesIO(done.content)) as image:
        assert image.format == "PNG" and image.size == (256, 256)
        assert np.asarray(image).std() > 1.0


def test_gradcam_option_on_submit(
    backend: Backend, worker_process: Service, api_server: str, api_key: str
) -> None:
    from brainscan.heatmaps import HeatmapStore

    job = submit(api_server, api_key, [("a.png", make_png(21)), ("b.png", make_png(22))], gradcam="true")
    body = wait_for(lambda: finished_job(api_server, api_key, job["id"]), what="the job")
    heatmaps = HeatmapStore(backend.storage_dir)
    ids = [item["id"] for item in body["items"]]
    wait_for(lambda: all(heatmaps.png_path(i).exists() for i in ids), what="heatmaps computed on submit")
    for item_id in ids:  # already there: no 202 round trip
        response = httpx.get(
            f"{api_server}/v1/items/{item_id}/gradcam.png",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=30,
        )
        assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
