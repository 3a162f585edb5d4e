"""The duplicate audit and the leak-free split: planted copies are found, distinct scans are not."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.training import REAL_TRAINING, draw_scan, encode, needs_real_data, write_dataset
from training.audit import (
    NEAR_DUPLICATE_BITS,
    audit_folder,
    duplicate_groups,
    group_split,
    hash_bytes,
    near_pairs,
)


def _reencoded(data: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("L").save(out, format="JPEG", quality=55)
    return out.getvalue()


def _resized(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("L")
    out = io.BytesIO()
    # Upscaled by a quarter: the dataset holds such copies of one slice at two resolutions.
    image.resize((image.width * 5 // 4, image.height * 5 // 4), Image.Resampling.LANCZOS).save(
        out, format="PNG"
    )
    return out.getvalue()


def _bordered(data: bytes) -> bytes:
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    framed = np.pad(pixels, ((20, 12), (8, 30)))  # black border, not centred
    return encode(framed, "PNG")


@pytest.fixture()
def planted(tmp_path: Path) -> dict:
    """A generated folder of distinct scans plus one exact copy and three near copies of known files."""
    root = write_dataset(tmp_path / "train", per_class=8, size=256)
    original = root / "glioma" / "glioma_001.png"
    data = original.read_bytes()
    shutil.copy(original, root / "meningioma" / "copy_of_glioma_001.png")  # exact, and mislabelled
    source = (root / "pituitary" / "pituitary_002.jpg").read_bytes()
    (root / "pituitary" / "reencoded.jpg").write_bytes(_reencoded(source))
    (root / "pituitary" / "resized.png").write_bytes(_resized(source))
    (root / "pituitary" / "bordered.png").write_bytes(_bordered(source))
    return {"root": root, "exact": data, "near_source": source}


def test_planted_copies_hash_within_threshold_and_distinct_scans_do_not() -> None:
    source = encode(draw_scan(3, 7, 256), "JPEG")
    _, original = hash_bytes(source)
    copies = [hash_bytes(f(source))[1] for f in (_reencoded, _resized, _bordered)]
    distances = [d for _, _, d in near_pairs([original], 256, other=copies)]
    assert len(distances) == 3 and max(distances) <= NEAR_DUPLICATE_BITS, distances
    distinct = [hash_bytes(encode(draw_scan(k % 4, 1000 + k, 256), "PNG"))[1] for k in range(24)]
    assert near_pairs(distinct, NEAR_DUPLICATE_BITS) == []


def test_audit_finds_planted_exact_and_near_duplicates(planted: dict) -> None:
    report = audit_folder(planted["root"], workers=1)
    assert report.images == 32 + 4
    assert report.exact_duplicate_groups == 1
    assert report.exact_duplicate_extra_copies == 1
    # The pituitary source and its three copies: each copy is near the source (copies of copies may
    # be a little further apart; the group joins them transitively).
    assert 3 <= report.near_duplicate_pairs <= 6
    assert report.images_in_duplicate_groups == 2 + 4
    assert report.groups_with_conflicting_labels == 1  # the copy filed under meningioma
    groups = sorted(sorted(e["files"]) for e in report.examples)
    assert sorted(["glioma/glioma_001.png", "meningioma/copy_of_glioma_001.png"]) in groups
    assert (
        sorted(
            [
                "pituitary/pituitary_002.jpg",
                "pituitary/reencoded.jpg",
                "pituitary/resized.png",
                "pituitary/bordered.png",
            ]
        )
        in groups
    )
    assert json.loads(report.to_json())["exact_duplicate_groups"] == 1
    assert "1 groups, 1 extra copies" in report.summary()


def test_audit_does_not_flag_distinct_images(tmp_path: Path) -> None:
    report = audit_folder(write_dataset(tmp_path / "clean", per_class=10, size=256), workers=1)
    assert report.images == 40
    assert (
        report.exact_duplicate_groups,
        report.near_duplicate_pairs,
        report.images_in_duplicate_groups,
    ) == (0, 0, 0)
    assert report.examples == []


def test_audit_against_lists_the_other_folders_copies(planted: dict, tmp_path: Path) -> None:
    test_dir = write_dataset(tmp_path / "test", per_class=3, size=256, seed=9)
    (test_dir / "glioma" / "leaked_exact.png").write_bytes(planted["exact"])
    # Framed and re-encoded: bytes found nowhere in the training folder, but the same slice.
    (test_dir / "pituitary" / "leaked_near.png").write_bytes(_reencoded(_bordered(planted["near_source"])))
    report = audit_folder(planted["root"], against=test_dir, workers=1)
    across = report.across
    assert across is not None
    assert (across["images"], across["exact"], across["near"], across["either"]) == (14, 1, 1, 2)
    assert sorted(across["files"]) == ["glioma/leaked_exact.png", "pituitary/leaked_near.png"]
    assert "1 exact and 1 near-duplicate images" in report.summary()


def test_unreadable_files_are_reported_not_fatal(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", per_class=2, size=64)
    (root / "notumor" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    report = audit_folder(root, workers=1)
    assert report.images == 8
    assert report.examples[-1]["unreadable"][0]["path"] == "notumor/broken.jpg"


# ---- the split --------------------------------------------------------------------------------
def _synthetic_groups(n: int = 400, seed: int = 3) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    labels = [str(c) for c in rng.choice(["a", "b", "c", "d"], size=n, p=[0.4, 0.3, 0.2, 0.1])]
    groups = list(range(n))
    for _ in range(80):  # join random same-label images into duplicate groups of up to 5
        i = int(rng.integers(n))
        for j in rng.integers(n, size=int(rng.integers(1, 5))):
            if labels[int(j)] == labels[i]:
                groups[int(j)] = groups[i]
    return labels, groups


def test_group_split_keeps_groups_whole_and_is_stratified_and_deterministic() -> None:
    labels, groups = _synthetic_groups()
    mask = group_split(labels, groups, 0.2, seed=11)
    for g in set(groups):
        sides = {bool(mask[i]) for i in range(len(groups)) if groups[i] == g}
        assert len(sides) == 1, f"group {g} straddles the split"
    totals, taken = Counter(labels), Counter(label for label, m in zip(labels, mask, strict=True) if m)
    for label, n in totals.items():
        assert abs(taken[label] - 0.2 * n) <= 5, (label, taken[label], n)  # within a group's size
    assert np.array_equal(mask, group_split(labels, groups, 0.2, seed=11))
    assert not np.array_equal(mask, group_split(labels, groups, 0.2, seed=12))


def test_group_split_gives_every_class_with_two_images_a_validation_image() -> None:
    labels = ["a", "a", "b", "b", "b", "c", "d", "d"]
    groups = [0, 1, 2, 2, 4, 5, 6, 6]  # "d" is one group: it cannot be split without a leak
    mask = group_split(labels, groups, 0.15)
    on_validation = Counter(label for label, m in zip(labels, mask, strict=True) if m)
    assert on_validation == {"a": 1, "b": 1}  # b's single image, not its pair; c has one; d cannot
    assert not mask[2] and not mask[3]


def test_duplicate_groups_join_exact_and_near_transitively() -> None:
    zero = "00" * 32
    near = "01" + "00" * 31  # 1 bit away from zero
    nearer = "03" + "00" * 31  # 1 bit away from near, 2 from zero
    far = "ff" * 32
    groups = duplicate_groups(["s1", "s2", "s3", "s1", "s5"], [zero, near, nearer, far, far], max_bits=1)
    assert groups[0] == groups[1] == groups[2] == groups[3]  # near chain + exact sha of 3
    assert groups[4] == groups[3]  # identical dHash to 3


@needs_real_data
def test_audit_of_the_real_training_folder_finds_its_exact_duplicates(tmp_path: Path) -> None:
    """On a subset (fast): the exact-duplicate pairs SHA256SUMS lists, plus distinct files around them."""
    sums = REAL_TRAINING.parent / "SHA256SUMS"
    if not sums.is_file():
        pytest.skip(f"{sums} is missing")
    by_hash: dict[str, list[str]] = {}
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        by_hash.setdefault(digest, []).append(name.removeprefix("Training/"))
    pairs = [names[:2] for names in by_hash.values() if len(names) >= 2][:6]
    singles = [names[0] for names in by_hash.values() if len(names) == 1][:30]
    assert len(pairs) == 6, "the real folder is known to hold exact duplicates"
    subset = tmp_path / "subset"
    for name in [n for pair in pairs for n in pair] + singles:
        (subset / name).parent.mkdir(parents=True, exist_ok=True)
        (subset / name).symlink_to(REAL_TRAINING / name)
    report = audit_folder(subset, workers=1)
    assert report.images == 42
    assert report.exact_duplicate_groups >= 6 and report.exact_duplicate_extra_copies >= 6
    flagged = {f for e in report.examples for f in e.get("files", [])}
    assert all(a in flagged and b in flagged for a, b in pairs)
