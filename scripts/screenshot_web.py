"""Make docs/screenshot-web.png: the web page with the real default model scoring a few real scans.

Starts ``brainscan up`` (embedded stack) on a free port with a throw-away var folder, so the scans
uploaded live only there and are deleted with it; pastes the key into the page in headless Chromium
(Debian's ``chromium``, as tests/e2e/test_web_page.py), uploads ``--per-class`` scans of each class
folder of ``--data``, waits for the results and opens one scan's Grad-CAM. Writes two PNGs:
``docs/screenshot-web.png`` (the page) and ``docs/screenshot-viewer.png`` (the viewer).

    .venv/bin/python scripts/screenshot_web.py --data ../shared/data/brain-tumor-mri/Training

The model is whatever the stack serves from ``--model-dir`` (the promoted one, else the newest).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("BRAINSCAN_TEST_CHROMIUM", "/usr/bin/chromium"))
CLASS_FOLDERS = ("glioma", "meningioma", "notumor", "pituitary")
WAIT_S = 600


def pick_scans(data: Path, per_class: int) -> list[Path]:
    """``per_class`` scans of each class folder, spread over its sorted file list (deterministic)."""
    chosen: list[Path] = []
    for name in CLASS_FOLDERS:
        files = sorted(p for p in (data / name).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if len(files) < per_class:
            raise SystemExit(f"{data / name}: fewer than {per_class} scans")
        step = len(files) // per_class
        chosen += [files[i * step + step // 2] for i in range(per_class)]
    return chosen


def wait_until(check: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder with one sub-folder per class")
    parser.add_argument("--per-class", type=int, default=2, help="scans per class (default 2)")
    parser.add_argument(
        "--model-dir", type=Path, default=ROOT / "models", help="model repository (default models/)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go (default docs/)")
    args = parser.parse_args()
    scans = pick_scans(args.data, args.per_class)

    from playwright.sync_api import expect, sync_playwright

    from brainscan_cli.embedded import free_port

    with tempfile.TemporaryDirectory(prefix="brainscan-screenshot-") as tmp:
        var_dir = Path(tmp) / "var"
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRAINSCAN_")}
        env.update(
            BRAINSCAN_VAR_DIR=str(var_dir),
            BRAINSCAN_MODEL_DIR=str(args.model_dir.resolve()),
            BRAINSCAN_PORT=str(port),
            BRAINSCAN_TF_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        log = Path(tmp) / "up.log"
        with open(log, "wb") as out:
            up = subprocess.Popen(
                [sys.executable, "-m", "brainscan_cli.main", "up"], env=env, cwd=ROOT, stdout=out, stderr=out
            )
        try:
            wait_until(lambda: "ready." in log.read_text() or up.poll() is not None, "brainscan up")
            if up.poll() is not None:
                raise SystemExit(f"brainscan up exited:\n{log.read_text()[-3000:]}")
            key = (var_dir / "api-key").read_text().strip()
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
                )
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/")
                page.fill("#key", key)
                page.click("#key-form button[type=submit]")
                expect(page.locator("#model")).not_to_have_text("model: unknown", timeout=WAIT_S * 1000)
                page.set_input_files("#files", [str(p) for p in scans])
                page.wait_for_selector("article.job[data-finished='true']", timeout=WAIT_S * 1000)
                print(page.inner_text("#model"), "·", page.inner_text("article.job .counts"))
                args.out.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out / "screenshot-web.png"), full_page=True)

                page.locator("article.job tbody tr").first.locator("button.view").click()
                expect(page.locator("#viewer-controls")).to_be_visible(timeout=WAIT_S * 1000)
                page.locator("#viewer-opacity").fill("70")
                page.wait_for_timeout(300)  # let the images paint
                page.locator("#viewer").screenshot(path=str(args.out / "screenshot-viewer.png"))
                print(page.inner_text("#viewer-cam-caption"))
                browser.close()
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(90)


if __name__ == "__main__":
    main()
