"""Every line a process writes is a JSON object once ``start_process_logging("json")`` ran: its own
log lines, ``print``, warnings, native (absl/TensorFlow) lines on fd 2, and an uncaught exception."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from brainscan.logs import as_json_line
from tests.support.environment import ROOT


def test_json_lines_pass_and_other_lines_are_wrapped_with_a_level() -> None:
    assert as_json_line('{"level": "INFO", "msg": "x"}', "stderr") == '{"level": "INFO", "msg": "x"}'
    assert as_json_line("   ", "stdout") is None
    native = json.loads(as_json_line("E0000 00:00:1700000000.1 42 cuda.cc:7] no GPU", "stderr") or "")
    assert (native["level"], native["logger"]) == ("ERROR", "native")
    tf = json.loads(as_json_line("2026-01-01 10:00:00.000001: W tensorflow/x.cc:3] slow", "stderr") or "")
    assert tf["level"] == "WARNING" and tf["msg"].endswith("slow")
    banner = json.loads(as_json_line("\x1b[36m -------------- celery@host v5\x1b[0m", "stdout") or "")
    assert (banner["level"], banner["logger"], banner["msg"]) == (
        "INFO",
        "stdout",
        " -------------- celery@host v5",
    )
    assert json.loads(as_json_line("[1, 2]", "stderr") or "")["msg"] == "[1, 2]"  # JSON, not an object


def test_a_process_output_is_json_lines_whatever_writes_it() -> None:
    script = textwrap.dedent(
        """
        import logging, os, sys, warnings
        from brainscan.logs import configure_logging, start_process_logging
        start_process_logging("json")
        configure_logging("INFO", "json")
        logging.getLogger("app").info("ready", extra={"event": "started"})
        print("a library's print")
        os.write(2, b"W0000 00:00:1700000000.1 42 port.cc:9] native warning\\n")
        warnings.warn("careful", UserWarning)
        raise RuntimeError("secret-in-message")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1
    assert result.stdout == ""  # fd 1 went through the relay, which writes to the original fd 2
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    by_msg = {line["msg"]: line for line in lines}
    assert by_msg["ready"]["event"] == "started"
    assert by_msg["a library's print"]["logger"] == "stdout"
    assert by_msg["W0000 00:00:1700000000.1 42 port.cc:9] native warning"]["level"] == "WARNING"
    assert any(line["logger"] == "py.warnings" and "careful" in line["msg"] for line in lines)
    (crash,) = [line for line in lines if line["msg"] == "uncaught exception"]
    assert crash["level"] == "CRITICAL" and crash["exc_type"] == "RuntimeError"
    assert "secret-in-message" not in result.stderr  # exception messages are never logged
