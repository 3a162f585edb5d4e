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
  percentile range, estimated on a strided sample of at most ``PERCENTILE_SAMPLE`` voxels whatever
  the volume's shape. Constant slices (all background, typically zero padding) are skipped: they
  carry no anatomy; the ``slice k/n`` reference keeps the volume's numbering, so gaps show.
  4-D volumes (more than one time point) are refused.

Cost is decided from the header, before any pixel is read (:class:`VolumeLimits`): slices or
frames per file, pixels per slice or frame, voxels and decoded bytes per file. Past that, memory
holds at most one slab of ``SLAB_VOXELS`` voxels (or one slice, if a slice is bigger), blank slices
are found a slab at a time with array operations, and a ``.nii.gz`` is decompressed
(:func:`gunzip_nifti`) to exactly the size its header declares, never more.

Privacy: the original DICOM bytes are never stored, only derived pixels; only the pixel-module
elements, ``SeriesNumber`` and ``InstanceNumber`` are read from a dataset, nothing about it is
logged, and pydicom's own log messages (which may quote element values) are silenced. Error texts
are fixed reasons (with our own limits and setting names): they never quote a value from the file.

Everything here reads from a path on local disk (intake spools archive members to a temporary
file first) and yields one PNG at a time.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import numpy as np

from brainscan.settings import Settings, get_settings

if TYPE_CHECKING:
    from nibabel.nifti1 import Nifti1Header

ScannerKind = Literal["dicom", "nifti", "nifti-gz"]
SCANNER_KINDS: tuple[ScannerKind, ...] = ("dicom", "nifti", "nifti-gz")

NIFTI1_HEADER = 348
NIFTI2_HEADER = 540
PERCENTILE_SAMPLE = 2_000_000  # voxels read to estimate a volume's intensity window
SLAB_VOXELS = 4_000_000  # voxels of consecutive slices converted (float32) and checked at once
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
CHUNK = 1024 * 1024

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


@dataclass(frozen=True)
class VolumeLimits:
    """What one scanner file may cost; every limit is checked from the header, before pixel work.

    ``max_image_pixels`` (one slice or frame) is intake's image limit; the others are per file:
    axial slices of a NIfTI volume or frames of a DICOM file, voxels, and decoded bytes (a NIfTI's
    header included: the size of the uncompressed ``.nii``).
    """

    max_image_pixels: int
    max_slices: int
    max_voxels: int
    max_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings, *, max_image_pixels: int | None = None) -> VolumeLimits:
        return cls(
            max_image_pixels=max_image_pixels or settings.max_image_pixels,
            max_slices=settings.max_volume_slices,
            max_voxels=settings.max_volume_voxels,
            max_bytes=settings.max_volume_bytes,
        )


def _configured_limits(max_image_pixels: int) -> VolumeLimits:
    return VolumeLimits.from_settings(get_settings(), max_image_pixels=max_image_pixels)


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
    with np.errstate(over="ignore", invalid="ignore"):
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
        with np.errstate(over="ignore", invalid="ignore"):
            values = frame.astype(np.float32) * np.float32(self.slope) + np.float32(self.intercept)
        if self.center is not None and self.width is not None and self.width > 0:
            low, high = self.center - self.width / 2.0, self.center + self.width / 2.0
        else:
            low, high = _finite_range(values)
        grey = window_to_uint8(values, low, high)
        return 255 - grey if self.invert else grey


@dataclass(frozen=True)
class DicomPlan:
    """What a DICOM file's header says it holds, checked against the limits before decoding."""

    syntax: Any  # pydicom UID: a transfer syntax pydicom knows
    frames: int
    decoded_bytes: int
    window: DicomWindow
    where: str  # ", series N, instance M" (numbers only) for the items' source reference


def dicom_frames(
    path: Path, *, max_image_pixels: int, limits: VolumeLimits | None = None, spend: Spend = _no_budget
) -> Iterator[DerivedScan]:
    """One PNG per frame of a DICOM file. Raises VolumeError (a reason) for what it cannot read.

    The header is checked against ``limits`` (default: the configured ones) before any pixel is
    decoded. ``spend(n)`` is told the decoded size of compressed pixel data before it is decoded,
    so the caller can bound decompression; uncompressed pixel data is bounded by the file's size.
    """
    plan = plan_dicom(_read_dicom_header(path), limits or _configured_limits(max_image_pixels))
    if plan.syntax.is_compressed:
        spend(plan.decoded_bytes)
    return _decode_dicom_frames(path, plan)


