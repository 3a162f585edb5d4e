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
    assert data["page"] == {
        "offset": 0,
        "limit": 100,
        "returned": 3,
        "next_offset": None,
        "flag": None,
        "order": "position",
    }
    assert data["flags"] == {"uncertain": 0, "out_of_scope": 0}
    assert (scored["flag"], scored["flag_reason"], scored["scope_score"]) == (None, None, None)


def test_pagination(session: Session) -> None:
    job = make_job(session, n=7)
    page = job_to_dict(session, job, offset=2, limit=3)
    assert [i["position"] for i in page["items"]] == [2, 3, 4]
    assert page["page"]["next_offset"] == 5
    counts_only = job_to_dict(session, job, offset=0, limit=0)
    assert counts_only["items"] == [] and counts_only["total"] == 7
    assert counts_only["page"]["next_offset"] is None  # following it would loop on the same page


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


# ---- flags (issue 11) ----------------------------------------------------------------------------
UNCERTAIN_REASON = "uncertain: the calibrated confidence is below the model's threshold"
OUT_OF_SCOPE_REASON = "out of scope: the image is nearly uniform (blank), not a scan"


def make_flagged_job(session: Session) -> Job:
    """Positions: 0 confident (0.97), 1 uncertain (0.55), 2 out of scope (no label, no confidence),
    3 failed, 4 confident (0.91), 5 uncertain (0.62), 6 queued."""
    job = Job(total=7, done=5, failed=1, status="running", flagged_uncertain=2, flagged_out_of_scope=1)
    session.add(job)
    session.flush()

    def scored(position: int, label: str | None, confidence: float | None, **flag: object) -> Item:
        return Item(
            job_id=job.id,
            position=position,
            filename=f"s{position}.png",
            status="succeeded",
            label=label,
            confidence=confidence,
            prob_glioma=0.1,
            prob_meningioma=0.1,
            prob_notumor=0.7,
            prob_pituitary=0.1,
            **flag,
        )

    session.add_all(
        [
            scored(0, "notumor", 0.97, scope_score=0.4),
            scored(1, "glioma", 0.55, flag="uncertain", flag_reason=UNCERTAIN_REASON, scope_score=0.8),
            scored(2, None, None, flag="out_of_scope", flag_reason=OUT_OF_SCOPE_REASON, scope_score=3.5),
            Item(job_id=job.id, position=3, filename="bad.jpg", status="failed", error="empty file"),
            scored(4, "pituitary", 0.91, scope_score=0.2),
            scored(5, "meningioma", 0.62, flag="uncertain", flag_reason=UNCERTAIN_REASON, scope_score=0.9),
            Item(job_id=job.id, position=6, filename="later.png", status="queued"),
        ]
    )
    session.commit()
    return job


def positions(data: dict) -> list[int]:
    return [item["position"] for item in data["items"]]


def test_flag_fields_and_counts(session: Session) -> None:
    job = make_flagged_job(session)
    data = job_to_dict(session, job)
    assert data["flags"] == {"uncertain": 2, "out_of_scope": 1}
    items = {item["position"]: item for item in data["items"]}
    assert {k: items[1][k] for k in ("label", "confidence", "flag", "flag_reason", "scope_score")} == {
        "label": "glioma",
        "confidence": 0.55,
        "flag": "uncertain",
        "flag_reason": UNCERTAIN_REASON,
        "scope_score": 0.8,
    }
    out = items[2]
    assert (out["label"], out["confidence"], out["flag"], out["scope_score"]) == (
        None,
        None,
        "out_of_scope",
        3.5,
    )
    assert out["probabilities"]["notumor"] == 0.7  # kept, for audit
    assert (items[3]["flag"], items[6]["flag"]) == (None, None)


def test_a_job_from_before_flags_has_no_counts(session: Session) -> None:
    job = make_job(session)
    job.flagged_uncertain = job.flagged_out_of_scope = None  # as migration 0003 leaves older jobs
    session.commit()
    assert job_to_dict(session, job)["flags"] is None
    assert list_jobs(session, None)["jobs"][0]["flags"] is None


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        (None, [0, 1, 2, 3, 4, 5, 6]),
        ("any", [1, 2, 5]),
        ("none", [0, 3, 4, 6]),
        ("uncertain", [1, 5]),
        ("out_of_scope", [2]),
    ],
)
def test_filter_by_flag(session: Session, flag: str | None, expected: list[int]) -> None:
    job = make_flagged_job(session)
    data = job_to_dict(session, job, flag=flag)  # type: ignore[arg-type]
    assert positions(data) == expected
    assert data["page"]["flag"] == flag and data["page"]["next_offset"] is None


def test_order_by_confidence_puts_items_without_one_last(session: Session) -> None:
    job = make_flagged_job(session)
    assert positions(job_to_dict(session, job, order="-confidence")) == [0, 4, 5, 1, 2, 3, 6]
    assert positions(job_to_dict(session, job, order="confidence")) == [1, 5, 4, 0, 2, 3, 6]
    # Filter and order together: the uncertain items, least confident first.
    assert positions(job_to_dict(session, job, flag="uncertain", order="confidence")) == [1, 5]


def test_filtered_pages_follow_one_another(session: Session) -> None:
    job = make_flagged_job(session)
    first = job_to_dict(session, job, offset=0, limit=2, flag="none")
    assert positions(first) == [0, 3] and first["page"]["next_offset"] == 2
    second = job_to_dict(session, job, offset=2, limit=2, flag="none")
    assert positions(second) == [4, 6] and second["page"]["next_offset"] is None
    by_confidence = job_to_dict(session, job, offset=2, limit=3, order="-confidence")
    assert positions(by_confidence) == [5, 1, 2] and by_confidence["page"]["next_offset"] == 5


def test_unknown_filter_or_order_is_refused(session: Session) -> None:
    job = make_flagged_job(session)
    with pytest.raises(ValueError, match="flag must be one of"):
        job_to_dict(session, job, flag="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order must be one of"):
        job_to_dict(session, job, order="label")  # type: ignore[arg-type]


def test_csv_carries_the_flags(session: Session) -> None:
    job = make_flagged_job(session)
    rows = list(csv.DictReader(io.StringIO("".join(iter_csv(session, job.id)))))
    assert [(r["position"], r["flag"], r["label"], r["confidence"], r["scope_score"]) for r in rows] == [
        ("0", "", "notumor", "0.97", "0.4"),
        ("1", "uncertain", "glioma", "0.55", "0.8"),
        ("2", "out_of_scope", "", "", "3.5"),
        ("3", "", "", "", ""),
        ("4", "", "pituitary", "0.91", "0.2"),
        ("5", "uncertain", "meningioma", "0.62", "0.9"),
        ("6", "", "", "", ""),
    ]
    assert rows[2]["flag_reason"] == OUT_OF_SCOPE_REASON and rows[2]["prob_notumor"] == "0.7"
