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

Every line a JSON object. Not everything a process prints goes through ``logging``: Celery's banner,
TensorFlow's C++ (absl, oneDNN) lines written straight to file descriptor 2, a library's
``print``. :func:`start_process_logging` (first thing in ``brainscan api|worker|beat``) therefore
points file descriptors 1 and 2 at a small relay process that passes JSON lines through and wraps
any other line in one (``logger`` ``stdout``/``stderr``, the level read from absl's ``I``/``W``/
``E``/``F`` prefix when there is one). A relay process rather than a thread: it outlives a crash of
its writer, so the last lines (a fatal error, a segfault's message) still reach the log. It also
routes ``warnings`` through ``logging`` and logs uncaught exceptions as one line each.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import selectors
import signal
import subprocess
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


# ---- every line of a process's output a JSON object ---------------------------------------------
RELAYED_ENV = "BRAINSCAN_LOG_RELAYED"  # set once a process's output goes through the relay
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# absl / TensorFlow C++: "I0000 00:00:1700000000.123 123 file.cc:12] ..." or
# "2026-01-01 00:00:00.000000: W tensorflow/...cc:12] ..."
_NATIVE = re.compile(r"^(?:\d{4}-\d\d-\d\d [\d:.]+: )?([IWEF])(?:\d{4} [\d:.]+ +\d+ | )\S+:\d+\] ")
_NATIVE_LEVELS = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
MAX_LINE = 64 * 1024


def as_json_line(raw: str, stream: str) -> str | None:
    """One line of a process's raw output as a JSON object line (None: blank, dropped).

    A line that already is a JSON object passes unchanged; any other becomes
    ``{"ts", "level", "logger": stream, "msg"}``: INFO on stdout, WARNING on stderr, or the level an
    absl/TensorFlow prefix names.
    """
    text = _ANSI.sub("", raw).rstrip("\r\n")
    if not text.strip():
        return None
    if text.startswith("{"):
        with contextlib.suppress(ValueError):
            if isinstance(json.loads(text), dict):
                return text
    native = _NATIVE.match(text)
    level = _NATIVE_LEVELS[native.group(1)] if native else ("INFO" if stream == "stdout" else "WARNING")
    data = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "logger": "native" if native else stream,
        "msg": text,
    }
    return json.dumps(data, ensure_ascii=False)


def relay(sources: dict[int, str], out: TextIO) -> None:
    """Read lines from each fd in ``sources`` (fd -> stream name) until all reach EOF; write JSON lines."""
    selector = selectors.DefaultSelector()
    buffers: dict[int, bytes] = {}
    for fd in sources:
        selector.register(fd, selectors.EVENT_READ)
        buffers[fd] = b""

    def emit(fd: int, chunk: bytes) -> None:
        line = as_json_line(chunk.decode("utf-8", "replace"), sources[fd])
        if line is not None:
            out.write(line + "\n")

    while selector.get_map():
        for key, _ in selector.select():
            fd = int(key.fd)
            data = os.read(fd, 65536)
            if not data:  # every writer closed it
                if buffers[fd]:
                    emit(fd, buffers[fd])
                selector.unregister(fd)
                continue
            buffers[fd] += data
            *lines, buffers[fd] = buffers[fd].split(b"\n")
            if len(buffers[fd]) > MAX_LINE:  # a line without end: cut it rather than grow
                lines.append(buffers[fd])
                buffers[fd] = b""
            for line in lines:
                emit(fd, line)
        out.flush()


def relay_output_as_json() -> None:
    """Point this process's fds 1 and 2 at a relay process that writes JSON lines to the old fd 2.

    Children (Celery's pool, ...) inherit the pipes. The relay ignores SIGINT/SIGTERM, runs in its own
    session (a signal to our process group is not for it) and exits when every writer has closed.
    """
    if os.environ.get(RELAYED_ENV):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    relay_process = subprocess.Popen(
        [sys.executable, "-m", "brainscan.logs", "relay", str(err_read)],
        stdin=out_read,
        stdout=2,
        stderr=subprocess.DEVNULL,
        pass_fds=(err_read,),
        start_new_session=True,
        env={**os.environ, RELAYED_ENV: "1"},
    )
    os.dup2(out_write, 1)
    os.dup2(err_write, 2)
    for fd in (out_read, out_write, err_read, err_write):
        os.close(fd)
    os.environ[RELAYED_ENV] = "1"
    atexit.register(_drain, relay_process)


def _drain(relay_process: subprocess.Popen) -> None:
    # At a normal exit, let the relay write our last lines before we go: a container stops when its
    # first process exits, and would take the relay with it.
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        relay_process.wait(2)  # EOF once every writer (our children too) has closed its end


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("brainscan").critical("uncaught exception", exc_info=(kind, value, tb))


def start_process_logging(fmt: str = "json") -> None:
    """What ``brainscan api|worker|beat`` do first, before TensorFlow or Celery load.

    TensorFlow's C++ INFO/WARNING lines are off unless the environment asks for them
    (``TF_CPP_MIN_LOG_LEVEL``); with ``fmt == "json"`` whatever still reaches fds 1/2 goes through the
    relay; warnings (Celery's SecurityWarning, deprecations) are logged, not printed.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if fmt == "json":
        relay_output_as_json()
        sys.excepthook = _log_uncaught
    logging.captureWarnings(True)


def _relay_main(argv: list[str]) -> int:
    # python -m brainscan.logs relay ERR_FD: stdin is the process's stdout, ERR_FD its stderr.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = open(sys.stdout.fileno(), "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    relay({0: "stdout", int(argv[1]): "stderr"}, out)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["relay"]:
    sys.exit(_relay_main(sys.argv[1:]))
