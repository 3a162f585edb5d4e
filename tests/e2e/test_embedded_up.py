"""``brainscan up``: the embedded stack starts from nothing, scores a scan, and Ctrl-C leaves no process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from brainscan_cli.embedded import default_workers, free_port
from tests.support.environment import ROOT, wait_for
from tests.support.images import make_jpeg

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def descendants(pid: int) -> set[int]:
    """Every process started (directly or not) by ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def clean_environ() -> dict[str, str]:
    # The embedded defaults, whatever BRAINSCAN_* the caller's environment holds.
    return {k: v for k, v in os.environ.items() if not k.startswith("BRAINSCAN_")}


def run_up(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "brainscan_cli.main", "up", *args],
            env={**clean_environ(), **env, "PYTHONUNBUFFERED": "1"},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_up_without_a_model_says_how_to_get_one(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "brainscan_cli.main", "up"],
        env={
            **clean_environ(),
            "BRAINSCAN_VAR_DIR": str(tmp_path / "var"),
            "BRAINSCAN_MODEL_DIR": str(tmp_path / "models"),
            "BRAINSCAN_PORT": str(free_port()),
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "no model to serve" in result.stderr and "brainscan train" in result.stderr
    assert "models/<name>/<version>" in result.stderr
    assert not (tmp_path / "var" / "brainscan.db").exists()  # nothing started, nothing written


def test_up_scores_a_scan_and_ctrl_c_stops_every_child(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    var_dir = tmp_path / "var"
    env = {
        "BRAINSCAN_VAR_DIR": str(var_dir),
        "BRAINSCAN_MODEL_DIR": str(tiny_model_dir),
        "BRAINSCAN_PORT": str(port),
        "BRAINSCAN_TF_THREADS": "1",
    }
    log = tmp_path / "up.log"
    # A stack stopped mid-upload left a temporary file behind (issue 13): swept before anything starts.
    leftover = var_dir / "storage" / "tmp" / "upload-left-behind"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"x" * 4096)
    up = run_up(env, log)
    try:
        wait_for(lambda: "ready." in log.read_text() or up.poll() is not None, what="brainscan up")
        assert up.poll() is None, log.read_text()
        children = descendants(up.pid)
        # One single-threaded worker per core by default (BRAINSCAN_TF_THREADS=1 here).
        assert f"workers   {default_workers()} x 1 thread(s)" in log.read_text()
        assert len(children) >= 3 + default_workers()  # redis, api, beat and the workers
        assert not leftover.exists()
        assert "removed 1 leftover temporary file(s), 4096 bytes" in log.read_text()
        assert (var_dir / "brainscan.db").stat().st_mode & 0o777 == 0o600  # owner-only

        key = (var_dir / "api-key").read_text().strip()
        assert key in log.read_text()
        headers = {"Authorization": f"Bearer {key}"}
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            accepted = client.post("/v1/jobs", files=[("files", ("scan.jpg", make_jpeg(7), "image/jpeg"))])
            assert accepted.status_code == 202, accepted.text
            job_id = accepted.json()["id"]
            job = wait_for(
                lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["finished"] and j,
                what="the scan's result",
            )
        assert isinstance(job, dict) and job["status"] == "succeeded"
        assert job["items"][0]["label"] in ("glioma", "meningioma", "notumor", "pituitary")
    finally:
        up.send_signal(signal.SIGINT)  # what Ctrl-C sends
        code = up.wait(90)
    assert code == 0, log.read_text()[-3000:]
    assert [pid for pid in children if alive(pid)] == []
    assert "stopped" in log.read_text()
