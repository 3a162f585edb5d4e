"""Client file names as display data: cleaned, bounded, never opened as paths."""

from __future__ import annotations

import unicodedata

MAX_FILENAME_CHARS = 255
OS_METADATA_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}


def sanitize_filename(name: str | bytes | None) -> str:
    """A client's file name made safe to display: no control characters, at most 255 characters.

    It stays data: nothing ever opens a path built from it.
    """
    if name is None:
        return "unnamed"
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    out = []
    for ch in name:
        category = unicodedata.category(ch)
        if category == "Cs":  # lone surrogates (tar's surrogateescape) cannot be encoded anywhere
            out.append("\ufffd")
        elif category == "Cc" or ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069":
            continue  # control characters, and bidi overrides that make names lie about extensions
        else:
            out.append(ch)
    clean = "".join(out).strip()
    if not clean:
        return "unnamed"
    if len(clean) > MAX_FILENAME_CHARS:
        # Keep the start (folders) and the end (file name and extension) of a long name.
        keep_head = 100
        keep_tail = MAX_FILENAME_CHARS - keep_head - 1
        clean = clean[:keep_head] + "\u2026" + clean[-keep_tail:]
    return clean


def member_name(archive_name: str, member: str) -> str:
    return sanitize_filename(f"{archive_name}/{sanitize_filename(member)}")


def is_os_metadata(member: str) -> bool:
    parts = [p for p in member.replace("\\", "/").split("/") if p]
    if not parts:
        return False
    base = parts[-1]
    return parts[0] == "__MACOSX" or base.startswith("._") or base.lower() in OS_METADATA_NAMES
