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
from brainscan.storage import ScanStore, sweep_tmp
from brainscan.trust import DEFAULT_UNCERTAIN_BELOW

log = logging.getLogger(__name__)

DESCRIPTION = f"""**Research use only - not for diagnostic use.** The results are a model's output, not a
diagnosis: they must not be used to decide anything about a patient's care.

Batch scoring of brain MRI scans (glioma, meningioma, no tumor, pituitary).
Upload scans or archives with `POST /v1/jobs`, then poll `GET /v1/jobs/{{id}}`.
Every `/v1` route needs `Authorization: Bearer <key>` (`brainscan keys create NAME`).

**Flags.** Every scored item carries `flag`, `flag_reason` (text for people) and `scope_score`:

- `out_of_scope`: not a scan this model was made for (an input check failed: blank, strong colour,
  no head on a dark background; or `scope_score` > 1). `label` and `confidence` are null; the
  probabilities stay for audit only.
- `uncertain`: the label is kept, but its calibrated confidence is below the model's threshold.
- null: in scope and confident.

`scope_score` is the distance of the scan's features from the model's training data divided by the
threshold chosen on the validation split (at most ~1% of validation scans above 1); null when the
model has no scope detector. `confidence` is calibrated (the model card's temperature, fitted on the
validation split); the `uncertain` threshold is the lowest at which unflagged validation scans were
at least 99.5% correct, and `BRAINSCAN_UNCERTAIN_BELOW` overrides it. A model without a fitted card
section (the original card-less SavedModel) has no detector, no temperature and no input checks:
it is flagged only `uncertain`, on its raw confidence below {DEFAULT_UNCERTAIN_BELOW}, which is no
calibrated guarantee.
A job carries per-flag counts (`flags`); `GET /v1/jobs/{{id}}?flag=...&order=...` filters and sorts."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = make_engine(settings.resolved_database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Leftovers of a process that stopped mid-upload; an hour's margin spares the uploads of
        # other API processes sharing the store (the embedded supervisor sweeps everything).
        swept = sweep_tmp(app.state.store)
        if swept.files:
            log.info("removed %d leftover temporary file(s), %d bytes", swept.files, swept.bytes)
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
