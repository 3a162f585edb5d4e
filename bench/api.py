"""``POST /v1/jobs`` under load: single-scan uploads from 32 concurrent clients (httpx, asyncio).

    .venv/bin/python bench/api.py                                    # own embedded stack, API only
    .venv/bin/python bench/api.py --workers 1                        # ... with a worker scoring too
    .venv/bin/python bench/api.py --url http://127.0.0.1:8000 --key bs_...
    .venv/bin/python bench/api.py --quick                            # 64 requests: proves it runs

Each request uploads one real training scan (generated when the dataset is absent) as a new job and
counts when the API answers ``202``: stored, recorded and queued. Bounded: ``--requests`` in all
and ``--seconds`` of sending, whichever comes first. Loopback only (``127.0.0.0/8``, ``::1``,
``localhost``): this is a load generator, not to be pointed at someone else's server.

The embedded stack runs no worker by default, so the figure is the API's alone (the queued messages
die with the temp stack); a tiny generated model satisfies its start-up check. Last line:
``api_p50_ms=A api_p99_ms=B api_rps=C errors=E``. Figures, never assertions: run on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # loopback.py, naive.py, soak.py
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from loopback import is_loopback  # noqa: E402
from naive import sample_scans, scan_source  # noqa: E402


def log(message: str) -> None:
    print(f"[api {time.strftime('%H:%M:%S')}] {message}", flush=True)


def start_embedded(var_dir: Path, workers: int):  # type: ignore[no-untyped-def]
    from soak import build_tiny_model

    from brainscan.settings import Settings, get_settings
    from brainscan_cli.embedded import free_port, start_stack, wait_for_workers

    model = build_tiny_model(var_dir.parent / "models" / "tiny" / "1")
    for key in [k for k in os.environ if k.startswith("BRAINSCAN_")]:
        del os.environ[key]  # the embedded defaults, whatever the caller's shell holds
    os.environ.update(
        BRAINSCAN_VAR_DIR=str(var_dir),
        BRAINSCAN_MODEL_DIR=str(model),
        BRAINSCAN_PORT=str(free_port()),
        BRAINSCAN_LOG_LEVEL="WARNING",
        BRAINSCAN_TF_THREADS="1",
    )
    get_settings.cache_clear()
    stack = start_stack(Settings(), workers=workers, echo=log)
    if workers:
        wait_for_workers(stack, workers, timeout_s=300)
    return stack


async def load(
    url: str, key: str, scans: list[bytes], clients: int, requests: int, seconds: float
) -> tuple[list[float], int, float]:
    """(latencies in ms of the 202s, errors, seconds) for ``clients`` concurrent senders."""
    import httpx

    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=60
    ) as client:

        async def sender() -> None:
            nonlocal errors, sent
            while sent < requests and time.monotonic() < deadline:
                index = sent
                sent += 1
                files = [("files", (f"scan_{index}.jpg", scans[index % len(scans)], "image/jpeg"))]
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/jobs", files=files)
                    ok = response.status_code == 202 and "id" in response.json()
                except (httpx.HTTPError, ValueError):
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - started) * 1000.0)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(clients)))
        return latencies, errors, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="", help="an API already running on this machine")
    parser.add_argument("--key", default=os.environ.get("BRAINSCAN_API_KEY", ""), help="API key for --url")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000, help="at most this many POSTs")
    parser.add_argument("--seconds", type=float, default=60.0, help="at most this long sending")
    parser.add_argument("--workers", type=int, default=0, help="workers in the embedded stack")
    parser.add_argument("--quick", action="store_true", help="64 requests: proves it runs, measures nothing")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.seconds = 64, 30.0
    if args.url and not args.key:
        parser.error("--url needs --key (or BRAINSCAN_API_KEY)")
    if args.url and not is_loopback(args.url):
        parser.error(f"{args.url} is not a loopback address: this load generator stays on this machine")

    scans = [data for _, data in sample_scans(64, seed=7)]
    with tempfile.TemporaryDirectory(prefix="brainscan-api-") as tmp:
        stack = None
        try:
            if args.url:
                url, key = args.url, args.key
            else:
                stack = start_embedded(Path(tmp) / "var", args.workers)
                url, key = stack.url, stack.key
            log(f"{args.clients} clients, up to {args.requests} single-scan POSTs or {args.seconds:.0f}s")
            latencies, errors, elapsed = asyncio.run(
                load(url, key, scans, args.clients, args.requests, args.seconds)
            )
        finally:
            if stack is not None:
                stack.stop()

    done = len(latencies)
    p50, p99 = (float(np.percentile(latencies, q)) if latencies else float("nan") for q in (50, 99))
    rps = done / elapsed if elapsed else 0.0
    print()
    print(f"target        {'embedded stack' if not args.url else args.url}, {args.workers} worker(s)")
    print(f"uploads       {done} accepted (202), {errors} errors, {scan_source()}, in {elapsed:.1f} s")
    print(f"latency       p50={p50:.0f} ms p99={p99:.0f} ms max={max(latencies, default=0):.0f} ms")
    print(f"throughput    {rps:.1f} requests/s with {args.clients} concurrent clients")
    print(f"api_p50_ms={p50:.0f} api_p99_ms={p99:.0f} api_rps={rps:.1f} errors={errors}")


if __name__ == "__main__":
    main()
