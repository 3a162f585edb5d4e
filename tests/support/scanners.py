"""DICOM and NIfTI files for tests, generated with pydicom and nibabel (nothing downloaded).

Every DICOM carries a made-up patient identity (``PATIENT``, ``PATIENT_ID``) so that tests can check
that it never reaches storage, logs or responses.
"""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

PATIENT = "Doe^Jane Secret"
PATIENT_ID = "PID-7781-SECRET"


def make_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    window: tuple[object, object] | None = None,
    rescale: tuple[float, float] | None = None,
    series: int | None = 4,
    instance: int | None = 17,
    file_format: bool = True,
    syntax: str = ExplicitVRLittleEndian,
) -> bytes:
    """A DICOM MR image; ``pixels`` is (rows, cols) or (frames, rows, cols), uint8/uint16/int16."""
    ds = Dataset()
    ds.PatientName = PATIENT
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "MR"
    if series is not None:
        ds.SeriesNumber = series
    if instance is not None:
        ds.InstanceNumber = instance
    frames = pixels.shape[0] if pixels.ndim == 3 else None
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    else:  # compressed: the payload is never decoded in these tests
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3not really a jpeg\xff\xd9"] * (frames or 1))
    out = io.BytesIO()
    if file_format:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(out, enforce_file_format=True)
    else:  # a bare dataset: no preamble, no 'DICM', no file meta (implicit VR little endian)
        ds.save_as(out, implicit_vr=True, little_endian=True)
    return out.getvalue()


def make_nifti(volume: np.ndarray, affine: np.ndarray | None = None, gz: bool = False) -> bytes:
    image = nib.Nifti1Image(volume, np.eye(4) if affine is None else affine)
    data = image.to_bytes()
    return gzip.compress(data) if gz else data
