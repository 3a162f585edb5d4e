"""Where the tests run: the repository root, settings from the environment, and polling.

In-process code reads settings from the environment: ``use_env`` sets ``BRAINSCAN_*`` variables and
clears the cached settings; subprocesses (worker, API) get the same variables.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = float(os.environ.get("BRAINSCAN_TEST_WAIT_S", "180"))  # generous: the CPU may be shared


def clear_settings_cache() -> None:
    from brainscan.settings import get_settings

    get_settings.cache_clear()


@contextlib.contextmanager
def use_env(env: dict[str, str]) -> Iterator[None]:
    """Set environment variables (settings) for in-process code; restore them afterwards."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    clear_settings_cache()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        clear_settings_cache()


def wait_for(check: Callable[[], object], timeout_s: float = WAIT_S, what: str = "condition") -> object:
    """Poll until ``check()`` is truthy. A timeout is a hang guard, not a performance assertion."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout_s:.0f}s")
        time.sleep(0.1)
