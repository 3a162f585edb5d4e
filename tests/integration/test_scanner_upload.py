"""DICOM and NIfTI through the HTTP API, and ``GET /v1/items/{id}/image.png``.

Real database (SQLite, PostgreSQL), real Redis broker (its own db number; no worker consumes it).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.api import Api, make_api
from tests.support.archives import make_zip
from tests.support.scanners import PATIENT, PATIENT_ID, make_dicom, make_nifti
from tests.support.services import flushed_broker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scan_broker() -> Iterator[str]:
    yield from flushed_broker()


@pytest.fixture(params=["sqlite", "postgres"])
def api(
    request: pytest.FixtureRequest, scan_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Api]:
    database_url = request.getfixturevalue(f"{request.param}_url")
    yield from make_api(database_url, scan_broker, tmp_path, monkeypatch)


def test_dicom_and_nifti_in_a_zip_become_png_items(api: Api) -> None:
    frames = np.stack([np.tile(np.arange(16, dtype=np.uint16) * (i + 1), (16, 1)) for i in range(3)])
    dicom = make_dicom(frames, window=(20, 40))
    volume = np.zeros((12, 12, 6), np.float32)
    volume[2:10, 2:10, 1:5] = np.arange(8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4)
    study = make_zip({"study/t1.nii.gz": make_nifti(volume, gz=True), "study/IM0001": make_dicom(frames[0])})
    response = api.client.post(
        "/v1/jobs",
        headers=api.auth(),
        files=[
            ("files", ("cine.dcm", dicom, "application/dicom")),
            ("files", ("study.zip", study, "application/zip")),
        ],
    )
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert (accepted["total"], accepted["failed"]) == (3 + 4 + 1, 0)

    job = api.client.get(accepted["status_url"], headers=api.auth()).json()
    got = [(item["filename"], item["source_ref"], item["status"]) for item in job["items"]]
    assert got == [
        *(("cine.dcm", f"frame {i}/3, series 4, instance 17", "queued") for i in (1, 2, 3)),
        *(("study.zip/study/t1.nii.gz", f"slice {k}/6", "queued") for k in (2, 3, 4, 5)),
        ("study.zip/study/IM0001", "frame 1/1, series 4, instance 17", "queued"),
    ]

    # The stored scan of each item is an 8-bit greyscale PNG, served to its owner only.
    first = job["items"][0]
    image = api.client.get(f"/v1/items/{first['id']}/image.png", headers=api.auth())
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(image.content)) as png:
        assert (png.format, png.mode, png.size) == ("PNG", "L", (16, 16))
        assert np.asarray(png)[0, :3].tolist() == [0, 6, 13]  # 0, 1, 2 in a 0..40 window
    assert image.content == api.store.read(first["sha256"])
    other = api.client.get(f"/v1/items/{first['id']}/image.png", headers=api.auth(api.other_key))
    assert other.status_code == 404 and other.json() == {"detail": "item not found"}

    # Nothing of the DICOM files themselves (marker, identity) was stored or answered.
    for path in api.store.root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"DICM" not in data and PATIENT.encode() not in data and PATIENT_ID.encode() not in data
    assert PATIENT not in response.text + str(job)


def test_item_image_converts_jpeg_and_refuses_unknown_items(api: Api) -> None:
    pixels = np.random.default_rng(3).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    response = api.client.post(
        "/v1/jobs",
        headers=api.auth(),
        files=[
            ("files", ("a.jpg", out.getvalue(), "image/jpeg")),
            ("files", ("x.txt", b"text", "text/plain")),
        ],
    )
    job = api.client.get(response.json()["status_url"], headers=api.auth()).json()
    scan, failed = job["items"]
    image = api.client.get(f"/v1/items/{scan['id']}/image.png", headers=api.auth())
    assert image.status_code == 200
    with Image.open(io.BytesIO(image.content)) as png:
        assert (png.format, png.size) == ("PNG", (24, 20))
    missing = api.client.get(f"/v1/items/{failed['id']}/image.png", headers=api.auth())
    assert missing.status_code == 404 and missing.json()["detail"] == "no scan stored for this item"
    assert api.client.get("/v1/items/999999999/image.png", headers=api.auth()).status_code == 404
    assert api.client.get(f"/v1/items/{scan['id']}/image.png").status_code == 401
