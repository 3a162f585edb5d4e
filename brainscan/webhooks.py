"""Job-finished webhooks: POST the job's summary to the ``callback_url`` given at submit.

``notify`` never raises: a receiver that is down, slow or broken must not fail the job or the
worker. It retries connection errors, timeouts, ``429`` and ``5xx`` with exponential backoff
(``backoff``, ``2*backoff``, ``4*backoff``, ... capped at ``max_backoff``; a ``Retry-After`` in
seconds is honoured within that cap) and stops at once on any other ``4xx`` (the receiver refused
this payload; sending it again would not change that). Redirects are not followed.

Every delivery of one notification carries the same ``X-Brainscan-Delivery`` id, so a receiver
can drop duplicates (a retry after a timeout may arrive twice). Logs name the job and the callback's
host only: a callback URL can carry a token in its path or query.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
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
    """POST ``payload`` as JSON to ``callback_url``; True once a 2xx answer came back. Never raises."""
    host = _host(callback_url)
    job_id = _job_id(payload)
    extra = {"job_id": job_id, "callback_host": host}
    delivery = uuid.uuid4().hex
    headers = {
        "User-Agent": f"brainscan/{__version__}",
        "X-Brainscan-Event": str(payload.get("event", EVENT)),
        "X-Brainscan-Delivery": delivery,
    }
    attempts = max(1, int(attempts))
    try:
        client = httpx.Client(timeout=timeout, follow_redirects=False, headers=headers)
    except Exception as exc:
        log.warning("webhook not sent: %s", type(exc).__name__, extra=extra)
        return False
    with client:
        for attempt in range(1, attempts + 1):
            delay = min(backoff * (2 ** (attempt - 1)), max_backoff)
            try:
                response = client.post(callback_url, json=payload)
            except Exception as exc:  # refused, DNS, timeout, invalid URL: all the receiver's side
                outcome = type(exc).__name__
                retry = isinstance(exc, httpx.TransportError)
            else:
                code = response.status_code
                if 200 <= code < 300:
                    log.info("webhook delivered (attempt %d)", attempt, extra={**extra, "status_code": code})
                    return True
                outcome = f"HTTP {code}"
                retry = code == 429 or code >= 500
                if retry:
                    delay = min(max(delay, _retry_after(response)), max_backoff)
            if not retry:
                log.warning("webhook refused, not retried: %s", outcome, extra=extra)
                return False
            if attempt == attempts:
                break
            log.info("webhook attempt %d/%d failed (%s); retrying", attempt, attempts, outcome, extra=extra)
            sleep(delay)
    log.warning("webhook failed after %d attempts: %s", attempts, outcome, extra=extra)
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
