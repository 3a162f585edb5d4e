"""Request dependencies: settings, a database session, the scan store, the publisher, the caller
(and, for a submit, the caller within its daily quotas: ``SubmitterDep``).

Each is built once in ``api.app.create_app(settings)`` and reached here through ``app.state``; routes
name them by their ``Annotated`` aliases (``SessionDep``, ``CallerDep``, ...).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from brainscan.auth import authenticate
from brainscan.db import ApiKey
from brainscan.queueing import Publisher
from brainscan.quotas import quota_exceeded
from brainscan.settings import Settings
from brainscan.storage import ScanStore

# auto_error=False: we answer 401 ourselves, with a JSON body and a WWW-Authenticate header.
bearer = HTTPBearer(auto_error=False, description="An API key: `brainscan keys create NAME` prints one.")


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def app_store(request: Request) -> ScanStore:
    return request.app.state.store


def app_publisher(request: Request) -> Publisher:
    return request.app.state.publisher


def request_session(request: Request) -> Iterator[Session]:
    session: Session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(app_settings)]
StoreDep = Annotated[ScanStore, Depends(app_store)]
PublisherDep = Annotated[Publisher, Depends(app_publisher)]
SessionDep = Annotated[Session, Depends(request_session)]


def authenticated_caller(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)], session: SessionDep
) -> ApiKey:
    key = authenticate(session, credentials.credentials) if credentials else None
    if key is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # The key row is only needed for its id; end the read transaction so none stays open.
    session.commit()
    return key


CallerDep = Annotated[ApiKey, Depends(authenticated_caller)]


def submitting_caller(caller: CallerDep, session: SessionDep, settings: SettingsDep) -> ApiKey:
    """The caller of a submit, checked against its daily quotas before anything is read or stored."""
    exceeded = quota_exceeded(
        session,
        caller.id,
        scans_per_day=settings.quota_scans_per_day,
        bytes_per_day=settings.quota_bytes_per_day,
    )
    session.commit()  # end the read transaction
    if exceeded is not None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"{exceeded.reason}; nothing was stored",
            headers={"Retry-After": str(exceeded.retry_after_s)},
        )
    return caller


SubmitterDep = Annotated[ApiKey, Depends(submitting_caller)]
