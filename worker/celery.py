"""The one Celery app. Its configuration is data, in one place, read from ``brainscan.settings``.

This module stays light (no TensorFlow): the API imports it to publish work. The worker imports
``worker.tasks`` (via ``include``), which loads the model only inside a worker process.

Delivery semantics: ``acks_late`` + ``reject_on_worker_lost`` give at-least-once processing; the
tasks make it exactly-once in the database (guarded UPDATEs). With Redis as broker, a message that a
dead worker held is redelivered after ``visibility_timeout``; Kombu's default is one hour, we use
``settings.visibility_timeout_s`` (5 minutes) so a crash costs minutes, not an hour. It must stay
longer than the longest batch, or a live worker's messages would be redelivered under it.

Priority lane: Kombu's Redis transport keeps one list per priority step (``brainscan`` for priority
0, ``brainscan\x06\x169`` for 9, ...) and a worker's BRPOP names them in step order, so a message
at ``URGENT_PRIORITY`` is taken before any ``BULK_PRIORITY`` one, however many are queued (with
Redis, 0 is the *highest* priority). ``brainscan.queueing.publish`` sends small jobs (at most
``settings.urgent_max_items`` scans) urgent and everything else bulk: a single scan never waits
behind a queued archive's messages, only behind the flush the worker is already scoring.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals
from celery.schedules import crontab

from brainscan.settings import Settings, get_settings

SCORE_TASK = "brainscan.score_items"
REAP_TASK = "brainscan.reap"
QUEUE = "brainscan"
# Kombu's default Redis priority steps, named so the lane's lists are known (api/routes/metrics.py
# sums their lengths). Smaller is served first.
PRIORITY_STEPS = [0, 3, 6, 9]
URGENT_PRIORITY = 0  # also what a message without a priority gets (beat's reaper runs)
BULK_PRIORITY = 9


# ---- brainscan: auxiliary tasks (worker/gradcam.py, worker/nightly.py, worker/notify.py) ----------
# On their own queues, so a slow webhook receiver or a long Grad-CAM never sits in the scoring lane's
# lists; ``brainscan worker`` consumes all of WORKER_QUEUES by default.
GRADCAM_TASK = "brainscan.gradcam"
NIGHTLY_TASK = "brainscan.nightly"
NOTIFY_TASK = "brainscan.notify_job"
AUX_QUEUE = "brainscan.aux"  # Grad-CAM and the nightly inbox scan
NOTIFY_QUEUE = "brainscan.notify"  # job-finished webhooks
WORKER_QUEUES = (QUEUE, AUX_QUEUE, NOTIFY_QUEUE)
AUX_MODULES = ["worker.gradcam", "worker.nightly", "worker.notify"]
AUX_ROUTES = {
    GRADCAM_TASK: {"queue": AUX_QUEUE},
    NIGHTLY_TASK: {"queue": AUX_QUEUE},
    NOTIFY_TASK: {"queue": NOTIFY_QUEUE},
}


def parse_cron(expression: str) -> crontab:
    """``settings.nightly_cron`` ("minute hour day-of-month month day-of-week", UTC) -> crontab."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"BRAINSCAN_NIGHTLY_CRON={expression!r}: want 5 crontab fields, "
            "'minute hour day-of-month month day-of-week' (e.g. '0 2 * * *')"
        )
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        return crontab(minute, hour, day_of_week, day_of_month, month_of_year)
    except Exception as exc:  # celery raises ValueError / ParseException subclasses
        raise ValueError(f"BRAINSCAN_NIGHTLY_CRON={expression!r}: {exc}") from None


def aux_beat_schedule(settings: Settings) -> dict:
    return {"nightly-inbox": {"task": NIGHTLY_TASK, "schedule": parse_cron(settings.nightly_cron)}}


# ---- end auxiliary tasks -------------------------------------------------------------------------


def celery_config(settings: Settings) -> dict:
    # A worker must be able to buffer a full batch of one-item messages (single-scan jobs), so its
    # prefetch window is counted in messages: two batches' worth, one scoring and one filling.
    # Kombu's Redis transport pulls one message per poll and the batch flushes as soon as enough
    # *items* are buffered (worker/tasks.py), so big chunked jobs are not hoarded by one worker.
    prefetch = max(4, 2 * settings.batch_size)
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # workers wait for a restarted Redis forever
        "broker_connection_timeout": 3,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "priority_steps": PRIORITY_STEPS,
            # Kombu sweeps for expired unacked messages every interval*throttle seconds (100 s by
            # default); sweep often enough that recovery is about visibility_timeout, not more.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 5)),
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 3,
            "socket_keepalive": True,
            "retry_on_timeout": True,
            "health_check_interval": 10,
        },
        "broker_heartbeat": 0,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": prefetch,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": QUEUE,
        "task_routes": {SCORE_TASK: {"queue": QUEUE}, REAP_TASK: {"queue": QUEUE}, **AUX_ROUTES},
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "timezone": "UTC",
        "enable_utc": True,
        "beat_schedule": {
            "reap-stranded-items": {
                "task": REAP_TASK,
                "schedule": float(settings.reaper_interval_s),
                # A reaper run that waited longer than an interval is superseded by the next one.
                "options": {"expires": float(settings.reaper_interval_s)},
            },
            **aux_beat_schedule(settings),
        },
    }


def create_app(settings: Settings | None = None, set_as_current: bool = True) -> Celery:
    celery_app = Celery("brainscan", include=["worker.tasks", *AUX_MODULES], set_as_current=set_as_current)
    celery_app.conf.update(celery_config(settings or get_settings()))
    return celery_app


app = create_app()


# ---- brainscan: JSON logs in workers and beat (settings.log_format) ------------------------------
@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _json_logs(logger: Any = None, **_: Any) -> None:
    settings = get_settings()
    if settings.log_format != "json" or logger is None:
        return
    from brainscan.logs import JsonFormatter

    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
