"""brainscan.webhooks.post_once / retry_delay against real HTTP servers on localhost (no mocked transport).

The receivers listen on 127.0.0.1, which the destination policy refuses unless allowed: the tests
that deliver allow it explicitly (``LOCAL``), the policy tests show the refusal.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from brainscan.webhooks import (
    DEADLINE_EXCEEDED,
    EVENT,
    REFUSED_DESTINATION,
    DestinationPolicy,
    post_once,
    retry_delay,
)

LOCAL = DestinationPolicy.parse("127.0.0.1")
PAYLOAD = {"event": EVENT, "job": {"id": "job-123", "status": "succeeded", "total": 2, "done": 2}}


@dataclass
class Receiver:
    """Answers each POST with the next status of ``script`` (the last one repeats)."""

    script: list[int]
    url: str = ""
    requests: list[dict] = field(default_factory=list)
    hang_s: float = 0.0
    retry_after: str | None = None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(script=[200])
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            state.requests.append(
                {"path": self.path, "headers": dict(self.headers), "body": json.loads(body)}
            )
            if state.hang_s and len(state.requests) == 1:
                release.wait(state.hang_s)  # first call: longer than the client's timeout
            code = state.script[min(len(state.requests) - 1, len(state.script) - 1)]
            self.send_response(code)
            if state.retry_after is not None:
                self.send_header("Retry-After", state.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/brainscan?token=s3cret"
    yield state
    release.set()
    server.shutdown()
    server.server_close()


def test_delivered_first_time(receiver: Receiver) -> None:
    attempt = post_once(receiver.url, PAYLOAD, "d-1", policy=LOCAL)
    assert (attempt.delivered, attempt.retry, attempt.outcome) == (True, False, "HTTP 200")
    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert request["path"] == "/hooks/brainscan?token=s3cret"
    assert request["body"] == PAYLOAD
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["X-Brainscan-Event"] == "job.finished"
    assert request["headers"]["X-Brainscan-Delivery"] == "d-1"
    # The connection went to the checked address; the Host header still names the URL's host.
    assert request["headers"]["Host"] == receiver.url.split("/")[2]


def test_server_errors_and_429_are_worth_a_retry_client_errors_are_final(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="brainscan.webhooks")
    receiver.script = [503, 500, 429, 410, 200]
    outcomes = [post_once(receiver.url, PAYLOAD, "d-2", policy=LOCAL) for _ in range(5)]
    assert [(a.delivered, a.retry, a.outcome) for a in outcomes] == [
        (False, True, "HTTP 503"),
        (False, True, "HTTP 500"),
        (False, True, "HTTP 429"),
        (False, False, "HTTP 410"),
        (True, False, "HTTP 200"),
    ]
    # Every try is the same delivery (one id for the receiver to de-duplicate on), same body.
    assert {r["headers"]["X-Brainscan-Delivery"] for r in receiver.requests} == {"d-2"}
    assert all(r["body"] == PAYLOAD for r in receiver.requests)
    # Logs name the job and host, never the URL's token.
    assert caplog.records and all("s3cret" not in record.getMessage() for record in caplog.records)
    assert {getattr(record, "job_id", None) for record in caplog.records} == {"job-123"}


def test_retry_delay_doubles_and_honours_retry_after_within_the_cap(receiver: Receiver) -> None:
    assert [retry_delay(attempt, 0.25, 300.0) for attempt in (1, 2, 3)] == [0.25, 0.5, 1.0]
    assert retry_delay(4, 1.0, 5.0) == 5.0
    receiver.script = [429]
    receiver.retry_after = "7"
    attempt = post_once(receiver.url, PAYLOAD, "d-3", policy=LOCAL)
    assert (attempt.retry, attempt.retry_after) == (True, 7.0)
    assert retry_delay(1, 1.0, 5.0, attempt.retry_after) == 5.0  # within the cap
    assert retry_delay(1, 1.0, 300.0, attempt.retry_after) == 7.0
    receiver.retry_after = "Fri, 27 Nov 2026 10:00:00 GMT"  # an HTTP date: our own backoff applies
    assert post_once(receiver.url, PAYLOAD, "d-3", policy=LOCAL).retry_after == 0.0


def test_a_silent_receiver_is_cut_at_the_deadline_and_retried(receiver: Receiver) -> None:
    receiver.hang_s = 5.0
    attempt = post_once(receiver.url, PAYLOAD, "d-4", deadline_s=0.3, policy=LOCAL)
    assert (attempt.delivered, attempt.retry, attempt.outcome) == (False, True, DEADLINE_EXCEEDED)
    assert post_once(receiver.url, PAYLOAD, "d-4", deadline_s=5.0, policy=LOCAL).delivered


def test_a_trickling_receiver_is_cut_at_the_total_deadline() -> None:
    """One byte of the answer every 0.2 s never trips a per-read timeout: only a total deadline ends it."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def trickle() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
                if stop.wait(0.2):
                    return
                connection.sendall(bytes([byte]))

    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    outcome: list = []
    client = threading.Thread(
        target=lambda: outcome.append(
            post_once(f"http://127.0.0.1:{port}/hook", PAYLOAD, "d-5", deadline_s=1.0, policy=LOCAL)
        ),
        daemon=True,
    )
    client.start()
    client.join(60)  # a guard against a hang, not a timing: the answer trickles for 2,000 s
    stop.set()
    listener.close()
    assert not client.is_alive(), "post_once kept reading a trickling answer past its deadline"
    (attempt,) = outcome
    assert (attempt.delivered, attempt.retry, attempt.outcome) == (False, True, DEADLINE_EXCEEDED)


