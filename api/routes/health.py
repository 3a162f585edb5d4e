"""``/healthz`` (the process is alive) and ``/readyz`` (it can do useful work)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from brainscan.queueing import redis_client, redis_problem
from brainscan.workers import read_beats

router = APIRouter(tags=["health"])
CHECK_TIMEOUT_S = 1.0


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Alive: answers without touching any dependency."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "A dependency is down; see the checks."}})
def readyz(request: Request) -> JSONResponse:
    """Ready: the database answers, the broker answers, and at least one worker can score.

    ``checks.workers``: ``count`` workers that can score, ``unhealthy`` workers alive but unable to
    (``problems`` says why, e.g. ``{"storage: PermissionError": 1}``: it cannot read the scans the API
    stored, see the README's "Storage"). Counts only: no host names or paths.
    """
    settings = request.app.state.settings
    checks: dict[str, dict[str, Any]] = {}

    try:
        with request.app.state.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "error": type(exc).__name__}

    problem = redis_problem(settings.broker_url, CHECK_TIMEOUT_S)
    checks["broker"] = {"ok": True} if problem is None else {"ok": False, "error": problem}
    checks["workers"] = _workers(request, settings.broker_url) if problem is None else {**_NO_WORKERS}

    ready = all(check["ok"] for check in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


_NO_WORKERS: dict[str, Any] = {"ok": False, "count": 0, "unhealthy": 0, "problems": {}}


def _workers(request: Request, broker_url: str) -> dict[str, Any]:
    try:
        client = redis_client(broker_url, CHECK_TIMEOUT_S)
        try:
            beats = read_beats(client)
        finally:
            client.close()
    except Exception:
        return {**_NO_WORKERS}
    if not beats:  # workers that write no heartbeat still answer a control ping
        count = request.app.state.publisher.ping_workers(timeout=CHECK_TIMEOUT_S)
        return {**_NO_WORKERS, "ok": count > 0, "count": count}
    problems = Counter(f"storage: {beat.storage}" for beat in beats if not beat.healthy)
    healthy = sum(1 for beat in beats if beat.healthy)
    return {
        "ok": healthy > 0,
        "count": healthy,
        "unhealthy": len(beats) - healthy,
        "problems": dict(problems),
    }
