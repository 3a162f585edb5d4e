"""Flags end to end: a real API and a real worker serving a calibrated tiny model score ONE zip
holding real-looking scans and clearly out-of-scope images (uniform noise, a blank image, a
generated colour picture); the API returns the right flags.

The model is a small Keras network trained for a few epochs on generated scans, exported with its
``features`` output and calibrated by ``training.calibrate.calibrate_model`` (scope detector on the
training split, thresholds and temperature on the validation split): ``tests/support/trust.py``.
Nothing it was fitted on is out of scope; the out-of-scope images are made here, for evaluation.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from brainscan import CLASSES
from brainscan.modelrepo import read_card
from brainscan.trust import REASONS
from tests.support.archives import make_zip
from tests.support.environment import wait_for
from tests.support.processes import Service

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    # The worker's write path is the same on both databases, and test_flags_contract.py covers
    # PostgreSQL: one backend keeps this (model-training) module affordable.
    pytest.mark.parametrize("backend", ["sqlite"], indirect=True),
]

SCANS = 8


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This module's model repository: one calibrated tiny model (overrides conftest's)."""
    from tests.support.trust import build_calibrated_model

    repo = tmp_path_factory.mktemp("trust-models")
    build_calibrated_model(repo / "tiny-trust" / "1", tmp_path_factory.mktemp("trust-data"))
    yield repo


def get(api_server: str, api_key: str, path: str) -> httpx.Response:
    response = httpx.get(f"{api_server}{path}", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response


def test_one_zip_of_scans_and_junk_comes_back_flagged(
    backend: Any, worker_process: Service, api_server: str, api_key: str, tiny_model_dir: Path
) -> None:
    from tests.support.trust import in_scope_scans, out_of_scope_images

    scans, junk = in_scope_scans(SCANS), out_of_scope_images()
    archive = make_zip({**{f"study/{name}": data for name, data in scans.items()}, **junk})
    response = httpx.post(
        f"{api_server}/v1/jobs",
        headers={"Authorization": f"Bearer {api_key}"},
        files=[("files", ("mixed.zip", archive))],
        timeout=60,
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    wait_for(
        lambda: get(api_server, api_key, f"/v1/jobs/{job_id}?limit=0").json()["finished"], what="the job"
    )

    job = get(api_server, api_key, f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["total"], job["done"]) == ("succeeded", SCANS + 3, SCANS + 3)
    assert job["model"] == {"name": "tiny-trust", "version": "1"}
    items = {item["filename"].rsplit("/", 1)[-1]: item for item in job["items"]}
    trust = read_card(tiny_model_dir / "tiny-trust" / "1").trust
    assert trust is not None and trust.detector == "mahalanobis"

    # Real-looking scans: never out of scope; labelled; uncertain exactly below the card's threshold.
    for name in scans:
        item = items[name]
        assert item["flag"] != "out_of_scope", (name, item)
        assert item["label"] in CLASSES and item["scope_score"] is not None and item["scope_score"] <= 1
        expected = "uncertain" if item["confidence"] < trust.uncertain_below else None
        assert item["flag"] == expected, (name, item["confidence"], trust.uncertain_below)
        assert item["flag_reason"] == (REASONS["low_confidence"] if expected else None)

    # The junk: out of scope, no label, no confidence, a reason; probabilities kept for audit.
    for name in junk:
        item = items[name]
        assert (item["flag"], item["label"], item["confidence"]) == ("out_of_scope", None, None), item
        assert item["flag_reason"].startswith("out of scope: ") and item["scope_score"] is not None
        assert sum(item["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert items["blank.png"]["flag_reason"] == REASONS["near_constant"]
    assert items["picture.png"]["flag_reason"] == REASONS["strong_colour"]

    uncertain = sum(1 for name in scans if items[name]["flag"] == "uncertain")
    assert job["flags"] == {"uncertain": uncertain, "out_of_scope": 3}
    flagged = get(api_server, api_key, f"/v1/jobs/{job_id}?flag=out_of_scope").json()["items"]
    assert sorted(item["filename"] for item in flagged) == sorted(f"mixed.zip/{name}" for name in junk)

    rows = list(csv.DictReader(io.StringIO(get(api_server, api_key, f"/v1/jobs/{job_id}/results.csv").text)))
    assert [(row["filename"], row["flag"]) for row in rows] == [
        (item["filename"], item["flag"] or "") for item in job["items"]
    ]
