"""Bounded cost and fixed reasons for scanner files and image decoding (issue 13, findings 2 and 9).

Geometry is judged from the header before any pixel work; memory is bounded by the plan whatever
the shape; no error quotes a value from inside the file. Every file is generated here.
"""

from __future__ import annotations

import gzip
import io
import math
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from brainscan import scanners
from brainscan.imaging import ScanError, open_image
from brainscan.intake import IntakeLimits, expand_uploads
from brainscan.settings import Settings
from brainscan.storage import ScanStore
from tests.support.scanners import make_dicom, make_nifti

LIMITS = IntakeLimits(
    max_archive_entries=50,
    max_expanded_bytes=16 * 1024 * 1024,
    max_scan_bytes=4 * 1024 * 1024,
    max_image_pixels=1_000_000,
    max_items_per_job=500,
)
DEFAULTS = Settings()
VOLUME_LIMITS = scanners.VolumeLimits(
    max_image_pixels=1_000_000, max_slices=2048, max_voxels=8_000_000, max_bytes=64 * 1024 * 1024
)


def nifti2(volume: np.ndarray, gz: bool = False) -> bytes:
    data = nib.Nifti2Image(volume, np.eye(4)).to_bytes()
    return gzip.compress(data) if gz else data


def declared_nifti2(shape: tuple[int, ...], dtype: type = np.float32) -> bytes:
    """A NIfTI-2 header (and extension flag) that declares ``shape`` but carries no voxels at all."""
    header = nib.Nifti2Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 544
    return header.binaryblock + b"\x00" * 4


def intake(tmp_path: Path, files: dict[str, bytes], limits: IntakeLimits = LIMITS) -> dict[str, str | None]:
    uploads = tmp_path / "uploads"
    uploads.mkdir(exist_ok=True)
    paths = []
    for i, (name, data) in enumerate(files.items()):
        (uploads / f"upload-{i}").write_bytes(data)
        paths.append((uploads / f"upload-{i}", name))
    entries = expand_uploads(ScanStore(tmp_path / "store"), limits, paths)
    return {e.filename: e.error for e in entries}


# -- NIfTI geometry, before any per-slice work ---------------------------------------------------


def test_default_volume_limits_are_the_documented_ones() -> None:
    limits = scanners.VolumeLimits.from_settings(DEFAULTS)
    assert (limits.max_slices, limits.max_voxels, limits.max_bytes) == (2048, 512**3, 512 * 1024 * 1024)
    assert limits.max_image_pixels == DEFAULTS.max_image_pixels


def test_nifti2_with_100k_one_pixel_slices_is_refused_from_its_header(tmp_path: Path) -> None:
    # 100k all-zero 1x1 slices: a few hundred bytes compressed; it used to cost a blank check per slice.
    data = nifti2(np.zeros((1, 1, 100_000), np.float32), gz=True)
    assert len(data) < 2048
    errors = intake(tmp_path, {"thin.nii.gz": data, "ok.nii": make_nifti(np.arange(64.0).reshape(4, 4, 4))})
    assert errors == {
        "thin.nii.gz": "NIfTI volume has more than 2048 axial slices (BRAINSCAN_MAX_VOLUME_SLICES)",
        "ok.nii": None,  # the next file is unaffected
    }


def test_a_header_declaring_a_huge_volume_is_refused_before_reading_or_writing_voxels(tmp_path: Path) -> None:
    # 10^12 slices declared in a 544-byte file: refused on geometry, not as "truncated" after a read.
    head = declared_nifti2((1, 1, 10**12))
    errors = intake(tmp_path, {"liar.nii": head, "liar.nii.gz": gzip.compress(head)})
    for name in ("liar.nii", "liar.nii.gz"):
        assert errors[name] == "NIfTI volume has more than 2048 axial slices (BRAINSCAN_MAX_VOLUME_SLICES)"
    header = scanners.read_nifti_header(io.BytesIO(declared_nifti2((3000, 3000, 1000))))
    with pytest.raises(scanners.VolumeError) as refused:
        scanners.plan_nifti(header, VOLUME_LIMITS)
    assert (
        str(refused.value)
        == "NIfTI slice has more pixels than the limit of 1000000 (BRAINSCAN_MAX_IMAGE_PIXELS)"
    )
    big = scanners.VolumeLimits(max_image_pixels=10**7, max_slices=4096, max_voxels=10**10, max_bytes=2**40)
    for limits, reason in (
        ({"max_voxels": 10**8}, "NIfTI volume has more than 100000000 voxels (BRAINSCAN_MAX_VOLUME_VOXELS)"),
        (
            {"max_bytes": 10**9},
            "NIfTI volume is larger than 1000000000 bytes uncompressed (BRAINSCAN_MAX_VOLUME_BYTES)",
        ),
    ):
        with pytest.raises(scanners.VolumeError) as refused:
            scanners.plan_nifti(header, scanners.VolumeLimits(**{**big.__dict__, **limits}))
        assert str(refused.value) == reason


