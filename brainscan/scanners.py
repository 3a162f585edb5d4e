"""Scanner formats (DICOM, NIfTI) turned into 8-bit greyscale PNG scans at intake.

The rest of the service scores 2-D images, so a scanner file is converted once, when it arrives:

* **DICOM** (``.dcm``, any name: sniffed from the bytes). Every frame becomes one PNG. Pixels get
  the modality rescale (``RescaleSlope``/``RescaleIntercept``) first, then the file's own window
  (``WindowCenter``/``WindowWidth``, the first value when several are given) mapped linearly so
  that ``center - width/2`` is 0 and ``center + width/2`` is 255; without a usable window the
  frame's full range is used. ``MONOCHROME1`` (white = low) is inverted so that every PNG is
  white-is-high. RGB/YBR frames are converted to luminance. Per-frame functional groups of
  enhanced multi-frame files are not consulted: the top-level window and rescale apply to all
  frames.
* **NIfTI** (``.nii``, ``.nii.gz``; NIfTI-1 and NIfTI-2). The volume is reoriented to the closest
  canonical (RAS+) orientation so that the third axis runs inferior -> superior, and each axial
  slice becomes one PNG, shown in the radiological convention (anterior at the top, the
  patient's right on the image's left). Intensities use one window per volume: its 0.5th-99.5th
  percentile range, estimated on at most ``PERCENTILE_SAMPLE`` voxels (a strided sample) so that
  memory stays bounded. Constant slices (all background, typically zero padding) are skipped:
  they carry no anatomy; the ``slice k/n`` reference keeps the volume's numbering, so gaps show.
  4-D volumes (more than one time point) are refused.

Privacy: the original DICOM bytes are never stored, only derived pixels; only the pixel-module
elements, ``SeriesNumber`` and ``InstanceNumber`` are read from a dataset, nothing about it is
logged, and pydicom's own log messages (which may quote element values) are silenced. Error texts
name the problem, never a value from the file.

Everything here reads from a path on local disk (intake spools archive members to a temporary
file first) and yields one PNG at a time, so memory holds at most one frame or slice.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

ScannerKind = Literal["dicom", "nifti", "nifti-gz"]
SCANNER_KINDS: tuple[ScannerKind, ...] = ("dicom", "nifti", "nifti-gz")

NIFTI1_HEADER = 348
NIFTI2_HEADER = 540
PERCENTILE_SAMPLE = 2_000_000
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5

# pydicom logs (and warns) with element values in the message; none of that may reach our logs.
_pydicom_log = logging.getLogger("pydicom")
_pydicom_log.addHandler(logging.NullHandler())
_pydicom_log.propagate = False
_pydicom_log.setLevel(logging.CRITICAL + 1)


class VolumeError(ValueError):
    """A scanner file (or what is left of it) that cannot be converted; the message is the reason."""


@dataclass(frozen=True)
class DerivedScan:
    """One 2-D image cut out of a scanner file: PNG bytes and where in the file it came from."""

    png: bytes
    ref: str


Spend = Callable[[int], None]


def _no_budget(_n: int) -> None:
    return None


# --------------------------------------------------------------------------------------------------
# Sniffing


def sniff_scanner(head: bytes) -> ScannerKind | None:
    """DICOM, NIfTI or gzip-compressed NIfTI, from a file's first bytes (pass at least 1 KiB)."""
    if head.startswith(b"\x1f\x8b"):
        return "nifti-gz" if _nifti_magic(_gunzip_head(head, NIFTI2_HEADER)) else None
    if _nifti_magic(head):
        return "nifti"
    if head[128:132] == b"DICM":
        return "dicom"
    if _bare_dicom_dataset(head):
        return "dicom"
    return None


