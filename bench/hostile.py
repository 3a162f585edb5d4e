"""Hostile uploads against a real API: what each costs (issue 13's figures), printed, never asserted.

    .venv/bin/python bench/hostile.py                      # own embedded stack (API + beat, no worker)
    .venv/bin/python bench/hostile.py --url http://127.0.0.1:8000 --key bs_... --storage var/storage
    .venv/bin/python bench/hostile.py --quick              # small inputs: proves it runs

Each case is generated in memory (``tests/support/hostile.py``: gigabytes of zeros are one small
gzip member repeated) and POSTed once, alone, while another thread asks ``GET /healthz`` every
100 ms. Per case: bytes on the wire, the POST's time and status, /healthz latency while the POST was
in flight (p50, p90, max, share under 1 s), and how much the storage folder grew (``storage/`` of
the stack, or ``--storage``). Issue 13's targets: POST under 10 s, /healthz under 1 s at least 90% of
the time, no 5xx, storage growth under 64 MB for a ~2 MB upload. Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # loopback.py, soak.py
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from loopback import is_loopback  # noqa: E402

from tests.support import hostile  # noqa: E402

MIB = 1024 * 1024


def log(message: str) -> None:
    print(f"[hostile {time.strftime('%H:%M:%S')}] {message}", flush=True)


def cases(quick: bool) -> list[tuple[str, list[tuple[str, bytes]]]]:
    """(case name, files of one request)."""
    import nibabel as nib

    big = 64 * MIB if not quick else 4 * MIB
    header = nib.Nifti2Header()
    header.set_data_shape((1, 1, 1_000_000))
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 544
    blank_slices = gzip.compress(header.binaryblock + bytes(4) + bytes(1_000_000))
    return [
        ("one scan (baseline)", [("scan.jpg", hostile.small_jpeg())]),
        (
            "pax header, long digit run",
            [("digits.tgz", hostile.pax_digits_tar_gz(2000 * MIB if not quick else MIB))],
        ),
        ("600 chained pax headers", [("chain.tgz", gzip.compress(hostile.chained_pax_tar(600)))]),
        ("32 x 64 MiB JPEG magic + zeros", [("junk.tgz", hostile.junk_jpeg_members_tar_gz(32, big))]),
        ("32 x 64 MiB real JPEG + zeros", [("padded.tgz", hostile.padded_jpeg_members_tar_gz(32, big))]),
        (
            "4 x skipped-member bombs",
            [
                (f"bomb{i}.tgz", hostile.skipped_member_bomb_tar_gz(2000 * MIB if not quick else big))
                for i in range(4)
            ],
        ),
        ("NIfTI-2 1x1x1M blank slices", [("blank.nii.gz", blank_slices)]),
    ]


@dataclass
class Outcome:
    name: str
    sent: int
    status: int
    post_s: float
    health_ms: list[float]
    growth: int
    summary: str


def storage_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def run_case(
    client: httpx.Client, url: str, key: str, storage: Path, name: str, files: list[tuple[str, bytes]]
) -> Outcome:
    before = storage_bytes(storage)
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=30) as health:
            while not done.is_set():
                start = time.perf_counter()
                with contextlib.suppress(httpx.HTTPError):
                    health.get(f"{url}/healthz")
                latencies.append((time.perf_counter() - start) * 1000)
                done.wait(0.1)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    start = time.perf_counter()
    response = client.post(
        f"{url}/v1/jobs",
        headers={"Authorization": f"Bearer {key}"},
        files=[("files", (filename, data)) for filename, data in files],
    )
    post_s = time.perf_counter() - start
    done.set()
    prober.join()
    summary = response.text[:160]
    if response.status_code == 202:
        job = client.get(
            f"{url}/v1/jobs/{response.json()['id']}", headers={"Authorization": f"Bearer {key}"}
        ).json()
        reasons = sorted({item.get("error") or "stored" for item in job.get("items", [])})
        summary = f"{job['total']} item(s), {job['failed']} failed: " + " | ".join(
            r[:90] for r in reasons[:3]
        )
    return Outcome(
        name,
        sum(len(d) for _, d in files),
        response.status_code,
        post_s,
        latencies,
        storage_bytes(storage) - before,
        summary,
    )


def start_embedded(var_dir: Path):  # type: ignore[no-untyped-def]
    from soak import build_tiny_model

    from brainscan.settings import Settings, get_settings
    from brainscan_cli.embedded import free_port, start_stack

    model = build_tiny_model(var_dir.parent / "models" / "tiny" / "1")
    for key in [k for k in os.environ if k.startswith("BRAINSCAN_")]:
        del os.environ[key]  # the embedded defaults, whatever the caller's shell holds
    os.environ.update(
        BRAINSCAN_VAR_DIR=str(var_dir),
        BRAINSCAN_MODEL_DIR=str(model),
        BRAINSCAN_PORT=str(free_port()),
        BRAINSCAN_LOG_LEVEL="WARNING",
    )
    get_settings.cache_clear()
    return start_stack(Settings(), workers=0, echo=log)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="", help="an API already running on this machine")
    parser.add_argument("--key", default=os.environ.get("BRAINSCAN_API_KEY", ""), help="API key for --url")
    parser.add_argument("--storage", default="", help="with --url: its storage folder, to measure growth")
    parser.add_argument("--quick", action="store_true", help="small inputs: proves it runs")
    args = parser.parse_args()
    if args.url and not args.key:
        parser.error("--url needs --key (or BRAINSCAN_API_KEY)")
    if args.url and not is_loopback(args.url):
        parser.error(f"{args.url} is not a loopback address")

    outcomes = []
    with tempfile.TemporaryDirectory(prefix="brainscan-hostile-") as tmp:
        stack = None
        try:
            if args.url:
                url, key, storage = args.url, args.key, Path(args.storage or "/nonexistent")
            else:
                stack = start_embedded(Path(tmp) / "var")
                url, key, storage = stack.url, stack.key, Path(tmp) / "var" / "storage"
            with httpx.Client(timeout=600) as client:
                for name, files in cases(args.quick):
                    log(f"{name}: {sum(len(d) for _, d in files)} bytes")
                    outcomes.append(run_case(client, url, key, storage, name, files))
        finally:
            if stack is not None:
                stack.stop()

    print()
    print(
        f"{'case':34} {'sent':>9} {'http':>4} {'post_s':>7} {'hz_n':>5} {'hz_p50':>7} {'hz_p90':>7} "
        f"{'hz_max':>7} {'hz<1s':>6} {'storage+':>10}"
    )
    for o in outcomes:
        lat = np.asarray(o.health_ms or [float("nan")])
        under = float(np.mean(lat < 1000)) if o.health_ms else float("nan")
        print(
            f"{o.name:34} {o.sent:>9} {o.status:>4} {o.post_s:>7.2f} {len(o.health_ms):>5} "
            f"{np.percentile(lat, 50):>6.0f}ms {np.percentile(lat, 90):>6.0f}ms {lat.max():>6.0f}ms "
            f"{under:>6.0%} {o.growth:>10}"
        )
    print()
    for o in outcomes:
        print(f"{o.name}: {o.summary}")
    worst_post = max(o.post_s for o in outcomes)
    worst_growth = max(o.growth for o in outcomes)
    fives = sum(o.status >= 500 for o in outcomes)
    print(f"hostile_max_post_s={worst_post:.2f} hostile_max_storage_growth={worst_growth} http_5xx={fives}")


if __name__ == "__main__":
    main()
