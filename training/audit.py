"""Find exact and near-duplicate images, and carve leak-free splits from them.

Exact duplicates share a SHA-256. Near-duplicates (the same slice re-encoded, resized or
re-framed) share a perceptual difference hash: the image is cropped to the head (the same crop the
compact model uses, so black borders and resizing do not matter), reduced to a 17x16 grey thumbnail, and
each of the 256 bits says whether a pixel is brighter than its right neighbour. Two images whose hashes
differ in at most ``NEAR_DUPLICATE_BITS`` bits are near-duplicates. On the training folder the
nearest-neighbour distance is bimodal: copies sit at 0-12 bits, distinct slices (even neighbouring
slices of one study) mostly at 20-60, with a trough at 13-17; the threshold sits in that trough.
Duplicates are grouped transitively (union-find), and a split assigns whole groups to one side, so no
near-copy of a validation image is trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from brainscan.imaging import crop_to_brain, to_grey_or_rgb

NEAR_DUPLICATE_BITS = 16
"""Hamming distance (of 256 bits) at or below which two images count as near-duplicates."""
HASH_SIDE = 16

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def difference_hash(image: Image.Image) -> str:
    """256-bit difference hash of the head, as 64 hex digits."""
    head = crop_to_brain(to_grey_or_rgb(image, channels=1))[..., 0]
    thumbnail = Image.fromarray(head).resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(thumbnail, dtype=np.int16)
    return np.packbits((pixels[:, 1:] > pixels[:, :-1]).flatten()).tobytes().hex()


def hash_bytes(data: bytes) -> tuple[str, str]:
    """(SHA-256 hex, difference hash hex) of an image file's bytes."""
    with Image.open(io.BytesIO(data)) as image:
        return hashlib.sha256(data).hexdigest(), difference_hash(image)


def _as_words(hashes: Sequence[str]) -> np.ndarray:
    return np.frombuffer(b"".join(bytes.fromhex(h) for h in hashes), dtype=np.uint64).reshape(len(hashes), -1)


def list_images(root: Path) -> list[tuple[Path, str]]:
    """Every image under ``root/<class>/``, as (path, class name), in a stable order."""
    found = []
    for class_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                found.append((path, class_dir.name))
    return found


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_pairs(hashes: Sequence[str], max_bits: int, other: Sequence[str] | None = None) -> list[tuple]:
    """Index pairs (i, j, distance) whose hashes differ in at most ``max_bits`` bits.

    Within one list (i < j) or, with ``other``, across two lists. Blocked so memory stays small.
    """
    left = _as_words(hashes)
    right = left if other is None else _as_words(other)
    pairs: list[tuple] = []
    if len(left) == 0 or len(right) == 0:
        return pairs
    for start in range(0, len(left), 256):
        block = left[start : start + 256]
        distance = np.zeros((len(block), len(right)), dtype=np.int32)
        for word in range(left.shape[1]):
            distance += np.bitwise_count(block[:, word, None] ^ right[None, :, word])
        rows, cols = np.nonzero(distance <= max_bits)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if other is None and c <= i:
                continue
            pairs.append((i, c, int(distance[r, c])))
    return pairs


def duplicate_groups(
    sha256s: Sequence[str], hashes: Sequence[str], max_bits: int = NEAR_DUPLICATE_BITS
) -> list[int]:
    """Group id per image: images joined by an exact or near-duplicate link share a group."""
    groups = _UnionFind(len(sha256s))
    first_with: dict[str, int] = {}
    for i, digest in enumerate(sha256s):
        if digest in first_with:
            groups.union(first_with[digest], i)
        else:
            first_with[digest] = i
    for i, j, _ in near_pairs(hashes, max_bits):
        groups.union(i, j)
    return [groups.find(i) for i in range(len(sha256s))]


def group_split(
    labels: Sequence[str], groups: Sequence[int], validation_fraction: float, seed: int = 1337
) -> np.ndarray:
    """Boolean mask, True = validation. Stratified by class; whole duplicate groups stay on one side.

    Groups are shuffled deterministically and taken into validation until each class reaches its share.
    A group is filed under its most common label (mixed-label groups are rare: label noise in the source).
    Every class with at least two images gets at least one validation image when its groups allow it
    while leaving one for training (a tiny dataset would otherwise validate on nothing).
    """
    by_group: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    group_label = {
        g: Counter(labels[i] for i in members).most_common(1)[0][0] for g, members in by_group.items()
    }
    target = {c: validation_fraction * n for c, n in Counter(labels).items()}
    taken: Counter[str] = Counter()
    order = sorted(by_group)
    np.random.default_rng(seed).shuffle(order)
    is_validation = np.zeros(len(labels), dtype=bool)
    for g in order:
        label = group_label[g]
        if taken[label] + len(by_group[g]) <= target[label] + 0.5:
            is_validation[by_group[g]] = True
            taken[label] += len(by_group[g])
    counts = Counter(labels)
    for label, n in counts.items():
        if taken[label] or n < 2 or validation_fraction <= 0:
            continue
        # The smallest of the class's groups (first in the shuffled order on ties) that leaves training data.
        candidates = [g for g in order if group_label[g] == label and len(by_group[g]) < n]
        if candidates:
            g = min(candidates, key=lambda g: len(by_group[g]))
            is_validation[by_group[g]] = True
            taken[label] += len(by_group[g])
    return is_validation


