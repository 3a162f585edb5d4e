"""Grad-CAM through the API and a real worker: computed on request, or on submit.

The maps themselves (compact net, ResNet50, saliency fallback): tests/unit/test_gradcam_maps.py.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.backends import Backend
from tests.support.environment import wait_for
from tests.support.images import make_png
from tests.support.processes import Service

pytestmark = pytest.mark.integration


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
