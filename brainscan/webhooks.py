"""Job-finished webhooks: POST the job's summary to the ``callback_url`` given at submit.

:func:`post_once` makes one try and never raises: a receiver that is down, slow or broken must not
fail the job or the worker. Connection errors, timeouts, ``429`` and ``5xx`` are worth another try,
with exponential backoff (``backoff``, ``2*backoff``, ``4*backoff``, ... capped; a ``Retry-After`` in
seconds is honoured within the cap, :func:`retry_delay`); any other ``4xx`` is final (the receiver
refused this payload; sending it again would not change that). Redirects are not followed. The
retries are Celery's (``worker/notify.py``), so they outlive a worker restart.

Bounded cost per try. One try has a *total* deadline (``BRAINSCAN_WEBHOOK_TIMEOUT_S``): name
resolution, connect, send and the whole answer, not a per-read timeout, so a receiver trickling one
byte every few seconds is cut at the deadline like a silent one. ``getaddrinfo`` cannot be
cancelled, so it runs on a daemon thread of its own (:class:`BoundedResolver`) that the try stops
waiting for at the deadline ("callback host did not resolve within N s", retried like a timeout);
at most ``RESOLVER_THREADS`` lookups are pending at once in a process, and past that a try fails at
once ("name resolution busy", retried) rather than start one more thread a hung resolver would keep.

Destination policy. A callback URL is attacker-chosen: it must not reach the service's own network.
Every address the host resolves to *at send time* (a name may resolve elsewhere than it did at
submit) must be public (``ipaddress``'s ``is_global``: not loopback, link-local, private, shared,
reserved or multicast) unless the host name or a CIDR holding the address is in
``BRAINSCAN_WEBHOOK_ALLOW``; the connection then goes to the very address checked (no second
lookup an attacker's DNS could answer differently). A refused destination is final, never retried.

Every try of one notification carries the same ``X-Brainscan-Delivery`` id, so a receiver can drop
duplicates (a retry after a timeout may arrive twice). Logs name the job and the callback's host
only: a callback URL can carry a token in its path or query.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from brainscan import __version__

log = logging.getLogger(__name__)

EVENT = "job.finished"
# Name lookups pending at once in one process (a worker runs one try at a time per thread).
RESOLVER_THREADS = 4

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def job_payload(job: Any) -> dict[str, Any]:
    """The body sent for a finished job: its summary (counts, status, model), no item data."""
    from brainscan.results import job_summary

    return {"event": EVENT, "job": job_summary(job)}


# ---- destination policy ---------------------------------------------------------------------------


class DestinationRefused(Exception):
    """The callback's host is, or resolves to, an address the policy does not allow."""


@dataclass(frozen=True)
class DestinationPolicy:
    """Which non-public destinations a callback may reach (``BRAINSCAN_WEBHOOK_ALLOW``)."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = field(default=())

    @classmethod
    def parse(cls, allow: str) -> DestinationPolicy:
        """``"hooks.internal, 10.1.0.0/16, 127.0.0.1"``: host names and addresses/CIDRs."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in (part.strip() for part in allow.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows(self, host: str, address: IPAddress) -> bool:
        if host.lower().rstrip(".") in self.hosts:
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address.is_global or any(address in network for network in self.networks)

    def submit_problem(self, url: str) -> str | None:
        """Why ``url`` is refused at submit, from the URL alone (no name lookup), else None.

        A literal address is checked now; a host name is checked against what it resolves to at
        each send (:func:`post_once`).
        """
        try:
            host = urlsplit(url).hostname or ""
        except ValueError:
            return "callback_url is not a valid URL"
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            name = host.lower().rstrip(".")
            local = name in ("localhost", "") or name.endswith(".localhost")
            if local and name not in self.hosts:
                return "callback_url points at a local host (allow it with BRAINSCAN_WEBHOOK_ALLOW)"
            return None
        if not self.allows(host, address):
            return (
                "callback_url points at a loopback, link-local, private or reserved address "
                "(allow it with BRAINSCAN_WEBHOOK_ALLOW)"
            )
        return None


# ---- one try ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """What one POST of a webhook came to."""

    delivered: bool
    retry: bool  # a failure worth another try: connection error, timeout, 429, 5xx
    outcome: str  # "HTTP 503", "ConnectTimeout", "deadline exceeded": never the URL
    retry_after: float = 0.0  # seconds the receiver asked for (Retry-After), 0 when none
    timed_out: bool = False  # the receiver (or its name server) used up the whole deadline


DEADLINE_EXCEEDED = "deadline exceeded"
REFUSED_DESTINATION = "destination not allowed"


# ---- name resolution ----------------------------------------------------------------------------


class ResolutionFailed(Exception):
    """The callback host did not resolve in time, or no lookup could start: worth another try.

    The message is the attempt's outcome: it names the limit, never the host.
    """

    def __init__(self, reason: str, *, timed_out: bool) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


AddressInfo = tuple[Any, ...]  # one ``socket.getaddrinfo`` result


