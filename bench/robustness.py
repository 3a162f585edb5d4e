"""Accuracy under intensity and geometric shifts, through the serving path (issue 12).

    .venv/bin/python bench/robustness.py --model models/brainscan-compact/3 \
        --data ../shared/data/brain-tumor-mri/Training [--shifts none,contrast=1.5,...] \
        [--json OUT.json] [--markdown OUT.md] [--format savedmodel|tflite|tflite-int8]

Scores the model's own leak-free validation split (``reports/split.json`` in the model folder, a list
of paths relative to ``--data``) - never a test split - once per named shift. Each scan is shifted
with PIL as decoded from its file, saved losslessly (PNG; ``jpeg=Q`` re-encodes as JPEG at quality
Q) and then goes through exactly what a worker does: ``brainscan.imaging.prepare`` with the card's
input spec, then ``brainscan.runtime.load_scorer(...).predict``.

Shifts (comma-separated): ``none``, ``contrast=F`` and ``brightness=F`` (``PIL.ImageEnhance``),
``gamma=G`` (255 (x/255)^G), ``window=W`` (black and white points moved inwards by W of the range,
then stretched back to 0-255; negative W widens the window), ``rotate=D`` (degrees), ``flip``
(horizontal), ``jpeg=Q``, ``noise=S`` (Gaussian, standard deviation S grey levels, seed 0).

Prints a table: accuracy, errors, tumour scans labelled notumor, notumor scans labelled a tumour,
glioma recall. Figures, never assertions.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from brainscan import CLASSES
from brainscan.imaging import prepare
from brainscan.runtime import load_scorer, predict_in_batches

DEFAULT_SHIFTS = (
    "none,contrast=1.5,contrast=0.7,brightness=0.7,brightness=1.3,gamma=0.7,gamma=1.4,"
    "window=0.1,window=-0.1,rotate=10,flip,jpeg=30,noise=8"
)
NOTUMOR = CLASSES.index("notumor")
GLIOMA = CLASSES.index("glioma")


def _lut(image: Image.Image, curve: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    """Apply an intensity curve (on 0-255 floats) to every band, clipped and rounded to 8 bits."""
    table = np.clip(np.round(curve(np.arange(256, dtype=np.float64))), 0, 255).astype(np.uint8)
    return image.point(table.tolist() * len(image.getbands()))


def shift_function(name: str) -> Callable[[Image.Image], Image.Image]:
    """The PIL transformation a shift name stands for; ValueError for an unknown one."""
    kind, _, value = name.partition("=")
    if kind == "none":
        return lambda image: image
    if kind == "flip":
        return ImageOps.mirror
    if not value:
        raise ValueError(f"shift {name!r} needs a value, e.g. {kind}=1.5")
    amount = float(value)
    if kind == "contrast":
        return lambda image: ImageEnhance.Contrast(image).enhance(amount)
    if kind == "brightness":
        return lambda image: ImageEnhance.Brightness(image).enhance(amount)
    if kind == "gamma":
        return lambda image: _lut(image, lambda x: 255.0 * (x / 255.0) ** amount)
    if kind == "window":
        black, white = 255.0 * amount, 255.0 * (1.0 - amount)
        return lambda image: _lut(image, lambda x: (x - black) * 255.0 / (white - black))
    if kind == "rotate":
        return lambda image: image.rotate(amount, resample=Image.Resampling.BILINEAR)
    if kind == "noise":

        def noisy(image: Image.Image) -> Image.Image:
            pixels = np.asarray(image, dtype=np.float32)
            noise = np.random.default_rng(0).normal(0.0, amount, pixels.shape)
            return Image.fromarray(np.clip(np.round(pixels + noise), 0, 255).astype(np.uint8), image.mode)

        return noisy
    if kind == "jpeg":
        return lambda image: image  # the re-encoding itself is the shift (see ``shifted_bytes``)
    raise ValueError(f"unknown shift {name!r}")


def shifted_bytes(data: bytes, name: str) -> bytes:
    """The scan's file after the shift, as the bytes a client would upload."""
    if name == "none":
        return data
    image = Image.open(io.BytesIO(data))
    image = ImageOps.exif_transpose(image) or image
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    image = shift_function(name)(image)
    out = io.BytesIO()
    if name.startswith("jpeg="):
        image.save(out, "JPEG", quality=int(float(name.split("=", 1)[1])))
    else:
        image.save(out, "PNG", compress_level=1)
    return out.getvalue()


def score_shift(scorer, files: list[bytes], labels: np.ndarray, name: str) -> dict:  # type: ignore[no-untyped-def]
    spec = scorer.card.input_spec
    inputs = np.stack([prepare(shifted_bytes(data, name), spec) for data in files])
    predicted = predict_in_batches(scorer, inputs).argmax(axis=1)
    tumour = labels != NOTUMOR
    gliomas = labels == GLIOMA
    return {
        "shift": name,
        "n": len(labels),
        "accuracy": float((predicted == labels).mean()),
        "errors": int((predicted != labels).sum()),
        "tumour_as_notumor": int((tumour & (predicted == NOTUMOR)).sum()),
        "notumor_as_tumour": int((~tumour & (predicted != NOTUMOR)).sum()),
        "glioma_recall": float((predicted[gliomas] == GLIOMA).mean()) if gliomas.any() else None,
    }


def validation_files(model: Path, data: Path) -> tuple[list[Path], np.ndarray]:
    """The model's leak-free validation scans (``reports/split.json``) under ``data``, with labels."""
    split = model / "reports" / "split.json"
    if not split.is_file():
        raise SystemExit(f"{split} not found: models are measured here on their own validation split")
    relative = json.loads(split.read_text())["validation"]
    paths = [data / p for p in relative]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} validation scans missing under {data}, e.g. {missing[0]}")
    labels = np.array([CLASSES.index(Path(p).parent.name) for p in relative], dtype=np.int64)
    return paths, labels


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| shift | accuracy | errors | tumour scans labelled notumor | notumor labelled tumour "
        "| glioma recall |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        recall = f"{row['glioma_recall']:.3f}" if row["glioma_recall"] is not None else "-"
        lines.append(
            f"| {row['shift']} | {100 * row['accuracy']:.2f}% | {row['errors']} | "
            f"{row['tumour_as_notumor']} | {row['notumor_as_tumour']} | {recall} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="model folder (models/NAME/VERSION)")
    parser.add_argument("--data", type=Path, required=True, help="the folder the model was trained on")
    parser.add_argument("--shifts", default=DEFAULT_SHIFTS)
    parser.add_argument("--format", default="savedmodel", help="savedmodel | tflite | tflite-int8")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    args = parser.parse_args(argv)

    names = [s.strip() for s in args.shifts.split(",") if s.strip()]
    for name in names:
        shift_function(name)  # refuse a typo before any scoring
    scorer = load_scorer(args.model, model_format=args.format)
    paths, labels = validation_files(args.model, args.data)
    files = [p.read_bytes() for p in paths]
    card = scorer.card
    print(
        f"{card.name}/{card.version} ({args.format}, preprocessing {card.preprocessing}, crop {card.crop}) "
        f"on {len(files)} leak-free validation scans of {args.data}",
        file=sys.stderr,
    )
    rows = []
    for name in names:
        rows.append(score_shift(scorer, files, labels, name))
        print(f"  {name}: {100 * rows[-1]['accuracy']:.2f}%", file=sys.stderr)
    table = markdown_table(rows)
    print(table, end="")
    if args.json:
        report = {"model": str(args.model), "format": args.format, "data": str(args.data), "rows": rows}
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
