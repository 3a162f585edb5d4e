"""The HTTP API over a real database (SQLite file and PostgreSQL) and a real Redis broker."""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from brainscan.auth import revoke_key
from brainscan.db import Item, Job
from brainscan.modelrepo import ModelCard
from tests.support.api import Api, make_api
from tests.support.archives import make_zip
from tests.support.services import flushed_broker

pytestmark = pytest.mark.integration


def image_bytes(fmt: str = "JPEG", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="session")
def api_broker() -> Iterator[str]:
    yield from flushed_broker()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def api(database_url: str, api_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    yield from make_api(database_url, api_broker, tmp_path, monkeypatch)


@pytest.fixture
def small_api(
    database_url: str, api_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Api]:
    yield from make_api(database_url, api_broker, tmp_path, monkeypatch, max_request_bytes=20_000)


def stored(api: Api) -> list[Path]:
    return sorted(p for p in api.store.root.rglob("*") if p.is_file())


def job_count(api: Api) -> int:
    with api.sessions() as session:
        return session.scalar(select(func.count()).select_from(Job).where(Job.owner_key_id == api.key_id))


# -- auth ----------------------------------------------------------------------------------------


def test_every_v1_route_needs_a_valid_key(api: Api) -> None:
    for method, path in (("GET", "/v1/jobs"), ("GET", "/v1/models"), ("POST", "/v1/jobs")):
        for headers in ({}, {"Authorization": "Bearer bs_not-a-key"}, {"Authorization": "Basic eDp5"}):
            response = api.client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.json() == {
                "detail": "missing or invalid API key: send 'Authorization: Bearer <key>'"
            }
            assert response.headers["www-authenticate"] == "Bearer"
    assert api.client.get("/v1/jobs", headers=api.auth()).status_code == 200


def test_revoked_key_is_refused(api: Api) -> None:
    with api.sessions() as session:
        [revoked] = revoke_key(session, api.key[:11])
        session.commit()
        assert revoked.id == api.key_id
    assert api.client.get("/v1/jobs", headers=api.auth()).status_code == 401


def test_another_keys_job_is_not_found(api: Api) -> None:
    response = api.client.post("/v1/jobs", headers=api.auth(), files=[("files", ("a.jpg", image_bytes()))])
    job_id = response.json()["id"]
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/results.csv"):
        other = api.client.get(path, headers=api.auth(api.other_key))
        assert other.status_code == 404 and other.json() == {"detail": "job not found"}
        assert api.client.get(path, headers=api.auth()).status_code == 200
    assert api.client.get("/v1/jobs", headers=api.auth(api.other_key)).json()["jobs"] == []
    missing = api.client.get("/v1/jobs/00000000-0000-0000-0000-000000000000", headers=api.auth())
    assert missing.status_code == 404


# -- submit --------------------------------------------------------------------------------------


def test_upload_images_and_zip_become_items(api: Api) -> None:
    jpeg, png = image_bytes("JPEG", 1), image_bytes("PNG", 2)
    inner_a, inner_b = image_bytes("JPEG", 3), image_bytes("PNG", 4)
    study = make_zip({"study/a.jpg": inner_a, "study/sub/b.png": inner_b, "study/notes.txt": b"hi"})
    response = api.client.post(
        "/v1/jobs",
        headers=api.auth(),
        files=[
            ("files", ("scan1.jpg", jpeg, "image/jpeg")),
            ("files", ("scan2.png", png, "image/png")),
            ("files", ("study.zip", study, "application/zip")),
        ],
        data={"callback_url": "https://example.org/hook"},
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and body["total"] == 5 and body["failed"] == 1
    # BRAINSCAN_PUBLIC_URL's default (host and port), whatever Host the request named
    assert body["status_url"] == f"http://127.0.0.1:8000/v1/jobs/{body['id']}"
    assert response.headers["location"] == body["status_url"]

    expected = [
        ("scan1.jpg", sha(jpeg), "queued"),
        ("scan2.png", sha(png), "queued"),
        ("study.zip/study/a.jpg", sha(inner_a), "queued"),
        ("study.zip/study/sub/b.png", sha(inner_b), "queued"),
        ("study.zip/study/notes.txt", None, "failed"),
    ]
    with api.sessions() as session:
        job = session.get(Job, body["id"])
        assert (job.owner_key_id, job.total, job.done, job.failed) == (api.key_id, 5, 0, 1)
        assert job.callback_url == "https://example.org/hook"
        items = session.scalars(select(Item).where(Item.job_id == job.id).order_by(Item.position)).all()
        assert [(i.filename, i.sha256, i.status) for i in items] == expected
        if body["enqueued"]:  # the broker took them: every queued item is stamped
            assert all(i.enqueued_at is not None for i in items if i.status == "queued")
    for _name, digest, _status in expected:
        if digest:
            assert api.store.path_for(digest).is_file()
    # The spooled upload files are gone; only content-addressed scans remain.
    assert all(p.parent.parent.parent.name == "scans" for p in stored(api))
    assert len(stored(api)) == 4


def test_enqueue_reaches_the_real_broker(api: Api, api_broker: str) -> None:
    import redis

    pytest.importorskip("worker.celery")
    response = api.client.post(
        "/v1/jobs", headers=api.auth(), files=[("files", ("a.jpg", image_bytes(seed=7)))]
    )
    assert response.status_code == 202 and response.json()["enqueued"] is True
    client = redis.Redis.from_url(api_broker)
    assert client.llen("brainscan") >= 1  # the Celery queue holds the message (no worker here)


def test_job_with_only_bad_files_is_failed_at_once(api: Api) -> None:
    response = api.client.post(
        "/v1/jobs",
        headers=api.auth(),
        files=[("files", ("notes.jpg", b"plain text")), ("files", ("empty.png", b""))],
    )
    assert response.status_code == 202
    assert response.json()["status"] == "failed" and response.json()["failed"] == 2
    job = api.client.get(response.json()["status_url"], headers=api.auth()).json()
    assert job["finished"] is True and job["pending"] == 0
    assert [(i["filename"], i["status"], i["error"]) for i in job["items"]] == [
        (
            "notes.jpg",
            "failed",
            "unsupported file type: send JPEG, PNG, DICOM or NIfTI scans, or zip/tar archives of them",
        ),
        ("empty.png", "failed", "empty file"),
    ]


def test_hostile_filenames_are_data(api: Api) -> None:
    # Built by hand: clients (httpx, curl) would escape some of these bytes themselves.
    name = b"../../" + b"x" * 10_000 + b"\x1b[2J\x07\x7f\xe2\x80\xae.jpg"
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="'
        + name
        + b'"\r\n\r\n'
        + image_bytes()
        + b"\r\n--xyz--\r\n"
    )
    response = api.client.post("/v1/jobs", headers={**api.auth(), "Content-Type": XYZ}, content=body)
    assert response.status_code == 202, response.text
    [item] = api.client.get(response.json()["status_url"], headers=api.auth()).json()["items"]
    assert len(item["filename"]) == 255 and item["filename"].startswith("../../xxx")
    assert item["filename"].endswith("x[2J.jpg")  # ESC, BEL, DEL and the bidi override are gone
    assert stored(api) == [api.store.path_for(sha(image_bytes()))]


def test_no_files_is_400(api: Api) -> None:
    only_a_field = (
        b'--xyz\r\nContent-Disposition: form-data; name="callback_url"\r\n\r\nhttp://x.org/\r\n--xyz--\r\n'
    )
    response = api.client.post("/v1/jobs", headers={**api.auth(), "Content-Type": XYZ}, content=only_a_field)
    assert response.status_code == 400
    assert response.json() == {"detail": "no files: send one or more multipart fields named 'files'"}
    bad_callback = api.client.post(
        "/v1/jobs",
        headers=api.auth(),
        files=[("files", ("a.jpg", image_bytes()))],
        data={"callback_url": "file:///etc/passwd"},
    )
    assert bad_callback.status_code == 400 and "callback_url" in bad_callback.json()["detail"]
    assert job_count(api) == 0 and stored(api) == []


XYZ = "multipart/form-data; boundary=xyz"


@pytest.mark.parametrize(
    ("content_type", "body", "reason"),
    [
        ("application/json", b"{}", "expected a multipart/form-data body"),
        ("multipart/form-data", b"--x\r\n", "expected a multipart/form-data body"),
        ("multipart/form-data; boundary=xyz", b"garbage without any boundary", "malformed multipart body"),
        (
            "multipart/form-data; boundary=xyz",
            b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n\xff\xd8\xff',
            "closing boundary",
        ),
        (
            "multipart/form-data; boundary=xyz",
            b"--xyz\r\nNo-Colon-Header\r\n\r\nx\r\n--xyz--\r\n",
            "malformed",
        ),
        (
            "multipart/form-data; boundary=xyz",
            b"--xyz\r\nX-A: b\r\n\r\nx\r\n--xyz--\r\n",
            "Content-Disposition",
        ),
    ],
)
def test_malformed_multipart_is_400_and_stores_nothing(
    api: Api, content_type: str, body: bytes, reason: str
) -> None:
    response = api.client.post("/v1/jobs", headers={**api.auth(), "Content-Type": content_type}, content=body)
    assert response.status_code == 400, response.text
    assert reason in response.json()["detail"]
    assert job_count(api) == 0 and stored(api) == []


def test_over_the_size_cap_is_413_and_stores_nothing(small_api: Api) -> None:
    api = small_api
    big = [
        ("files", ("a.jpg", image_bytes(seed=1))),
        ("files", ("pad.png", b"\x89PNG\r\n\x1a\n" + bytes(30_000))),
    ]
    response = api.client.post("/v1/jobs", headers=api.auth(), files=big)
    assert response.status_code == 413
    assert "BRAINSCAN_MAX_REQUEST_BYTES" in response.json()["detail"]
    assert "nothing was stored" in response.json()["detail"]

    # Without a Content-Length (chunked), the counting check while streaming catches it.
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n'.encode()
        + b"\xff\xd8\xff"
    )

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(10):
            yield bytes(5_000)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = api.client.post(
        "/v1/jobs",
        headers={**api.auth(), "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=chunks(),
    )
    assert response.status_code == 413, response.text
    assert job_count(api) == 0
    assert stored(api) == []  # not even a spooled part left behind


# -- read ----------------------------------------------------------------------------------------


def submit_three(api: Api) -> str:
    files = [("files", (f"s{i}.jpg", image_bytes(seed=10 + i))) for i in range(2)]
    files.append(("files", ("=cmd|calc.jpg", b"text pretending")))
    response = api.client.post("/v1/jobs", headers=api.auth(), files=files)
    assert response.status_code == 202
    return response.json()["id"]


def test_get_job_body_and_pagination(api: Api) -> None:
    job_id = submit_three(api)
    with api.sessions() as session:  # as a worker would: score the first item
        item = session.scalars(select(Item).where(Item.job_id == job_id, Item.position == 0)).one()
        item.status, item.label, item.confidence = "succeeded", "glioma", 0.7
        item.prob_glioma, item.prob_meningioma, item.prob_notumor, item.prob_pituitary = 0.7, 0.1, 0.1, 0.1
        item.model_name, item.model_version, item.inference_ms = "demo", "1", 12.5
        session.get(Job, job_id).done = 1
        session.commit()

    body = api.client.get(f"/v1/jobs/{job_id}", headers=api.auth()).json()
    assert {k: body[k] for k in ("id", "status", "total", "done", "failed", "pending", "finished")} == {
        "id": job_id,
        "status": "queued",
        "total": 3,
        "done": 1,
        "failed": 1,
        "pending": 1,
        "finished": False,
    }
    first, second, third = body["items"]
    assert first["filename"] == "s0.jpg" and first["label"] == "glioma" and first["confidence"] == 0.7
    assert first["probabilities"] == {"glioma": 0.7, "meningioma": 0.1, "notumor": 0.1, "pituitary": 0.1}
    assert first["model"] == {"name": "demo", "version": "1"} and first["timings"]["inference_ms"] == 12.5
    assert first["sha256"] == sha(image_bytes(seed=10))
    assert second["status"] == "queued" and second["probabilities"] is None and second["label"] is None
    assert third["status"] == "failed" and third["error"].startswith("unsupported file type")
    assert body["page"] == {
        "offset": 0,
        "limit": 100,
        "returned": 3,
        "next_offset": None,
        "flag": None,
        "order": "position",
    }

    page = api.client.get(f"/v1/jobs/{job_id}?offset=1&limit=1", headers=api.auth()).json()
    assert [i["filename"] for i in page["items"]] == ["s1.jpg"]
    assert page["page"] == {
        "offset": 1,
        "limit": 1,
        "returned": 1,
        "next_offset": 2,
        "flag": None,
        "order": "position",
    }
    assert api.client.get(f"/v1/jobs/{job_id}?limit=5000", headers=api.auth()).status_code == 422


def test_results_csv(api: Api) -> None:
    job_id = submit_three(api)
    response = api.client.get(f"/v1/jobs/{job_id}/results.csv", headers=api.auth())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["filename"] for r in rows] == ["s0.jpg", "s1.jpg", "'=cmd|calc.jpg"]  # no formula injection
    assert [r["status"] for r in rows] == ["queued", "queued", "failed"]
    assert rows[0]["sha256"] == sha(image_bytes(seed=10)) and rows[0]["job_id"] == job_id
    assert set(rows[0]) >= {"prob_glioma", "prob_meningioma", "prob_notumor", "prob_pituitary", "error"}


