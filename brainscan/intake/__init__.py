"""Job submission without HTTP: sniff what was sent, expand archives safely, store scans, write the job.

The API, the nightly inbox scan and tests all go through here. The rules:

* The type of a file comes from its bytes, never its name. JPEG and PNG are scans; ZIP, TAR and
  gzip-compressed TAR are archives of scans; DICOM and NIfTI (``.nii``, ``.nii.gz``) files, alone
  or inside archives, are converted here into one 8-bit PNG per frame or axial slice
  (:mod:`brainscan.scanners`; the original scanner bytes are never stored); anything else becomes a
  failed item with the reason.
* Archives are read as streams, member by member. Nothing is ever extracted to a path: a member's
  name (``../../etc/passwd``, ``/abs``, control characters) is display data only, and each scan is
  stored under its SHA-256 by :class:`~brainscan.storage.ScanStore`.
* Archives are read by bounded code: a tar stream by our own linear parser
  (:func:`~brainscan.intake.archives.tar_members`: extended headers capped in size and count, so
  ``tarfile``'s quadratic pax regex and its recursion are never reached), a zip's central directory
  counted before ``zipfile`` opens it.
* One budget per request (:class:`~brainscan.intake.expansion.RequestBudget`) counts every
  decompressed byte (skipped members, tar headers and ``.nii.gz`` voxels included), every archive
  entry examined, the bytes of scans stored and the CPU time spent; headers are never trusted.
* Junk is refused before it is stored: a scan's header must parse (format, dimensions, mode) within
  its first 256 KiB and its size must be one its pixels could need (:func:`brainscan.imaging.scan_header`).
* Limits truncate, they do not fail the request: whatever could not be read becomes one failed item
  that says which limit stopped it and which setting raises it.
* An archive over the entry limit, an empty archive, a nested archive, a link, a device file or an
  encrypted member each become one failed item; directories and OS metadata files
  (``__MACOSX/``, ``._*``, ``.DS_Store``, ``Thumbs.db``) are skipped silently.

Then :func:`brainscan.jobs.create_job` writes the job and all its items in one transaction, and
:func:`submit_job` enqueues (through the function its caller passes) only after that commit; the
reaper sends anything the broker missed.

The modules: ``sniffing`` (what a file is), ``names`` (client file names as display data),
``archives`` (low-level zip/tar guards), ``expansion`` (:class:`Intake`: files to stored entries)
and ``submit`` (the job transaction, then the enqueue).
"""

from brainscan.intake.expansion import Intake, IntakeLimits, RequestBudget, expand_uploads
from brainscan.intake.names import MAX_FILENAME_CHARS, sanitize_filename
from brainscan.intake.sniffing import describe_unsupported, sniff
from brainscan.intake.submit import Submitted, submit_job
from brainscan.jobs import IntakeEntry

__all__ = [
    "MAX_FILENAME_CHARS",
    "Intake",
    "IntakeEntry",
    "IntakeLimits",
    "RequestBudget",
    "Submitted",
    "describe_unsupported",
    "expand_uploads",
    "sanitize_filename",
    "sniff",
    "submit_job",
]
