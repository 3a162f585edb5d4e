"""API errors quote no server path and no internals: each error path of ``/v1/models``,
``/v1/items/{id}/image.png`` and ``POST /v1/jobs`` that used to answer ``str(exc)``, triggered for
real, answers a fixed (or name/version-only) detail, while the server's log keeps the full text.

The app runs in process over a real SQLite file and a real Redis broker (``BRAINSCAN_TEST_REDIS``'s
db: no worker reads it). The texts do not depend on the database, so one backend is enough here.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from brainscan.modelrepo import ModelCard
from tests.support.api import Api, make_api
from tests.support.images import make_jpeg
from tests.support.models import add_model as add_card_only_model
from tests.support.services import REDIS_TEST_URL, flushed_broker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    yield from flushed_broker(REDIS_TEST_URL)


@pytest.fixture
def api(sqlite_url: str, broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    yield from make_api(sqlite_url, broker, tmp_path, monkeypatch)


@pytest.fixture
def ghost_api(sqlite_url: str, broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    yield from make_api(sqlite_url, broker, tmp_path, monkeypatch, model_name="ghost")


def server_paths(api: Api) -> list[str]:
    settings = api.settings
    paths = [settings.model_dir, settings.resolved_storage_dir, settings.var_dir]
    return [str(Path(p).resolve()) for p in paths] + [str(p) for p in paths]


def assert_no_server_path(api: Api, text: str) -> None:
    for path in server_paths(api):
        assert path not in text, f"{path!r} in {text!r}"
    for word in ("Traceback", "model.json", "promoted.json", "brainscan train", "Errno"):
        assert word not in text, f"{word!r} in {text!r}"


def add_model(api: Api, name: str = "demo", version: str = "3") -> Path:
    return add_card_only_model(api.settings.model_dir, name, version, input_size=(32, 32), channels=1)


def upload(api: Api, name: str, data: bytes) -> dict:
    response = api.client.post("/v1/jobs", headers=api.auth(), files=[("files", (name, data, "image/jpeg"))])
    assert response.status_code == 202, response.text
    job = api.client.get(response.json()["status_url"], headers=api.auth()).json()
    (item,) = job["items"]
    return item


def truncated_jpeg() -> bytes:
    """A JPEG whose header passes intake (so it is stored) and whose pixel data is cut short."""
    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("L", (64, 64), bytes(range(256)) * 16).save(out, format="JPEG", quality=95)
    data = out.getvalue()
    return data[: len(data) // 2]


# ---- /v1/models -------------------------------------------------------------------------------------
def test_models_without_a_model_says_so_without_the_model_folder(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="api.routes.models"):
        response = api.client.get("/v1/models", headers=api.auth())
    assert response.status_code == 503
    assert response.json() == {"detail": "no model to serve"}
    assert_no_server_path(api, response.text)
    # The operator's log has the full text: where the server looked, and what to do.
    assert any(str(api.settings.model_dir.resolve()) in record.getMessage() for record in caplog.records)


def test_models_names_only_the_model_asked_for(ghost_api: Api) -> None:
    add_model(ghost_api, "demo", "3")
    response = ghost_api.client.get("/v1/models", headers=ghost_api.auth())
    assert response.status_code == 503
    assert response.json() == {"detail": "no model to serve: ghost/* not installed"}
    assert_no_server_path(ghost_api, response.text)


def test_models_with_several_and_none_promoted_or_an_unreadable_card(api: Api) -> None:
    add_model(api, "demo", "3")
    add_model(api, "other", "1")
    several = api.client.get("/v1/models", headers=api.auth())
    assert several.status_code == 503
    assert several.json() == {
        "detail": "no model to serve: several models are installed and none is promoted"
    }
    assert_no_server_path(api, several.text)

    # A card that is not JSON: pydantic's message quotes the file's content; the client gets none of it.
    (api.settings.model_dir / "other" / "1" / "model.json").write_text('{"name": "SECRET-CARD-TEXT", ')
    broken = api.client.get("/v1/models", headers=api.auth())
    assert broken.status_code == 503
    assert broken.json() == {"detail": "no model to serve: the model repository cannot be read"}
    assert "SECRET-CARD-TEXT" not in broken.text
    assert_no_server_path(api, broken.text)


# ---- /v1/items/{id}/image.png --------------------------------------------------------------------
def test_an_undecodable_stored_scan_is_422_with_the_fixed_reason(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    item = upload(api, "cut.jpg", truncated_jpeg())
    assert item["status"] == "queued" and item["sha256"]
    url = f"/v1/items/{item['id']}/image.png"
    with caplog.at_level(logging.WARNING, logger="api.routes.items"):
        stored = api.client.get(url, headers=api.auth())
    assert stored.status_code == 422
    assert stored.json() == {"detail": "cannot decode image: image file is truncated"}
    assert_no_server_path(api, stored.text)
    assert any(f"item {item['id']}:" in record.getMessage() for record in caplog.records)

    add_model(api)
    as_model = api.client.get(f"{url}?view=model", headers=api.auth())
    assert as_model.status_code == 422
    assert as_model.json() == {"detail": "cannot decode image: image file is truncated"}
    assert_no_server_path(api, as_model.text)


def test_view_model_without_a_model_or_with_a_broken_one_is_503_without_paths(api: Api) -> None:
    item = upload(api, "a.jpg", make_jpeg(5))
    url = f"/v1/items/{item['id']}/image.png?view=model"
    missing = api.client.get(url, headers=api.auth())
    assert missing.status_code == 503
    assert missing.json() == {"detail": "no model to serve"}
    assert_no_server_path(api, missing.text)

    folder = add_model(api)
    (folder / "model.json").write_text("not json at all")
    broken = api.client.get(url, headers=api.auth())
    assert broken.status_code == 503
    assert broken.json() == {"detail": "no model to serve: the model repository cannot be read"}
    assert_no_server_path(api, broken.text)

    ModelCard(name="demo", version="3", input_size=(32, 32), channels=1).write(folder)
    served = api.client.get(url, headers=api.auth())
    assert served.status_code == 200 and served.headers["x-brainscan-model"] == "demo/3"


def test_unreadable_scan_storage_is_503_without_the_storage_root(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    item = upload(api, "a.jpg", make_jpeg(6))
    url = f"/v1/items/{item['id']}/image.png"
    scans = api.store.scans_dir
    moved = scans.with_name("scans-away")
    scans.rename(moved)  # the volume is gone: not "this scan is gone"
    try:
        with caplog.at_level(logging.WARNING, logger="api.routes.items"):
            response = api.client.get(url, headers=api.auth())
    finally:
        moved.rename(scans)
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json() == {"detail": "scan storage unavailable, retry shortly"}
    assert_no_server_path(api, response.text)
    assert any(str(api.store.root) in record.getMessage() for record in caplog.records)
    assert api.client.get(url, headers=api.auth()).status_code == 200

    # One scan removed (retention), the store fine: still "no scan stored", 404.
    api.store.path_for(item["sha256"]).unlink()
    gone = api.client.get(url, headers=api.auth())
    assert gone.status_code == 404 and gone.json() == {"detail": "no scan stored for this item"}


# ---- POST /v1/jobs: malformed bodies --------------------------------------------------------------
@pytest.mark.parametrize(
    ("content_type", "body", "detail"),
    [
        ("text/plain", b"/etc/passwd", "expected a multipart/form-data body (with a boundary)"),
        (
            "multipart/form-data; boundary=XyZ",
            b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="/srv/secret.jpg"\r\n\r\nDATA',
            "multipart body ended before its closing boundary",
        ),
    ],
)
def test_a_malformed_upload_answers_a_fixed_text(
    api: Api, content_type: str, body: bytes, detail: str
) -> None:
    response = api.client.post("/v1/jobs", headers={**api.auth(), "Content-Type": content_type}, content=body)
    assert response.status_code == 400
    assert response.json() == {"detail": detail}
    assert "/etc/passwd" not in response.text and "/srv/secret.jpg" not in response.text
    assert_no_server_path(api, response.text)
    tmp = api.store.tmp_dir
    assert not tmp.exists() or not any(tmp.iterdir())  # nothing spooled was left behind
