"""brainscan.webhooks.notify against a real HTTP server on localhost (no mocked transport)."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from brainscan.webhooks import EVENT, notify

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
    sleeps: list[float] = []
    assert notify(receiver.url, PAYLOAD, attempts=3, backoff=0.5, sleep=sleeps.append) is True
    assert len(receiver.requests) == 1 and sleeps == []
    request = receiver.requests[0]
    assert request["path"] == "/hooks/brainscan?token=s3cret"
    assert request["body"] == PAYLOAD
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["X-Brainscan-Event"] == "job.finished"


def test_server_errors_are_retried_with_exponential_backoff(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="brainscan.webhooks")
    receiver.script = [503, 500, 429, 200]
    sleeps: list[float] = []
    assert notify(receiver.url, PAYLOAD, attempts=5, backoff=0.25, sleep=sleeps.append) is True
    assert len(receiver.requests) == 4
    assert sleeps == [0.25, 0.5, 1.0]
    # Every try is the same delivery (one id for the receiver to de-duplicate on), same body.
    assert len({r["headers"]["X-Brainscan-Delivery"] for r in receiver.requests}) == 1
    assert all(r["body"] == PAYLOAD for r in receiver.requests)
    # Logs name the job and host, never the URL's token.
    assert all("s3cret" not in record.getMessage() for record in caplog.records)
    assert {getattr(record, "job_id", None) for record in caplog.records} == {"job-123"}


def test_gives_up_after_the_attempts_and_does_not_raise(receiver: Receiver) -> None:
    receiver.script = [502]
    sleeps: list[float] = []
    assert notify(receiver.url, PAYLOAD, attempts=3, backoff=1.0, sleep=sleeps.append) is False
    assert len(receiver.requests) == 3 and sleeps == [1.0, 2.0]


def test_retry_after_is_honoured_within_the_cap(receiver: Receiver) -> None:
    receiver.script = [429, 200]
    receiver.retry_after = "7"
    sleeps: list[float] = []
    assert notify(receiver.url, PAYLOAD, attempts=3, backoff=1.0, max_backoff=5.0, sleep=sleeps.append)
    assert sleeps == [5.0]


def test_client_errors_are_not_retried(receiver: Receiver) -> None:
    receiver.script = [410]
    sleeps: list[float] = []
    assert notify(receiver.url, PAYLOAD, attempts=5, backoff=1.0, sleep=sleeps.append) is False
    assert len(receiver.requests) == 1 and sleeps == []


def test_a_timeout_is_retried(receiver: Receiver) -> None:
    receiver.hang_s = 5.0
    sleeps: list[float] = []
    assert notify(receiver.url, PAYLOAD, attempts=3, backoff=0.0, timeout=0.3, sleep=sleeps.append) is True
    assert len(receiver.requests) == 2 and sleeps == [0.0]


def test_unreachable_or_invalid_urls_never_raise() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    sleeps: list[float] = []
    assert (
        notify(f"http://127.0.0.1:{closed}/x", PAYLOAD, attempts=2, backoff=0.1, sleep=sleeps.append) is False
    )
    assert sleeps == [0.1]
    for url in ("not a url", "ftp://example.invalid/x", "http://[::1", ""):
        assert notify(url, PAYLOAD, attempts=2, backoff=0.0, sleep=lambda _s: None) is False
