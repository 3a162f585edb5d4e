"""``GET /metrics`` over a real database (SQLite, PostgreSQL) and a real Redis broker.

The databases are shared by the whole test session, so every figure is checked as a difference
between a scrape before and a scrape after this test wrote its rows.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from brainscan.db import Item, Job
from tests.support.api import Api, make_api
from tests.support.services import flushed_broker, own_database

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def metrics_broker() -> Iterator[str]:
    yield from flushed_broker()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database of this module's own: the figures are over every row, so no other test may add any."""
    with own_database(request.param, tmp_path_factory.mktemp("metrics-db")) as url:
        yield url


@pytest.fixture
def api(
    database_url: str, metrics_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Api]:
    yield from make_api(database_url, metrics_broker, tmp_path, monkeypatch, metrics_latency_window=3)


def scrape(api: Api) -> Samples:
    response = api.client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def add_job(api: Api, items: list[dict]) -> str:
    now = datetime.now(UTC)
    with api.sessions() as session:
        job = Job(owner_key_id=api.key_id, status="running", total=len(items), source="test", created_at=now)
        session.add(job)
        session.flush()
        for position, fields in enumerate(items):
            session.add(Item(job_id=job.id, position=position, filename=f"s{position}.png", **fields))
        session.commit()
        return job.id


def test_metrics_reflect_the_database_and_the_queue(api: Api) -> None:
    before = scrape(api)
    now = datetime.now(UTC)
    old = now - timedelta(minutes=10)
    add_job(
        api,
        [
            {"status": "queued", "created_at": now - timedelta(seconds=30)},
            {"status": "queued"},
            {"status": "running"},
            # Three scored now (the latest three: the latency window), one ten minutes ago.
            *(
                {
                    "status": "succeeded",
                    "finished_at": now - timedelta(seconds=5 + i),
                    "preprocess_ms": 10.0 * (i + 1),
                    "inference_ms": 100.0 * (i + 1),
                }
                for i in range(3)
            ),
            {"status": "succeeded", "finished_at": old, "preprocess_ms": 999.0, "inference_ms": 999.0},
            {"status": "failed", "error": "cannot decode image: cannot identify image file <1>"},
            {"status": "failed", "error": "cannot decode image: truncated"},
            {"status": "failed", "error": "unsupported file type: send JPEG, PNG, DICOM or NIfTI scans"},
            {"status": "failed", "error": None},
        ],
    )
    client = redis.Redis.from_url(api.settings.broker_url)
    client.delete("brainscan", "brainscan\x06\x163")  # our own db number: no one else's queue
    client.rpush("brainscan", b"m1", b"m2", b"m3")
    client.rpush("brainscan\x06\x163", b"m4")
    client.close()

    after = scrape(api)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(after, "brainscan_up") == 1 and value(after, "brainscan_broker_up") == 1
    assert value(after, "brainscan_queue_depth", queue="brainscan") == 4
    assert (delta("brainscan_items", status="queued"), delta("brainscan_items", status="running")) == (2, 1)
    assert (delta("brainscan_items", status="succeeded"), delta("brainscan_items", status="failed")) == (4, 4)
    assert delta("brainscan_jobs", status="running") == 1
    assert delta("brainscan_scans_scored_total") == 4
    assert delta("brainscan_item_failures", reason="corrupt") == 2
    assert delta("brainscan_item_failures", reason="unsupported") == 1
    assert delta("brainscan_item_failures", reason="unknown") == 1
    # Only the three scored in the last minute (other tests' rows may add to it, never subtract).
    assert value(after, "brainscan_scans_scored_last_minute") >= 3
    assert value(after, "brainscan_oldest_queued_age_seconds") >= 30
    # The latency window holds the three latest scored items: ours (finished a few seconds ago).
    assert value(after, "brainscan_stage_latency_seconds_count", stage="preprocess") == 3
    assert value(after, "brainscan_stage_latency_seconds_sum", stage="preprocess") == pytest.approx(0.06)
    assert value(after, "brainscan_stage_latency_seconds_sum", stage="inference") == pytest.approx(0.6)
    assert value(
        after, "brainscan_stage_latency_seconds", stage="inference", quantile="0.5"
    ) == pytest.approx(0.2)


def test_metrics_without_a_broker_still_report_the_database(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for api in make_api(database_url, f"redis://127.0.0.1:{port}/0", tmp_path, monkeypatch):
        samples = scrape(api)
        assert value(samples, "brainscan_broker_up") == 0
        assert ("brainscan_queue_depth", (("queue", "brainscan"),)) not in samples
        assert ("brainscan_items", (("status", "queued"),)) in samples


def test_metrics_need_no_key_and_expose_no_names(api: Api) -> None:
    add_job(api, [{"status": "failed", "error": "cannot decode image: secret-name.dcm is damaged"}])
    text = api.client.get("/metrics").text
    assert 'brainscan_item_failures{reason="corrupt"}' in text
    assert "secret-name" not in text and "s0.png" not in text and api.key not in text


# Item errors as intake and the workers write them, and errors quoting a value an upload chose.
ERRORS_AND_CODES = [
    ("gave up after 5 attempts; last error: model call failed on this scan: ValueError", "gave_up"),
    (
        "intake stopped before the upload was fully read (the process reading it ended): 3 item(s)",
        "intake_interrupted",
    ),
    ("not read: the job reached its limit of 20000 scans (BRAINSCAN_MAX_ITEMS_PER_JOB)", "job_full"),
    ("model produced non-finite output", "model_error"),
    ("symbolic link in archive: not followed", "archive_entry_refused"),
    ("scan larger than 67108864 bytes (BRAINSCAN_MAX_SCAN_BYTES)", "too_large"),
    ("image too large to decode safely (decompression bomb guard)", "too_large"),
    ("NIfTI volume has no non-blank axial slice", "empty"),
    ("unsupported DICOM photometric interpretation (MONOCHROME1/2, RGB or YBR only)", "unsupported"),
    ("unsupported file type (PDF document): send JPEG, PNG, DICOM or NIfTI scans", "unsupported"),
    ("cannot decode image: damaged image data (OSError)", "corrupt"),
    ("corrupt archive: Bad CRC-32 for file 'x'; the rest of it was not read", "corrupt"),
    # Text no pattern knows, as a hostile header value would make it: counted, never shown.
    ("PhotometricInterpretation ZZ-LEAK-7f3a <_io.BytesIO object at 0x7f00deadbeef>", "other"),
    ("ZZ-LEAK-7f3a: 1234", "other"),
]


def test_failure_reasons_are_fixed_codes_whatever_the_error_says(api: Api) -> None:
    from api.routes.metrics import FAILURE_REASONS

    before = scrape(api)
    add_job(api, [{"status": "failed", "error": error} for error, _ in ERRORS_AND_CODES])
    after = scrape(api)
    text = api.client.get("/metrics").text
    labels = {dict(labels)["reason"] for name, labels in after if name == "brainscan_item_failures"}
    assert labels == set(FAILURE_REASONS)  # every code, always: a fixed label set
    expected: dict[str, int] = {}
    for _, code in ERRORS_AND_CODES:
        expected[code] = expected.get(code, 0) + 1
    for code, count in expected.items():
        delta = value(after, "brainscan_item_failures", reason=code) - value(
            before, "brainscan_item_failures", reason=code
        )
        assert delta == count, code
    assert "ZZ-LEAK" not in text and "0x7f00" not in text and "MONOCHROME" not in text
