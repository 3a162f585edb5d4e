"""Request dependencies: settings, a database session, the scan store, and the calling API key."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from brainscan.auth import authenticate
from brainscan.db import ApiKey
from brainscan.settings import Settings
from brainscan.storage import ScanStore

# auto_error=False: we answer 401 ourselves, with a JSON body and a WWW-Authenticate header.
bearer = HTTPBearer(auto_error=False, description="An API key: `brainscan keys create NAME` prints one.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> ScanStore:
    return request.app.state.store


def get_session(request: Request) -> Iterator[Session]:
    session: Session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()


def get_caller(
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    session: Session = Depends(get_session),
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
