"""LOCALMLX_LOG_FORMAT=json: one {time, level, logger, message[, exception]} object per stderr line."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import _JsonLogFormatter
from sidecar.settings import settings_from_env

ROOT = Path(__file__).resolve().parents[1]


def test_a_logged_exception_stays_on_one_line():
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.getLogger("localmlx.t").makeRecord(
            "localmlx.t", logging.ERROR, __file__, 1, "it broke: %s", ("ü",), sys.exc_info())
    line = _JsonLogFormatter().format(record)
    assert "\n" not in line and line.isascii()
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["logger"] == "localmlx.t" and entry["message"] == "it broke: ü"
    assert entry["exception"].startswith("Traceback") and "ValueError: bad\nvalue" in entry["exception"]
    assert entry["time"].endswith("+00:00")


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