def _read_dicom_header(path: Path) -> Any:
    from pydicom import dcmread

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # defer_size: large values (pixel data, private blobs) stay on disk until asked for.
            return dcmread(path, force=True, stop_before_pixels=True, defer_size=64 * 1024)
    except Exception as exc:
        raise VolumeError(f"unreadable DICOM file ({type(exc).__name__})") from None


def plan_dicom(ds: Any, limits: VolumeLimits) -> DicomPlan:
    """Check a DICOM dataset's geometry and pixel module against ``limits``; nothing is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _plan_dicom(ds, limits)
    except VolumeError:
        raise
    except Exception as exc:  # a malformed element, decoded only when asked for
        raise VolumeError(f"unreadable DICOM header ({type(exc).__name__})") from None


def _plan_dicom(ds: Any, limits: VolumeLimits) -> DicomPlan:
    syntax = _transfer_syntax(ds)
    rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
    if not rows or not columns or rows < 1 or columns < 1:
        raise VolumeError("DICOM file without an image (no Rows/Columns): nothing to score")
    if rows * columns > limits.max_image_pixels:
        raise VolumeError(
            f"DICOM frame has more pixels than the limit of {limits.max_image_pixels} "
            "(BRAINSCAN_MAX_IMAGE_PIXELS)"
        )
    frames = max(_int(ds.get("NumberOfFrames")) or 1, 1)
    if frames > limits.max_slices:
        raise VolumeError(
            f"DICOM file has more than {limits.max_slices} frames (BRAINSCAN_MAX_VOLUME_SLICES)"
        )
    if frames * rows * columns > limits.max_voxels:
        raise VolumeError(
            f"DICOM file has more than {limits.max_voxels} pixels in all (BRAINSCAN_MAX_VOLUME_VOXELS)"
        )
    samples = max(_int(ds.get("SamplesPerPixel")) or 1, 1)
    bits = max(_int(ds.get("BitsAllocated")) or 8, 1)
    decoded_bytes = frames * rows * columns * samples * math.ceil(bits / 8)
    if decoded_bytes > limits.max_bytes:
        raise VolumeError(
            f"DICOM pixel data decodes to more than {limits.max_bytes} bytes (BRAINSCAN_MAX_VOLUME_BYTES)"
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB") and not photometric.startswith("YBR"):
        raise VolumeError("unsupported DICOM photometric interpretation (MONOCHROME1/2, RGB or YBR only)")
    window = DicomWindow(
        slope=_first_number(ds.get("RescaleSlope")) or 1.0,
        intercept=_first_number(ds.get("RescaleIntercept")) or 0.0,
        center=_first_number(ds.get("WindowCenter")),
        width=_first_number(ds.get("WindowWidth")),
        invert=photometric == "MONOCHROME1",
    )
    series, instance = _int(ds.get("SeriesNumber")), _int(ds.get("InstanceNumber"))
    where = (f", series {series}" if series is not None else "") + (
        f", instance {instance}" if instance is not None else ""
    )
    return DicomPlan(syntax, frames, decoded_bytes, window, where)


def _transfer_syntax(ds: Any) -> Any:
    """The dataset's transfer syntax, if pydicom knows it as one (an unknown UID is refused)."""
    from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        syntax = ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
    syntax = UID(str(syntax))
    try:
        syntax.is_compressed  # noqa: B018 - raises for a UID that is not a known transfer syntax
    except ValueError:
        raise VolumeError("unsupported DICOM transfer syntax") from None
    return syntax


