"""DICOM and NIfTI at intake: sniffing, frames/slices as PNG items, windowing, limits, privacy.

Every scanner file here is generated in the test with pydicom or nibabel.
"""

from __future__ import annotations

import gzip
import io
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEGLosslessSV1

from brainscan import scanners
from brainscan.intake import IntakeEntry, IntakeLimits, expand_uploads, sniff
from brainscan.storage import ScanStore
from tests.support.archives import make_tar, make_zip
from tests.support.scanners import PATIENT, PATIENT_ID, make_dicom, make_nifti

LIMITS = IntakeLimits(
    max_archive_entries=50,
    max_expanded_bytes=16 * 1024 * 1024,
    max_scan_bytes=4 * 1024 * 1024,
    max_image_pixels=1_000_000,
    max_items_per_job=500,
)


def brain_volume(shape: tuple[int, int, int] = (20, 24, 12), blank: int = 2, seed: int = 0) -> np.ndarray:
    """A float volume with ``blank`` all-zero slices at each end of the third axis."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(500, 120, shape).astype(np.float32)
    volume[:, :, :blank] = 0
    volume[:, :, shape[2] - blank :] = 0
    return volume


@pytest.fixture
def store(tmp_path: Path) -> ScanStore:
    return ScanStore(tmp_path / "store")


def run(
    store: ScanStore, tmp_path: Path, files: dict[str, bytes], limits: IntakeLimits = LIMITS
) -> list[IntakeEntry]:
    uploads = tmp_path / "uploads"
    uploads.mkdir(exist_ok=True)
    paths = []
    for i, (name, data) in enumerate(files.items()):
        path = uploads / f"upload-{i}"
        path.write_bytes(data)
        paths.append((path, name))
    return expand_uploads(store, limits, paths)


def pixels(store: ScanStore, entry: IntakeEntry) -> np.ndarray:
    assert entry.sha256 is not None, entry.error
    with Image.open(io.BytesIO(store.read(entry.sha256))) as image:
        assert image.format == "PNG" and image.mode == "L"
        return np.asarray(image)


def stored_bytes(store: ScanStore) -> list[bytes]:
    return [p.read_bytes() for p in store.root.rglob("*") if p.is_file()]


# -- sniffing --------------------------------------------------------------------------------------


def test_sniff_recognises_dicom_and_nifti_from_bytes_only() -> None:
    image = np.zeros((8, 8), np.uint8)
    assert scanners.sniff_scanner(make_dicom(image)[:2048]) == "dicom"
    assert scanners.sniff_scanner(make_dicom(image, file_format=False)[:2048]) == "dicom"
    assert scanners.sniff_scanner(make_nifti(np.ones((4, 4, 4), np.int16))[:2048]) == "nifti"
    assert scanners.sniff_scanner(make_nifti(np.ones((4, 4, 4), np.int16), gz=True)[:2048]) == "nifti-gz"
    for other in (b"", b"hello world" * 100, gzip.compress(b"plain text" * 200), b"\x08\x00" + b"\x00" * 50):
        assert scanners.sniff_scanner(other) is None
    # The generic sniffer does not claim them (intake asks scanners when it finds nothing else).
    assert sniff(make_dicom(image)[:2048]) is None


# -- DICOM -----------------------------------------------------------------------------------------


def test_window_center_and_width_map_to_0_and_255(store: ScanStore, tmp_path: Path) -> None:
    # center 100, width 200: 0 -> 0, 100 -> 127.5, 200 -> 255; outside is clipped.
    row = np.array([0, 50, 100, 150, 200, 250, 20, 180], np.uint16)
    image = np.tile(row, (8, 1))
    entries = run(store, tmp_path, {"scan.dcm": make_dicom(image, window=(100, 200))})
    assert [(e.filename, e.source_ref, e.error) for e in entries] == [
        ("scan.dcm", "frame 1/1, series 4, instance 17", None)
    ]
    out = pixels(store, entries[0])
    assert out.shape == (8, 8)
    assert out[0].tolist() == [0, 64, 128, 191, 255, 255, 26, 230]


def test_monochrome1_is_inverted(store: ScanStore, tmp_path: Path) -> None:
    image = np.tile(np.array([0, 100, 200, 50], np.uint16), (4, 1))
    entries = run(
        store, tmp_path, {"m1.dcm": make_dicom(image, photometric="MONOCHROME1", window=(100, 200))}
    )
    assert pixels(store, entries[0])[0].tolist() == [255, 127, 0, 191]


def test_rescale_is_applied_before_a_multi_valued_window(store: ScanStore, tmp_path: Path) -> None:
    # stored -> 2 * stored - 1000; window: first of two values (center 0, width 400) -> -200..200.
    stored = np.array([400, 500, 600, 300, 700, 450], np.uint16)  # -> -200, 0, 200, -400, 400, -100
    image = np.tile(stored, (6, 1))
    data = make_dicom(image, window=([0, 40], [400, 80]), rescale=(2, -1000), series=None, instance=None)
    entries = run(store, tmp_path, {"ct16.dcm": data})
    assert entries[0].source_ref == "frame 1/1"
    assert pixels(store, entries[0])[0].tolist() == [0, 128, 255, 0, 255, 64]


def test_without_a_window_the_full_range_is_used(store: ScanStore, tmp_path: Path) -> None:
    image = np.tile(np.array([-300, 0, 100, 700], np.int16), (4, 1))
    entries = run(store, tmp_path, {"nowin.dcm": make_dicom(image)})
    assert pixels(store, entries[0])[0].tolist() == [0, 77, 102, 255]


def test_multi_frame_file_becomes_one_item_per_frame(store: ScanStore, tmp_path: Path) -> None:
    frames = np.stack([np.full((6, 6), 10 * (i + 1), np.uint8) for i in range(5)])
    frames[:, 0, 0] = 0
    frames[:, -1, -1] = 255
    entries = run(store, tmp_path, {"cine.dcm": make_dicom(frames, window=(128, 256))})
    assert [e.source_ref for e in entries] == [f"frame {i}/5, series 4, instance 17" for i in range(1, 6)]
    assert {e.filename for e in entries} == {"cine.dcm"}
    assert all(e.error is None for e in entries)
    # Each item holds its own frame (different pixels, different stored PNGs).
    assert len({e.sha256 for e in entries}) == 5
    assert [int(pixels(store, e)[2, 2]) for e in entries] == [10, 20, 30, 40, 50]


def test_bare_dataset_without_preamble_is_read(store: ScanStore, tmp_path: Path) -> None:
    image = np.tile(np.array([0, 255], np.uint8), (4, 2))
    entries = run(store, tmp_path, {"old.dcm": make_dicom(image, file_format=False)})
    assert entries[0].error is None and entries[0].source_ref == "frame 1/1, series 4, instance 17"
    assert pixels(store, entries[0])[0].tolist() == [0, 255, 0, 255]


def test_compressed_dicom_without_a_decoder_fails_with_a_clear_reason(
    store: ScanStore, tmp_path: Path
) -> None:
    data = make_dicom(np.zeros((8, 8), np.uint16), syntax=JPEGLosslessSV1)
    entries = run(store, tmp_path, {"lossless.dcm": data, "ok.dcm": make_dicom(np.zeros((4, 4), np.uint8))})
    assert entries[0].filename == "lossless.dcm" and entries[0].sha256 is None
    assert entries[0].error is not None
    assert "compressed DICOM (JPEG Lossless" in entries[0].error and "cannot be decoded" in entries[0].error
    assert entries[1].error is None  # the next file is unaffected


def test_broken_dicom_fails_alone(store: ScanStore, tmp_path: Path) -> None:
    whole = make_dicom(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    entries = run(
        store,
        tmp_path,
        {"cut.dcm": whole[: len(whole) - 4000], "junk.dcm": b"\0" * 128 + b"DICM" + b"\xff" * 300},
    )
    assert [e.filename for e in entries] == ["cut.dcm", "junk.dcm"]
    assert all(e.failed and e.sha256 is None for e in entries)
    assert all(PATIENT not in (e.error or "") for e in entries)


def test_frames_count_toward_the_item_limit(store: ScanStore, tmp_path: Path) -> None:
    limits = IntakeLimits(**{**LIMITS.__dict__, "max_items_per_job": 3})
    frames = np.stack([np.full((4, 4), i, np.uint8) for i in range(5)])
    entries = run(store, tmp_path, {"cine.dcm": make_dicom(frames)}, limits)
    assert [e.source_ref for e in entries[:3]] == [f"frame {i}/5, series 4, instance 17" for i in (1, 2, 3)]
    assert len(entries) == 4 and entries[3].failed and "BRAINSCAN_MAX_ITEMS_PER_JOB" in entries[3].error


def test_frame_over_the_pixel_limit_is_refused(store: ScanStore, tmp_path: Path) -> None:
    limits = IntakeLimits(**{**LIMITS.__dict__, "max_image_pixels": 100})
    entries = run(store, tmp_path, {"big.dcm": make_dicom(np.zeros((20, 20), np.uint8))}, limits)
    # A fixed reason: our limit and the setting that raises it, not the file's own dimensions.
    assert (
        entries[0].error == "DICOM frame has more pixels than the limit of 100 (BRAINSCAN_MAX_IMAGE_PIXELS)"
    )


def test_no_dicom_bytes_or_identity_reach_storage_or_logs(
    store: ScanStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    single = make_dicom(np.tile(np.arange(16, dtype=np.uint16), (16, 1)), window=(8, 16))
    frames = make_dicom(np.stack([np.full((8, 8), i * 20, np.uint8) for i in range(3)]))
    bare = make_dicom(np.full((4, 4), 7, np.uint8), file_format=False)
    archive = make_zip({"study/IM1.dcm": single, "study/IM2": frames, "study/IM3": bare})
    entries = run(
        store, tmp_path, {"a.dcm": single, "study.zip": archive, "study.tar": make_tar({"x/IM2": frames})}
    )
    assert sum(1 for e in entries if e.sha256) == 1 + (1 + 3 + 1) + 3
    assert all(not e.failed for e in entries)
    blobs = stored_bytes(store)
    assert blobs, "PNG scans are stored"
    for blob in blobs:
        assert blob.startswith(b"\x89PNG\r\n\x1a\n")
        assert b"DICM" not in blob
        assert PATIENT.encode() not in blob and PATIENT_ID.encode() not in blob
    assert not any(p.is_file() for p in store.tmp_dir.rglob("*")), "temporary copies are removed"
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert PATIENT not in logged and PATIENT_ID not in logged


# -- NIfTI -----------------------------------------------------------------------------------------


def expected_slices(volume: np.ndarray, affine: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(1-based slice number, PNG pixels) computed independently with nibabel's canonical image."""
    canonical = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(volume, affine)).dataobj, np.float64)
    low, high = np.percentile(canonical, [0.5, 99.5])
    out = []
    for k in range(canonical.shape[2]):
        plane = canonical[:, :, k]
        if plane.max() == plane.min():
            continue
        display = plane.T[::-1, ::-1]
        grey = np.clip(np.rint((display - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
        out.append((k + 1, grey))
    return out


def test_nifti_axial_slices_in_canonical_orientation(store: ScanStore, tmp_path: Path) -> None:
    # Stored axes (A, S, L)-ish: the third stored axis is not axial, so reorientation matters.
    volume = brain_volume((10, 12, 14), blank=0)
    volume[:, :2, :] = 0  # blank axial slices once reoriented (stored axis 1 is S)
    affine = np.array([[0, 0, -1.0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    entries = run(store, tmp_path, {"brain.nii": make_nifti(volume, affine)})
    expected = expected_slices(volume, affine)
    assert len(expected) == 10  # 12 axial slices, 2 blank ones skipped
    assert [e.source_ref for e in entries] == [f"slice {k}/12" for k, _ in expected]
    for entry, (_k, grey) in zip(entries, expected, strict=True):
        assert entry.filename == "brain.nii"
        got = pixels(store, entry)
        assert got.shape == grey.shape == (10, 14)  # rows: A (stored axis 0), columns: R (axis 2)
        assert np.abs(got.astype(int) - grey.astype(int)).max() <= 1


def test_nifti_gz_and_nii_inside_archives(store: ScanStore, tmp_path: Path) -> None:
    volume = brain_volume((16, 16, 9), blank=2)
    nii, niigz = make_nifti(volume), make_nifti(volume, gz=True)
    entries = run(
        store,
        tmp_path,
        {
            "vol.nii.gz": niigz,
            "study.zip": make_zip({"mr/t1.nii.gz": niigz, "mr/t1.nii": nii}),
            "study.tar": make_tar({"t1.nii.gz": niigz}),
        },
    )
    names = [e.filename for e in entries]
    assert all(not e.failed for e in entries), [e.error for e in entries if e.failed]
    for name in ("vol.nii.gz", "study.zip/mr/t1.nii.gz", "study.zip/mr/t1.nii", "study.tar/t1.nii.gz"):
        refs = [e.source_ref for e in entries if e.filename == name]
        assert refs == [f"slice {k}/9" for k in range(3, 8)], name
    assert len(names) == 4 * 5
    # The same volume gives the same slices whichever way it arrived: stored once each.
    assert len({e.sha256 for e in entries}) == 5


def test_nifti_limits_and_refusals(store: ScanStore, tmp_path: Path) -> None:
    volume = brain_volume((32, 32, 8), blank=0)
    small = IntakeLimits(**{**LIMITS.__dict__, "max_expanded_bytes": 16_000})
    entries = run(store, tmp_path, {"big.nii.gz": make_nifti(volume, gz=True)}, small)
    assert len(entries) == 1 and entries[0].failed and "BRAINSCAN_MAX_EXPANDED_BYTES" in entries[0].error

    entries = run(
        store,
        tmp_path,
        {
            "fmri.nii": make_nifti(np.ones((4, 4, 3, 5), np.float32)),
            "empty.nii": make_nifti(np.zeros((4, 4, 3), np.float32)),
            "cut.nii.gz": make_nifti(volume, gz=True)[:-500],
            "cut.nii": make_nifti(volume)[:-100],
        },
    )
    errors = {e.filename: e.error for e in entries}
    assert all(e.failed for e in entries)
    assert errors["fmri.nii"] == "4-D NIfTI (more than one volume in the file): send one 3-D volume per file"
    assert errors["empty.nii"] == "NIfTI volume has no non-blank axial slice"
    assert errors["cut.nii.gz"].startswith("corrupt gzip-compressed NIfTI")
    assert errors["cut.nii"] == "NIfTI file is shorter than its header says: truncated volume"

    few = IntakeLimits(**{**LIMITS.__dict__, "max_items_per_job": 4})
    entries = run(store, tmp_path, {"vol.nii": make_nifti(brain_volume((8, 8, 9), blank=0))}, few)
    assert [e.source_ref for e in entries[:4]] == [f"slice {k}/9" for k in range(1, 5)]
    assert len(entries) == 5 and "BRAINSCAN_MAX_ITEMS_PER_JOB" in entries[4].error


def test_window_helper_maps_its_bounds() -> None:
    values = np.array([-1.0, 0.0, 5.0, 10.0, 11.0, np.nan])
    assert scanners.window_to_uint8(values, 0.0, 10.0).tolist() == [0, 0, 128, 255, 255, 0]
    assert scanners.window_to_uint8(values, 3.0, 3.0).tolist() == [0] * 6
