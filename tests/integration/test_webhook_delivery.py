"""Job-finished webhooks from a real worker: exactly one POST per job, even after a duplicate delivery;
owed from the commit on (the webhook reaper sends one never queued); one key's slow receiver cannot
hold the delivery slot while another key's webhook waits.

The receivers listen on 127.0.0.1, which the destination policy refuses by default: this module's
worker allows it (``BRAINSCAN_WEBHOOK_ALLOW``).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select, update

from brainscan.db import Item, Job, session_scope
from tests.support.backends import Backend
from tests.support.environment import wait_for
from tests.support.images import make_jpeg
from tests.support.processes import Service, start_worker
from tests.support.records import create_job, job_finished, make_key

pytestmark = pytest.mark.integration


class Receiver:
    """A local HTTP server that records every POST (path, headers, JSON body)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], dict]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                with receiver.lock:
                    receiver.received.append((self.path, dict(self.headers), body))
                    tries = sum(1 for post in receiver.received if post[0] == self.path)
                # A ".../flaky" receiver is down for its first POST: the worker must try again.
                self.send_response(503 if self.path.endswith("/flaky") and tries == 1 else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posts_to(self, path: str) -> list[tuple[str, dict[str, str], dict]]:
        with self.lock:
            return [post for post in self.received if post[0] == path]


WEBHOOK_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def worker_process(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """This module's worker: local receivers allowed, a short per-try deadline."""
    service = start_worker(
        backend,
        tmp_path_factory.mktemp("logs"),
        BRAINSCAN_WEBHOOK_ALLOW="127.0.0.1",
        BRAINSCAN_WEBHOOK_TIMEOUT_S=str(WEBHOOK_TIMEOUT_S),
    )
    yield service
    service.stop()


@pytest.fixture(scope="module")
def receiver(backend: Backend) -> Iterator[Receiver]:
    # One receiver per backend, so one backend's deliveries never show up in the other's assertions.
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


def job_with_callback(backend: Backend, scans: list[tuple[str, bytes]], callback_url: str) -> str:
    job_id = create_job(backend, scans)
    with backend.active(), session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(callback_url=callback_url))
    return job_id


def test_a_finished_job_is_posted_once(backend: Backend, worker_process: Service, receiver: Receiver) -> None:
    from brainscan.queueing import enqueue_job, publish

    job_id = job_with_callback(
        backend, [(f"w_{i}.jpg", make_jpeg(300 + i)) for i in range(3)], f"{receiver.url}/hooks/a"
    )
    with backend.active():
        assert enqueue_job(job_id)
    wait_for(lambda: job_finished(backend, job_id), what="the job to finish")
    wait_for(lambda: receiver.posts_to("/hooks/a"), what="the webhook")

    # A duplicate delivery of the job's items closes nothing, so it must not notify again. A second
    # job queued after it is the marker: once its webhook arrived, the duplicate was processed.
    with backend.active(), session_scope() as session:
        ids = list(session.scalars(select(Item.id).where(Item.job_id == job_id)))
    with backend.active():
        publish(ids)
    marker = job_with_callback(backend, [("marker.jpg", make_jpeg(399))], f"{receiver.url}/hooks/marker")
    with backend.active():
        assert enqueue_job(marker)
    wait_for(lambda: receiver.posts_to("/hooks/marker"), what="the marker job's webhook")

    (post,) = receiver.posts_to("/hooks/a")
    _, headers, body = post
    assert headers["X-Brainscan-Event"] == "job.finished" and headers["X-Brainscan-Delivery"]
    assert body["event"] == "job.finished"
    summary = body["job"]
    assert summary["id"] == job_id
    assert (summary["status"], summary["finished"]) == ("succeeded", True)
    assert (summary["total"], summary["done"], summary["failed"], summary["pending"]) == (3, 3, 0, 0)
    assert summary["model"] == {"name": "tiny", "version": "1"}
    assert summary["finished_at"] is not None
    # Per-flag counts (issue 11): the same as the job's items say.
    with backend.active(), session_scope() as session:
        item_flags = list(session.scalars(select(Item.flag).where(Item.job_id == job_id)))
    assert summary["flags"] == {flag: item_flags.count(flag) for flag in ("uncertain", "out_of_scope")}
    assert len(receiver.posts_to("/hooks/marker")) == 1


def test_a_job_without_callback_sends_nothing(
    backend: Backend, worker_process: Service, receiver: Receiver
) -> None:
    from brainscan.queueing import enqueue_job

    before = len(receiver.received)
    silent = create_job(backend, [("quiet.jpg", make_jpeg(400))])
    marker = job_with_callback(backend, [("marker2.jpg", make_jpeg(401))], f"{receiver.url}/hooks/marker2")
    with backend.active():
        assert enqueue_job(silent) and enqueue_job(marker)
    wait_for(lambda: job_finished(backend, silent), what="the job without callback")
    wait_for(lambda: receiver.posts_to("/hooks/marker2"), what="the marker job's webhook")
    assert [post[0] for post in receiver.received[before:]] == ["/hooks/marker2"]


def test_a_failed_delivery_is_retried_with_the_same_delivery_id(
    backend: Backend, worker_process: Service, receiver: Receiver
) -> None:
    from brainscan.queueing import enqueue_job

    job_id = job_with_callback(backend, [("flaky.jpg", make_jpeg(402))], f"{receiver.url}/hooks/flaky")
    with backend.active():
        assert enqueue_job(job_id)
    wait_for(lambda: len(receiver.posts_to("/hooks/flaky")) >= 2, what="the webhook's retry")
    first, second = receiver.posts_to("/hooks/flaky")[:2]
    # The retry is Celery's (a new run of the task), yet the same delivery for the receiver.
    assert first[1]["X-Brainscan-Delivery"] == second[1]["X-Brainscan-Delivery"]
    assert first[2] == second[2] and second[2]["job"]["id"] == job_id


def finished_with_callback(backend: Backend, name: str, callback_url: str, owner_key_id: int | None) -> str:
    """A job whose final results are committed (as a worker's last batch leaves it), nothing queued."""
    from brainscan.db import utcnow

    job_id = create_job(backend, [(name, make_jpeg(sum(map(ord, name))))], owner_key_id)
    with backend.active(), session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                callback_url=callback_url,
                status="failed",
                failed=1,
                finished_at=utcnow() - timedelta(seconds=10),
            )
        )
        session.execute(update(Item).where(Item.job_id == job_id).values(status="failed", error="test"))
    return job_id


