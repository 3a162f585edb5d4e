"""POST /v1/jobs while the broker is frozen (accepts connections, never answers): printed, never asserted.

    .venv/bin/python bench/frozen_broker.py                       # 5 POSTs, BRAINSCAN_BROKER_TIMEOUT_S=1
    .venv/bin/python bench/frozen_broker.py --timeout 0.5 --posts 10

Starts a private redis-server, a TCP proxy in front of it (``tests/support/faults.py``), a SQLite
database and a real API process (``brainscan api``) whose broker is the proxy; no worker. One POST of
one scan while the proxy forwards, then the proxy freezes and each further POST of one scan is timed.
Issue 13's target: the POST answers (202, ``"enqueued": false``) within 10 s; before the publisher
had read timeouts it never answered.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.backends import Backend  # noqa: E402
from tests.support.faults import RedisServer, TcpProxy  # noqa: E402
from tests.support.images import make_jpeg  # noqa: E402
from tests.support.processes import start_api  # noqa: E402
from tests.support.records import make_key  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=1.0, help="BRAINSCAN_BROKER_TIMEOUT_S")
    parser.add_argument("--posts", type=int, default=5)
    args = parser.parse_args()
    from brainscan.migrate import upgrade

    root = Path(tempfile.mkdtemp(prefix="frozen-broker-"))
    redis_server = RedisServer(root / "redis")
    redis_server.start()
    proxy = TcpProxy("127.0.0.1", redis_server.port)
    database_url = f"sqlite:///{root / 'brainscan.db'}"
    upgrade(database_url)
    backend = Backend(
        "sqlite", database_url, f"redis://127.0.0.1:{proxy.port}/0", root / "var", root / "models"
    )
    api, url = start_api(backend, root / "logs", BRAINSCAN_BROKER_TIMEOUT_S=str(args.timeout))
    try:
        _, key = make_key(backend)
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:

            def post(seed: int) -> tuple[float, int, object]:
                started = time.perf_counter()
                response = client.post(
                    "/v1/jobs", files=[("files", (f"{seed}.jpg", make_jpeg(seed), "image/jpeg"))]
                )
                return time.perf_counter() - started, response.status_code, response.json().get("enqueued")

            print(f"broker answering: {post(0)}")
            proxy.freeze()
            times = []
            for seed in range(1, args.posts + 1):
                seconds, code, enqueued = post(seed)
                times.append(seconds)
                print(f"frozen broker: POST {code} enqueued={enqueued} in {seconds:.2f} s", flush=True)
            print(
                f"BRAINSCAN_BROKER_TIMEOUT_S={args.timeout}: {len(times)} POSTs, median "
                f"{statistics.median(times):.2f} s, max {max(times):.2f} s"
            )
    finally:
        proxy.thaw()
        api.stop()
        proxy.close()
        redis_server.stop()


if __name__ == "__main__":
    main()