def _decode_dicom_frames(path: Path, plan: DicomPlan) -> Iterator[DerivedScan]:
    from pydicom.pixels import iter_pixels

    index = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for frame in iter_pixels(path, transfer_syntax_uid=plan.syntax):
                index += 1
                if index > plan.frames:
                    break
                if frame.ndim == 3:  # RGB (YBR is converted to RGB by pydicom): luminance
                    frame = frame[..., :3].astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
                png = to_png(plan.window.apply(frame))
                yield DerivedScan(png, f"frame {index}/{plan.frames}{plan.where}")
    except (NotImplementedError, RuntimeError) as exc:
        if plan.syntax.is_compressed and _no_decoder(exc):
            # The name comes from pydicom's dictionary of transfer syntaxes, not from the file.
            raise VolumeError(
                f"compressed DICOM ({plan.syntax.name}) cannot be decoded on this server: no decoder "
                "for that transfer syntax is installed (pylibjpeg or GDCM); send uncompressed DICOM"
            ) from None
        raise VolumeError(f"cannot decode DICOM frame {index + 1} ({type(exc).__name__})") from None
    except AttributeError:
        raise VolumeError("DICOM file has no pixel data") from None
    except VolumeError:
        raise
    except Exception as exc:
        raise VolumeError(f"cannot decode DICOM frame {index + 1} ({type(exc).__name__})") from None
    if index == 0:
        raise VolumeError("DICOM file has no pixel data")


def _no_decoder(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "plugin" in text or "not supported" in text or "no decoders" in text or "unable to decode" in text


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError, OverflowError):
        return None


# --------------------------------------------------------------------------------------------------
# NIfTI

Axis = tuple[int, bool]  # (stored axis, runs backwards)