def test_list_jobs_newest_first(api: Api) -> None:
    ids = [submit_three(api) for _ in range(3)]
    body = api.client.get("/v1/jobs?limit=2", headers=api.auth()).json()
    assert [j["id"] for j in body["jobs"]] == ids[::-1][:2]
    assert body["page"] == {"offset": 0, "limit": 2, "total": 3}
    rest = api.client.get("/v1/jobs?offset=2&limit=2", headers=api.auth()).json()
    assert [j["id"] for j in rest["jobs"]] == [ids[0]]


# -- models and health ---------------------------------------------------------------------------


def test_models_route(api: Api) -> None:
    response = api.client.get("/v1/models", headers=api.auth())
    assert response.status_code == 503 and "no model" in response.json()["detail"]
    folder = api.settings.model_dir / "demo" / "3"
    folder.mkdir(parents=True)
    ModelCard(
        name="demo", version="3", input_size=(144, 144), channels=1, metrics={"val_accuracy": 0.99}
    ).write(folder)
    body = api.client.get("/v1/models", headers=api.auth()).json()
    assert (body["name"], body["version"], body["classes"]) == (
        "demo",
        "3",
        ["glioma", "meningioma", "notumor", "pituitary"],
    )
    assert body["input"]["height"] == 144 and body["input"]["channels"] == 1
    assert body["metrics"] == {"val_accuracy": 0.99}


def test_health_and_readiness(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    response = api.client.get("/readyz")
    body = response.json()
    assert body["checks"]["database"] == {"ok": True}
    assert body["checks"]["broker"] == {"ok": True}
    # No worker runs in this test: not ready, and it says why.
    assert body["checks"]["workers"]["count"] == 0
    assert response.status_code == 503 and body["ready"] is False
    assert "/v1/jobs" in api.client.get("/openapi.json").json()["paths"]
    assert api.client.get("/docs").status_code == 200


def test_database_down_is_503_with_a_clear_body(
    api_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    down = "postgresql+psycopg://postgres@127.0.0.1:1/nothing?connect_timeout=2"
    from fastapi.testclient import TestClient

    from api.app import create_app
    from brainscan.settings import Settings

    app = create_app(Settings(database_url=down, broker_url=api_broker, var_dir=tmp_path))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/v1/jobs", headers={"Authorization": "Bearer bs_anything"})
        assert response.status_code == 503
        assert response.json() == {"detail": "database unavailable, retry shortly"}
        ready = client.get("/readyz").json()
        assert ready["checks"]["database"]["ok"] is False