def test_gunzip_writes_no_more_than_the_header_declares(tmp_path: Path) -> None:
    spent: list[int] = []
    # Refused from its header: nothing written, only the header decompressed.
    source = tmp_path / "thin.nii.gz"
    source.write_bytes(nifti2(np.zeros((1, 1, 100_000), np.float32), gz=True))
    out = io.BytesIO()
    with pytest.raises(scanners.VolumeError, match="BRAINSCAN_MAX_VOLUME_SLICES"):
        scanners.gunzip_nifti(source, out, max_image_pixels=10**6, limits=VOLUME_LIMITS, spend=spent.append)
    assert out.getvalue() == b"" and sum(spent) <= scanners.NIFTI2_HEADER

    # A valid volume followed by 8 MiB of zeros inside the gzip stream: the copy stops at the volume.
    volume = np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5)
    plain = nib.Nifti1Image(volume, np.eye(4)).to_bytes()
    source.write_bytes(gzip.compress(plain + b"\x00" * (8 * 1024 * 1024)))
    out, spent = io.BytesIO(), []
    written = scanners.gunzip_nifti(
        source, out, max_image_pixels=10**6, limits=VOLUME_LIMITS, spend=spent.append
    )
    assert out.getvalue() == plain and written == len(plain) == sum(spent)

    # Over the byte limit: refused before any voxel is decompressed.
    small = scanners.VolumeLimits(**{**VOLUME_LIMITS.__dict__, "max_bytes": 500})
    with pytest.raises(scanners.VolumeError) as refused:
        scanners.gunzip_nifti(source, io.BytesIO(), max_image_pixels=10**6, limits=small)
    assert (
        str(refused.value)
        == "NIfTI volume is larger than 500 bytes uncompressed (BRAINSCAN_MAX_VOLUME_BYTES)"
    )


