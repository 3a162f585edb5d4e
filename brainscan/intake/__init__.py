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
* Every byte read out of an archive is counted as it is read (headers are not trusted), against
  ``max_scan_bytes`` per scan and ``max_expanded_bytes`` per request, so a zip bomb costs at most
  the limit. Entries per archive (``max_archive_entries``) are counted before a zip is opened (its
  central directory is walked without building objects) and while a tar streams.
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

from brainscan.intake.expansion import Intake, IntakeLimits, expand_uploads
from brainscan.intake.names import MAX_FILENAME_CHARS, sanitize_filename
from brainscan.intake.sniffing import describe_unsupported, sniff
from brainscan.intake.submit import Submitted, submit_job
from brainscan.jobs import IntakeEntry

__all__ = [
    "MAX_FILENAME_CHARS",
    "Intake",
    "IntakeEntry",
    "IntakeLimits",
    "Submitted",
    "describe_unsupported",
    "expand_uploads",
    "sanitize_filename",
    "sniff",
    "submit_job",
]
