"""Per-key daily quotas count intake work, not only stored scans (brainscan/quotas.py).

The API in process over a real database (SQLite file and PostgreSQL) and a real Redis broker
(``BRAINSCAN_TEST_REDIS``'s db: no worker reads it). Files that fail at intake were received and
read all the same: their items count toward the scan quota and their bytes toward the byte quota,
so a key cannot make the service read junk uploads without end.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from brainscan.quotas import Usage, quota_exceeded, usage_today
from tests.support.api import Api, item_count, make_api
from tests.support.images import make_jpeg
from tests.support.services import REDIS_TEST_URL, flushed_broker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    yield from flushed_broker(REDIS_TEST_URL)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def post(api: Api, name: str, data: bytes):  # type: ignore[no-untyped-def]
    return api.client.post("/v1/jobs", headers=api.auth(), files=[("files", (name, data, "image/jpeg"))])


def usage(api: Api) -> Usage:
    with api.sessions() as session:
        return usage_today(session, api.key_id)


def test_files_that_fail_at_intake_count_toward_the_scan_quota(
    database_url: str, broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for api in make_api(database_url, broker, tmp_path, monkeypatch, quota_scans_per_day=2):
        for name in ("notes.txt", "empty.jpg"):
            junk = post(api, name, b"not an image" if name == "notes.txt" else b"")
            assert junk.status_code == 202 and (junk.json()["total"], junk.json()["failed"]) == (1, 1)
        assert usage(api).scans == 2
        refused = post(api, "a.jpg", make_jpeg(1))
        assert refused.status_code == 429
        assert refused.json()["detail"] == (
            "daily quota reached: 2 scans per UTC day (BRAINSCAN_QUOTA_SCANS_PER_DAY); nothing was stored"
        )
        assert item_count(api) == 2


def test_bytes_of_refused_files_count_toward_the_byte_quota(
    database_url: str, broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scan = make_jpeg(50)
    quota = 5000 + len(scan) + 1
    for api in make_api(database_url, broker, tmp_path, monkeypatch, quota_bytes_per_day=quota):
        junk = post(api, "notes.txt", b"x" * 5000)
        assert junk.status_code == 202 and junk.json()["failed"] == 1
        assert usage(api) == Usage(scans=1, bytes=5000)  # refused, stored nothing, still charged
        assert post(api, "a.jpg", scan).status_code == 202  # 5000 < quota: still under
        assert usage(api) == Usage(scans=2, bytes=5000 + len(scan))
        assert post(api, "b.jpg", make_jpeg(51)).status_code == 202  # one byte under: taken whole
        refused = post(api, "c.jpg", make_jpeg(52))
        assert refused.status_code == 429
        assert refused.json()["detail"] == (
            f"daily quota reached: {quota} upload bytes per UTC day (BRAINSCAN_QUOTA_BYTES_PER_DAY); "
            "nothing was stored"
        )
        assert item_count(api) == 3
        with api.sessions() as session:
            # Yesterday's usage does not count today.
            tomorrow = datetime.now(UTC) + timedelta(days=1)
            assert (
                quota_exceeded(session, api.key_id, scans_per_day=0, bytes_per_day=quota, now=tomorrow)
                is None
            )
