"""The FastAPI application: ``create_app(settings)`` for tests and embedding, ``app`` for uvicorn.

uvicorn api.app:app        # configured by BRAINSCAN_* environment variables
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import sessionmaker

from api.routes import gradcam, health, items, jobs, metrics, models, web
from brainscan import __version__
from brainscan.db import make_engine
from brainscan.queueing import Publisher
from brainscan.settings import Settings, get_settings
from brainscan.storage import ScanStore

log = logging.getLogger(__name__)

DESCRIPTION = """Batch scoring of brain MRI scans (glioma, meningioma, no tumor, pituitary).

Upload scans or archives with `POST /v1/jobs`, then poll `GET /v1/jobs/{id}`.
Every `/v1` route needs `Authorization: Bearer <key>` (`brainscan keys create NAME`)."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = make_engine(settings.resolved_database_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(title="brainscan", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = sessionmaker(bind=engine, expire_on_commit=False)
    app.state.store = ScanStore(settings.resolved_storage_dir)
    # The process's one publisher and one Celery app, on this app's engine (no second engine).
    app.state.publisher = Publisher(settings, app.state.sessions)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    async def database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
        # Connection refused, server restarting, pool exhausted: the client should just retry.
        # The exception text may hold the database URL (and its password): log the type only.
        log.warning("database error answered with 503: %s", type(exc).__name__)
        return JSONResponse(
            {"detail": "database unavailable, retry shortly"},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "5"},
        )

    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(items.router)
    app.include_router(gradcam.router)
    app.include_router(metrics.router)
    web.mount(app)
    return app


app = create_app()
