"""``/healthz`` (the process is alive) and ``/readyz`` (it can do useful work)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from brainscan.queueing import redis_problem

router = APIRouter(tags=["health"])
CHECK_TIMEOUT_S = 1.0


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Alive: answers without touching any dependency."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "A dependency is down; see the checks."}})
def readyz(request: Request) -> JSONResponse:
    """Ready: the database answers, the broker answers, and at least one worker is alive."""
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

    workers = request.app.state.publisher.ping_workers(timeout=CHECK_TIMEOUT_S) if problem is None else 0
    checks["workers"] = {"ok": workers > 0, "count": workers}

    ready = all(check["ok"] for check in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
