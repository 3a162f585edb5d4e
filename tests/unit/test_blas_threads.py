"""Service processes run NumPy's OpenBLAS on one thread (``brainscan_cli/__init__.py``).

OpenBLAS threads spin between calls; in a worker they took CPU from the model and the decode threads.
Checked in a fresh interpreter (OpenBLAS reads its setting once, when NumPy loads), by asking the
loaded OpenBLAS library itself.
"""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import {first}
import ctypes, numpy
path = next(line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower())
lib = ctypes.CDLL(path)
names = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads")
print(next(getattr(lib, name) for name in names if hasattr(lib, name))())
"""


def blas_threads(first_import: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(first=first_import)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(out.stdout.strip())


def test_the_brainscan_command_runs_openblas_on_one_thread() -> None:
    assert blas_threads("brainscan_cli.main") == 1


def test_an_operator_setting_wins() -> None:
    assert blas_threads("brainscan_cli.main", OPENBLAS_NUM_THREADS="2") == 2
