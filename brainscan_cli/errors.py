"""The errors an operator meets, as one clear line and a hint; the traceback only with ``--debug``.

``brainscan --debug COMMAND ...`` re-raises instead. Messages never quote a password: database
URLs are shown with the password hidden, and of a driver's message only its first line is kept
(connection errors name host and port, not credentials).
"""

from __future__ import annotations

from dataclasses import dataclass

debug = False  # set by ``brainscan --debug``

DEBUG_HINT = "run `brainscan --debug ...` for the traceback"


@dataclass(frozen=True)
class Explained:
    line: str
    hint: str


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__


def _database_url() -> str:
    from brainscan.settings import get_settings

    try:
        from sqlalchemy.engine import make_url

        return make_url(get_settings().resolved_database_url).render_as_string(hide_password=True)
    except Exception:
        return "BRAINSCAN_DATABASE_URL (unparsable)"


def explain(exc: BaseException) -> Explained | None:
    """What went wrong and what to do, for the errors with a known cause; None for the others."""
    import httpx
    import redis
    from sqlalchemy import exc as sa

    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        url = str(exc.request.url.copy_with(path="/", query=None)) if _has_request(exc) else "the API"
        return Explained(
            f"cannot reach the API at {url.rstrip('/')}: {_first_line(exc)}",
            "is it running? `brainscan up` starts one and saves its URL in var/api-url; elsewhere pass --url",
        )
    if isinstance(exc, httpx.TimeoutException):
        return Explained(
            f"the API did not answer in time ({type(exc).__name__})",
            "it may be overloaded or stuck: check its /readyz and its log",
        )
    if isinstance(exc, httpx.TransportError):
        return Explained(f"talking to the API failed: {type(exc).__name__}", "check --url and the network")
    if isinstance(exc, sa.ArgumentError | sa.NoSuchModuleError):
        return Explained(
            "BRAINSCAN_DATABASE_URL is not a database URL this installation understands",
            "e.g. postgresql+psycopg://user:password@host:5432/brainscan, or leave it empty for "
            "SQLite under var/",
        )
    if isinstance(exc, sa.OperationalError | sa.InterfaceError):
        cause = exc.orig if exc.orig is not None else exc
        return Explained(
            f"cannot use the database at {_database_url()}: {_first_line(cause)}",
            "check BRAINSCAN_DATABASE_URL, that the server is running and that the database exists",
        )
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return Explained(
            f"cannot reach Redis ({type(exc).__name__})",
            "check BRAINSCAN_BROKER_URL and that Redis is running",
        )
    if isinstance(exc, PermissionError | FileNotFoundError | IsADirectoryError):
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return Explained(f"{type(exc).__name__}{where}", "check the path and who owns it")
    return None


def _has_request(exc: BaseException) -> bool:
    try:
        return exc.request is not None  # type: ignore[attr-defined]
    except RuntimeError:  # httpx raises when the error was not tied to a request
        return False


def report(exc: BaseException) -> list[str]:
    """The lines to print for ``exc`` (without --debug)."""
    explained = explain(exc)
    if explained is None:
        return [f"error: {type(exc).__name__}: {_first_line(exc)}", f"  hint: {DEBUG_HINT}"]
    return [f"error: {explained.line}", f"  hint: {explained.hint} ({DEBUG_HINT})"]
