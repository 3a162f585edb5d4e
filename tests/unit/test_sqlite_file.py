"""Building an engine must never disturb SQLite's locks on a file this process already has open.

POSIX locks belong to the process: closing *any* descriptor of the database file drops every lock the
process holds on it, and the next writer from another process then corrupts the file (this happened:
the 0600 guard opened and closed the file each time an engine was built).
"""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from brainscan.db import make_engine

TRY_TO_WRITE = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], timeout=0)
try:
    connection.execute("BEGIN IMMEDIATE")
except sqlite3.OperationalError as exc:
    print(exc)
else:
    print("got the write lock")
"""


def other_process_tries_to_write(path: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", TRY_TO_WRITE, str(path)], capture_output=True, text=True, timeout=60
    )
    return result.stdout.strip()


def test_a_new_engine_keeps_the_write_lock_another_connection_holds(tmp_path: Path) -> None:
    path = tmp_path / "brainscan.db"
    url = f"sqlite:///{path}"
    make_engine(url).dispose()
    holder = sqlite3.connect(path)
    holder.execute("BEGIN IMMEDIATE")  # this process now holds SQLite's RESERVED lock
    try:
        assert other_process_tries_to_write(path) == "database is locked"
        make_engine(url).dispose()  # e.g. a second engine for the same URL in this process
        assert other_process_tries_to_write(path) == "database is locked"
    finally:
        holder.rollback()
        holder.close()
    assert other_process_tries_to_write(path) == "got the write lock"


def test_the_file_is_created_owner_only_and_a_loose_one_is_tightened(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.db"
    make_engine(f"sqlite:///{fresh}").dispose()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    loose = tmp_path / "loose.db"
    loose.touch()
    loose.chmod(0o644)
    make_engine(f"sqlite:///{loose}").dispose()
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600
