"""End to end: a 1,000-scan archive through the HTTP API, against the model-only and naive figures.

    .venv/bin/python bench/e2e.py                              # own embedded stack, ResNet50 architecture
    .venv/bin/python bench/e2e.py --model models/brainscan-compact/3 --format savedmodel   # fp32
    .venv/bin/python bench/e2e.py --model models/brainscan-compact/3 --format tflite-int8  # its int8 file
    .venv/bin/python bench/e2e.py --format tflite-int8         # the int8 variant (exported here if missing)
    .venv/bin/python bench/e2e.py --workers 1                  # one worker with every core
    .venv/bin/python bench/e2e.py --workers 2 --tf-threads 1   # two processes with one core each
    .venv/bin/python bench/e2e.py --url http://127.0.0.1:8000 --key bs_... --model DIR
    .venv/bin/python bench/e2e.py --quick                      # tiny sizes: proves it runs

One run measures, on one machine:

1. model-only: ``brainscan.runtime.load_scorer`` on the same model and variant, in this process,
   at ``batch = settings.batch_size`` on the same scans already preprocessed, with the threads the
   stack's workers get in total (``tf_threads x workers``, or every core). This is the figure the
   ratio ``e2e_vs_model`` divides by. With several workers a second figure is printed beside it: the
   model alone in as many processes as workers, each with a worker's threads, side by side (what the
   same cores give the model in the stack's own layout; ``e2e_vs_model_processes``);
2. naive: ``bench/naive.py``'s ``naive_throughput`` (the original project's one ``TFSMLayer`` call per
   image) on a subset of the same scans; always the SavedModel, whatever ``--format`` serves;
3. the stack (embedded in a temp folder via ``brainscan_cli.embedded``, or ``--url``): phase A posts the
   archive and waits for every result; wall time runs from the start of the upload to the last
   item's ``finished_at``, so upload, intake, queue, decode, scoring and the database all count.
   Phase B posts the archive again and, while it is scored, single-scan jobs at ``--single-rate``
   per second; a single's time-to-result is its item's ``finished_at`` (stamped by the worker in
   the transaction that makes it final) minus the moment its POST started. Polling only tells when
   to stop, so the probe does not load the API (server and client must share a clock: same machine).
   Phase A runs ``--repeat`` times (default 3), each after a model-only run of its own with the
   stack idle; the medians are reported, since runs on a shared machine vary by about 15%;
4. where the median phase A's time went: upload, intake, first/last result, queue wait and decode
   from the items' timings; decode wait, model and database per scan from the worker's
   ``batch_scored`` log lines; CPU seconds of each stack process and of this client (``psutil``).

Per-stage costs on their own, and the ceiling they put on ``e2e_vs_model``: ``bench/stages.py``.

The stack is laid out as ``brainscan up`` lays it out: one worker per core (up to four), each with
an equal share of the cores (``brainscan_cli.embedded.default_workers`` / ``worker_threads``);
``--workers`` and ``--tf-threads`` change it.

Without ``--format`` the stack and the model-only figure serve what the workers' rule picks
(``brainscan/variants.py``: int8 where the CPU has VNNI/AMX and the card shows it within 0.3 points).

With no arguments it starts its own stack serving the ResNet50 architecture (random weights: the
cost is the trained model's) for both the end-to-end and the model-side figures. Goals (issue 4):
e2e_vs_model >= 0.9, e2e_vs_naive >= 1.3 (>= 3.5 with the int8 variant), p99_single_ms <=
max_batch_wait_ms + 3 batch times. The last line is always
``e2e_vs_model=R1 e2e_vs_naive=R2 p99_single_ms=T``. Figures, never assertions: run on an idle machine.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import threading
import time
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # naive.py, model.py
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from naive import naive_throughput, resnet50_architecture, sample_scans, scan_source  # noqa: E402


def log(message: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (figures are named with it), or "unknown CPU"."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    return next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU"
    )


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# ---- the model ---------------------------------------------------------------------------------
def representative_dir(folder: Path, per_class: int = 25) -> Path:
    """Class folders for int8 calibration: the real training scans when present, else generated ones."""
    from naive import REAL_TRAINING, generated_scan

    from brainscan import CLASSES

    if REAL_TRAINING.is_dir():
        return REAL_TRAINING
    for label, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (folder / name / f"{i}.jpg").write_bytes(generated_scan(10_000 * (label + 1) + i))
    return folder


def prepare_model(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """The model folder to serve, and its label; exports the asked TFLite variant of our own model."""
    if args.model:
        return args.model.resolve(), str(args.model)
    log("exporting the ResNet50 architecture (random weights) ...")
    path = resnet50_architecture(tmp / "models" / "resnet50-architecture" / "1")
    if args.format in ("tflite", "tflite-int8"):
        from training.export import export_variants

        log(f"converting it to {args.format} (int8 calibrates on {args.calibration} scans) ...")
        export_variants(
            path,
            tflite=args.format == "tflite",
            int8=args.format == "tflite-int8",
            representative_dir=representative_dir(tmp / "calibration")
            if args.format == "tflite-int8"
            else None,
            samples=args.calibration,
            compare_on=4,
        )
    return path, "resnet50-architecture (random weights)"


def model_only_sps(
    path: Path,
    model_format: str,
    threads: int,
    batch_size: int,
    scans: list[bytes],
    seconds: float,
    start: Any = None,
) -> tuple[float, str]:
    """(scans/s, variant) of the served variant alone (the workers' rule picks it when ``model_format``
    is empty), at the workers' batch size, on real preprocessed input. ``start`` (a barrier) is
    waited for after loading, so that processes measuring side by side measure at the same time."""
    from model import measure

    from brainscan.imaging import prepare
    from brainscan.runtime import load_scorer
    from worker.engine import configure_tensorflow

    configure_tensorflow(threads)
    scorer = load_scorer(path, model_format=model_format, num_threads=threads)
    inputs = np.stack([prepare(data, scorer.card.input_spec) for data in scans[:batch_size]])
    while len(inputs) < batch_size:  # fewer scans than a batch (--quick): repeat them
        inputs = np.concatenate([inputs, inputs])[:batch_size]
    scorer.predict(inputs)  # warm-up before the others are waited for
    if start is not None:
        start.wait()
    return measure(scorer.predict, inputs, seconds), scorer.variant


def model_only_processes_sps(
    path: Path,
    model_format: str,
    workers: int,
    threads: int,
    batch_size: int,
    scans: list[bytes],
    seconds: float,
) -> float:
    """scans/s of the model alone in ``workers`` processes of ``threads`` threads each, measured side by
    side (summed): what the stack's own layout of the cores gives the model with nothing else to do."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # a fresh TensorFlow per process, as in a worker
    with context.Manager() as manager, ProcessPoolExecutor(workers, mp_context=context) as pool:
        start = manager.Barrier(workers)
        futures = [
            pool.submit(model_only_sps, path, model_format, threads, batch_size, scans, seconds, start)
            for _ in range(workers)
        ]
        return sum(future.result()[0] for future in futures)


