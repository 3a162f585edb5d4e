"""Model-only throughput: scans/s of the served model and of the ResNet50 architecture, per batch size.

    .venv/bin/python bench/model.py                 # default model + ResNet50 architecture (random weights)
    .venv/bin/python bench/model.py --model models/brainscan-compact/3 --batches 1,8,32,64

Prints a table and, last, one line ``model_vs_resnet50=R compact_sps=A resnet50_sps=B`` at batch 32,
after a line ``detector_cost=P% model_only_sps=A with_detector_sps=B``: the served model's ``predict``
against its ``judge`` (temperature, scope detector and flags on the same forward pass).
Also measures this machine's fp32 matmul peak and the GFLOP/s each model achieves against it.
Figures, never assertions: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def measure(predict, batch: np.ndarray, min_seconds: float) -> float:  # type: ignore[no-untyped-def]
    predict(batch)  # warm-up: graph tracing and allocation are not throughput
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_seconds or runs < 3:
        predict(batch)
        runs += 1
    return runs * len(batch) / elapsed


def measure_interleaved(first, second, batch: np.ndarray, min_seconds: float) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """scans/s of two callables, alternated call by call (medians), so a busy machine slows both alike."""
    first(batch), second(batch)  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    started = time.perf_counter()
    while time.perf_counter() - started < 2 * min_seconds or len(times[0]) < 5:
        for call, spent in ((first, times[0]), (second, times[1])):
            began = time.perf_counter()
            call(batch)
            spent.append(time.perf_counter() - began)
    return len(batch) / float(np.median(times[0])), len(batch) / float(np.median(times[1]))


def matmul_peak_gflops(n: int = 2048, seconds: float = 3.0) -> float:
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    matmul = tf.function(lambda: tf.matmul(a, b))
    matmul().numpy()
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        matmul().numpy()
        runs += 1
    return 2 * n**3 * runs / elapsed / 1e9


def forward_gflops(model_path: Path) -> float | None:
    """FLOPs of one forward pass, from TensorFlow's graph profiler (None if it cannot count them)."""
    try:
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        loaded = tf.saved_model.load(str(model_path))
        fn = loaded.signatures["serving_default"]
        frozen = convert_variables_to_constants_v2(fn)
        spec = frozen.inputs[0]
        shape = [1, *spec.shape[1:]]
        concrete = tf.function(lambda x: frozen(x)).get_concrete_function(tf.TensorSpec(shape, tf.float32))
        builder = tf.compat.v1.profiler.ProfileOptionBuilder
        opts = builder(builder.float_operation()).with_empty_output().build()
        info = tf.compat.v1.profiler.profile(graph=concrete.graph, options=opts)
        return info.total_float_ops / 1e9 if info.total_float_ops else None
    except Exception:  # profiler APIs move between TF versions; FLOPs are a nice-to-have here
        return None


def model_input(pixels: np.ndarray, scorer) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Random uint8-range pixels in the model's own input scale (its card's ``preprocessing``)."""
    from brainscan.imaging import normalize

    return np.asarray(normalize(pixels.astype(np.float32), scorer.card.preprocessing), dtype=np.float32)


def resnet50_architecture(folder: Path) -> Path:
    import keras

    from training.architectures import build_resnet50

    keras.utils.set_random_seed(0)
    model, _ = build_resnet50(weights=None)
    model.export(str(folder), format="tf_saved_model", verbose=False)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the served model)")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per cell")
    args = parser.parse_args()

    from brainscan.modelrepo import resolve_model
    from brainscan.runtime import load_scorer
    from brainscan.settings import get_settings

    settings = get_settings()
    served = resolve_model(args.model or settings.model_dir, "" if args.model else settings.model_name)
    batches = [int(b) for b in args.batches.split(",")]
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak on this machine: {peak:.0f} GFLOP/s")
    rows: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        candidates = {
            f"{served.card.name}/{served.card.version}": served.path,
            "resnet50-architecture": resnet50_architecture(Path(tmp) / "resnet50" / "1"),
        }
        for label, path in candidates.items():
            scorer = load_scorer(path)
            h, w = scorer.card.input_size
            rng = np.random.default_rng(0)
            flops = forward_gflops(path)
            rows[label] = {}
            for size in batches:
                batch = model_input(rng.uniform(0, 255, (size, h, w, scorer.card.channels)), scorer)
                rows[label][size] = sps = measure(scorer.predict, batch, args.seconds)
                achieved = (
                    f"  {sps * flops:.0f} GFLOP/s ({100 * sps * flops / peak:.0f}% of peak)" if flops else ""
                )
                print(f"{label:>28}  batch {size:>3}: {sps:8.1f} scans/s{achieved}", flush=True)
    model_label = next(iter(rows))
    at = 32 if 32 in batches else batches[-1]
    # Issue 11: what the scope detector, temperature and flag decision add to model-only scoring.
    scorer = load_scorer(served.path)
    h, w = scorer.card.input_size
    batch = model_input(np.random.default_rng(0).uniform(0, 255, (at, h, w, scorer.card.channels)), scorer)
    bare, judged = measure_interleaved(scorer.predict, scorer.judge, batch, args.seconds)
    print(
        f"detector_cost={100 * (bare - judged) / bare:.1f}% model_only_sps={bare:.1f} "
        f"with_detector_sps={judged:.1f} batch={at} detector={scorer.trust.detector is not None}"
    )
    ratio = rows[model_label][at] / rows["resnet50-architecture"][at]
    print(
        f"model_vs_resnet50={ratio:.2f} model_sps={rows[model_label][at]:.1f} "
        f"resnet50_sps={rows['resnet50-architecture'][at]:.1f} batch={at}"
    )


if __name__ == "__main__":
    main()
