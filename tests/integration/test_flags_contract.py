"""The flag contract (issue 11) as clients see it: job JSON, ``results.csv``, ``/metrics``, the
OpenAPI document and ``brainscan status``, over the real app and both real databases.

The items are uploaded through ``POST /v1/jobs`` and their results written by the worker's own
write path (``worker.tasks.finalize``) from verdicts of ``brainscan.trust.decide``: what a worker
hands on after its forward pass, without a model in the loop (tests/integration/test_flags_worker.py
runs the whole thing with a real worker and a calibrated model).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner

from brainscan.db import Item
from brainscan.trust import REASONS, decide
from tests.support.api import Api, make_api
from tests.support.services import flushed_broker

pytestmark = pytest.mark.integration

# Four scans, one per outcome, and a text file that fails at intake (position 4).
PROBABILITIES = np.array(
    [
        [0.97, 0.01, 0.01, 0.01],  # confident, in scope: no flag
        [0.50, 0.30, 0.10, 0.10],  # below the threshold: uncertain, label kept
        [0.10, 0.10, 0.70, 0.10],  # far from the training data: out of scope
        [0.05, 0.05, 0.05, 0.85],  # an input check failed: out of scope
    ],
    dtype=np.float32,
)
SCOPE_SCORES = np.array([0.3, 0.6, 4.0, 0.2])
FINDINGS = [None, None, None, "near_constant"]
UNCERTAIN_BELOW = 0.9


def scan_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def flags_broker() -> Iterator[str]:
    yield from flushed_broker("redis://127.0.0.1:6379/15")


@pytest.fixture(params=["sqlite", "postgres"])
def api(
    request: pytest.FixtureRequest, flags_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Api]:
    yield from make_api(request.getfixturevalue(f"{request.param}_url"), flags_broker, tmp_path, monkeypatch)


def metric(api: Api, flag: str) -> float:
    text = api.client.get("/metrics").text
    match = re.search(rf'^brainscan_items_flagged_total\{{flag="{flag}"\}} (\S+)$', text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def scored_job(api: Api) -> str:
    """A job of four scans and one bad file, its scans finalised as a worker would."""
    from worker.tasks import Outcome, finalize

    files = [("files", (f"scan{i}.png", scan_bytes(i))) for i in range(4)]
    files.append(("files", ("notes.txt", b"not a scan")))
    response = api.client.post("/v1/jobs", headers=api.auth(), files=files)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    with api.sessions() as session:
        ids = list(
            session.scalars(
                select(Item.id).where(Item.job_id == job_id, Item.status == "queued").order_by(Item.position)
            )
        )
    verdicts = decide(PROBABILITIES, UNCERTAIN_BELOW, SCOPE_SCORES, FINDINGS)
    outcomes = [Outcome(i, job_id, "succeeded", v) for i, v in zip(ids, verdicts, strict=True)]
    assert finalize(outcomes, "demo", "1") == {job_id: (4, 0)}
    # A redelivered batch changes nothing, flag counts included.
    assert finalize(outcomes, "demo", "1") == {}
    return job_id


def test_job_json_carries_flags_and_counts(api: Api) -> None:
    before = {flag: metric(api, flag) for flag in ("uncertain", "out_of_scope")}
    job_id = scored_job(api)
    body = api.client.get(f"/v1/jobs/{job_id}", headers=api.auth()).json()
    assert (body["status"], body["done"], body["failed"]) == ("partial", 4, 1)
    assert body["flags"] == {"uncertain": 1, "out_of_scope": 2}
    fields = ("label", "confidence", "flag", "flag_reason", "scope_score")
    rows = [tuple(item[k] for k in fields) for item in body["items"]]
    assert rows[0][:4] == ("glioma", pytest.approx(0.97), None, None)
    assert rows[1][:4] == ("glioma", pytest.approx(0.5), "uncertain", REASONS["low_confidence"])
    assert rows[2][:4] == (None, None, "out_of_scope", REASONS["far_from_training"])
    assert rows[3][:4] == (None, None, "out_of_scope", REASONS["near_constant"])
    assert [r[4] for r in rows[:4]] == pytest.approx([0.3, 0.6, 4.0, 0.2])
    assert rows[4] == (None, None, None, None, None)  # failed at intake: never scored
    # Out of scope: no label and no confidence, but the probabilities stay for audit.
    assert body["items"][2]["probabilities"]["notumor"] == pytest.approx(0.7)
    # The job list and the metrics count the same flags.
    listed = api.client.get("/v1/jobs", headers=api.auth()).json()["jobs"]
    assert next(job for job in listed if job["id"] == job_id)["flags"] == body["flags"]
    assert metric(api, "uncertain") - before["uncertain"] == 1
    assert metric(api, "out_of_scope") - before["out_of_scope"] == 2


def test_filter_and_order_items(api: Api) -> None:
    job_id = scored_job(api)

    def positions(query: str) -> list[int]:
        response = api.client.get(f"/v1/jobs/{job_id}?{query}", headers=api.auth())
        assert response.status_code == 200, response.text
        return [item["position"] for item in response.json()["items"]]

    assert positions("flag=out_of_scope") == [2, 3]
    assert positions("flag=uncertain") == [1]
    assert positions("flag=any") == [1, 2, 3]
    assert positions("flag=none") == [0, 4]
    assert positions("order=-confidence") == [0, 1, 2, 3, 4]
    assert positions("order=confidence") == [1, 0, 2, 3, 4]
    page = api.client.get(f"/v1/jobs/{job_id}?flag=any&limit=2", headers=api.auth()).json()["page"]
    assert page == {
        "offset": 0,
        "limit": 2,
        "returned": 2,
        "next_offset": 2,
        "flag": "any",
        "order": "position",
    }
    for query in ("flag=maybe", "order=label", "flag=", "order=CONFIDENCE"):
        assert api.client.get(f"/v1/jobs/{job_id}?{query}", headers=api.auth()).status_code == 422


def test_results_csv_carries_flags(api: Api) -> None:
    job_id = scored_job(api)
    response = api.client.get(f"/v1/jobs/{job_id}/results.csv", headers=api.auth())
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [(r["flag"], r["label"]) for r in rows] == [
        ("", "glioma"),
        ("uncertain", "glioma"),
        ("out_of_scope", ""),
        ("out_of_scope", ""),
        ("", ""),
    ]
    assert [r["flag_reason"] for r in rows[2:4]] == [REASONS["far_from_training"], REASONS["near_constant"]]
    assert [r["scope_score"] for r in rows] == ["0.3", "0.6", "4.0", "0.2", ""]
    assert rows[2]["confidence"] == "" and float(rows[2]["prob_notumor"]) == pytest.approx(0.7)


def test_openapi_states_research_use_and_the_flag_contract(api: Api) -> None:
    document = api.client.get("/openapi.json").json()
    description = document["info"]["description"]
    assert "Research use only - not for diagnostic use." in description
    assert "BRAINSCAN_UNCERTAIN_BELOW" in description and "card-less" in description
    item = document["components"]["schemas"]["ItemOut"]["properties"]
    assert {"flag", "flag_reason", "scope_score"} <= set(item)
    flag_values = {v for option in item["flag"]["anyOf"] for v in option.get("enum", [])}
    assert flag_values == {"uncertain", "out_of_scope"}
    parameters = {p["name"]: p for p in document["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"]}
    assert {"flag", "order"} <= set(parameters)
    assert "out_of_scope" in json.dumps(parameters["flag"]["schema"])
    assert "-confidence" in json.dumps(parameters["order"]["schema"])


def test_cli_status_marks_flagged_rows_and_counts(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from brainscan_cli.commands import client as client_commands
    from brainscan_cli.main import app as cli

    job_id = scored_job(api)

    def http_client(url: str | None, key: str | None, timeout: float = 60.0) -> TestClient:
        return TestClient(api.client.app, headers=api.auth())

    monkeypatch.setattr(client_commands, "_client", http_client)
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    runner = CliRunner()
    table = runner.invoke(cli, ["status", job_id], catch_exceptions=False)
    assert table.exit_code == 0, table.output
    lines = {line.split()[1]: line for line in table.stdout.splitlines() if re.match(r"^\W*\d\s", line)}
    assert "glioma (uncertain)" in lines["1"] and "uncertain: the calibrated" in lines["1"]
    assert "OUT OF SCOPE" in lines["2"] and "glioma" not in lines["2"]
    assert "OUT OF SCOPE" in lines["3"] and "nearly uniform" in lines["3"]
    assert "glioma" in lines["0"] and "uncertain" not in lines["0"] and "OUT OF SCOPE" not in lines["0"]
    assert "total=5 done=4 failed=1 pending=0 uncertain=1 out_of_scope=2" in table.stdout
    assert "Research use only - not for diagnostic use." in table.stdout

    as_json = json.loads(runner.invoke(cli, ["status", job_id, "--json"], catch_exceptions=False).stdout)
    assert as_json["flags"] == {"uncertain": 1, "out_of_scope": 2}
    assert [item["flag"] for item in as_json["items"]] == [
        None,
        "uncertain",
        "out_of_scope",
        "out_of_scope",
        None,
    ]