@pytest.mark.parametrize(
    "shape",
    [
        (1, 1, 10**8),
        (10**8, 1, 1),
        (1, 10**6, 3),
        (4000, 4000, 4000),
        (2, 3, 10**12),
        (100, 100, 100),
        (3, 5, 7),
    ],
)
def test_percentile_sample_is_bounded_for_any_shape(shape: tuple[int, int, int]) -> None:
    budget = 2_000_000
    steps = scanners.sample_steps(shape, budget)
    sampled = math.prod(-(-n // step) for n, step in zip(shape, steps, strict=True))
    assert sampled <= budget
    if math.prod(shape) > budget:
        assert sampled > budget // 2  # still a real sample, not a handful of voxels
    else:
        assert steps == (1, 1, 1)


def test_nifti_plan_bounds_memory_whatever_the_shape() -> None:
    for shape in [(1, 1, 2000), (2000, 1, 1), (512, 512, 300), (1000, 1000, 2), (7, 3, 1900)]:
        header = scanners.read_nifti_header(io.BytesIO(declared_nifti2(shape)))
        limits = scanners.VolumeLimits(
            max_image_pixels=10**6, max_slices=2048, max_voxels=10**9, max_bytes=2**40
        )
        plan = scanners.plan_nifti(header, limits)
        assert plan.sample_voxels <= scanners.PERCENTILE_SAMPLE, shape
        assert plan.slab_voxels <= max(scanners.SLAB_VOXELS, plan.slice_pixels), shape
        assert plan.slab_slices >= 1 and plan.slices == shape[2]


def test_conversion_allocates_no_more_than_its_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 2 x 1 x 100_000 float32 (800 KB of voxels), almost all blank: every slice is looked at.
    monkeypatch.setattr(scanners, "PERCENTILE_SAMPLE", 1_000)
    monkeypatch.setattr(scanners, "SLAB_VOXELS", 4_096)
    volume = np.zeros((2, 1, 100_000), np.float32)
    volume[0, 0, [10, 50_000, 99_999]] = [1.0, 2.0, 3.0]
    path = tmp_path / "long.nii"
    path.write_bytes(nifti2(volume))
    limits = scanners.VolumeLimits(
        max_image_pixels=10**6, max_slices=100_000, max_voxels=10**6, max_bytes=10**7
    )
    list(scanners.nifti_slices(path, max_image_pixels=10**6, limits=limits))  # warm up: imports, caches
    tracemalloc.start()
    try:
        scans = list(scanners.nifti_slices(path, max_image_pixels=10**6, limits=limits))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [scan.ref for scan in scans] == ["slice 11/100000", "slice 50001/100000", "slice 100000/100000"]
    assert peak < 200_000, peak  # the volume as float32 is 800_000 bytes


def test_nifti_refusals_quote_nothing_from_the_file(tmp_path: Path) -> None:
    complex_volume = make_nifti(np.ones((4, 4, 3), np.complex64))
    four_d = make_nifti(np.ones((4, 4, 3, 7), np.float32))
    errors = intake(tmp_path, {"c.nii": complex_volume, "t.nii": four_d})
    assert errors["c.nii"] == "NIfTI data type is not supported (greyscale volumes only)"
    assert errors["t.nii"] == "4-D NIfTI (more than one volume in the file): send one 3-D volume per file"
    assert not any(ch.isdigit() for ch in errors["t.nii"].replace("4-D", "").replace("3-D", ""))


def test_degenerate_orientation_still_gives_axial_slices(tmp_path: Path) -> None:
    # The affine leaves the anterior axis undefined (a zero column): the stored axis left over
    # carries it, unflipped; nothing crashes.
    volume = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    image = nib.Nifti1Image(volume, None)
    image.header.set_qform(None, code=0)
    image.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=2)
    data = image.to_bytes()
    path = tmp_path / "flat.nii"
    path.write_bytes(data)
    scans = list(scanners.nifti_slices(path, max_image_pixels=10**6, limits=VOLUME_LIMITS))
    assert [scan.ref for scan in scans] == ["slice 1/3", "slice 2/3", "slice 3/3"]


# -- DICOM ----------------------------------------------------------------------------------------


def test_unsupported_photometric_interpretation_is_a_fixed_reason(tmp_path: Path) -> None:
    data = make_dicom(np.zeros((8, 8), np.uint8), photometric="EVIL<script>")
    errors = intake(tmp_path, {"evil.dcm": data})
    assert (
        errors["evil.dcm"] == "unsupported DICOM photometric interpretation (MONOCHROME1/2, RGB or YBR only)"
    )
    assert "EVIL" not in errors["evil.dcm"].upper() and "<" not in errors["evil.dcm"]


def test_unknown_transfer_syntax_fails_alone(tmp_path: Path) -> None:
    explicit = make_dicom(np.zeros((8, 8), np.uint16))
    assert explicit.count(b"1.2.840.10008.1.2.1\x00") == 1  # the file meta's transfer syntax
    data = explicit.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.3.4.5.6.7.8.9.1\x00")
    errors = intake(tmp_path, {"odd.dcm": data, "ok.dcm": make_dicom(np.zeros((4, 4), np.uint8))})
    assert errors == {"odd.dcm": "unsupported DICOM transfer syntax", "ok.dcm": None}


def test_dicom_frames_and_volume_are_bounded_from_the_header(tmp_path: Path) -> None:
    from pydicom import dcmread

    def with_frames(frames: int, shape: tuple[int, int]) -> bytes:
        ds = dcmread(io.BytesIO(make_dicom(np.zeros((2, *shape), np.uint8))))
        ds.NumberOfFrames = frames  # claims far more frames than it carries
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()

    errors = intake(
        tmp_path, {"frames.dcm": with_frames(100_000, (1, 1)), "voxels.dcm": with_frames(2000, (512, 512))}
    )
    assert errors["frames.dcm"] == "DICOM file has more than 2048 frames (BRAINSCAN_MAX_VOLUME_SLICES)"
    assert (
        errors["voxels.dcm"]
        == "DICOM file has more than 134217728 pixels in all (BRAINSCAN_MAX_VOLUME_VOXELS)"
    )


# -- image decoding (brainscan/imaging.py) ------------------------------------------------------


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8), "L").save(out, "JPEG")
    return out.getvalue()


def test_decode_errors_are_fixed_reasons_without_addresses() -> None:
    whole = jpeg()
    cases = {
        b"\xff\xd8\xff" + b"\x00garbage" * 40: "cannot decode image: not a readable JPEG or PNG",
        whole[: len(whole) // 2]: "cannot decode image: image file is truncated",
    }
    for data, reason in cases.items():
        with pytest.raises(ScanError) as failed:
            open_image(data, 10**6)
        assert str(failed.value) == reason
        assert "0x" not in str(failed.value) and "object at" not in str(failed.value)
