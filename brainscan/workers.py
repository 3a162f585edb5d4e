"""What a worker says about itself in Redis, and getting a dead worker's messages back in seconds.

Heartbeat. Each worker process that consumes writes one key, ``<HEARTBEAT_PREFIX><node>:<pid>``,
every ``BEAT_S`` seconds with a TTL of three beats. Its value is a JSON object (:class:`WorkerBeat`):
the Celery node name (the worker id stored on the items it scores), the pid, the time of the beat
by the worker's clock, ``storage`` (None while it can read scans, else the error type that stopped
it: the worker then takes no scoring work, see ``worker/tasks.py``) and ``held``, the delivery tags
of the messages it holds unacknowledged at that time. ``/readyz`` and ``/metrics`` read these.

A dead worker's messages. With ``acks_late`` a message a worker holds stays in Kombu's ``unacked``
hash (indexed by delivery time in ``unacked_index``) until it is acked; when the worker dies, Kombu
gives it back only after the visibility timeout (5 minutes). :func:`restore_orphans` does it at
once: a message delivered more than ``MARGIN_S`` before every live worker's latest beat, that no
live worker lists as held, is held by nobody, so it goes back to the head of its queue. This is
safe across machines whose clocks differ: a message's delivery time and the beat it is compared
with come from the clock of the worker that received it, and a message delivered to a live worker
after that worker's last beat is newer than its beat, hence kept. It runs in every worker's
heartbeat thread (a SIGKILLed worker's key expires after three beats), in the reaper, and in
``brainscan up``'s supervisor as soon as it sees a worker exit. A message restored twice (two
callers at once) is not duplicated: Kombu's ``restore_by_tag`` is a transaction on the hash.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from brainscan.queue_contract import HEARTBEAT_PREFIX, broker_config
from brainscan.settings import Settings

log = logging.getLogger(__name__)

BEAT_S = 5.0  # a beat every 5 s; the key lives for three
MARGIN_S = 2.0  # a message younger than this, relative to the oldest live beat, is never restored
# Set by a scoring process that found storage unreadable; the worker's heartbeat probes and clears it.
STORAGE_PROBLEM_PREFIX = "brainscan:storage-problem:"
STORAGE_PROBLEM_TTL_S = 60


@dataclass(frozen=True)
class WorkerBeat:
    node: str
    pid: int
    ts: float
    storage: str | None = None  # None: scans readable; else why not (an error type, never a path)
    held: frozenset[str] | None = field(default=None)  # None: a worker that does not say (never restore)

    @property
    def healthy(self) -> bool:
        return self.storage is None

    def dumps(self) -> str:
        return json.dumps(
            {
                "node": self.node,
                "pid": self.pid,
                "ts": self.ts,
                "storage": self.storage,
                "held": sorted(self.held or ()),
            }
        )

    @classmethod
    def loads(cls, key: str, raw: bytes | str | None) -> WorkerBeat:
        node_pid = key[len(HEARTBEAT_PREFIX) :]
        try:
            data = json.loads(raw or b"")
            return cls(
                node=str(data["node"]),
                pid=int(data["pid"]),
                ts=float(data["ts"]),
                storage=data.get("storage"),
                held=frozenset(str(t) for t in data.get("held", ())),
            )
        except (ValueError, KeyError, TypeError):
            # An older worker writes its pid only: alive and healthy, but it does not list its messages.
            node, _, pid = node_pid.rpartition(":")
            return cls(node=node or node_pid, pid=int(pid) if pid.isdigit() else 0, ts=0.0, held=None)


def beat_key(node: str, pid: int) -> str:
    return f"{HEARTBEAT_PREFIX}{node}:{pid}"


def read_beats(client: redis.Redis) -> list[WorkerBeat]:
    """Every live worker's latest beat. Raises when Redis is unreachable."""
    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in client.scan_iter(HEARTBEAT_PREFIX + "*")]
    if not keys:
        return []
    values = client.mget(keys)
    return [
        WorkerBeat.loads(key, value) for key, value in zip(keys, values, strict=True) if value is not None
    ]


def storage_problem_key(node: str) -> str:
    return f"{STORAGE_PROBLEM_PREFIX}{node}"


def _kombu_connection(settings: Settings) -> Any:
    from kombu import Connection

    options = broker_config(settings)["broker_transport_options"]
    return Connection(settings.broker_url, transport_options=options, connect_timeout=3)


def restore_orphans(settings: Settings, forget_patterns: Iterable[str] = ()) -> int:
    """Put the messages held by no live worker back at the head of their queues; returns how many.

    ``forget_patterns``: heartbeat keys (glob patterns) of workers known to be dead (the supervisor
    saw them exit), dropped first so their messages need not wait for the keys to expire. Never
    raises: a broker outage only postpones this to the next call (Kombu's visibility timeout stays).
    """
    try:
        with _kombu_connection(settings) as connection:
            channel = connection.default_channel
            client: redis.Redis = channel.client
            for pattern in forget_patterns:
                for key in list(client.scan_iter(pattern)):
                    client.delete(key)
            beats = read_beats(client)
            if any(beat.held is None for beat in beats):
                return 0  # someone does not list what it holds: leave it to the visibility timeout
            cutoff = min((beat.ts for beat in beats), default=time.time()) - MARGIN_S
            held: set[str] = set().union(*(beat.held or () for beat in beats))
            candidates = client.zrangebyscore(channel.unacked_index_key, "-inf", cutoff)
            orphans = [t for t in (c.decode() if isinstance(c, bytes) else str(c) for c in candidates)]
            orphans = [tag for tag in orphans if tag not in held]
            for tag in orphans:
                channel.qos.restore_by_tag(tag, client=client)
    except Exception as exc:  # the URL may hold a password: the error type only
        log.warning("could not look for a dead worker's messages: %s", type(exc).__name__)
        return 0
    if orphans:
        log.info(
            "restored %d message(s) held by no live worker",
            len(orphans),
            extra={"event": "messages_restored", "messages": len(orphans)},
        )
    return len(orphans)