@dataclass
class AuditReport:
    root: str
    images: int
    exact_duplicate_groups: int = 0
    exact_duplicate_extra_copies: int = 0
    near_duplicate_pairs: int = 0
    images_in_duplicate_groups: int = 0
    groups_with_conflicting_labels: int = 0
    threshold_bits: int = NEAR_DUPLICATE_BITS  # of 256
    across: dict | None = None
    examples: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)

    def summary(self) -> str:
        lines = [
            f"{self.root}: {self.images} images",
            f"  exact duplicates: {self.exact_duplicate_groups} groups, "
            f"{self.exact_duplicate_extra_copies} extra copies",
            f"  near-duplicate pairs (dHash <= {self.threshold_bits}/256 bits): {self.near_duplicate_pairs}",
            f"  images in a duplicate group: {self.images_in_duplicate_groups}",
            f"  duplicate groups whose images carry different labels: {self.groups_with_conflicting_labels}",
        ]
        if self.across:
            lines.append(
                f"  against {self.across['root']}: {self.across['exact']} exact and "
                f"{self.across['near']} near-duplicate images of it also in {self.root}"
            )
        return "\n".join(lines)


def _hash_file(path: str) -> tuple[str, str] | str:
    """(SHA-256, dHash) of one file, or the reason it cannot be read as an image."""
    try:
        return hash_bytes(Path(path).read_bytes())
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for broken files
        return f"{type(exc).__name__}: {exc}"


def _audit_listing(root: Path) -> list[tuple[Path, str]]:
    """``list_images`` plus images lying directly in ``root`` (label ""): a flat folder audits too."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    flat = [(p, "") for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return flat + list_images(root)


def hash_folder(root: Path, workers: int | None = None, description: str | None = None) -> dict:
    """Hash every image under ``root``, with a progress bar.

    Returns {"paths", "labels", "sha256", "dhash", "unreadable"}.

    Files that do not decode are listed under "unreadable" (path, reason) and left out of the rest.
    """
    from rich.progress import track

    listing = _audit_listing(root)
    paths = [str(p) for p, _ in listing]
    workers = workers or os.cpu_count() or 1
    description = description or f"hashing {Path(root).name}"
    if workers == 1 or len(paths) < 64:
        results = list(
            track(map(_hash_file, paths), total=len(paths), description=description, transient=True)
        )
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(
                track(
                    pool.map(_hash_file, paths, chunksize=32),
                    total=len(paths),
                    description=description,
                    transient=True,
                )
            )
    out: dict = {"paths": [], "labels": [], "sha256": [], "dhash": [], "unreadable": []}
    for (path, label), result in zip(listing, results, strict=True):
        relative = str(path.relative_to(root))
        if isinstance(result, str):
            out["unreadable"].append({"path": relative, "reason": result})
            continue
        out["paths"].append(relative)
        out["labels"].append(label)
        out["sha256"].append(result[0])
        out["dhash"].append(result[1])
    return out


def audit_folder(
    root: Path,
    against: Path | None = None,
    max_bits: int = NEAR_DUPLICATE_BITS,
    workers: int | None = None,
    max_examples: int = 20,
) -> AuditReport:
    """Exact and near-duplicate groups within ``root``; with ``against``, which of its images have an
    exact or near copy in ``root`` (the leak check for a test folder against a training folder)."""
    hashed = hash_folder(Path(root), workers)
    paths, labels, sha256s, dhashes = hashed["paths"], hashed["labels"], hashed["sha256"], hashed["dhash"]
    report = AuditReport(root=str(root), images=len(paths), threshold_bits=max_bits)

    copies = Counter(sha256s)
    report.exact_duplicate_groups = sum(1 for n in copies.values() if n > 1)
    report.exact_duplicate_extra_copies = sum(n - 1 for n in copies.values() if n > 1)
    pairs = near_pairs(dhashes, max_bits)
    report.near_duplicate_pairs = sum(1 for i, j, _ in pairs if sha256s[i] != sha256s[j])

    groups = duplicate_groups(sha256s, dhashes, max_bits)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    duplicated = [m for m in members.values() if len(m) > 1]
    report.images_in_duplicate_groups = sum(len(m) for m in duplicated)
    report.groups_with_conflicting_labels = sum(1 for m in duplicated if len({labels[i] for i in m}) > 1)
    # Largest groups first, conflicting labels before agreeing ones: the examples worth a look.
    duplicated.sort(key=lambda m: (len({labels[i] for i in m}) == 1, -len(m), m[0]))
    for m in duplicated[:max_examples]:
        report.examples.append(
            {
                "files": [paths[i] for i in m],
                "labels": sorted({labels[i] for i in m}),
                "exact": len({sha256s[i] for i in m}) == 1,
            }
        )
    if hashed["unreadable"]:
        report.examples.append({"unreadable": hashed["unreadable"][:max_examples]})

    if against is not None:
        other = hash_folder(Path(against), workers)
        known = set(sha256s)
        exact = [k for k, digest in enumerate(other["sha256"]) if digest in known]
        close: dict[int, tuple[int, int]] = {}
        for j, i, distance in near_pairs(other["dhash"], max_bits, other=dhashes):
            if j not in close or distance < close[j][1]:
                close[j] = (i, distance)
        exact_set = set(exact)
        near = sorted(j for j in close if j not in exact_set)
        examples = []
        for j in sorted(exact_set | set(near))[:max_examples]:
            i = close[j][0] if j in close else sha256s.index(other["sha256"][j])
            examples.append(
                {
                    "file": other["paths"][j],
                    "label": other["labels"][j],
                    "copy_in_root": paths[i],
                    "root_label": labels[i],
                    "exact": j in exact_set,
                }
            )
        report.across = {
            "root": str(against),
            "images": len(other["paths"]),
            "exact": len(exact),
            "near": len(near),
            "either": len(exact_set | set(near)),
            "files": [other["paths"][j] for j in sorted(exact_set | set(near))],
            "examples": examples,
        }
    return report
