"""Job serialization and the CSV export: one shape for the API and the CLI."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from brainscan.db import Base, Item, Job, make_engine
from brainscan.results import CSV_COLUMNS, iso, iter_csv, job_to_dict, list_jobs


@pytest.fixture
def session(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'results.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        yield s
    engine.dispose()


def make_job(session: Session, n: int = 3) -> Job:
    job = Job(total=n, done=1, failed=1, status="running", model_name="demo", model_version="2")
    session.add(job)
    session.flush()
    session.add(
        Item(
            job_id=job.id,
            position=0,
            filename="a.jpg",
            sha256="ab" * 32,
            status="succeeded",
            label="pituitary",
            confidence=0.9,
            prob_glioma=0.05,
            prob_meningioma=0.03,
            prob_notumor=0.02,
            prob_pituitary=0.9,
            model_name="demo",
            model_version="2",
            preprocess_ms=1.5,
            inference_ms=3.0,
            finished_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        )
    )
    session.add(
        Item(job_id=job.id, position=1, filename="=HYPERLINK(x)", status="failed", error="empty file")
    )
    for position in range(2, n):
        session.add(Item(job_id=job.id, position=position, filename=f"f{position}.png", sha256="cd" * 32))
    session.commit()
    return job


def test_job_to_dict(session: Session) -> None:
    job = make_job(session)
    data = job_to_dict(session, job)
    assert {k: data[k] for k in ("status", "total", "done", "failed", "pending", "finished")} == {
        "status": "running",
        "total": 3,
        "done": 1,
        "failed": 1,
        "pending": 1,
        "finished": False,
    }
    assert data["model"] == {"name": "demo", "version": "2"}
    scored, failed, queued = data["items"]
    assert scored["probabilities"] == {"glioma": 0.05, "meningioma": 0.03, "notumor": 0.02, "pituitary": 0.9}
    assert list(scored["probabilities"]) == ["glioma", "meningioma", "notumor", "pituitary"]
    assert (scored["label"], scored["confidence"], scored["model"]) == (
        "pituitary",
        0.9,
        {"name": "demo", "version": "2"},
    )
    assert scored["timings"]["finished_at"] == "2025-01-02T03:04:05+00:00"
    assert scored["timings"]["inference_ms"] == 3.0
    assert (failed["status"], failed["error"], failed["probabilities"]) == ("failed", "empty file", None)
    assert queued["status"] == "queued" and queued["label"] is None
    assert data["page"] == {"offset": 0, "limit": 100, "returned": 3, "next_offset": None}


def test_pagination(session: Session) -> None:
    job = make_job(session, n=7)
    page = job_to_dict(session, job, offset=2, limit=3)
    assert [i["position"] for i in page["items"]] == [2, 3, 4]
    assert page["page"]["next_offset"] == 5
    assert job_to_dict(session, job, offset=0, limit=0)["items"] == []


def test_csv_streams_all_rows_and_defuses_formulas(session: Session) -> None:
    job = make_job(session, n=2503)
    chunks = list(iter_csv(session, job.id, page=1000))
    assert len(chunks) == 1 + 3  # the header, then one chunk per page
    rows = list(csv.reader(io.StringIO("".join(chunks))))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 1 + 2503
    first = dict(zip(CSV_COLUMNS, rows[1], strict=True))
    assert (first["filename"], first["label"], first["prob_pituitary"]) == ("a.jpg", "pituitary", "0.9")
    second = dict(zip(CSV_COLUMNS, rows[2], strict=True))
    assert second["filename"] == "'=HYPERLINK(x)" and second["error"] == "empty file"
    assert [int(r[2]) for r in rows[1:]] == list(range(2503))


def test_list_jobs_and_iso(session: Session) -> None:
    make_job(session)
    assert list_jobs(session, None)["page"]["total"] == 1
    assert list_jobs(session, 42)["jobs"] == []
    assert iso(datetime(2025, 1, 1)) == "2025-01-01T00:00:00+00:00"  # SQLite's naive values are UTC
    assert iso(None) is None