def _nifti_magic(header: bytes) -> str | None:
    """'n+1' / 'ni1' (NIfTI-1, sizeof_hdr 348 at 0, magic at 344) or 'n+2' (NIfTI-2, 540, magic at 4)."""
    if len(header) >= NIFTI1_HEADER:
        for endian in "<>":
            if struct.unpack_from(f"{endian}i", header, 0)[0] == NIFTI1_HEADER and header[344:348] in (
                b"n+1\x00",
                b"ni1\x00",
            ):
                return header[344:347].decode()
    if len(header) >= 12:
        for endian in "<>":
            if struct.unpack_from(f"{endian}i", header, 0)[0] == NIFTI2_HEADER and header[4:8] in (
                b"n+2\x00",
                b"ni2\x00",
            ):
                return header[4:7].decode()
    return None


def _gunzip_head(data: bytes, size: int) -> bytes:
    """The first ``size`` decompressed bytes of a gzip stream's beginning (bounded: max_length)."""
    try:
        return zlib.decompressobj(wbits=31).decompress(data, size)
    except zlib.error:
        return b""


def _bare_dicom_dataset(head: bytes) -> bool:
    """A DICOM dataset without the 128-byte preamble and 'DICM' (old ACR-NEMA style files)."""
    if len(head) < 8:
        return False
    group = struct.unpack_from("<H", head, 0)[0]
    if group not in (0x0002, 0x0008):
        return False
    from pydicom import dcmread

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(io.BytesIO(head), force=True, stop_before_pixels=True, defer_size=1024)
            # A random file parses as garbage under force=True; a real dataset names its image.
            return "SOPClassUID" in ds or ("Rows" in ds and "Columns" in ds)
    except Exception:
        return False


# --------------------------------------------------------------------------------------------------
# Pixels -> 8-bit


