"""The sidecar's log: LOCALMLX_LOG_FORMAT=json writes one {time, level, logger, message[, exception]}
object per stderr line; text writes one line per record, its traceback indented on the lines after.
Either way every message is escaped (tests/test_hostile.py sends the values from a client)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.logs import MAX_MESSAGE, JsonFormatter, TextFormatter, escape
from sidecar.settings import settings_from_env

ROOT = Path(__file__).resolve().parents[1]


def record_of(message: str, *args: object, exc_info: bool = False) -> logging.LogRecord:
    return logging.getLogger("localmlx.t").makeRecord("localmlx.t", logging.ERROR, __file__, 1, message, args,
                                                      sys.exc_info() if exc_info else None)


def test_a_logged_exception_stays_on_one_line():
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = record_of("it broke: %s", "ü", exc_info=True)
    line = JsonFormatter().format(record)
    assert "\n" not in line and line.isascii()
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["logger"] == "localmlx.t" and entry["message"] == "it broke: ü"
    assert entry["exception"].startswith("  Traceback") and "ValueError: bad\n  value" in entry["exception"]
    assert all(line.startswith("  ") for line in entry["exception"].splitlines())
    assert entry["time"].endswith("+00:00")


def test_a_text_record_is_one_line_and_its_traceback_is_indented_after_it():
    forged = "2030-01-01 00:00:00,000 ERROR localmlx.x: forged"
    try:
        raise ValueError(f"bad\n{forged}\x1b[2J")
    except ValueError:
        record = record_of("model %s\u2028%s", f"demo\r\n{forged}", "\x00", exc_info=True)
    head, *traceback = TextFormatter().format(record).split("\n")
    assert head.endswith(f"ERROR localmlx.t: model demo\\r\\n{forged}\\u2028\\x00")
    assert traceback[0] == "  Traceback (most recent call last):" and all(line.startswith("  ") for line in traceback)
    assert "  ValueError: bad" in traceback and f"  {forged}\\x1b[2J" in traceback


def test_escape_leaves_printable_text_alone_and_a_long_message_is_cut():
    assert escape("Grüße, 世界 🙂 \\ path/to") == "Grüße, 世界 🙂 \\ path/to"
    assert escape("\t\x7f\x85\u2029") == "\\t\\x7f\\x85\\u2029"
    entry = json.loads(JsonFormatter().format(record_of("%s", "x" * (MAX_MESSAGE + 10))))
    assert entry["message"] == "x" * MAX_MESSAGE + f"… ({MAX_MESSAGE + 10} characters)"


def test_the_setting_accepts_text_or_json_only():
    assert settings_from_env({}).log_format == "text"
    assert settings_from_env({"LOCALMLX_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(SystemExit, match="LOCALMLX_LOG_FORMAT"):
        settings_from_env({"LOCALMLX_LOG_FORMAT": "xml"})


def test_the_sidecar_logs_json_lines(tmp_path):
    env = {**os.environ, "LOCALMLX_LOG_FORMAT": "json", "LOCALMLX_MODELS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-P", "-m", "sidecar", "serve"], input=b"", capture_output=True,
                          env=env, cwd=ROOT, timeout=60)
    lines = done.stderr.decode().splitlines()
    assert lines, "the sidecar logged something"
    entries = [json.loads(line) for line in lines]
    assert any("serving" in entry["message"] for entry in entries)
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
