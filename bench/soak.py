"""Soak test: thousands of scans, many concurrent jobs, workers SIGKILLed and restarted throughout.

    .venv/bin/python bench/soak.py                                  # its own embedded stack
    .venv/bin/python bench/soak.py --scans 4000 --jobs 40           # bigger
    .venv/bin/python bench/soak.py --url http://host:8000 --key bs_...   # an existing deployment

With no ``--url`` it starts the embedded stack (``brainscan_cli.embedded``: a private Redis, SQLite, the
API, TWO workers and beat) in a temporary folder, serving a tiny generated model unless ``--model``
is given, with a short visibility timeout (10 s) and a fast reaper so that recovery takes seconds.
It submits ``--scans`` small JPEGs (a few truncated, a few not images at all) across ``--jobs``
concurrent jobs, and every ``--kill-every`` seconds SIGKILLs one live worker and starts a fresh one
(never leaving no worker able to score, so the run makes progress). When every job is finished (or
``--timeout`` passes) it checks every item: in the database for the embedded stack, through the API
(``results.csv``) for ``--url``. Chaos only applies to the embedded stack's own workers.

The last line is the verdict, ``submitted=N scored=N failed=N lost=N duplicated=N``, where
lost = items never finalised (or finalised but missing from their job's counts) and
duplicated = results counted more than once (job counters above the items' final statuses).
Both must be 0. Exit code 1 when they are not.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Embedded-stack tuning for the soak (children inherit the environment).
SOAK_ENV = {
    "BRAINSCAN_VISIBILITY_TIMEOUT_S": "10",  # a killed worker's messages are back in ~10 s
    "BRAINSCAN_REAPER_INTERVAL_S": "5",
    "BRAINSCAN_STALE_AFTER_S": "60",
    "BRAINSCAN_BATCH_SIZE": "16",
    "BRAINSCAN_ENQUEUE_CHUNK": "8",
    "BRAINSCAN_MAX_BATCH_WAIT_MS": "100",
    "BRAINSCAN_TF_THREADS": "1",
    "BRAINSCAN_MAX_ATTEMPTS": "10",  # many kills may hit the same item; it must not fail for that
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- inputs ------------------------------------------------------------------------------------
def build_tiny_model(folder: Path) -> Path:
    """A 32x32 conv net with random weights: the soak measures plumbing, not accuracy."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from brainscan.modelrepo import ModelCard

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1.0 / 128.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    folder.parent.mkdir(parents=True, exist_ok=True)
    model.export(str(folder), verbose=False)
    ModelCard(name="soak-tiny", version="1", input_size=(32, 32), architecture="tiny-cnn").write(folder)
    return folder


def make_scan(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="JPEG", quality=80)
    return out.getvalue()


@dataclass
class Batch:
    """One job's files and how many of them must fail (truncated JPEGs, text files)."""

    files: list[tuple[str, bytes]]
    expected_failed: int