def test_unreachable_or_invalid_urls_never_raise() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    attempt = post_once(f"http://127.0.0.1:{closed}/x", PAYLOAD, "d-6", policy=LOCAL)
    assert (attempt.delivered, attempt.retry, attempt.outcome) == (False, True, "ConnectError")
    for url in ("not a url", "ftp://example.invalid/x", "http://[::1", ""):
        attempt = post_once(url, PAYLOAD, "d-6", policy=LOCAL)
        assert (attempt.delivered, attempt.retry) == (False, False), url


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/hook",
        "http://localhost:{port}/hook",  # a name: checked on what it resolves to, at send time
        "http://[::ffff:127.0.0.1]:{port}/hook",
    ],
)
def test_loopback_is_refused_at_send_time_unless_allowed(receiver: Receiver, url: str) -> None:
    port = receiver.url.split(":")[2].split("/")[0]
    target = url.format(port=port)
    refused = post_once(target, PAYLOAD, "d-7")
    assert (refused.delivered, refused.retry, refused.outcome) == (False, False, REFUSED_DESTINATION)
    assert receiver.requests == []
    if "::ffff" not in url:  # the receiver listens on IPv4 only
        assert post_once(target, PAYLOAD, "d-7", policy=DestinationPolicy.parse("127.0.0.0/8")).delivered
        assert len(receiver.requests) == 1


def test_the_policy_refuses_internal_ranges_and_allows_what_is_listed() -> None:
    import ipaddress

    default = DestinationPolicy.parse("")
    for internal in ("127.0.0.1", "10.0.0.5", "172.16.3.4", "192.168.1.1", "169.254.169.254",
                     "100.64.0.1", "0.0.0.0", "::1", "fe80::1", "fc00::1", "::ffff:10.0.0.1"):  # fmt: skip
        assert not default.allows("h", ipaddress.ip_address(internal)), internal
    assert default.allows("h", ipaddress.ip_address("93.184.216.34"))
    policy = DestinationPolicy.parse(" hooks.internal. , 10.1.0.0/16,[fd00::1] ")
    assert policy.allows("HOOKS.internal", ipaddress.ip_address("10.9.9.9"))
    assert policy.allows("other", ipaddress.ip_address("10.1.200.3"))
    assert not policy.allows("other", ipaddress.ip_address("10.2.0.1"))
    assert policy.allows("other", ipaddress.ip_address("fd00::1"))
    # At submit, from the URL alone: literal internal addresses and localhost names are refused.
    assert default.submit_problem("http://169.254.169.254/latest") is not None
    assert default.submit_problem("http://localhost:9/x") is not None
    assert default.submit_problem("http://[::1]/x") is not None
    assert default.submit_problem("https://hooks.example.org/x?token=1") is None
    assert policy.submit_problem("http://10.1.2.3/x") is None