class BoundedResolver:
    """``getaddrinfo`` with a timeout, on at most ``max_pending`` threads at once.

    A lookup cannot be cancelled: one that outlives its caller's timeout keeps its thread (a daemon,
    so it never holds up the process's exit) and its slot until the resolver answers. With every
    slot held, :meth:`resolve` fails at once: a resolver that hangs costs at most ``max_pending``
    threads, however many webhooks wait.
    """

    def __init__(self, max_pending: int, lookup: Callable[..., list[AddressInfo]] | None = None) -> None:
        self.max_pending = max_pending
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lookup = lookup  # None: socket.getaddrinfo, looked up at each call

    def resolve(self, host: str, port: int, timeout_s: float) -> list[AddressInfo]:
        """``getaddrinfo(host, port)`` for TCP, or :class:`ResolutionFailed` after ``timeout_s``."""
        if not self._slots.acquire(blocking=False):
            raise ResolutionFailed(
                f"name resolution busy: {self.max_pending} lookups of callback hosts still pending",
                timed_out=False,
            )
        answer: Future[list[AddressInfo]] = Future()
        lookup = self._lookup or socket.getaddrinfo

        def run() -> None:
            try:
                answer.set_result(lookup(host, port, type=socket.SOCK_STREAM))
            except BaseException as exc:  # handed to the waiter, if it still waits
                answer.set_exception(exc)
            finally:
                self._slots.release()

        try:
            threading.Thread(target=run, name="webhook-dns", daemon=True).start()
        except RuntimeError:  # no thread could be started (a process limit)
            self._slots.release()
            raise ResolutionFailed("name resolution unavailable: no lookup thread", timed_out=False) from None
        try:
            return answer.result(timeout=timeout_s)
        except TimeoutError:
            raise ResolutionFailed(
                f"callback host did not resolve within {timeout_s:g} s", timed_out=True
            ) from None


_RESOLVER = BoundedResolver(RESOLVER_THREADS)


def post_once(
    callback_url: str,
    payload: dict[str, Any],
    delivery: str,
    *,
    deadline_s: float = 10.0,
    policy: DestinationPolicy | None = None,
) -> Attempt:
    """POST ``payload`` as JSON to ``callback_url`` once, within ``deadline_s`` in all. Never raises.

    Whoever retries (the ``brainscan.notify_job`` Celery task) passes the same ``delivery`` id every
    time, so the receiver can drop a duplicate. Must not be called from a running event loop.
    """
    extra = {"job_id": _job_id(payload), "callback_host": _host(callback_url)}
    headers = {
        "User-Agent": f"brainscan/{__version__}",
        "X-Brainscan-Event": str(payload.get("event", EVENT)),
        "X-Brainscan-Delivery": delivery,
    }
    started = time.monotonic()
    try:
        target = _target(callback_url)
        # Resolved before the event loop starts: a lookup cannot be cancelled, so the try stops
        # waiting for it at the deadline rather than hand it to an executor the loop waits for.
        address = _resolve_allowed(target, policy or DestinationPolicy(), deadline_s)
        remaining = deadline_s - (time.monotonic() - started)
        if remaining <= 0:
            raise TimeoutError
        # The whole try (connect, send, answer) within what the lookup left of the deadline.
        post = _post(callback_url, target, address, payload, headers, remaining)
        response = asyncio.run(asyncio.wait_for(post, remaining))
    except ResolutionFailed as exc:
        log.warning("webhook not sent: %s", exc, extra=extra)
        return Attempt(False, True, str(exc), timed_out=exc.timed_out)
    except TimeoutError:
        return Attempt(False, True, DEADLINE_EXCEEDED, timed_out=True)
    except DestinationRefused:
        log.warning("webhook destination refused by BRAINSCAN_WEBHOOK_ALLOW policy", extra=extra)
        return Attempt(False, False, REFUSED_DESTINATION)
    except Exception as exc:  # refused, DNS, invalid URL: all the receiver's side
        transient = isinstance(exc, httpx.TransportError | OSError)
        return Attempt(False, transient, type(exc).__name__)
    code = response.status_code
    if 200 <= code < 300:
        log.info("webhook delivered", extra={**extra, "status_code": code})
        return Attempt(True, False, f"HTTP {code}")
    retry = code == 429 or code >= 500
    return Attempt(False, retry, f"HTTP {code}", _retry_after(response) if retry else 0.0)


def _target(url: str) -> httpx.URL:
    target = httpx.URL(url)
    if target.scheme not in ("http", "https") or not target.host:
        raise ValueError("callback_url must be an http(s) URL")
    return target


async def _post(
    url: str,
    target: httpx.URL,
    address: IPAddress,
    payload: dict[str, Any],
    headers: dict[str, str],
    deadline_s: float,
) -> httpx.Response:
    pinned = target.copy_with(host=str(address))
    request_headers = {**headers, "Host": url_netloc(url)}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    # trust_env=False: no proxy from the environment would take the pinned address elsewhere.
    # A streamed request whose body is never read: a receiver chosen by the client cannot push a large
    # response into the worker's memory (only the status and headers are used).
    async with httpx.AsyncClient(timeout=deadline_s, follow_redirects=False, trust_env=False) as client:
        request = client.build_request(
            "POST", pinned, json=payload, headers=request_headers, extensions=extensions
        )
        response = await client.send(request, stream=True)
        await response.aclose()  # status and headers only: the body is never read
        return response


def _resolve_allowed(target: httpx.URL, policy: DestinationPolicy, timeout_s: float) -> IPAddress:
    """The address to connect to: every address the host resolves to must be allowed."""
    host = target.host
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        addresses = [ipaddress.ip_address(host.split("%", 1)[0])]  # a literal: nothing to look up
    except ValueError:
        infos = _RESOLVER.resolve(host, port, timeout_s)
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addresses:
        raise OSError("no address")
    if not all(policy.allows(host, address) for address in addresses):
        raise DestinationRefused(host)
    return addresses[0]


def url_netloc(url: str) -> str:
    """``host[:port]`` of ``url`` without any user info: the Host header to send."""
    return urlsplit(url).netloc.rpartition("@")[2]


def retry_delay(attempt: int, backoff: float, max_backoff: float, retry_after: float = 0.0) -> float:
    """Seconds before try ``attempt + 1``: ``backoff * 2**(attempt-1)``, or Retry-After, within the cap."""
    return min(max(backoff * (2 ** (attempt - 1)), retry_after), max_backoff)


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
