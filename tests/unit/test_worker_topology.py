"""``brainscan up``'s default topology: one worker per core (up to four), sharing the cores equally."""

from __future__ import annotations

import pytest

from brainscan_cli import embedded
from brainscan_cli.embedded import MAX_DEFAULT_WORKERS, default_workers, worker_threads


@pytest.mark.parametrize(
    ("cores", "expected"), [(1, 1), (2, 2), (4, 4), (16, MAX_DEFAULT_WORKERS), (None, 1)]
)
def test_one_worker_per_core_up_to_the_cap(
    monkeypatch: pytest.MonkeyPatch, cores: int | None, expected: int
) -> None:
    monkeypatch.setattr(embedded.os, "cpu_count", lambda: cores)
    assert default_workers() == expected


@pytest.mark.parametrize(
    ("tf_threads", "workers", "cores", "expected"),
    [
        (0, 1, 8, 0),  # a lone worker keeps every core
        (0, 2, 2, 1),  # two workers on two cores: one thread each
        (0, 4, 16, 4),  # an equal share
        (0, 3, 2, 1),  # more workers than cores: still one thread, never zero ("all")
        (3, 2, 2, 3),  # an explicit setting wins
    ],
)
def test_workers_share_the_cores_unless_the_setting_says_otherwise(
    monkeypatch: pytest.MonkeyPatch, tf_threads: int, workers: int, cores: int, expected: int
) -> None:
    monkeypatch.setattr(embedded.os, "cpu_count", lambda: cores)
    assert worker_threads(tf_threads, workers) == expected
