"""The training data: scan a ``<root>/<class>/<file>`` folder, decode once, split without leaks.

Every image is decoded with ``brainscan.imaging.load_pixels`` — the very function the workers use —
at the model's input spec, and the uint8 result is cached in one ``.npz`` per (folder, spec), so later
epochs and later runs skip JPEG decoding entirely. The cache also keeps each image's SHA-256 and
difference hash, which the leak-free split needs. Augmentation then runs on those pixels in ``tf.data``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainscan import CLASSES
from brainscan.imaging import InputSpec, load_pixels
from training.audit import duplicate_groups, group_split, hash_bytes, list_images


@dataclass
class ScanSet:
    """Decoded images of one folder at one input spec."""

    pixels: np.ndarray  # uint8 (n, h, w, c)
    labels: np.ndarray  # int (n,), index into CLASSES
    paths: list[str]  # relative to the data root
    sha256: list[str]
    dhash: list[str]
    fingerprint: str  # identifies the folder's content (file list + hashes)

    def subset(self, mask: np.ndarray) -> ScanSet:
        idx = np.flatnonzero(mask)
        return ScanSet(
            self.pixels[idx],
            self.labels[idx],
            [self.paths[i] for i in idx],
            [self.sha256[i] for i in idx],
            [self.dhash[i] for i in idx],
            self.fingerprint,
        )


def _decode_one(args: tuple[str, InputSpec]) -> tuple[np.ndarray, str, str]:
    path, spec = args
    data = Path(path).read_bytes()
    sha256, dhash = hash_bytes(data)
    return load_pixels(data, spec), sha256, dhash


def _folder_listing(root: Path) -> tuple[list[tuple[Path, str]], str]:
    images = [(p, c) for p, c in list_images(root) if c in CLASSES]
    unknown = sorted({c for _, c in list_images(root)} - set(CLASSES))
    if unknown:
        raise ValueError(f"{root}: class folders {unknown} are not among {list(CLASSES)}")
    if not images:
        raise ValueError(f"{root}: no JPEG/PNG images under {root}/<class>/ for classes {list(CLASSES)}")
    listing = hashlib.sha256()
    for path, label in images:
        stat = path.stat()
        listing.update(f"{path.relative_to(root)}\0{label}\0{stat.st_size}\0{int(stat.st_mtime)}\n".encode())
    return images, listing.hexdigest()[:16]


def load_scanset(root: Path, spec: InputSpec, cache_dir: Path | None, workers: int | None = None) -> ScanSet:
    """Decode every image of ``root`` at ``spec`` (cached), with progress on stderr."""
    root = Path(root)
    images, listing_id = _folder_listing(root)
    key = f"{listing_id}-{spec.height}x{spec.width}x{spec.channels}-{spec.crop}"
    cache_file = cache_dir / f"scans-{key}.npz" if cache_dir else None
    if cache_file and cache_file.exists():
        with np.load(cache_file, allow_pickle=False) as cached:
            meta = json.loads(str(cached["meta"]))
            return ScanSet(
                cached["pixels"],
                cached["labels"],
                meta["paths"],
                meta["sha256"],
                meta["dhash"],
                meta["fingerprint"],
            )

    from rich.progress import track

    workers = workers or os.cpu_count() or 1
    jobs = [(str(p), spec) for p, _ in images]
    if workers == 1 or len(jobs) < 64:
        # A small folder decodes faster in-process than a pool starts, and does not fork a process
        # that may already run TensorFlow's threads (evaluate, tests).
        decoded = list(
            track(
                map(_decode_one, jobs), total=len(jobs), description=f"decoding {root.name}", transient=True
            )
        )
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            decoded = list(
                track(
                    pool.map(_decode_one, jobs, chunksize=32),
                    total=len(jobs),
                    description=f"decoding {root.name}",
                    transient=True,
                )
            )
    pixels = np.stack([d[0] for d in decoded])
    sha256 = [d[1] for d in decoded]
    dhash = [d[2] for d in decoded]
    labels = np.array([CLASSES.index(c) for _, c in images], dtype=np.int64)
    # The content fingerprint ends up in the model card: it names exactly what a model saw.
    fingerprint = hashlib.sha256("".join(sorted(sha256)).encode()).hexdigest()[:16]
    paths = [str(p.relative_to(root)) for p, _ in images]
    scans = ScanSet(pixels, labels, paths, sha256, dhash, fingerprint)
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"paths": paths, "sha256": sha256, "dhash": dhash, "fingerprint": fingerprint})
        tmp = cache_file.with_suffix(".tmp.npz")
        np.savez(tmp, pixels=pixels, labels=labels, meta=np.array(meta))
        tmp.replace(cache_file)
    return scans


def leak_free_split(scans: ScanSet, validation_fraction: float, seed: int) -> tuple[ScanSet, ScanSet]:
    """(train, validation): stratified, with exact/near-duplicate groups kept on one side."""
    labels = [CLASSES[i] for i in scans.labels]
    groups = duplicate_groups(scans.sha256, scans.dhash)
    is_validation = group_split(labels, groups, validation_fraction, seed)
    return scans.subset(~is_validation), scans.subset(is_validation)


def class_counts(labels: Sequence[int]) -> dict[str, int]:
    counts = np.bincount(np.asarray(labels), minlength=len(CLASSES))
    return {c: int(n) for c, n in zip(CLASSES, counts, strict=True)}


def validation_paths(model_dir: Path, *, required: bool = True) -> set[str]:
    """The model's own validation files (``reports/split.json``, written by ``brainscan train``).

    ``required``: calibration must never fall back to training images, so a missing split is an error;
    int8 calibration only leaves these files out, so a model without a split just has none to leave out.
    """
    split = Path(model_dir) / "reports" / "split.json"
    if not split.is_file():
        if not required:
            return set()
        raise ValueError(
            f"{split} is missing: calibration needs the model's own validation split "
            "(written by `brainscan train`), never its training images"
        )
    return set(json.loads(split.read_text()).get("validation", []))
