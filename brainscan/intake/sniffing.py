"""What a file is, from its first bytes (never its name)."""

from __future__ import annotations

from typing import Literal

Kind = Literal["jpeg", "png", "zip", "tar", "gzip"]
SCAN_KINDS = ("jpeg", "png")
ARCHIVE_KINDS = ("zip", "tar", "gzip")
HEAD_BYTES = 64 * 1024  # enough for every magic number and, usually, an image's size header
SUPPORTED = "send JPEG, PNG, DICOM or NIfTI scans, or zip/tar archives of them"

# Other formats we can name in the error, so that a client learns what it actually sent.
_KNOWN_UNSUPPORTED = (
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"%PDF", "PDF"),
    (0, b"BZh", "bzip2"),
    (0, b"\xfd7zXZ\x00", "xz"),
    (0, b"7z\xbc\xaf\x27\x1c", "7z"),
    (0, b"Rar!", "RAR"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


def sniff(head: bytes) -> Kind | None:
    """The real type of a file from its first bytes (pass at least 1 KiB when there is that much)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):  # PK\5\6: an empty zip
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if looks_like_tar(head):
        return "tar"
    return None


def looks_like_tar(head: bytes) -> bool:
    if head[257:262] == b"ustar":  # POSIX and GNU tar
        return True
    # An empty tar is nothing but zero blocks (at least two).
    return len(head) >= 1024 and not any(head[:1024])


def describe_unsupported(head: bytes) -> str:
    if not head:
        return "empty file"
    for offset, magic, name in _KNOWN_UNSUPPORTED:
        if head[offset : offset + len(magic)] == magic:
            return f"unsupported file type ({name}): {SUPPORTED}"
    return f"unsupported file type: {SUPPORTED}"
