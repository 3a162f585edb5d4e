"""Job-finished webhooks: POST the job's summary to the ``callback_url`` given at submit.

:func:`post_once` makes one try and never raises: a receiver that is down, slow or broken must not
fail the job or the worker. Connection errors, timeouts, ``429`` and ``5xx`` are worth another try,
with exponential backoff (``backoff``, ``2*backoff``, ``4*backoff``, ... capped; a ``Retry-After`` in
seconds is honoured within the cap, :func:`retry_delay`); any other ``4xx`` is final (the receiver
refused this payload; sending it again would not change that). Redirects are not followed.

In a worker the retries are Celery's (``worker/notify.py``: ``autoretry_for`` / ``retry_backoff`` /
``max_retries``), so they outlive a worker restart; :func:`notify` is the same policy in-process.

Every try of one notification carries the same ``X-Brainscan-Delivery`` id, so a receiver can drop
duplicates (a retry after a timeout may arrive twice). Logs name the job and the callback's host
only: a callback URL can carry a token in its path or query.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from brainscan import __version__

log = logging.getLogger(__name__)

EVENT = "job.finished"


def job_payload(job: Any) -> dict[str, Any]:
    """The body sent for a finished job: its summary (counts, status, model), no item data."""
    from brainscan.results import job_summary

    return {"event": EVENT, "job": job_summary(job)}


@dataclass(frozen=True)
class Attempt:
    """What one POST of a webhook came to."""

    delivered: bool
    retry: bool  # a failure worth another try: connection error, timeout, 429, 5xx
    outcome: str  # "HTTP 503", "ConnectTimeout": never the URL
    retry_after: float = 0.0  # seconds the receiver asked for (Retry-After), 0 when none


def post_once(callback_url: str, payload: dict[str, Any], delivery: str, *, timeout: float = 10.0) -> Attempt:
    """POST ``payload`` as JSON to ``callback_url`` once, as delivery ``delivery``. Never raises.

    Whoever retries (the ``brainscan.notify_job`` Celery task, or :func:`notify`) passes the same
    ``delivery`` id every time, so the receiver can drop a duplicate.
    """
    extra = {"job_id": _job_id(payload), "callback_host": _host(callback_url)}
    headers = {
        "User-Agent": f"brainscan/{__version__}",
        "X-Brainscan-Event": str(payload.get("event", EVENT)),
        "X-Brainscan-Delivery": delivery,
    }
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, headers=headers) as client:
            response = client.post(callback_url, json=payload)
    except Exception as exc:  # refused, DNS, timeout, invalid URL: all the receiver's side
        return Attempt(False, isinstance(exc, httpx.TransportError), type(exc).__name__)
    code = response.status_code
    if 200 <= code < 300:
        log.info("webhook delivered", extra={**extra, "status_code": code})
        return Attempt(True, False, f"HTTP {code}")
    retry = code == 429 or code >= 500
    return Attempt(False, retry, f"HTTP {code}", _retry_after(response) if retry else 0.0)


def retry_delay(attempt: int, backoff: float, max_backoff: float, retry_after: float = 0.0) -> float:
    """Seconds before try ``attempt + 1``: ``backoff * 2**(attempt-1)``, or Retry-After, within the cap."""
    return min(max(backoff * (2 ** (attempt - 1)), retry_after), max_backoff)


def notify(
    callback_url: str,
    payload: dict[str, Any],
    attempts: int = 5,
    backoff: float = 2.0,
    *,
    timeout: float = 10.0,
    max_backoff: float = 300.0,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Deliver in this process, sleeping between tries; True once a 2xx answer came back. Never raises.

    For callers without a worker (scripts, tools). A worker never sleeps in a task: the
    ``brainscan.notify_job`` task makes one :func:`post_once` per run and lets Celery schedule the
    next try (``worker/notify.py``), so a retry survives a worker restart.
    """
    extra = {"job_id": _job_id(payload), "callback_host": _host(callback_url)}
    delivery = uuid.uuid4().hex
    attempts = max(1, int(attempts))
    for attempt in range(1, attempts + 1):
        result = post_once(callback_url, payload, delivery, timeout=timeout)
        if result.delivered:
            return True
        if not result.retry:
            log.warning("webhook refused, not retried: %s", result.outcome, extra=extra)
            return False
        if attempt == attempts:
            break
        log.info(
            "webhook attempt %d/%d failed (%s); retrying", attempt, attempts, result.outcome, extra=extra
        )
        sleep(retry_delay(attempt, backoff, max_backoff, result.retry_after))
    log.warning("webhook failed after %d attempts: %s", attempts, result.outcome, extra=extra)
    return False


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "0")))
    except ValueError:
        return 0.0  # an HTTP date: ignored, our own backoff applies


def _host(url: str) -> str:
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def _job_id(payload: dict[str, Any]) -> str | None:
    job = payload.get("job")
    if isinstance(job, dict) and job.get("id"):
        return str(job["id"])
    value = payload.get("id")
    return str(value) if value else None
