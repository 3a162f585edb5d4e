"""Structured logs: one JSON object per line, with the job id when the line is about a job.

Named ``logs`` (not ``logging``) so it never shadows the standard library module.

    from brainscan.logs import configure_logging, job_context
    configure_logging()                       # root logger -> JSON on stderr
    log.info("scored", extra={"job_id": j})   # explicit
    with job_context(j): log.info("scored")   # or for everything logged inside the block

A line holds ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, ``job_id`` when known, any
other ``extra=`` fields whose values are plain JSON scalars, and for exceptions ``exc_type`` and
the traceback's frames (``stack``) but *not* the exception's message: messages of database and
HTTP errors can quote URLs with passwords or request data. Callers never log scan content, API
keys or DICOM tags; this formatter adds nothing of the kind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import traceback
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

job_id_var: ContextVar[str | None] = ContextVar("brainscan_job_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
_SCALARS = (str, int, float, bool, type(None))


@contextlib.contextmanager
def job_context(job_id: str | None) -> Iterator[None]:
    """Every line logged inside the block (same thread or task) carries ``job_id``."""
    token = job_id_var.set(str(job_id) if job_id is not None else None)
    try:
        yield
    finally:
        job_id_var.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None) or job_id_var.get()
        if job_id:
            data["job_id"] = str(job_id)
        for key, value in record.__dict__.items():
            if key in _STANDARD or key in data or key.startswith("_"):
                continue
            if isinstance(value, _SCALARS):
                data[key] = value
            elif isinstance(value, list | tuple) and all(isinstance(v, _SCALARS) for v in value):
                data[key] = list(value)
        if record.exc_info and record.exc_info[0] is not None:
            data["exc_type"] = record.exc_info[0].__name__
            data["stack"] = "".join(traceback.format_tb(record.exc_info[2])).rstrip()
        return json.dumps(data, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def make_formatter(fmt: str = "json") -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str = "INFO", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Point the root logger (and uvicorn's loggers) at one handler with our formatter.

    For processes we start (``brainscan api``, ``brainscan worker``); libraries and tests should not
    call it, since it replaces the root logger's handlers.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uv = logging.getLogger(name)
        uv.handlers.clear()
        uv.propagate = True


def uvicorn_log_config(fmt: str = "json", level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for ``uvicorn.run(log_config=...)``: everything through us."""
    formatter: dict[str, Any] = (
        {"()": "brainscan.logs.JsonFormatter"} if fmt == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["default"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": True},
        },
    }
