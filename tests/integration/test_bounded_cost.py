"""Issue 13, bounded cost outside intake: the API over a real database (SQLite file and PostgreSQL)
and a real Redis: a frozen broker, per-key daily quotas, URLs from configuration not from ``Host``,
callback destinations, the SQLite file's mode and the start-up sweep of ``storage/tmp``.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from brainscan.db import Item, Job
from brainscan.quotas import day_start
from tests.support.api import Api, item_count, make_api
from tests.support.environment import wait_for
from tests.support.faults import RedisServer, TcpProxy
from tests.support.images import make_jpeg
from tests.support.services import flushed_broker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def api_broker() -> Iterator[str]:
    yield from flushed_broker()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def post_scans(api: Api, count: int, seed: int, **data: str):  # type: ignore[no-untyped-def]
    files = [("files", (f"s{i}.jpg", make_jpeg(seed + i), "image/jpeg")) for i in range(count)]
    return api.client.post("/v1/jobs", headers=api.auth(), files=files, data=data)


# ---- URLs from configuration ----------------------------------------------------------------------
def test_status_url_and_location_come_from_public_url_never_from_host(
    database_url: str, api_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for api in make_api(
        database_url, api_broker, tmp_path, monkeypatch, public_url="https://scans.example.org/brainscan/"
    ):
        response = post_scans(api, 1, 10)
        hostile = api.client.post(
            "/v1/jobs",
            headers={**api.auth(), "Host": "evil.example.net", "X-Forwarded-Host": "evil.example.net"},
            files=[("files", ("h.jpg", make_jpeg(11), "image/jpeg"))],
        )
        for answer in (response, hostile):
            assert answer.status_code == 202, answer.text
            body = answer.json()
            assert body["status_url"] == f"https://scans.example.org/brainscan/v1/jobs/{body['id']}"
            assert answer.headers["location"] == body["status_url"]


def test_the_default_public_url_is_the_configured_host_and_port(
    database_url: str, api_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for api in make_api(database_url, api_broker, tmp_path, monkeypatch, host="10.0.0.7", port=8123):
        response = api.client.post(
            "/v1/jobs",
            headers={**api.auth(), "Host": "evil.example.net"},
            files=[("files", ("d.jpg", make_jpeg(12), "image/jpeg"))],
        )
        assert response.status_code == 202
        assert response.headers["location"] == f"http://10.0.0.7:8123/v1/jobs/{response.json()['id']}"


# ---- callback destinations at submit ----------------------------------------------------------
@pytest.mark.parametrize(
    "callback",
    [
        "http://127.0.0.1:9000/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/x",
        "http://[::1]:8080/x",
        "http://localhost:6379/",
    ],
)
def test_a_callback_to_an_internal_address_is_refused_at_submit(
    database_url: str,
    api_broker: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    callback: str,
) -> None:
    for api in make_api(database_url, api_broker, tmp_path, monkeypatch):
        before = item_count(api)
        response = post_scans(api, 1, 20, callback_url=callback)
        assert response.status_code == 400
        assert "BRAINSCAN_WEBHOOK_ALLOW" in response.json()["detail"]
        assert callback.split("/")[2] not in response.json()["detail"]  # the URL is not echoed
        assert item_count(api) == before


def test_an_allowed_internal_callback_is_accepted(
    database_url: str, api_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for api in make_api(
        database_url, api_broker, tmp_path, monkeypatch, webhook_allow="10.1.0.0/16,localhost"
    ):
        for callback in ("http://10.1.2.3/x", "http://localhost:9/hook"):
            response = post_scans(api, 1, 30, callback_url=callback)
            assert response.status_code == 202, response.text
            with api.sessions() as session:
                job = session.get(Job, response.json()["id"])
                assert job is not None and job.callback_url == callback  # stored: it will be delivered


# ---- per-key daily quotas ---------------------------------------------------------------------
def test_the_scan_quota_answers_429_with_retry_after_before_reading_the_upload(
    database_url: str, api_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for api in make_api(database_url, api_broker, tmp_path, monkeypatch, quota_scans_per_day=3):
        assert post_scans(api, 2, 40).status_code == 202
        assert post_scans(api, 2, 42).status_code == 202  # started under the quota: taken whole
        assert item_count(api) == 4
        refused = post_scans(api, 1, 44)
        assert refused.status_code == 429
        assert refused.json()["detail"] == (
            "daily quota reached: 3 scans per UTC day (BRAINSCAN_QUOTA_SCANS_PER_DAY); nothing was stored"
        )
        now = datetime.now(UTC)
        to_midnight = (day_start(now) + timedelta(days=1) - now).total_seconds()
        assert 1 <= int(refused.headers["retry-after"]) <= to_midnight + 1
        assert item_count(api) == 4
        assert not any(api.store.tmp_dir.iterdir())  # the body was never spooled
        # Another key has its own quota.
        other = api.client.post(
            "/v1/jobs",
            headers=api.auth(api.other_key),
            files=[("files", ("o.jpg", make_jpeg(45), "image/jpeg"))],
        )
        assert other.status_code == 202


# ---- a frozen broker ------------------------------------------------------------------------------
def submit_into(api: Api, answers: list) -> None:
    answers.append(post_scans(api, 2, 61))


def test_a_frozen_broker_costs_a_post_seconds_then_202_not_enqueued_and_the_reaper_sends_it(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    proxy = TcpProxy("127.0.0.1", redis_server.port)
    try:
        for api in make_api(
            database_url, f"redis://127.0.0.1:{proxy.port}/0", tmp_path, monkeypatch, broker_timeout_s=0.5
        ):
            assert post_scans(api, 1, 60).json()["enqueued"] is True  # the proxy forwards
            proxy.freeze()  # Redis accepts connections and never answers
            answers: list = []
            request = threading.Thread(target=submit_into, args=(api, answers), daemon=True)
            request.start()
            request.join(120)  # a guard against a hang, not a timing: unbounded before the fix
            assert not request.is_alive(), "POST /v1/jobs hung on a frozen broker"
            (response,) = answers
            assert response.status_code == 202, response.text
            body = response.json()
            assert (body["status"], body["total"], body["enqueued"]) == ("queued", 2, False)
            with api.sessions() as session:
                stamps = session.scalars(select(Item.enqueued_at).where(Item.job_id == body["id"])).all()
            assert stamps == [None, None]

            proxy.thaw()
            from worker.tasks import reap

            # The reaper (the beat task's body, in this process) sends the never-sent items.
            wait_for(lambda: reap() >= 2, what="the reaper to send the stranded items")
            with api.sessions() as session:
                stamps = session.scalars(select(Item.enqueued_at).where(Item.job_id == body["id"])).all()
            assert None not in stamps
    finally:
        proxy.close()
        redis_server.stop()


# ---- SQLite file mode, start-up sweep --------------------------------------------------------------
def test_the_sqlite_file_is_created_owner_only_and_a_loose_one_is_tightened(tmp_path: Path) -> None:
    from brainscan.db import make_engine
    from brainscan.migrate import upgrade

    old_umask = os.umask(0o022)
    try:
        url = f"sqlite:///{tmp_path / 'db' / 'brainscan.db'}"
        upgrade(url)  # creates the folder and the file
        engine = make_engine(url)
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE probe (x INTEGER)")
        files = [p for p in (tmp_path / "db").iterdir() if p.name.startswith("brainscan.db")]
        assert {p.name for p in files} >= {"brainscan.db"}
        for path in files:  # the database and its -wal / -shm
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
        engine.dispose()

        loose = tmp_path / "loose.db"
        loose.touch(mode=0o644)
        os.chmod(loose, 0o644)
        make_engine(f"sqlite:///{loose}").dispose()
        assert stat.S_IMODE(loose.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


def test_the_api_sweeps_old_temporary_files_at_start_up(
    database_url: str, api_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_dir = tmp_path / "storage" / "tmp"
    tmp_dir.mkdir(parents=True)
    (tmp_dir / "upload-left-behind").write_bytes(b"x" * 1000)
    two_hours_ago = time.time() - 7200
    os.utime(tmp_dir / "upload-left-behind", (two_hours_ago, two_hours_ago))
    (tmp_dir / "upload-in-flight").write_bytes(b"y")  # another API process's live upload
    for api in make_api(database_url, api_broker, tmp_path, monkeypatch):
        assert sorted(p.name for p in api.store.tmp_dir.iterdir()) == ["upload-in-flight"]
