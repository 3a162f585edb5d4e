"""The operator's commands as a process runs them: misconfiguration is one line and a hint (no
traceback unless ``--debug``), a missing schema says ``db upgrade``, and ``nightly --now`` says why
it left freshly copied files alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from brainscan_cli.embedded import free_port
from tests.support.environment import ROOT

pytestmark = pytest.mark.integration


def brainscan(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("BRAINSCAN_")}
    return subprocess.run(
        [sys.executable, "-m", "brainscan_cli.main", *args],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def two_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("  hint: "), result.stderr
    return lines


def test_db_upgrade_with_a_wrong_url_is_one_line(tmp_path: Path) -> None:
    unreachable = f"postgresql+psycopg://brainscan:s3cret@127.0.0.1:{free_port()}/brainscan"
    first, hint = two_lines(brainscan("db", "upgrade", BRAINSCAN_DATABASE_URL=unreachable))
    assert first.startswith("error: cannot use the database at postgresql+psycopg://brainscan:***@127.0.0.1")
    assert "s3cret" not in first and "BRAINSCAN_DATABASE_URL" in hint
    first, _ = two_lines(brainscan("db", "upgrade", BRAINSCAN_DATABASE_URL="not a url"))
    assert first == "error: BRAINSCAN_DATABASE_URL is not a database URL this installation understands"
    debug = brainscan("--debug", "db", "upgrade", BRAINSCAN_DATABASE_URL="not a url")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_keys_list_tells_an_unreachable_database_from_a_missing_schema(tmp_path: Path) -> None:
    unreachable = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/brainscan"
    first, _ = two_lines(brainscan("keys", "list", BRAINSCAN_DATABASE_URL=unreachable))
    assert "cannot use the database" in first and "db upgrade" not in first
    empty = brainscan("keys", "list", BRAINSCAN_VAR_DIR=str(tmp_path))  # SQLite file, no tables
    assert empty.returncode == 1
    assert empty.stderr.strip() == "the database has no brainscan tables yet: run `brainscan db upgrade`"


def test_nightly_now_says_it_left_files_that_are_still_settling(sqlite_url: str, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "just-copied.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    result = brainscan(
        "nightly",
        "--now",
        BRAINSCAN_DATABASE_URL=sqlite_url,
        BRAINSCAN_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0",
        BRAINSCAN_VAR_DIR=str(tmp_path / "var"),
        BRAINSCAN_NIGHTLY_INBOX_DIR=str(inbox),
        BRAINSCAN_NIGHTLY_SETTLE_S="600",
    )
    assert result.returncode == 0, result.stderr
    assert "1 file(s) skipped: modified less than 600 s ago (BRAINSCAN_NIGHTLY_SETTLE_S)" in result.stdout
    assert (inbox / "just-copied.zip").exists()
