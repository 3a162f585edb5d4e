"""``brainscan up`` as an operator meets it (issue 15): a stack on a non-default port that the CLI
finds with no flags, CLI errors that are a line and a hint, JSON log files, and a supervisor that
restarts a SIGKILLed worker while the API keeps answering, the job in flight finishing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from brainscan_cli.embedded import free_port
from tests.e2e.test_embedded_up import clean_environ, descendants, run_up
from tests.support.environment import ROOT, wait_for
from tests.support.images import make_jpeg

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Up(NamedTuple):
    process: subprocess.Popen
    log: Path
    var_dir: Path
    url: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def up(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    root = tmp_path_factory.mktemp("up")
    port = free_port()  # not 8000: the CLI must find it from var/api-url
    env = {
        "BRAINSCAN_VAR_DIR": str(root / "var"),
        "BRAINSCAN_MODEL_DIR": str(tiny_model_dir),
        "BRAINSCAN_PORT": str(port),
        "BRAINSCAN_TF_THREADS": "1",
        "BRAINSCAN_LOG_FORMAT": "json",
    }
    log = root / "up.log"
    process = run_up(env, log, "--workers", "1")  # one worker: the one this module kills
    try:
        wait_for(lambda: "ready." in log.read_text() or process.poll() is not None, what="brainscan up")
        assert process.poll() is None, log.read_text()
        yield Up(process, log, root / "var", f"http://127.0.0.1:{port}", env)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(90)


def cli(up: Up, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "brainscan_cli.main", *args],
        env={**clean_environ(), "BRAINSCAN_VAR_DIR": up.env["BRAINSCAN_VAR_DIR"], **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def scan_file(tmp_path: Path, seed: int = 3) -> Path:
    path = tmp_path / f"scan_{seed}.jpg"
    path.write_bytes(make_jpeg(seed))
    return path


def test_submit_wait_finds_the_stack_with_no_flags(up: Up, tmp_path: Path) -> None:
    assert (up.var_dir / "api-url").read_text().strip() == up.url
    result = cli(up, "submit", str(scan_file(tmp_path)), "--wait", "--json")
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["status"] == "succeeded" and job["items"][0]["label"] is not None
    assert job["items"][0]["worker_id"].startswith("brainscan-")


def test_a_refused_key_names_where_it_came_from(up: Up, tmp_path: Path) -> None:
    result = cli(up, "status", "some-job", BRAINSCAN_API_KEY="bs_notakey")
    assert result.returncode == 1
    assert "error 401" in result.stderr and "came from $BRAINSCAN_API_KEY" in result.stderr
    assert f"the URL {up.url} from" in result.stderr and "Traceback" not in result.stderr


def test_the_embedded_key_is_not_sent_to_another_url(up: Up, tmp_path: Path) -> None:
    other = f"http://127.0.0.1:{free_port()}"
    result = cli(up, "submit", str(scan_file(tmp_path)), "--url", other)
    assert result.returncode == 2
    assert f"no API key for {other}" in result.stderr and up.url in result.stderr


def test_an_api_that_is_down_is_one_line_and_a_hint(up: Up, tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    result = cli(up, "submit", str(scan_file(tmp_path)), "--url", down, "--key", "bs_whatever")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"error: cannot reach the API at {down}")
    assert "brainscan up" in lines[1]


def test_a_killed_worker_is_restarted_and_the_job_in_flight_finishes(up: Up) -> None:
    key = (up.var_dir / "api-key").read_text().strip()
    client = httpx.Client(base_url=up.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    files = [("files", (f"s{i}.jpg", make_jpeg(i, size=(900, 900)), "image/jpeg")) for i in range(96)]
    accepted = client.post("/v1/jobs", files=files)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]

    def some_running() -> bool:
        job = client.get(f"/v1/jobs/{job_id}", params={"limit": 200}).json()
        assert not job["finished"], "the job finished before the kill: make it bigger"
        return any(item["status"] == "running" for item in job["items"])

    wait_for(some_running, what="the worker to start on the job")
    worker = worker_pid(up)
    os.killpg(worker, signal.SIGKILL)  # as the OOM killer would: no clean-up, no ack

    answered: list[int] = []

    def back() -> bool:
        answered.append(client.get("/healthz").status_code)  # the API is never down meanwhile
        ready = client.get("/readyz").json()["checks"]["workers"]["count"] >= 1
        return ready and worker_pid(up) != worker

    wait_for(back, timeout_s=60, what="the worker to be restarted")
    assert set(answered) == {200}
    job: Any = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job_id}", params={"limit": 0}).json())["finished"] and j,
        what="the job in flight to finish",
    )
    assert (job["status"], job["done"], job["failed"]) == ("succeeded", 96, 0)
    log = up.log.read_text()
    assert "worker-1 exited (code -9)" in log and "worker-1 restarted" in log


def test_every_line_of_every_log_file_is_a_json_object(up: Up) -> None:
    logs = sorted((up.var_dir / "logs").glob("*.log"))
    assert {path.name for path in logs} >= {"api.log", "worker-1.log", "beat.log"}
    for path in logs:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                assert isinstance(json.loads(line), dict), f"{path.name}:{number}: {line[:200]}"
    events = [json.loads(line).get("event") for line in (up.var_dir / "logs" / "worker-1.log").open()]
    assert "batch_scored" in events and "worker_started" in events


def worker_pid(up: Up) -> int:
    """The pid of the stack's (current) worker process: `python -m brainscan_cli.main worker`."""
    for pid in descendants(up.process.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"brainscan_cli.main" in argv and b"worker" in argv:
            return pid
    return -1
