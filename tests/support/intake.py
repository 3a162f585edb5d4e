"""Intake limits roomy enough that only what a test tightens (``dataclasses.replace``) ever binds."""

from __future__ import annotations

from brainscan.intake import IntakeLimits

ROOMY_LIMITS = IntakeLimits(
    max_archive_entries=1000,
    max_expanded_bytes=64 * 1024 * 1024,
    max_scan_bytes=1024 * 1024,
    max_image_pixels=1_000_000,
    max_items_per_job=1000,
)
