"""The queue contract between the API, the core and the workers: names, lanes, routes, retry policy.

Whoever publishes (the API, the reaper, the nightly run) and whoever consumes (``worker/celery.py``)
read these from here, so a task name or a queue cannot drift between the two sides. Nothing here
talks to a broker; :mod:`brainscan.queueing` does.

Priority lane: Kombu's Redis transport keeps one list per priority step (``brainscan`` for priority
0, ``brainscan\\x06\\x169`` for 9, ...) and a worker's BRPOP names them in step order, so a message
at ``URGENT_PRIORITY`` is taken before any ``BULK_PRIORITY`` one, however many are queued (with
Redis, 0 is the *highest* priority). :meth:`brainscan.queueing.Publisher.priority_for` sends small
jobs (at most ``settings.urgent_max_items`` scans) urgent and everything else bulk.
"""

from __future__ import annotations

from typing import Any

from brainscan.settings import Settings

SCORE_TASK = "brainscan.score_items"
REAP_TASK = "brainscan.reap"
GRADCAM_TASK = "brainscan.gradcam"
NIGHTLY_TASK = "brainscan.nightly"
NOTIFY_TASK = "brainscan.notify_job"
NOTIFY_REAP_TASK = "brainscan.reap_webhooks"
RETENTION_TASK = "brainscan.retention"

QUEUE = "brainscan"  # scoring and the reaper
AUX_QUEUE = "brainscan.aux"  # Grad-CAM and the nightly inbox scan
NOTIFY_QUEUE = "brainscan.notify"  # job-finished webhooks
# Scoring first; auxiliary work on its own queues so a slow webhook receiver or a long Grad-CAM never
# sits in the scoring lane's lists. ``brainscan worker`` consumes all of them by default.
WORKER_QUEUES = (QUEUE, AUX_QUEUE, NOTIFY_QUEUE)
TASK_ROUTES = {
    SCORE_TASK: {"queue": QUEUE},
    REAP_TASK: {"queue": QUEUE},
    GRADCAM_TASK: {"queue": AUX_QUEUE},
    NIGHTLY_TASK: {"queue": AUX_QUEUE},
    NOTIFY_TASK: {"queue": NOTIFY_QUEUE},
    NOTIFY_REAP_TASK: {"queue": NOTIFY_QUEUE},
    RETENTION_TASK: {"queue": AUX_QUEUE},
}

# Kombu's default Redis priority steps, named so the lane's lists are known. Smaller is served first.
PRIORITY_STEPS = [0, 3, 6, 9]
URGENT_PRIORITY = 0  # also what a message without a priority gets
REAP_PRIORITY = 3  # the reaper's runs: after urgent scans, before bulk work; never on the urgent list
BULK_PRIORITY = 9
# Kombu names a queue's list for a step other than 0 ``<queue>\x06\x16<step>`` (kombu.transport.redis).
KOMBU_PRIORITY_SEP = "\x06\x16"

# Short and bounded: the API must answer even when Redis is gone.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.25, "interval_max": 0.5}
# Workers write ``<prefix><host>:<pid>`` with a TTL; readiness and metrics count these keys.
HEARTBEAT_PREFIX = "brainscan:worker:"


def priority_lists(queue: str = QUEUE) -> list[str]:
    """The Redis lists that hold ``queue``'s waiting messages, one per priority step."""
    return [f"{queue}{KOMBU_PRIORITY_SEP}{step}" if step else queue for step in PRIORITY_STEPS]


def broker_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration both sides must agree on: broker, transport, serialisation, routes."""
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
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": QUEUE,
        "task_routes": TASK_ROUTES,
        "timezone": "UTC",
        "enable_utc": True,
    }
