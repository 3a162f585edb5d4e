"""``brainscan.retention``: the storage lifecycle's daily run (beat, ``BRAINSCAN_RETENTION_CRON``).

Deletes jobs (with their results and Grad-CAM overlays) finished more than
``BRAINSCAN_RETENTION_DAYS`` ago and the scans no item references any more
(:func:`brainscan.storage.purge_expired`), then removes ``storage/tmp`` files left by a process that
stopped mid-upload (:func:`brainscan.storage.sweep_tmp`, files older than an hour: a live upload
may share the folder).
"""

from __future__ import annotations

import logging

from brainscan.db import default_sessions
from brainscan.settings import get_settings
from brainscan.storage import PurgeReport, ScanStore, SweepReport, purge_expired, sweep_tmp
from worker.celery import RETENTION_TASK, app

log = logging.getLogger(__name__)


def run_retention() -> tuple[PurgeReport, SweepReport]:
    settings = get_settings()
    store = ScanStore(settings.resolved_storage_dir)
    with default_sessions()() as session:
        purged = purge_expired(session, store, retention_days=settings.retention_days)
    swept = sweep_tmp(store)
    log.info(
        "retention: removed %d job(s), %d item(s), %d scan(s) (%d bytes), %d temporary file(s)",
        purged.jobs,
        purged.items,
        purged.scans,
        purged.scan_bytes,
        swept.files,
    )
    return purged, swept


@app.task(name=RETENTION_TASK, ignore_result=True, acks_late=False)
def retention() -> dict[str, int]:
    purged, swept = run_retention()
    return {
        "jobs": purged.jobs,
        "scans": purged.scans,
        "scan_bytes": purged.scan_bytes,
        "tmp_files": swept.files,
    }
