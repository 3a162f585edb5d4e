"""What each stage of the stack costs per scan, one at a time, and the end-to-end ceiling that implies.

    .venv/bin/python bench/stages.py --model models/brainscan-compact/3 --format savedmodel
    .venv/bin/python bench/stages.py --model models/brainscan-compact/3 --format tflite-int8
    .venv/bin/python bench/stages.py --quick                   # tiny sizes: proves it runs

``bench/e2e.py`` measures the stack as a whole; this measures its parts alone, with nothing else
running, as CPU time of the process doing the work (user + system):

1. model: the variant alone on one thread at the workers' batch size (CPU per scan), and with every
   core in one process (scans/s: the model-only figure ``bench/e2e.py`` divides by);
2. decode: what a worker's decode thread does for each scan, its bytes already in memory
   (``brainscan.imaging.prepare_and_view`` and the model's input check);
3. intake: ``brainscan.intake.submit_job`` of one zip of the scans into a fresh SQLite database and
   scan store (the API's work after the upload is spooled; the HTTP request and the multipart parsing
   are not counted, nor is the queue: enqueueing is a no-op);
4. bookkeeping: the worker's ``claim`` and ``finalize`` of every item in batches, on the same SQLite
   database (no Celery message handling counted).

Each is a lower bound on what the stage costs in the stack, so the ceiling is an upper bound:
``cores x 1000 / (model + decode + intake + bookkeeping)`` scans/s is the most the stack could score
here with every core busy all the time on these stages alone, and ``ceiling_e2e_vs_model`` is that
over the model-only figure. The last line is always ``ceiling_e2e_vs_model=R model_ms=M overhead_ms=O``.
Figures, never assertions: run on an idle machine.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # naive.py, model.py, e2e.py
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as in every service process (brainscan_cli)

from e2e import cpu_name, model_only_sps  # noqa: E402
from naive import sample_scans, scan_source  # noqa: E402


def in_fresh_process(function, *args):  # type: ignore[no-untyped-def]
    """``function(*args)`` in a new interpreter: TensorFlow's threads are fixed at its first use."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def decode_cpu_ms(model: Path, model_format: str, scans: list[bytes]) -> tuple[float, dict[str, float]]:
    """CPU ms per scan of a worker's decode thread: the serving preprocessing and the input check,
    over all scans, and by kind of file (mode, and whether its short side is >= 512)."""
    from PIL import Image

    from brainscan.imaging import prepare_and_view
    from brainscan.runtime import load_scorer

    scorer = load_scorer(model, model_format=model_format, num_threads=1)
    spec = scorer.card.input_spec
    kinds: dict[str, list[float]] = {}
    for data in scans:
        image = Image.open(io.BytesIO(data))
        kind = f"{image.format} {image.mode} {'>=512' if min(image.size) >= 512 else '<512'}"
        started = time.process_time()
        _, decoded = prepare_and_view(data, spec)
        scorer.trust.check(data, decoded)
        kinds.setdefault(kind, []).append(time.process_time() - started)
    every = [t for times in kinds.values() for t in times]
    by_kind = {f"{kind} ({len(t)})": 1000.0 * float(np.mean(t)) for kind, t in sorted(kinds.items())}
    return 1000.0 * float(np.mean(every)), by_kind


