"""A callback host whose name server hangs: brainscan.webhooks resolves with a timeout, on few threads.

``socket.getaddrinfo`` is replaced by a lookup that blocks until the test releases it: that is the
hanging resolver itself (nothing else is stood in for). No test waits for a lookup to finish on its
own; each releases its blocked lookups at the end, so no thread outlives the test by more than that.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import brainscan.webhooks as webhooks
from brainscan.webhooks import (
    EVENT,
    RESOLVER_THREADS,
    BoundedResolver,
    DestinationPolicy,
    ResolutionFailed,
    post_once,
)

PAYLOAD = {"event": EVENT, "job": {"id": "job-dns", "status": "succeeded", "total": 1, "done": 1}}
PUBLIC_ANSWER = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80))]


class HangingLookup:
    """A ``getaddrinfo`` that blocks until released; counts the lookups that started."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = 0
        self._lock = threading.Lock()

    def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        with self._lock:
            self.started += 1
        self.release.wait(60)  # a guard for a broken test, never reached by a passing one
        return PUBLIC_ANSWER


@pytest.fixture
def hanging() -> Iterator[HangingLookup]:
    lookup = HangingLookup()
    yield lookup
    lookup.release.set()


def dns_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "webhook-dns" and t.is_alive()]


def wait_for_slots(resolver: BoundedResolver) -> None:
    """Until every released lookup has given its slot back."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(resolver._slots.acquire(blocking=False) for _ in range(resolver.max_pending)):
            for _ in range(resolver.max_pending):
                resolver._slots.release()
            return
        time.sleep(0.01)
    raise AssertionError("released lookups did not give their slots back")


def test_a_hanging_resolver_fails_the_attempt_at_the_deadline_with_a_clear_reason(
    monkeypatch: pytest.MonkeyPatch, hanging: HangingLookup
) -> None:
    monkeypatch.setattr(webhooks, "_RESOLVER", BoundedResolver(RESOLVER_THREADS))
    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    started = time.monotonic()
    attempt = post_once("https://hooks.example.org/brainscan?token=s3cret", PAYLOAD, "d-1", deadline_s=0.3)
    elapsed = time.monotonic() - started
    assert (attempt.delivered, attempt.retry, attempt.outcome) == (
        False,
        True,  # worth another try: Celery's retry policy (worker/notify.py) applies
        "callback host did not resolve within 0.3 s",
    )
    assert attempt.timed_out  # it used the whole deadline: notify holds the key's slot like a timeout
    assert 0.3 <= elapsed < 2.0
    assert "hooks.example.org" not in attempt.outcome and "s3cret" not in attempt.outcome
    assert hanging.started == 1
    assert dns_threads() and all(thread.daemon for thread in dns_threads())  # never hold up exit


def test_at_most_max_pending_lookups_hang_and_more_fail_at_once(hanging: HangingLookup) -> None:
    resolver = BoundedResolver(2, lookup=hanging)
    for _ in range(2):
        with pytest.raises(ResolutionFailed) as timed_out:
            resolver.resolve("slow.example.org", 443, timeout_s=0.1)
        assert str(timed_out.value) == "callback host did not resolve within 0.1 s"
        assert timed_out.value.timed_out
    # A flood of further lookups starts no thread and waits for nothing.
    started = time.monotonic()
    for _ in range(50):
        with pytest.raises(ResolutionFailed) as busy:
            resolver.resolve("slow.example.org", 443, timeout_s=5.0)
        assert str(busy.value) == "name resolution busy: 2 lookups of callback hosts still pending"
        assert not busy.value.timed_out
    assert time.monotonic() - started < 1.0
    assert hanging.started == 2  # a thread starts only with a free slot: two threads in all
    # Once the resolver answers, the slots come back and lookups work again.
    hanging.release.set()
    wait_for_slots(resolver)
    assert resolver.resolve("slow.example.org", 443, timeout_s=5.0) == PUBLIC_ANSWER


def test_a_saturated_resolver_fails_the_attempt_fast_and_it_is_retried(
    monkeypatch: pytest.MonkeyPatch, hanging: HangingLookup
) -> None:
    resolver = BoundedResolver(1, lookup=hanging)
    monkeypatch.setattr(webhooks, "_RESOLVER", resolver)
    first = post_once("http://hooks.example.org/x", PAYLOAD, "d-2", deadline_s=0.2)
    assert first.outcome == "callback host did not resolve within 0.2 s"
    started = time.monotonic()
    second = post_once("http://other.example.org/x", PAYLOAD, "d-3", deadline_s=10.0)
    assert time.monotonic() - started < 1.0  # not the 10 s deadline
    assert (second.delivered, second.retry, second.timed_out) == (False, True, False)
    assert second.outcome == "name resolution busy: 1 lookups of callback hosts still pending"
    assert hanging.started == 1


def test_lookup_errors_still_reach_the_caller_and_literal_addresses_need_no_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lookups: list[str] = []

    def unknown_host(host: str, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(webhooks, "_RESOLVER", BoundedResolver(1, lookup=unknown_host))
    attempt = post_once("http://nowhere.example.invalid/x", PAYLOAD, "d-4", deadline_s=5.0)
    assert (attempt.delivered, attempt.retry, attempt.outcome) == (False, True, "gaierror")
    assert lookups == ["nowhere.example.invalid"]
    # The failed lookup gave its slot back; a literal address is checked without a lookup at all.
    refused = post_once("http://10.0.0.1/x", PAYLOAD, "d-5", deadline_s=5.0, policy=DestinationPolicy())
    assert refused.outcome == "destination not allowed"
    assert lookups == ["nowhere.example.invalid"]