# ---- the stack ---------------------------------------------------------------------------------
def start_embedded(var_dir: Path, model_path: Path, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from brainscan.settings import Settings, get_settings
    from brainscan_cli.embedded import free_port, start_stack, wait_for_workers

    for key in [k for k in os.environ if k.startswith("BRAINSCAN_")]:
        del os.environ[key]  # the embedded defaults, whatever the caller's shell holds
    os.environ.update(
        BRAINSCAN_VAR_DIR=str(var_dir),
        BRAINSCAN_MODEL_DIR=str(model_path),  # a model folder: resolve_model serves it as is
        BRAINSCAN_PORT=str(free_port()),
        BRAINSCAN_BATCH_SIZE=str(args.batch_size),
        BRAINSCAN_TF_THREADS=str(args.tf_threads),
        BRAINSCAN_MODEL_FORMAT=args.format,
        # INFO: the worker's one line per model batch (decode wait, model, write times) feeds the
        # stage breakdown; it goes to the stack's log files, not to this console.
        BRAINSCAN_LOG_LEVEL="INFO",
    )
    if args.max_batch_wait_ms is not None:
        os.environ["BRAINSCAN_MAX_BATCH_WAIT_MS"] = str(args.max_batch_wait_ms)
    get_settings.cache_clear()
    stack = start_stack(Settings(), workers=args.workers, echo=log)
    log(f"waiting for {args.workers} worker(s) to load the model ...")
    try:
        wait_for_workers(stack, args.workers, timeout_s=600)
    except BaseException:
        for path in sorted((var_dir / "logs").glob("worker-*.log")):  # the temp folder goes with us
            log(f"{path.name}:\n{path.read_text(errors='replace')[-3000:]}")
        stack.stop()
        raise
    return stack


class Api:
    def __init__(self, url: str, key: str) -> None:
        import httpx

        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)

    def submit(self, files: list[tuple[str, bytes, str]]) -> tuple[str, float]:
        """POST one job; (job id, wall-clock time the upload started)."""
        started = time.time()
        response = self.client.post("/v1/jobs", files=[("files", f) for f in files])
        if response.status_code != 202:
            raise RuntimeError(f"POST /v1/jobs: {response.status_code} {response.text[:300]}")
        return str(response.json()["id"]), started

    def job(self, job_id: str, items: int = 0) -> dict:
        response = self.client.get(f"/v1/jobs/{job_id}", params={"limit": items})
        response.raise_for_status()
        return response.json()

    def wait(self, job_id: str, timeout_s: float, every_s: float = 0.5, items: int = 0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id, items)
            if job["finished"]:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} unfinished after {timeout_s:.0f}s: {job['pending']} pending"
                )
            time.sleep(every_s)


def stamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def archive(scans: list[tuple[str, bytes]], prefix: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:  # JPEGs do not deflate
        for name, data in scans:
            zf.writestr(f"{prefix}/{name}", data)
    return out.getvalue()


def run_archive(api: Api, data: bytes, name: str, timeout_s: float) -> tuple[float, float, float, dict]:
    """(wall seconds from upload start to the last result, seconds the POST took, start, job)."""
    job_id, started = api.submit([(name, data, "application/zip")])
    posted = time.time() - started
    job = api.wait(job_id, timeout_s)
    return stamp(job["finished_at"]) - started, posted, started, job


# ---- where the time goes ------------------------------------------------------------------------
class CpuMeter:
    """CPU seconds (user + system) of the stack's processes and of this client, between two reads."""

    def __init__(self, stack) -> None:  # type: ignore[no-untyped-def]
        import psutil

        self.processes = {"client": psutil.Process()}
        for child in stack.children if stack is not None else []:
            self.processes[child.name] = psutil.Process(child.process.pid)
        self.start = self.read()

    def read(self) -> dict[str, float]:
        import psutil

        used = {}
        for name, process in self.processes.items():
            try:
                # The stack's processes with their own children; the client alone (the stack's
                # processes are its children too).
                tree = [process] if name == "client" else [process, *process.children(recursive=True)]
                used[name] = sum(sum(p.cpu_times()[:2]) for p in tree)
            except psutil.Error:
                used[name] = float("nan")
        return used

    def since_start(self) -> dict[str, float]:
        end = self.read()
        return {name: end[name] - self.start[name] for name in end}


def job_items(api: Api, job_id: str, total: int) -> list[dict]:
    items: list[dict] = []
    while len(items) < total:
        page = api.client.get(f"/v1/jobs/{job_id}", params={"offset": len(items), "limit": 1000})
        page.raise_for_status()
        batch = page.json()["items"]
        if not batch:
            break
        items.extend(batch)
    return items


def worker_batches(var_dir: Path, job_id: str) -> list[dict]:
    """The workers' ``batch_scored`` log lines (JSON) of one job's batches."""
    import json

    lines = []
    for path in sorted((var_dir / "logs").glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if '"batch_scored"' not in line or job_id not in line:
                continue
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def stage_report(
    started: float, posted: float, job: dict, items: list[dict], batches: list[dict], cpu: dict[str, float]
) -> list[str]:
    """Where one archive's time went: wall-clock stages from the items' timings, per-scan worker
    stages from the batch log lines, CPU seconds per process."""
    created = stamp(job["created_at"]) - started
    stored = [stamp(i["timings"]["created_at"]) - started for i in items]
    enqueued = [stamp(i["timings"]["enqueued_at"]) - started for i in items if i["timings"]["enqueued_at"]]
    began = [stamp(i["timings"]["started_at"]) for i in items if i["timings"]["started_at"]]
    finished = [stamp(i["timings"]["finished_at"]) - started for i in items if i["timings"]["finished_at"]]
    waits = [
        (stamp(i["timings"]["started_at"]) - stamp(i["timings"]["enqueued_at"])) * 1000.0
        for i in items
        if i["timings"]["started_at"] and i["timings"]["enqueued_at"]
    ]
    decode = [i["timings"]["preprocess_ms"] for i in items if i["timings"]["preprocess_ms"] is not None]
    n = max(len(items), 1)
    lines = [
        f"upload        {created:6.2f} s  POST start -> job created (body spooled, first chunk stored)",
        f"intake        {max(stored) - created if stored else 0.0:6.2f} s  job created -> last chunk "
        f"committed; POST answered at {posted:.2f} s",
        f"first result  {min(finished) if finished else float('nan'):6.2f} s  after the POST started "
        f"(first item enqueued at {min(enqueued) if enqueued else float('nan'):.2f} s)",
        f"last result   {max(finished) if finished else float('nan'):6.2f} s",
        f"queue wait    p50 {percentile(waits, 50):7.0f} ms  p90 {percentile(waits, 90):7.0f} ms "
        "(enqueued -> claimed by a worker)",
        f"decode        {np.mean(decode) if decode else float('nan'):7.2f} ms/scan on a decode thread "
        "(read + decode + preprocess; overlaps the model)",
    ]
    if began:
        last = max(stamp(i["timings"]["finished_at"]) for i in items if i["timings"]["finished_at"])
        lines.append(f"worker busy   {last - min(began):6.2f} s  first claim -> last result")
    if batches:
        for key, label in (
            ("decode_wait_ms", "decode wait"),
            ("inference_ms", "model"),
            ("write_ms", "database"),
        ):
            total_ms = sum(float(b.get(key, 0.0)) for b in batches)
            spent = f"{total_ms / 1000:.2f} s in {len(batches)} batches"
            lines.append(f"{label:<13} {total_ms / n:7.2f} ms/scan  ({spent})")
    used = ", ".join(f"{name} {seconds:.2f}" for name, seconds in sorted(cpu.items()))
    lines.append(f"cpu seconds   {used}; total {sum(v for v in cpu.values() if v == v):.2f}")
    per_scan = ", ".join(f"{name} {1000 * seconds / n:.2f}" for name, seconds in sorted(cpu.items()))
    lines.append(f"cpu ms/scan   {per_scan}")
    return lines


def single_scan_latencies(
    api: Api, big: str, singles: list[bytes], rate: float, timeout_s: float
) -> tuple[list[float], dict[str, list[float]]]:
    """Post single-scan jobs at ``rate``/s while job ``big`` runs; their times to result in ms, and
    where that time went (ms per single: POST start -> enqueued, enqueued -> claimed by a worker,
    claimed -> final)."""
    sent: list[tuple[str, float]] = []
    stop = threading.Event()

    def probe() -> None:
        next_at = time.monotonic()
        index = 0
        while not stop.is_set():
            sent.append(api.submit([(f"single_{index}.jpg", singles[index % len(singles)], "image/jpeg")]))
            index += 1
            next_at += 1.0 / rate
            stop.wait(max(0.0, next_at - time.monotonic()))

    thread = threading.Thread(target=probe, name="single-probe", daemon=True)
    thread.start()
    try:
        api.wait(big, timeout_s)
    finally:
        stop.set()
        thread.join()
    latencies = []
    parts: dict[str, list[float]] = {"posted": [], "queued": [], "scored": []}
    for job_id, started in sent:
        job = api.wait(job_id, timeout_s, every_s=0.2, items=1)
        (item,) = job["items"]
        if item["status"] != "succeeded":
            continue
        times = item["timings"]
        enqueued, claimed, finished = (stamp(times[k]) for k in ("enqueued_at", "started_at", "finished_at"))
        latencies.append((finished - started) * 1000.0)
        parts["posted"].append((enqueued - started) * 1000.0)
        parts["queued"].append((claimed - enqueued) * 1000.0)
        parts["scored"].append((finished - claimed) * 1000.0)
    return latencies, parts


# ---- main ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="", help="an API already running (default: own embedded stack)")
    parser.add_argument("--key", default=os.environ.get("BRAINSCAN_API_KEY", ""), help="API key for --url")
    parser.add_argument(
        "--model", type=Path, default=None, help="model folder (default: ResNet50 architecture)"
    )
    parser.add_argument("--format", default="", choices=["", "savedmodel", "tflite", "tflite-int8"])
    parser.add_argument("--scans", type=int, default=1000, help="scans in the archive")
    parser.add_argument("--naive-scans", type=int, default=100, help="scans for the naive figure")
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: as brainscan up, one per core)"
    )
    parser.add_argument("--tf-threads", type=int, default=None, help="per worker (default cores / workers)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: settings.batch_size")
    parser.add_argument("--max-batch-wait-ms", type=int, default=None)
    parser.add_argument("--single-rate", type=float, default=2.0, help="single-scan jobs per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="model-only measuring time")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="phase A runs, each after its own model-only run; the medians are reported (runs on a "
        "shared machine vary by +-15%%)",
    )
    parser.add_argument("--calibration", type=int, default=200, help="int8 calibration scans")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves it runs, measures nothing")
    args = parser.parse_args()
    if args.quick:
        args.scans, args.naive_scans, args.seconds, args.calibration, args.repeat = 24, 4, 1.0, 8, 2
    if args.url and not args.key:
        parser.error("--url needs --key (or BRAINSCAN_API_KEY)")

    from brainscan.settings import get_settings
    from brainscan_cli.embedded import default_workers, worker_threads

    settings = get_settings()
    cores = os.cpu_count() or 1
    if args.workers is None:
        args.workers = default_workers()
    if args.tf_threads is None:
        args.tf_threads = worker_threads(0, args.workers)
    if args.batch_size is None:
        args.batch_size = settings.batch_size
    max_wait_ms = args.max_batch_wait_ms if args.max_batch_wait_ms is not None else settings.max_batch_wait_ms
    model_threads = args.tf_threads * args.workers if args.tf_threads else 0

    scans = sample_scans(args.scans)
    with tempfile.TemporaryDirectory(prefix="brainscan-e2e-") as tmp:
        model_path, label = prepare_model(args, Path(tmp))
        log(f"model: {label} ({args.format or 'variant by the serving rule'}), batch {args.batch_size}")
        log(f"scans: {len(scans)} {scan_source()}")

        # Model-side figures first, while the machine is quiet.
        model_sps, variant = model_only_sps(
            model_path, args.format, model_threads, args.batch_size, [d for _, d in scans], args.seconds
        )
        log(
            f"model-only: {model_sps:.1f} scans/s at batch {args.batch_size} "
            f"({model_threads or 'all'} threads, variant {variant})"
        )
        model_runs = [model_sps]
        processes_sps = None
        if args.workers > 1:
            processes_sps = model_only_processes_sps(
                model_path,
                args.format,
                args.workers,
                args.tf_threads,
                args.batch_size,
                [d for _, d in scans[: args.batch_size]],
                args.seconds,
            )
            layout = f"{args.workers} processes x {args.tf_threads} thread(s)"
            log(f"model-only in {layout}: {processes_sps:.1f} scans/s")
        naive_subset = [d for _, d in scans[: args.naive_scans]]
        naive_sps = naive_throughput(model_path, naive_subset)
        log(f"naive: {naive_sps:.1f} scans/s ({len(naive_subset)} scans, one TFSMLayer call each)")

        stack = None
        try:
            if args.url:
                url, key = args.url, args.key
                if not args.model:
                    log(
                        "warning: --url without --model: model-side figures are for the ResNet50 architecture"
                    )
            else:
                stack = start_embedded(Path(tmp) / "var", model_path, args)
                url, key = stack.url, stack.key
            api = Api(url, key)
            runs: list[tuple[float, list[str]]] = []
            for run in range(1, args.repeat + 1):
                if run > 1:  # the model alone again, with the stack idle: both figures drift alike
                    again, _ = model_only_sps(
                        model_path,
                        args.format,
                        model_threads,
                        args.batch_size,
                        [d for _, d in scans],
                        args.seconds,
                    )
                    model_runs.append(again)
                    log(f"model-only: {again:.1f} scans/s (run {run})")
                data = archive(scans, f"a{run}")
                log(
                    f"phase A, run {run}/{args.repeat}: one archive of {len(scans)} scans "
                    f"({len(data) / 1e6:.1f} MB), nothing else"
                )
                cpu = CpuMeter(stack)
                wall, posted, started, job = run_archive(api, data, f"archive-a{run}.zip", args.timeout)
                cpu_used = cpu.since_start()
                log(
                    f"phase A: {job['done']} scored, {job['failed']} failed in {wall:.1f}s "
                    f"(upload + intake {posted:.1f}s): {job['total'] / wall:.1f} scans/s end to end"
                )
                batches = worker_batches(Path(tmp) / "var", job["id"]) if stack is not None else []
                stages = stage_report(
                    started, posted, job, job_items(api, job["id"], job["total"]), batches, cpu_used
                )
                runs.append((job["total"] / wall, stages))
            # The median run (the upper one of an even count) and its breakdown; the model-only run likewise.
            e2e_sps, stages = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            model_sps = sorted(model_runs)[len(model_runs) // 2]
            log(f"phase B: the archive again, with single-scan jobs at {args.single_rate}/s while it runs")
            big, _ = api.submit([("archive-b.zip", archive(scans, "b"), "application/zip")])
            singles = [d for _, d in scans[: min(len(scans), 50)]]
            latencies, single_parts = single_scan_latencies(api, big, singles, args.single_rate, args.timeout)
        finally:
            if stack is not None:
                stack.stop()

    batch_ms = 1000.0 * args.batch_size / model_sps
    goal_ms = max_wait_ms + 3 * batch_ms
    p50, p95, p99 = (percentile(latencies, q) for q in (50, 95, 99))
    print()
    print(f"machine       {cores} cores, {cpu_name()}; model {label}")
    print(f"variant       {variant} ({'--format ' + args.format if args.format else 'the serving rule'})")
    print(
        f"stack         {'embedded' if not args.url else args.url}, {args.workers} worker(s), "
        f"tf_threads {args.tf_threads or 'all'}, batch {args.batch_size}, max_batch_wait {max_wait_ms} ms"
    )
    print(f"model-only    {model_sps:8.1f} scans/s (batch {args.batch_size}, one batch = {batch_ms:.0f} ms)")
    if processes_sps is not None:
        print(
            f"model-only    {processes_sps:8.1f} scans/s in {args.workers} processes x {args.tf_threads} "
            "thread(s), side by side (the stack's layout)"
        )
    print(f"naive         {naive_sps:8.1f} scans/s")
    if args.repeat > 1:
        print(f"model-only    runs {', '.join(f'{r:.1f}' for r in model_runs)} (median above)")
    print(f"end to end    {e2e_sps:8.1f} scans/s ({len(scans)} scans; median of {args.repeat} run(s))")
    if args.repeat > 1:
        print(f"end to end    runs {', '.join(f'{r:.1f}' for r, _ in runs)}")
    print(
        f"single scan   n={len(latencies)} p50={p50:.0f} ms p95={p95:.0f} ms p99={p99:.0f} ms "
        f"(goal <= {max_wait_ms} + 3 x {batch_ms:.0f} = {goal_ms:.0f} ms)"
    )
    spent = ", ".join(
        f"{label} p50 {percentile(single_parts[key], 50):.0f} / p99 {percentile(single_parts[key], 99):.0f}"
        for key, label in (("posted", "POST -> enqueued"), ("queued", "-> claimed"), ("scored", "-> final"))
    )
    print(f"single scan   {spent} ms")
    print("where phase A's time went (the median run: one archive, nothing else):")
    for line in stages:
        print(f"  {line}")
    r1, r2 = e2e_sps / model_sps, e2e_sps / naive_sps
    if processes_sps is not None:
        print(f"e2e_vs_model_processes={e2e_sps / processes_sps:.3f}")
    print(f"e2e_vs_model={r1:.3f} e2e_vs_naive={r2:.3f} p99_single_ms={p99:.0f}")


if __name__ == "__main__":
    main()
