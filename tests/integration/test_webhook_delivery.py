"""Job-finished webhooks from a real worker: exactly one POST per job, even after a duplicate delivery."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select, update

from brainscan.db import Item, Job, session_scope
from tests.support.backends import Backend
from tests.support.environment import wait_for
from tests.support.images import make_jpeg
from tests.support.processes import Service
from tests.support.records import create_job, job_finished

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