@dataclass(frozen=True)
class NiftiPlan:
    """A NIfTI volume's layout and the bounded work it will cost, decided from its header alone."""

    shape: tuple[int, int, int]  # stored spatial shape (Fortran order on disk)
    dtype: np.dtype
    offset: int  # where the voxels start in the uncompressed file
    slope: float
    inter: float
    right: Axis  # which stored axis runs towards the patient's right, left, superior
    anterior: Axis
    superior: Axis
    sample_steps: tuple[int, int, int]  # strides of the percentile sample
    slab_slices: int  # axial slices converted and checked for blankness at once

    @property
    def slices(self) -> int:
        return self.shape[self.superior[0]]

    @property
    def slice_pixels(self) -> int:
        return self.shape[self.right[0]] * self.shape[self.anterior[0]]

    @property
    def file_bytes(self) -> int:
        return self.offset + math.prod(self.shape) * self.dtype.itemsize

    @property
    def sample_voxels(self) -> int:
        return math.prod(-(-n // step) for n, step in zip(self.shape, self.sample_steps, strict=True))

    @property
    def slab_voxels(self) -> int:
        return self.slab_slices * self.slice_pixels


def nifti_slices(
    path: Path, *, max_image_pixels: int, limits: VolumeLimits | None = None
) -> Iterator[DerivedScan]:
    """One PNG per non-blank axial slice of an uncompressed NIfTI file on disk (memory-mapped).

    The header is checked against ``limits`` (default: the configured ones) before any voxel is
    read; a ``.nii.gz`` is decompressed by the caller first, with :func:`gunzip_nifti`.
    """
    plan = plan_nifti(read_nifti_header(path), limits or _configured_limits(max_image_pixels))
    if plan.file_bytes > path.stat().st_size:
        raise VolumeError("NIfTI file is shorter than its header says: truncated volume")
    return _nifti_scans(path, plan)


def read_nifti_header(source: Path | BinaryIO) -> Nifti1Header:
    """The fixed-size header at the start of an uncompressed NIfTI stream (extensions are skipped)."""
    import nibabel as nib

    if isinstance(source, Path):
        with open(source, "rb") as f:
            head = f.read(NIFTI2_HEADER)
    else:
        head = source.read(NIFTI2_HEADER)
    magic = _nifti_magic(head)
    if magic in ("ni1", "ni2"):
        raise VolumeError(
            "NIfTI header/image pair (.hdr + .img) is not supported: send a single .nii or .nii.gz"
        )
    if magic is None:
        raise VolumeError("unreadable NIfTI file (no NIfTI header)")
    header_class, size = (
        (nib.Nifti2Header, NIFTI2_HEADER) if magic == "n+2" else (nib.Nifti1Header, NIFTI1_HEADER)
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return header_class(binaryblock=head[:size], check=True)
    except Exception as exc:
        raise VolumeError(f"unreadable NIfTI header ({type(exc).__name__})") from None


def plan_nifti(header: Nifti1Header, limits: VolumeLimits) -> NiftiPlan:
    """Check a NIfTI header's geometry against ``limits`` and plan bounded work; reads no voxel."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shape = tuple(int(n) for n in header.get_data_shape())
            dtype = np.dtype(header.get_data_dtype())
            offset = int(header.get_data_offset())
            slope, inter = header.get_slope_inter()
            affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    except Exception as exc:
        raise VolumeError(f"unreadable NIfTI header ({type(exc).__name__})") from None
    if offset < int(header.sizeof_hdr):
        raise VolumeError("unreadable NIfTI header (voxels would start inside the header)")
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise VolumeError("NIfTI data type is not supported (greyscale volumes only)")
    if any(n > 1 for n in shape[3:]):
        raise VolumeError("4-D NIfTI (more than one volume in the file): send one 3-D volume per file")
    spatial = (*shape[:3], *[1] * (3 - len(shape[:3])))
    if min(spatial) < 1:
        raise VolumeError("NIfTI volume is empty")
    right, anterior, superior = _canonical_axes(affine)
    plan = NiftiPlan(
        shape=(spatial[0], spatial[1], spatial[2]),
        dtype=dtype,
        offset=offset,
        slope=1.0 if slope is None else float(slope),
        inter=0.0 if inter is None else float(inter),
        right=right,
        anterior=anterior,
        superior=superior,
        sample_steps=sample_steps((spatial[0], spatial[1], spatial[2]), PERCENTILE_SAMPLE),
        slab_slices=1,
    )
    _check_nifti_limits(plan, limits)
    slab_slices = max(1, min(plan.slices, SLAB_VOXELS // plan.slice_pixels))
    return NiftiPlan(**{**plan.__dict__, "slab_slices": slab_slices})


def _check_nifti_limits(plan: NiftiPlan, limits: VolumeLimits) -> None:
    if plan.slices > limits.max_slices:
        raise VolumeError(
            f"NIfTI volume has more than {limits.max_slices} axial slices (BRAINSCAN_MAX_VOLUME_SLICES)"
        )
    if plan.slice_pixels > limits.max_image_pixels:
        raise VolumeError(
            f"NIfTI slice has more pixels than the limit of {limits.max_image_pixels} "
            "(BRAINSCAN_MAX_IMAGE_PIXELS)"
        )
    if math.prod(plan.shape) > limits.max_voxels:
        raise VolumeError(
            f"NIfTI volume has more than {limits.max_voxels} voxels (BRAINSCAN_MAX_VOLUME_VOXELS)"
        )
    if plan.file_bytes > limits.max_bytes:
        raise VolumeError(
            f"NIfTI volume is larger than {limits.max_bytes} bytes uncompressed (BRAINSCAN_MAX_VOLUME_BYTES)"
        )


def _canonical_axes(affine: np.ndarray) -> tuple[Axis, Axis, Axis]:
    """For R, A and S: the stored axis that carries it and whether it is flipped (closest canonical).

    An axis the affine leaves undefined (a zero or non-finite column, as 2-D files often have) takes
    the first stored axis left over, unflipped.
    """
    from nibabel.orientations import io_orientation

    ornt = None
    if np.all(np.isfinite(affine)):
        try:
            ornt = io_orientation(affine)
        except Exception:
            ornt = None
    found: dict[int, Axis] = {}
    if ornt is not None:
        for stored in range(3):
            output, sign = ornt[stored]
            if math.isfinite(output):
                found[int(output)] = (stored, bool(sign < 0))
    unused = [a for a in range(3) if a not in {stored for stored, _ in found.values()}]
    for output in range(3):
        if output not in found:
            found[output] = (unused.pop(0), False)
    return found[0], found[1], found[2]


def sample_steps(shape: tuple[int, int, int], budget: int) -> tuple[int, int, int]:
    """Per-axis strides whose strided sample has at most ``budget`` voxels (and more than half of
    it when the volume is bigger), for any shape: the longest sampled axis is thinned first."""
    steps = [1, 1, 1]
    lengths = list(shape)
    while math.prod(lengths) > budget:
        axis = lengths.index(max(lengths))
        steps[axis] *= 2
        lengths[axis] = -(-shape[axis] // steps[axis])
    return steps[0], steps[1], steps[2]


def gunzip_nifti(
    source: Path,
    out: BinaryIO,
    *,
    max_image_pixels: int,
    limits: VolumeLimits | None = None,
    spend: Spend = _no_budget,
) -> int:
    """Decompress a ``.nii.gz`` into ``out``: its header is checked first, then exactly the bytes
    the header declares are written (a longer stream is cut there). Returns the bytes written.

    Every decompressed byte is counted with ``spend`` first; a stream shorter than its header says
    leaves a short file (which :func:`nifti_slices` refuses as truncated). Damaged gzip data raises
    ``EOFError``/``zlib.error``/``OSError`` for the caller to report.
    """
    with gzip.open(source, "rb") as compressed:
        head = compressed.read(NIFTI2_HEADER)
        spend(len(head))
        plan = plan_nifti(read_nifti_header(io.BytesIO(head)), limits or _configured_limits(max_image_pixels))
        remaining = plan.file_bytes - len(head)
        out.write(head[: plan.file_bytes])
        written = min(len(head), plan.file_bytes)
        while remaining > 0 and (chunk := compressed.read(min(CHUNK, remaining))):
            spend(len(chunk))
            out.write(chunk)
            written += len(chunk)
            remaining -= len(chunk)
    return written


def _nifti_scans(path: Path, plan: NiftiPlan) -> Iterator[DerivedScan]:
    try:
        volume = np.memmap(path, dtype=plan.dtype, mode="r", offset=plan.offset, shape=plan.shape, order="F")
        low, high = _robust_range(
            _scaled(volume[tuple(slice(None, None, s) for s in plan.sample_steps)], plan)
        )
        emitted = 0
        for first, slab in _axial_slabs(volume, plan):
            for k in first + np.flatnonzero(_non_blank(slab)):  # blank slices (padding): nothing to score
                grey = window_to_uint8(_radiological(slab[k - first], plan), low, high)
                emitted += 1
                yield DerivedScan(to_png(grey), f"slice {k + 1}/{plan.slices}")
    except VolumeError:
        raise
    except Exception as exc:
        raise VolumeError(f"cannot read NIfTI volume ({type(exc).__name__})") from None
    if emitted == 0:
        raise VolumeError("NIfTI volume has no non-blank axial slice")


def _axial_slabs(volume: np.ndarray, plan: NiftiPlan) -> Iterator[tuple[int, np.ndarray]]:
    """(index of the first slice, float32 slab of axial slices inferior -> superior), plan.slab_slices
    at a time; a slab's axes are (slice, the two other stored axes in stored order)."""
    axis, flipped = plan.superior
    n = plan.slices
    for first in range(0, n, plan.slab_slices):
        last = min(n, first + plan.slab_slices)
        index: list[slice] = [slice(None)] * 3
        index[axis] = slice(n - last, n - first) if flipped else slice(first, last)
        slab = np.moveaxis(_scaled(volume[tuple(index)], plan), axis, 0)
        yield first, slab[::-1] if flipped else slab


def _scaled(stored: np.ndarray, plan: NiftiPlan) -> np.ndarray:
    """A copy of stored voxels as float32 with the header's scl_slope/scl_inter applied."""
    values = np.array(stored, dtype=np.float32)
    if plan.slope != 1.0 or plan.inter != 0.0:
        with np.errstate(over="ignore", invalid="ignore"):
            values *= np.float32(plan.slope)
            values += np.float32(plan.inter)
    return values


def _non_blank(slab: np.ndarray) -> np.ndarray:
    """Per slice of a slab: does it hold two different finite values? (vectorised over the slab)"""
    finite = np.isfinite(slab)
    low = np.where(finite, slab, np.inf).min(axis=(1, 2))
    high = np.where(finite, slab, -np.inf).max(axis=(1, 2))
    return high > low


def _radiological(plane: np.ndarray, plan: NiftiPlan) -> np.ndarray:
    """A slice (its two stored axes in stored order) -> rows anterior..posterior, columns R..L."""
    (ax_r, flip_r), (ax_a, flip_a) = plan.right, plan.anterior
    if ax_r > ax_a:
        plane = plane.T
    if flip_r:
        plane = plane[::-1, :]
    if flip_a:
        plane = plane[:, ::-1]
    return plane.T[::-1, ::-1]


def _robust_range(sample: np.ndarray) -> tuple[float, float]:
    """The 0.5th and 99.5th percentiles of a (bounded) sample of the volume."""
    sample = sample.ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 0.0
    low, high = (float(v) for v in np.percentile(sample, [LOW_PERCENTILE, HIGH_PERCENTILE]))
    if high <= low:  # a nearly constant volume: fall back to its full range
        low, high = float(sample.min()), float(sample.max())
    return low, high
