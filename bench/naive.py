"""The original project's way to score: load the SavedModel as a Keras layer, one call per image.

    .venv/bin/python bench/naive.py                       # ResNet50 architecture, random weights
    .venv/bin/python bench/naive.py --model models/brainscan-compact/3 --scans 200
    .venv/bin/python bench/naive.py --quick               # a few scans, to see that it runs

Per scan: decode with PIL, resize, ``resnet50.preprocess_input``, a batch of one through
``keras.layers.TFSMLayer(path, call_endpoint="serve")``; timed from the bytes to the probabilities
(no HTTP, no queue, no database: the naive path's best case). The default model is the ResNet50
architecture (``training.architectures.build_resnet50(weights=None)``, exported to a temp folder),
so its cost is ``bench/model.py``'s ResNet50 row. Scans are real training scans when
``../shared/data/brain-tumor-mri/Training`` is present, else generated 512x512 JPEGs.
``bench/e2e.py`` imports ``naive_throughput`` and ``sample_scans`` for its ratio.

Last line: ``naive_sps=S scans=N``. A figure, never an assertion: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REAL_TRAINING = ROOT.parent / "shared" / "data" / "brain-tumor-mri" / "Training"


# ---- scans -----------------------------------------------------------------------------------
def generated_scan(seed: int, size: int = 512) -> bytes:
    """A 512x512 grey JPEG (a bright ellipse with texture), about the size of the dataset's scans."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = 0.5 + rng.uniform(-0.05, 0.05, 2)
    head = ((yy - cy) / 0.42) ** 2 + ((xx - cx) / 0.36) ** 2 <= 1
    texture = rng.normal(110, 35, (size // 8, size // 8)).clip(0, 255).astype(np.uint8)
    texture = np.asarray(Image.fromarray(texture).resize((size, size), Image.BILINEAR), dtype=np.float32)
    pixels = np.where(head, texture, rng.uniform(0, 8, (size, size))).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="JPEG", quality=90)
    return out.getvalue()


def sample_scans(count: int, seed: int = 0, data_dir: Path = REAL_TRAINING) -> list[tuple[str, bytes]]:
    """``count`` (name, bytes): real training scans drawn evenly across classes, else generated."""
    import random

    if data_dir.is_dir():
        files = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if files:
            chosen = random.Random(seed).sample(files, min(count, len(files)))
            while len(chosen) < count:  # more than the dataset holds: repeat it
                chosen.append(files[len(chosen) % len(files)])
            return [(f"{i:05d}_{p.name}", p.read_bytes()) for i, p in enumerate(chosen)]
    return [(f"{i:05d}_generated.jpg", generated_scan(seed * 1_000_003 + i)) for i in range(count)]


def scan_source(data_dir: Path = REAL_TRAINING) -> str:
    return f"real scans of {data_dir}" if data_dir.is_dir() else "generated 512x512 JPEGs"


# ---- the model -------------------------------------------------------------------------------
def resnet50_architecture(folder: Path) -> Path:
    """The original recipe's architecture with random weights, exported card-less (same cost)."""
    import keras

    from training.architectures import build_resnet50

    keras.utils.set_random_seed(0)
    model, _ = build_resnet50(weights=None)
    model.export(str(folder), format="tf_saved_model", verbose=False)
    return folder


def naive_throughput(model_path: Path, scans: list[bytes]) -> float:
    """Scans/s of the original path on ``scans``: PIL decode + resize + preprocess + one call each.

    The input size, channels and preprocessing come from the folder's card (a card-less folder is
    the original contract: 224x224 RGB, ``resnet50.preprocess_input``).
    """
    import keras
    from PIL import Image

    from brainscan.modelrepo import read_card

    card = read_card(Path(model_path))
    height, width = card.input_size
    mode = "RGB" if card.channels == 3 else "L"
    layer = keras.layers.TFSMLayer(str(model_path), call_endpoint="serve")

    def score_one(data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data)).convert(mode).resize((width, height))
        pixels = np.asarray(image, dtype=np.float32).reshape(1, height, width, card.channels)
        if card.preprocessing == "resnet50":
            pixels = keras.applications.resnet50.preprocess_input(pixels)
        outputs = layer(pixels)
        if isinstance(outputs, dict):
            outputs = outputs.get("output_0", next(iter(outputs.values())))
        return np.asarray(outputs)

    score_one(scans[0])  # warm-up: the first call traces; the original paid it once per process
    started = time.perf_counter()
    for data in scans:
        score_one(data)
    return len(scans) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="model folder (default: ResNet50 architecture)"
    )
    parser.add_argument("--scans", type=int, default=200, help="scans to score one by one")
    parser.add_argument("--quick", action="store_true", help="10 scans: proves it runs, measures nothing")
    args = parser.parse_args()
    count = 10 if args.quick else args.scans
    scans = [data for _, data in sample_scans(count)]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or resnet50_architecture(Path(tmp) / "resnet50" / "1")
        label = str(args.model) if args.model else "resnet50-architecture (random weights)"
        sps = naive_throughput(model, scans)
    print(f"naive path, {label}, {count} {scan_source()}: {sps:.1f} scans/s")
    print(f"naive_sps={sps:.2f} scans={count}")


if __name__ == "__main__":
    main()