def make_jobs(scans: int, jobs: int, seed: int) -> list[Batch]:
    rng = random.Random(seed)
    batches = [Batch([], 0) for _ in range(jobs)]
    for index in range(scans):
        batch = batches[index % jobs]
        roll = rng.random()
        data = make_scan(seed * 1_000_003 + index)
        if roll < 0.03:
            batch.files.append((f"cut_{index}.jpg", data[: len(data) // 3]))  # the worker must fail it
            batch.expected_failed += 1
        elif roll < 0.05:
            batch.files.append((f"notes_{index}.jpg", b"not an image %d" % index))  # intake fails it
            batch.expected_failed += 1
        else:
            batch.files.append((f"scan_{index}.jpg", data))
    return batches


# ---- the embedded stack and the chaos ------------------------------------------------------------
@dataclass
class Chaos:
    stack: object  # brainscan_cli.embedded.Stack
    every_s: float
    kills: int = 0
    restarts: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def workers(self) -> list:  # type: ignore[type-arg]
        return [c for c in self.stack.children if c.name.startswith("worker")]  # type: ignore[attr-defined]

    def ready(self, child) -> bool:  # type: ignore[no-untyped-def]
        """A worker is ready when its heartbeat (hostname brainscan-<pid>@...) is in Redis."""
        import redis

        from brainscan.queueing import HEARTBEAT_PREFIX

        with contextlib.suppress(Exception):
            client = redis.Redis.from_url(self.stack.env["BRAINSCAN_BROKER_URL"], socket_connect_timeout=1)  # type: ignore[attr-defined]
            try:
                pattern = f"{HEARTBEAT_PREFIX}brainscan-{child.process.pid}@*"
                return child.alive() and any(client.scan_iter(match=pattern))
            finally:
                client.close()
        return False

    def run(self) -> None:
        from brainscan_cli.embedded import spawn

        stack = self.stack
        logs = stack.settings.var_dir.resolve() / "logs"  # type: ignore[attr-defined]
        rng = random.Random(7)
        while not self.stop.wait(self.every_s):
            workers = self.workers()
            ready = [w for w in workers if self.ready(w)]
            # Never kill the last worker able to score: chaos, not a standstill.
            if len(ready) < 2:
                continue
            victim = rng.choice(ready)
            victim.signal_group(signal.SIGKILL)
            with contextlib.suppress(Exception):
                victim.process.wait(10)
            self.kills += 1
            replacement = spawn(
                victim.name,
                [sys.executable, "-m", "brainscan_cli.main", "worker"],
                stack.env,  # type: ignore[attr-defined]
                logs / f"{victim.name}.log",
            )
            stack.children[stack.children.index(victim)] = replacement  # type: ignore[attr-defined]
            self.restarts += 1
            log(f"SIGKILLed {victim.name} (pid {victim.process.pid}), started pid {replacement.process.pid}")


def start_embedded(var_dir: Path, model_dir: Path, workers: int):  # type: ignore[no-untyped-def]
    from brainscan.settings import Settings, get_settings
    from brainscan_cli.embedded import free_port, start_stack, wait_for_workers

    for key in [k for k in os.environ if k.startswith("BRAINSCAN_")]:
        del os.environ[key]  # the embedded defaults, whatever the caller's shell holds
    os.environ.update(SOAK_ENV)
    os.environ.update(
        BRAINSCAN_VAR_DIR=str(var_dir), BRAINSCAN_MODEL_DIR=str(model_dir), BRAINSCAN_PORT=str(free_port())
    )
    get_settings.cache_clear()
    settings = Settings()
    stack = start_stack(settings, workers=workers, echo=log)
    log("waiting for the workers to load the model ...")
    wait_for_workers(stack, workers, timeout_s=300)
    return stack


# ---- submitting and polling ------------------------------------------------------------------------
def submit(url: str, key: str, batch: Batch) -> str:
    import httpx

    files = [("files", (name, data, "image/jpeg")) for name, data in batch.files]
    for attempt in range(5):
        try:
            response = httpx.post(
                f"{url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}, files=files, timeout=120
            )
        except httpx.HTTPError:
            if attempt == 4:
                raise
            time.sleep(1 + attempt)
            continue
        if response.status_code == 202:
            return str(response.json()["id"])
        if response.status_code != 503 or attempt == 4:
            raise RuntimeError(f"submit failed: {response.status_code} {response.text[:300]}")
        time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def finished(url: str, key: str, job_ids: list[str]) -> tuple[int, int]:
    """(finished jobs, pending items) from the API."""
    import httpx

    done_jobs, pending = 0, 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for job_id in job_ids:
            try:
                body = client.get(f"/v1/jobs/{job_id}", params={"limit": 0}).json()
            except Exception:
                return 0, -1
            done_jobs += bool(body["finished"])
            pending += int(body["pending"])
    return done_jobs, pending


# ---- the verdict ----------------------------------------------------------------------------------
@dataclass
class JobCheck:
    total: int
    done: int
    failed: int
    statuses: Counter  # type: ignore[type-arg]
    items: int
    gave_up: int = 0
    redelivered: int = 0  # items claimed more than once (a kill hit them in flight), counted once


def check_in_database(database_url: str, job_ids: list[str]) -> list[JobCheck]:
    from sqlalchemy import func, select

    from brainscan.db import Item, Job, session_scope

    checks = []
    with session_scope(database_url) as session:
        for job_id in job_ids:
            job = session.get(Job, job_id)
            assert job is not None, job_id
            statuses = Counter(
                dict(
                    session.execute(
                        select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status)
                    ).all()
                )
            )
            gave_up = session.scalar(
                select(func.count()).where(Item.job_id == job_id, Item.error.like("gave up after%"))
            )
            redelivered = session.scalar(select(func.count()).where(Item.job_id == job_id, Item.attempts > 1))
            checks.append(
                JobCheck(
                    job.total,
                    job.done,
                    job.failed,
                    statuses,
                    sum(statuses.values()),
                    gave_up or 0,
                    redelivered or 0,
                )
            )
    return checks


def check_through_api(url: str, key: str, job_ids: list[str]) -> list[JobCheck]:
    import httpx

    checks = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        for job_id in job_ids:
            job = client.get(f"/v1/jobs/{job_id}", params={"limit": 0}).json()
            rows = list(csv.DictReader(io.StringIO(client.get(f"/v1/jobs/{job_id}/results.csv").text)))
            statuses = Counter(row["status"] for row in rows)
            gave_up = sum(1 for row in rows if (row["error"] or "").startswith("gave up after"))
            redelivered = sum(1 for item in _all_items(client, job_id) if item["attempts"] > 1)
            checks.append(
                JobCheck(job["total"], job["done"], job["failed"], statuses, len(rows), gave_up, redelivered)
            )
    return checks


def _all_items(client, job_id: str):  # type: ignore[no-untyped-def]
    offset: int | None = 0
    while offset is not None:
        page = client.get(f"/v1/jobs/{job_id}", params={"offset": offset, "limit": 1000}).json()
        yield from page["items"]
        offset = page["page"]["next_offset"]


def verdict(checks: list[JobCheck], sent: int) -> dict[str, int]:
    scored = sum(c.statuses["succeeded"] for c in checks)
    failed = sum(c.statuses["failed"] for c in checks)
    not_final = sum(c.items - c.statuses["succeeded"] - c.statuses["failed"] for c in checks)
    # Final items missing from their job's counters are as good as lost to a client reading counts;
    # counters above the final statuses are results counted twice.
    uncounted = sum(
        max(0, c.statuses["succeeded"] - c.done) + max(0, c.statuses["failed"] - c.failed) for c in checks
    )
    duplicated = sum(
        max(0, c.done - c.statuses["succeeded"]) + max(0, c.failed - c.statuses["failed"]) for c in checks
    )
    missing_items = max(0, sent - sum(c.items for c in checks))  # sent but never recorded
    return {
        "submitted": sent,
        "scored": scored,
        "failed": failed,
        "lost": not_final + uncounted + missing_items,
        "duplicated": duplicated + sum(max(0, c.items - c.total) for c in checks),
    }


# ---- main ----------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="", help="an existing deployment (default: start an embedded stack)")
    parser.add_argument("--key", default=os.environ.get("BRAINSCAN_API_KEY", ""), help="API key for --url")
    parser.add_argument("--model", type=Path, default=None, help="model repository for the embedded stack")
    parser.add_argument("--scans", type=int, default=4000, help="scans in all (at least 2000)")
    parser.add_argument("--jobs", type=int, default=40, help="jobs, all submitted concurrently")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=4.0, help="seconds between worker kills")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds to wait for every job")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.url and not args.key:
        parser.error("--url needs --key (or BRAINSCAN_API_KEY)")

    batches = make_jobs(args.scans, args.jobs, args.seed)
    sent = sum(len(b.files) for b in batches)
    expected_failed = sum(b.expected_failed for b in batches)
    tmp = tempfile.mkdtemp(prefix="brainscan-soak-")
    stack = chaos = None
    chaos_thread = None
    url, key = args.url.rstrip("/"), args.key
    try:
        if not url:
            model_dir = args.model
            if model_dir is None:
                model_dir = Path(tmp) / "models"
                build_tiny_model(model_dir / "soak-tiny" / "1")
            stack = start_embedded(Path(tmp) / "var", model_dir.resolve(), args.workers)
            url, key = stack.url, stack.key
            chaos = Chaos(stack, args.kill_every)
            chaos_thread = threading.Thread(target=chaos.run, name="chaos", daemon=True)
            chaos_thread.start()

        started = time.monotonic()
        log(f"submitting {sent} scans in {len(batches)} concurrent jobs to {url}")
        with ThreadPoolExecutor(len(batches)) as pool:
            job_ids = list(pool.map(lambda b: submit(url, key, b), batches))
        log(f"submitted in {time.monotonic() - started:.1f}s; waiting (at most {args.timeout:.0f}s)")

        deadline = time.monotonic() + args.timeout
        last_report = 0.0
        while time.monotonic() < deadline:
            done_jobs, pending = finished(url, key, job_ids)
            if done_jobs == len(job_ids):
                break
            if time.monotonic() - last_report > 15:
                log(f"{done_jobs}/{len(job_ids)} jobs finished, {pending} items pending")
                last_report = time.monotonic()
            time.sleep(1)
        elapsed = time.monotonic() - started
        if chaos is not None:
            chaos.stop.set()
            log(f"chaos: {chaos.kills} workers SIGKILLed and restarted")
        log(f"all jobs finished after {elapsed:.0f}s" if done_jobs == len(job_ids) else "timed out")

        if stack is not None:
            checks = check_in_database(stack.env["BRAINSCAN_DATABASE_URL"], job_ids)
        else:
            checks = check_through_api(url, key, job_ids)
    finally:
        if chaos is not None:
            chaos.stop.set()
        if chaos_thread is not None:
            chaos_thread.join(30)
        if stack is not None:
            stack.stop()

    result = verdict(checks, sent)
    ok = result["lost"] == 0 and result["duplicated"] == 0
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        log(f"logs and database kept in {tmp}")
    gave_up = sum(c.gave_up for c in checks)
    redelivered = sum(c.redelivered for c in checks)
    log(f"expected failures (corrupt inputs): {expected_failed}; items that gave up after retries: {gave_up}")
    log(f"items claimed more than once (in flight when a worker died), each counted once: {redelivered}")
    print(" ".join(f"{name}={value}" for name, value in result.items()), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
