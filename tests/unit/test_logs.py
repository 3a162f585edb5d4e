"""brainscan.logs: one JSON object per line, job ids attached, no exception messages."""

from __future__ import annotations

import io
import json
import logging

from brainscan.logs import JsonFormatter, job_context, uvicorn_log_config


def capture() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"brainscan.test.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_lines_are_json_with_job_ids_from_extra_or_context() -> None:
    logger, stream = capture()
    logger.info("job %s stored: %d item(s)", "j-1", 3, extra={"job_id": "j-1", "items": 3})
    with job_context("j-2"):
        logger.warning("scored batch", extra={"batch": [1, 2], "opaque": object()})
    logger.info("no job")
    first, second, third = lines(stream)
    assert first["msg"] == "job j-1 stored: 3 item(s)" and first["job_id"] == "j-1" and first["items"] == 3
    assert first["level"] == "INFO" and first["ts"].endswith("+00:00")
    assert second["job_id"] == "j-2" and second["batch"] == [1, 2] and "opaque" not in second
    assert "job_id" not in third


def test_exceptions_log_type_and_frames_but_not_their_message() -> None:
    logger, stream = capture()
    password = "hunter" + "2"  # built at run time: the traceback quotes source lines, not values
    try:
        raise ConnectionError(f"postgresql://user:{password}@db/brainscan refused")
    except ConnectionError:
        logger.exception("database down")
    (line,) = lines(stream)
    assert line["exc_type"] == "ConnectionError" and "test_logs.py" in line["stack"]
    assert "hunter2" not in json.dumps(line)


def test_uvicorn_config_routes_everything_through_the_formatter() -> None:
    config = uvicorn_log_config("json", "info")
    assert config["formatters"]["default"] == {"()": "brainscan.logs.JsonFormatter"}
    assert config["root"]["level"] == "INFO"
    assert all(not c["handlers"] and c["propagate"] for c in config["loggers"].values())
