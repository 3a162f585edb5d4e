"""The ``brainscan`` command and the embedded supervisor: the top-level wiring.

This package sits above ``api/``, ``worker/`` and ``training/`` and may import all of them; nothing
imports it back (``brainscan/`` is the core and imports nothing above it).
"""