def send(backend: Backend, task: str, args: list) -> None:
    from brainscan.queueing import default_publisher

    with backend.active():
        default_publisher().send(task, [args])


def test_a_webhook_committed_but_never_queued_is_sent_by_the_reaper(
    backend: Backend, worker_process: Service, receiver: Receiver
) -> None:
    from worker.celery import NOTIFY_REAP_TASK

    # The process that committed the results died before queuing the webhook.
    job_id = finished_with_callback(backend, "crash.jpg", f"{receiver.url}/hooks/crash", None)
    send(backend, NOTIFY_REAP_TASK, [])
    wait_for(lambda: receiver.posts_to("/hooks/crash"), what="the reaper to queue the owed webhook")

    def done() -> bool:
        with backend.active(), session_scope() as session:
            return session.scalar(select(Job.webhook_done_at).where(Job.id == job_id)) is not None

    wait_for(done, what="the webhook to be marked done")
    # Delivered, so no longer owed: another reaper run sends nothing more.
    marker = finished_with_callback(backend, "marker3.jpg", f"{receiver.url}/hooks/marker3", None)
    send(backend, NOTIFY_REAP_TASK, [])
    wait_for(lambda: receiver.posts_to("/hooks/marker3"), what="the marker's webhook")
    (post,) = receiver.posts_to("/hooks/crash")
    assert post[2]["job"]["id"] == job_id and post[2]["job"]["status"] == "failed"
    assert len(receiver.posts_to("/hooks/marker3")) == 1 and marker


class TricklingReceiver:
    """Accepts every POST and answers one byte every 0.5 s, for ever: no per-read timeout trips."""

    def __init__(self, events: list[str], lock: threading.Lock) -> None:
        self.events, self.lock = events, lock
        self.stopped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.events.append("slow")
            threading.Thread(target=self._trickle, args=(connection,), daemon=True).start()

    def _trickle(self, connection: socket.socket) -> None:
        with connection:
            try:
                connection.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100_000:
                    if self.stopped.wait(0.5):
                        return
                    connection.sendall(bytes([byte]))
            except OSError:
                return  # the client gave up: what the deadline is for

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()


def test_one_keys_slow_receiver_cannot_hold_delivery_while_another_key_waits(
    backend: Backend, worker_process: Service, receiver: Receiver
) -> None:
    from brainscan.queueing import default_publisher

    events: list[str] = []
    lock = threading.Lock()
    slow = TricklingReceiver(events, lock)
    try:
        slow_key, _ = make_key(backend)
        other_key, _ = make_key(backend)
        slow_jobs = [
            finished_with_callback(backend, f"slow{i}.jpg", f"{slow.url}/hooks/slow{i}", slow_key)
            for i in range(3)
        ]
        waiting = finished_with_callback(backend, "waiting.jpg", f"{receiver.url}/hooks/waiting", other_key)
        with backend.active():
            default_publisher().notify_jobs([*slow_jobs, waiting])  # the slow key's three first

        def delivered() -> bool:
            if receiver.posts_to("/hooks/waiting"):
                with lock:
                    events.append("waiting")
                return True
            return False

        wait_for(delivered, what="the other key's webhook while the slow receiver trickles")
        with lock:
            before = events[: events.index("waiting")]
        # One try of the slow key (webhook_key_concurrency=1), cut at its deadline; its other jobs
        # were deferred, not tried, so the other key's webhook went next.
        assert before.count("slow") <= 1, events
    finally:
        slow.close()