def intake_and_bookkeeping_cpu_ms(scans: list[bytes], batch_size: int, work: Path) -> tuple[float, float]:
    """CPU ms per scan of the API's intake (``submit_job``) and of the worker's claim + finalize."""
    os.environ.update(
        BRAINSCAN_VAR_DIR=str(work / "var"), BRAINSCAN_DATABASE_URL=f"sqlite:///{work / 'brainscan.db'}"
    )
    from sqlalchemy import select

    from brainscan.db import Item, session_scope
    from brainscan.intake import IntakeLimits, submit_job
    from brainscan.migrate import upgrade
    from brainscan.settings import get_settings
    from brainscan.storage import ScanStore
    from brainscan.trust import Verdict
    from worker.tasks import Outcome, claim, finalize

    get_settings.cache_clear()
    settings = get_settings()
    upgrade(settings.resolved_database_url)
    store = ScanStore(settings.resolved_storage_dir)
    verdict = Verdict(np.array([0.9, 0.05, 0.03, 0.02], np.float32), "glioma", 0.9, None, None, None, 0.4)

    def submit(name: str, files: list[bytes]) -> list[int]:
        archive = work / name
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:  # JPEGs do not deflate
            for index, data in enumerate(files):
                zf.writestr(f"a/scan_{index:05d}.jpg", data)
        with session_scope() as session:
            job_id = submit_job(
                session,
                store,
                IntakeLimits.from_settings(settings),
                None,
                [(archive, name)],
                enqueue=lambda _job_id: True,
                notify=lambda _job_ids: None,
            ).job.id
        with session_scope() as session:
            return list(session.scalars(select(Item.id).where(Item.job_id == job_id).order_by(Item.position)))

    def score(ids: list[int]) -> None:
        for first in range(0, len(ids), batch_size):
            claimed = claim(ids[first : first + batch_size], "bench-stages")
            outcomes = [Outcome(c.id, c.job_id, "succeeded", verdict, preprocess_ms=1.0) for c in claimed]
            finalize(outcomes, "bench", "1")

    # A small job first: what the first call of each path imports and compiles is not per scan.
    score(submit("warm-up.zip", scans[:16]))
    started = time.process_time()
    ids = submit("archive.zip", scans)
    intake_ms = 1000.0 * (time.process_time() - started) / len(scans)
    started = time.process_time()
    score(ids)
    bookkeeping_ms = 1000.0 * (time.process_time() - started) / len(ids)
    return intake_ms, bookkeeping_ms


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "brainscan-compact" / "3")
    parser.add_argument("--format", default="savedmodel", choices=["savedmodel", "tflite", "tflite-int8"])
    parser.add_argument("--scans", type=int, default=500, help="scans for the decode, intake and bookkeeping")
    parser.add_argument("--seconds", type=float, default=10.0, help="model measuring time, each")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves it runs, measures nothing")
    args = parser.parse_args()
    if args.quick:
        args.scans, args.seconds = 40, 1.0

    from brainscan.settings import get_settings

    batch_size = get_settings().batch_size
    cores = os.cpu_count() or 1
    scans = [data for _, data in sample_scans(args.scans)]
    model = args.model.resolve()
    print(f"[stages] {len(scans)} scans {scan_source()}; model {model} ({args.format}), batch {batch_size}")
    one_thread, variant = in_fresh_process(
        model_only_sps, model, args.format, 1, batch_size, scans[:batch_size], args.seconds
    )
    every_core, _ = in_fresh_process(
        model_only_sps, model, args.format, 0, batch_size, scans[:batch_size], args.seconds
    )
    model_ms = 1000.0 / one_thread
    decode_ms, by_kind = in_fresh_process(decode_cpu_ms, model, args.format, scans)
    with tempfile.TemporaryDirectory(prefix="brainscan-stages-") as tmp:
        intake_ms, bookkeeping_ms = in_fresh_process(
            intake_and_bookkeeping_cpu_ms, scans, batch_size, Path(tmp)
        )
    overhead_ms = decode_ms + intake_ms + bookkeeping_ms
    ceiling = cores * 1000.0 / (model_ms + overhead_ms)

    print()
    print(f"machine       {cores} cores, {cpu_name()}")
    print(f"variant       {variant}, batch {batch_size}")
    print(
        f"model-only    {every_core:8.1f} scans/s, every core in one process (what e2e_vs_model divides by)"
    )
    print(f"model         {model_ms:8.2f} ms CPU/scan on one thread ({one_thread:.1f} scans/s)")
    print(f"decode        {decode_ms:8.2f} ms CPU/scan (preprocessing + input check), by kind of file:")
    for kind, ms in by_kind.items():
        print(f"                {ms:6.2f} ms  {kind}")
    print(f"intake        {intake_ms:8.2f} ms CPU/scan (submit_job of one zip; no HTTP, no queue)")
    print(
        f"bookkeeping   {bookkeeping_ms:8.2f} ms CPU/scan "
        f"(claim + finalize in batches of {batch_size}; no Celery)"
    )
    print(
        f"ceiling       {ceiling:8.1f} scans/s = {cores} cores x 1000 / "
        f"({model_ms:.2f} + {overhead_ms:.2f}) ms"
    )
    share = model_ms / (model_ms + overhead_ms)
    print(f"model's share of the CPU at best: {share:.3f}")
    print(
        f"ceiling_e2e_vs_model={ceiling / every_core:.3f} "
        f"model_ms={model_ms:.2f} overhead_ms={overhead_ms:.2f}"
    )


if __name__ == "__main__":
    main()