def window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low`` -> 0 and ``high`` -> 255 linearly, clipping outside; NaN becomes 0."""
    values = np.asarray(values, dtype=np.float32)
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    # Multiply before dividing, so that the window's middle lands on exactly 127.5 (-> 128).
    scaled = (values - np.float32(low)) * np.float32(255.0) / np.float32(high - low)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.floor(scaled + np.float32(0.5)), 0, 255).astype(np.uint8)  # round half up


def to_png(grey: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(grey, dtype=np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


def _finite_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 0.0
    return float(finite.min()), float(finite.max())


# --------------------------------------------------------------------------------------------------
# DICOM


def _first_number(value: Any) -> float | None:
    """WindowCenter/Width may be multi-valued (several windows): take the first; None if unusable."""
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
        if value is None:
            return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class DicomWindow:
    slope: float
    intercept: float
    center: float | None
    width: float | None
    invert: bool

    def apply(self, frame: np.ndarray) -> np.ndarray:
        values = frame.astype(np.float32) * np.float32(self.slope) + np.float32(self.intercept)
        if self.center is not None and self.width is not None and self.width > 0:
            low, high = self.center - self.width / 2.0, self.center + self.width / 2.0
        else:
            low, high = _finite_range(values)
        grey = window_to_uint8(values, low, high)
        return 255 - grey if self.invert else grey


def dicom_frames(path: Path, *, max_image_pixels: int, spend: Spend = _no_budget) -> Iterator[DerivedScan]:
    """One PNG per frame of a DICOM file. Raises VolumeError (a reason) for what it cannot read.

    ``spend(n)`` is told the decoded size of compressed pixel data before it is decoded, so the
    caller can bound decompression; uncompressed pixel data is bounded by the file's own size.
    """
    from pydicom import dcmread
    from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # defer_size: large values (pixel data, private blobs) stay on disk until asked for.
            ds = dcmread(path, force=True, stop_before_pixels=True, defer_size=64 * 1024)
    except Exception as exc:
        raise VolumeError(f"unreadable DICOM file ({type(exc).__name__})") from None

    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        syntax = ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
    syntax = UID(str(syntax))

    rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
    if not rows or not columns:
        raise VolumeError("DICOM file without an image (no Rows/Columns): nothing to score")
    if rows * columns > max_image_pixels:
        raise VolumeError(
            f"DICOM frame is {columns}x{rows} pixels, over the limit of {max_image_pixels} "
            "(BRAINSCAN_MAX_IMAGE_PIXELS)"
        )
    frames = max(_int(ds.get("NumberOfFrames")) or 1, 1)
    samples = max(_int(ds.get("SamplesPerPixel")) or 1, 1)
    bits = max(_int(ds.get("BitsAllocated")) or 8, 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB") and not photometric.startswith("YBR"):
        raise VolumeError(f"DICOM photometric interpretation {photometric[:20]} is not supported")
    if syntax.is_compressed:
        spend(rows * columns * frames * samples * math.ceil(bits / 8))

    window = DicomWindow(
        slope=_first_number(ds.get("RescaleSlope")) or 1.0,
        intercept=_first_number(ds.get("RescaleIntercept")) or 0.0,
        center=_first_number(ds.get("WindowCenter")),
        width=_first_number(ds.get("WindowWidth")),
        invert=photometric == "MONOCHROME1",
    )
    series = _int(ds.get("SeriesNumber"))
    instance = _int(ds.get("InstanceNumber"))
    where = (f", series {series}" if series is not None else "") + (
        f", instance {instance}" if instance is not None else ""
    )
    del ds  # nothing else of the dataset is needed (or kept)

    from pydicom.pixels import iter_pixels

    index = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for frame in iter_pixels(path, transfer_syntax_uid=syntax):
                index += 1
                if index > frames:
                    break
                if frame.ndim == 3:  # RGB (YBR is converted to RGB by pydicom): luminance
                    frame = frame[..., :3].astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
                yield DerivedScan(to_png(window.apply(frame)), f"frame {index}/{frames}{where}")
    except (NotImplementedError, RuntimeError) as exc:
        if syntax.is_compressed and _no_decoder(exc):
            raise VolumeError(
                f"compressed DICOM ({syntax.name}) cannot be decoded on this server: no decoder for "
                "that transfer syntax is installed (pylibjpeg or GDCM); send uncompressed DICOM"
            ) from None
        raise VolumeError(f"cannot decode DICOM frame {index + 1}/{frames} ({type(exc).__name__})") from None
    except AttributeError:
        raise VolumeError("DICOM file has no pixel data") from None
    except VolumeError:
        raise
    except Exception as exc:
        raise VolumeError(f"cannot decode DICOM frame {index + 1}/{frames} ({type(exc).__name__})") from None
    if index == 0:
        raise VolumeError("DICOM file has no pixel data")


def _no_decoder(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "plugin" in text or "not supported" in text or "no decoders" in text or "unable to decode" in text


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# NIfTI


def nifti_slices(path: Path, *, max_image_pixels: int) -> Iterator[DerivedScan]:
    """One PNG per non-blank axial slice of an uncompressed NIfTI file on disk (memory-mapped).

    A ``.nii.gz`` is decompressed by the caller first (under its expansion budget), so what reaches
    here is bounded by that budget and read one slice at a time.
    """
    import nibabel as nib
    from nibabel.orientations import io_orientation

    with open(path, "rb") as f:
        magic = _nifti_magic(f.read(NIFTI2_HEADER))
    if magic in ("ni1", "ni2"):
        raise VolumeError(
            "NIfTI header/image pair (.hdr + .img) is not supported: send a single .nii or .nii.gz"
        )
    image_class = nib.Nifti2Image if magic == "n+2" else nib.Nifti1Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # from_file_map, not from_filename: our temporary and spooled files have no .nii suffix.
            file_map = {"image": nib.fileholders.FileHolder(filename=str(path))}
            image = image_class.from_file_map(file_map, mmap=True)
            shape = tuple(int(n) for n in image.shape)
            dtype = image.get_data_dtype()
    except Exception as exc:
        raise VolumeError(f"unreadable NIfTI file ({type(exc).__name__})") from None

    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise VolumeError(f"NIfTI data type {dtype} is not supported (greyscale volumes only)")
    spatial = list(shape[:3]) + [1] * (3 - len(shape[:3]))
    extra = shape[3:]
    if any(n > 1 for n in extra):
        raise VolumeError(f"4-D NIfTI ({'x'.join(map(str, shape))}): send one 3-D volume per file")
    if min(spatial) < 1:
        raise VolumeError("NIfTI volume is empty")
    expected = math.prod(shape) * dtype.itemsize
    if image.dataobj.offset + expected > path.stat().st_size:
        raise VolumeError("NIfTI file is shorter than its header says: truncated volume")

    # Which stored axis becomes R, A and S (and whether it is flipped): nibabel's closest canonical.
    affine = image.affine if len(shape) >= 3 else np.diag([*image.header.get_zooms()[:2], 1.0, 1.0])
    ornt = io_orientation(affine)
    axis_of = {int(ornt[i, 0]): (i, ornt[i, 1] < 0) for i in range(3)}
    (ax_r, flip_r), (ax_a, flip_a), (ax_s, flip_s) = axis_of[0], axis_of[1], axis_of[2]
    n_r, n_a, n_s = spatial[ax_r], spatial[ax_a], spatial[ax_s]
    if n_r * n_a > max_image_pixels:
        raise VolumeError(
            f"NIfTI slice is {n_r}x{n_a} pixels, over the limit of {max_image_pixels} "
            "(BRAINSCAN_MAX_IMAGE_PIXELS)"
        )

    def volume(index: tuple[Any, ...]) -> np.ndarray:
        # Extra length-1 axes (x, y, z, 1) are indexed away; dataobj applies scl_slope/inter.
        full = index + (0,) * (len(shape) - 3) if len(shape) >= 3 else index[: len(shape)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(image.dataobj[full], dtype=np.float32)

    try:
        low, high = _robust_range(volume, spatial)
        emitted = 0
        for k in range(n_s):
            index: list[Any] = [slice(None)] * 3
            index[ax_s] = n_s - 1 - k if flip_s else k
            plane = volume(tuple(index))
            plane = plane.reshape([spatial[a] for a in range(3) if a != ax_s])
            # plane's axes are the two remaining stored axes, in stored order: make them (R, A).
            if ax_r > ax_a:
                plane = plane.T
            if flip_r:
                plane = plane[::-1, :]
            if flip_a:
                plane = plane[:, ::-1]
            finite_low, finite_high = _finite_range(plane)
            if finite_high <= finite_low:
                continue  # blank slice (padding): nothing to score
            # (R, A) -> radiological display: rows anterior..posterior, columns patient right..left.
            display = plane.T[::-1, ::-1]
            emitted += 1
            yield DerivedScan(to_png(window_to_uint8(display, low, high)), f"slice {k + 1}/{n_s}")
    except VolumeError:
        raise
    except Exception as exc:
        raise VolumeError(f"cannot read NIfTI volume ({type(exc).__name__})") from None
    if emitted == 0:
        raise VolumeError("NIfTI volume has no non-blank axial slice")


def _robust_range(volume: Callable[[tuple[Any, ...]], np.ndarray], spatial: list[int]) -> tuple[float, float]:
    """The 0.5th and 99.5th percentiles of the volume, from a strided sample of bounded size."""
    voxels = math.prod(spatial)
    step = max(1, math.ceil((voxels / PERCENTILE_SAMPLE) ** (1 / 3)))
    sample = volume(tuple(slice(None, None, step) for _ in range(3))).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 0.0
    low, high = (float(v) for v in np.percentile(sample, [LOW_PERCENTILE, HIGH_PERCENTILE]))
    if high <= low:  # a nearly constant volume: fall back to its full range
        low, high = float(sample.min()), float(sample.max())
    return low, high
