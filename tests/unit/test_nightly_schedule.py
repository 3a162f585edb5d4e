"""The nightly run's schedule: ``BRAINSCAN_NIGHTLY_CRON`` parsed into Celery beat's crontab."""

from __future__ import annotations

import pytest


def test_nightly_cron_setting_is_parsed() -> None:
    from brainscan.settings import Settings
    from worker.celery import NIGHTLY_TASK, celery_config, parse_cron

    default = celery_config(Settings())["beat_schedule"]["nightly-inbox"]
    assert default["task"] == NIGHTLY_TASK
    assert (default["schedule"].hour, default["schedule"].minute) == ({2}, {0})
    weekdays = parse_cron("30 1 * * 1-5")
    assert (weekdays.hour, weekdays.minute, weekdays.day_of_week) == ({1}, {30}, {1, 2, 3, 4, 5})
    for bad in ("0 2 * *", "0 25 * * *", "every night"):
        with pytest.raises(ValueError, match="BRAINSCAN_NIGHTLY_CRON"):
            parse_cron(bad)
