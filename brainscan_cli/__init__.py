"""The ``brainscan`` command and the embedded supervisor: the top-level wiring.

This package sits above ``api/``, ``worker/`` and ``training/`` and may import all of them; nothing
imports it back (``brainscan/`` is the core and imports nothing above it).
"""

import os

# NumPy's OpenBLAS starts one thread per core that keeps spinning between calls. In a worker, beside
# TensorFlow's own pool and the decode threads, those spinning threads took a quarter of the CPU
# (bench/e2e.py, fp32: 98 -> 128 scans/s with one BLAS thread, docs/performance.md). The service's own
# NumPy work is small matrices (the scope detector's distances): one BLAS thread is plenty. Set before
# NumPy loads, since OpenBLAS reads it once; a value the operator set wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
