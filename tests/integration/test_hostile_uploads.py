"""Hostile uploads through the real API (SQLite, real Redis): issue 13's intake findings.

Each input is tiny on the wire and would have cost the API seconds to hours, gigabytes of disk or a
500; here each answers 202 with the archive failed alone and a fixed reason, and nothing of it
stored. Figures (POST time, /healthz latency, storage growth) are measured by ``bench/hostile.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from brainscan.db import Item
from tests.support import hostile
from tests.support.api import Api, make_api
from tests.support.services import flushed_broker

pytestmark = pytest.mark.integration
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    yield from flushed_broker()


@pytest.fixture
def api(sqlite_url: str, broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    yield from make_api(
        sqlite_url, broker, tmp_path, monkeypatch, max_expanded_bytes=64 * MIB, max_items_per_job=3
    )


def post(api: Api, files: list[tuple[str, bytes]], **fields: str) -> dict:  # type: ignore[type-arg]
    response = api.client.post(
        "/v1/jobs",
        headers=api.auth(),
        files=[("files", (name, data)) for name, data in files],
        data=fields,
    )
    assert response.status_code == 202, response.text
    return response.json()


def errors_of(api: Api, job_id: str) -> dict[str, str | None]:
    with api.sessions() as session:
        items = session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.position)).all()
        return {item.filename: item.error for item in items}


def stored_scans(api: Api) -> list[Path]:
    return sorted(p for p in (api.store.root / "scans").rglob("*") if p.is_file())


def test_600_chained_pax_headers_fail_the_archive_not_the_request(api: Api) -> None:
    # Was: RecursionError in tarfile, HTTP 500, the scan sent with it lost.
    body = post(api, [("chain.tar", hostile.chained_pax_tar(600)), ("ok.jpg", hostile.small_jpeg())])
    errors = errors_of(api, body["id"])
    assert errors == {
        "chain.tar": "corrupt archive: more than 4 tar extended headers in a row; "
        "the rest of it was not read",
        "ok.jpg": None,
    }


def test_a_long_pax_digit_run_fails_the_archive_at_once(api: Api) -> None:
    # 200,000 digits: 84 s of API CPU (holding the GIL) on this interpreter's tarfile.
    body = post(api, [("digits.tgz", hostile.pax_digits_tar_gz(200_000))])
    assert body["failed"] == 1 and body["status"] == "failed"
    assert errors_of(api, body["id"]) == {
        "digits.tgz": "corrupt archive: tar extended header larger than 16384 bytes; "
        "the rest of it was not read"
    }


def test_jpeg_magic_and_zeros_are_never_stored(api: Api) -> None:
    # Was: stored whole (up to BRAINSCAN_MAX_SCAN_BYTES each), then ~11 s of worker time per item.
    body = post(api, [("junk.tgz", hostile.junk_jpeg_members_tar_gz(3, 8 * MIB))])
    assert set(errors_of(api, body["id"]).values()) == {"cannot decode image: not a readable JPEG or PNG"}
    assert stored_scans(api) == []


def test_skipped_member_bombs_spend_the_request_budget(api: Api) -> None:
    bomb = hostile.skipped_member_bomb_tar_gz(48 * MIB)
    body = post(api, [("a.tgz", bomb), ("b.tgz", bomb), ("c.tgz", bomb)])
    errors = errors_of(api, body["id"])
    assert errors["a.tgz/scan.jpg"] is None
    assert errors["b.tgz"].endswith("(BRAINSCAN_MAX_EXPANDED_BYTES); the rest of the archive was not read")
    assert errors["c.tgz"].endswith("(BRAINSCAN_MAX_EXPANDED_BYTES); not read")


def test_a_full_job_with_form_fields_is_accepted(api: Api) -> None:
    # max_items_per_job=3: three files plus callback_url and gradcam used to be "more than 3 parts": 413.
    files = [(f"{i}.jpg", hostile.small_jpeg(seed=i)) for i in range(3)]
    body = post(api, files, callback_url="https://example.org/done", gradcam="true")
    assert body["total"] == 3 and body["failed"] == 0


def test_too_many_files_is_413_citing_the_files_limit(api: Api) -> None:
    files = [("files", (f"{i}.jpg", hostile.small_jpeg(seed=i))) for i in range(4)]
    response = api.client.post("/v1/jobs", headers=api.auth(), files=files)
    assert response.status_code == 413
    assert response.json()["detail"] == (
        "more than 3 files in one request: the limit is 3 files per request (BRAINSCAN_MAX_ITEMS_PER_JOB); "
        "nothing was stored"
    )
    assert list(api.store.root.rglob("upload-*")) == []


def test_a_malformed_body_is_400_quoting_nothing_from_it(api: Api) -> None:
    response = api.client.post(
        "/v1/jobs",
        headers={**api.auth(), "Content-Type": "multipart/form-data; boundary=xyz"},
        content=b"--xyzSECRET\r\n" * 3,
    )
    assert response.status_code == 400
    assert response.json()["detail"] == "malformed multipart body"
