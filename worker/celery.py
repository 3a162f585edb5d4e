"""The worker's Celery app. Its configuration is data, in one place, read from ``brainscan.settings``.

Worker and beat processes import this; the API does not (it publishes through
``brainscan.queueing``). The worker imports ``worker.tasks`` (via ``include``), which loads the model
only inside a worker process.

Delivery semantics: ``acks_late`` + ``reject_on_worker_lost`` give at-least-once processing; the
tasks make it exactly-once in the database (guarded UPDATEs). With Redis as broker, a message that a
dead worker held is redelivered after ``visibility_timeout``; Kombu's default is one hour, we use
``settings.visibility_timeout_s`` (5 minutes) so a crash costs minutes, not an hour. It must stay
longer than the longest batch, or a live worker's messages would be redelivered under it.

The queue contract (task and queue names, priority lanes, routes, the publish retry policy) is
``brainscan.queue_contract``: the API and the reaper publish under it without importing this module.
This app is the one Celery app of a worker or beat process; ``brainscan.queueing`` publishes through it.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals
from celery.schedules import crontab

from brainscan import queueing
from brainscan.queue_contract import (
    AUX_QUEUE,
    BULK_PRIORITY,
    GRADCAM_TASK,
    NIGHTLY_TASK,
    NOTIFY_QUEUE,
    NOTIFY_REAP_TASK,
    NOTIFY_TASK,
    PRIORITY_STEPS,
    QUEUE,
    REAP_PRIORITY,
    REAP_TASK,
    RETENTION_TASK,
    SCORE_TASK,
    URGENT_PRIORITY,
    WORKER_QUEUES,
    broker_config,
)
from brainscan.settings import Settings, get_settings

__all__ = [  # the contract's names, re-exported: tests and tools read them here too
    "AUX_QUEUE",
    "BULK_PRIORITY",
    "GRADCAM_TASK",
    "NIGHTLY_TASK",
    "NOTIFY_QUEUE",
    "NOTIFY_REAP_TASK",
    "NOTIFY_TASK",
    "PRIORITY_STEPS",
    "QUEUE",
    "REAP_PRIORITY",
    "REAP_TASK",
    "RETENTION_TASK",
    "SCORE_TASK",
    "URGENT_PRIORITY",
    "WORKER_QUEUES",
    "app",
    "create_app",
]

TASK_MODULES = ["worker.tasks", "worker.gradcam", "worker.nightly", "worker.notify", "worker.retention"]


def parse_cron(expression: str, setting: str = "BRAINSCAN_NIGHTLY_CRON") -> crontab:
    """A crontab setting ("minute hour day-of-month month day-of-week", UTC) -> crontab."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"{setting}={expression!r}: want 5 crontab fields, "
            "'minute hour day-of-month month day-of-week' (e.g. '0 2 * * *')"
        )
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        return crontab(minute, hour, day_of_week, day_of_month, month_of_year)
    except Exception as exc:  # celery raises ValueError / ParseException subclasses
        raise ValueError(f"{setting}={expression!r}: {exc}") from None


def aux_beat_schedule(settings: Settings) -> dict:
    return {
        "nightly-inbox": {"task": NIGHTLY_TASK, "schedule": parse_cron(settings.nightly_cron)},
        # Daily: results and scans past BRAINSCAN_RETENTION_DAYS, and storage/tmp leftovers.
        "retention": {
            "task": RETENTION_TASK,
            "schedule": parse_cron(settings.retention_cron, "BRAINSCAN_RETENTION_CRON"),
        },
    }


def celery_config(settings: Settings) -> dict:
    # A worker must be able to buffer a full batch of one-item messages (single-scan jobs), so its
    # prefetch window is counted in messages: two batches' worth, one scoring and one filling.
    # Kombu's Redis transport pulls one message per poll and the batch flushes as soon as enough
    # *items* are buffered (worker/tasks.py), so big chunked jobs are not hoarded by one worker.
    prefetch = max(4, 2 * settings.batch_size)
    return {
        **broker_config(settings),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": prefetch,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "beat_schedule": {
            "reap-stranded-items": {
                "task": REAP_TASK,
                "schedule": float(settings.reaper_interval_s),
                # A reaper run that waited longer than an interval is superseded by the next one.
                # Its own priority step: the urgent list (0) holds urgent scoring work only, so a
                # flush that finds something there gives way to a scan, never to the reaper.
                "options": {"expires": float(settings.reaper_interval_s), "priority": REAP_PRIORITY},
            },
            # Webhooks committed as owed but never queued, or whose task was lost (worker/notify.py).
            "reap-owed-webhooks": {
                "task": NOTIFY_REAP_TASK,
                "schedule": float(settings.reaper_interval_s),
                "options": {"expires": float(settings.reaper_interval_s)},
            },
            **aux_beat_schedule(settings),
        },
    }


def create_app(settings: Settings | None = None, set_as_current: bool = True) -> Celery:
    celery_app = Celery("brainscan", include=TASK_MODULES, set_as_current=set_as_current)
    celery_app.conf.update(celery_config(settings or get_settings()))
    return celery_app


app = create_app()
queueing.use_celery_app(app)  # the reaper, webhooks and the nightly run publish through this app


# ---- brainscan: JSON logs in workers and beat (settings.log_format) ------------------------------
@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _json_logs(logger: Any = None, **_: Any) -> None:
    import logging

    logging.captureWarnings(True)  # Celery's SecurityWarning & co. as log lines, not raw text
    settings = get_settings()
    if settings.log_format != "json" or logger is None:
        return
    from brainscan.logs import JsonFormatter

    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())


@signals.celeryd_after_setup.connect
def _log_start(sender: Any = None, instance: Any = None, **_: Any) -> None:
    # Instead of Celery's banner (``brainscan worker`` passes --quiet): one line an operator can parse.
    import logging

    queues = sorted(instance.app.amqp.queues.consume_from or ()) if instance is not None else []
    pool_cls = getattr(instance, "pool_cls", "")
    pool = str(getattr(pool_cls, "__module__", pool_cls)).rsplit(".", 1)[-1]  # solo | prefork | ...
    logging.getLogger("worker").info(
        "worker %s starting: queues %s, %s pool",
        sender,
        ",".join(queues),
        pool,
        extra={"event": "worker_started", "worker_id": str(sender), "queues": queues},
    )
