"""The sidecar's log on stderr: one record per line, as text or as JSON (LOCALMLX_LOG_FORMAT).

Values from clients (model names, paths, method names, ids) reach log messages, so the
formatters escape every message: a control character (a newline, a carriage return, an
escape sequence, U+2028...) is written as its escape (`\\n`, `\\x1b`, `\\u2028`), and a message
is cut at MAX_MESSAGE characters. So a record is always one line that starts with its time
(text) or `{` (JSON), and nothing a client sends can forge one or drive a terminal.

A traceback (a logged exception or stack) is not the message: in text it follows its record
on lines of its own, each escaped the same way and indented by two spaces, so none of them
can pass for a record; in JSON it is the `exception` (or `stack`) member, in the same form,
inside the record's one line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

MAX_MESSAGE = 4096
_INDENT = "  "
# C0 and C1 controls, DEL, and the characters Unicode treats as line or paragraph breaks.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape(text: str) -> str:
    """`text` with every control character written as its escape."""
    return _CONTROL.sub(_escape_one, text)


def _message(record: logging.LogRecord) -> str:
    try:
        text = record.getMessage()
    except Exception:  # a bad format string or argument: log what there is rather than nothing
        text = f"{record.msg!r} % {record.args!r}"
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE]}… ({len(text)} characters)"
    return escape(text)


def _indented(text: str) -> str:
    return "\n".join(_INDENT + escape(line) for line in text.splitlines())


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, then any traceback indented on the lines after."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {_message(record)}"
        details = [self.formatException(record.exc_info)] if record.exc_info else []
        if record.stack_info:
            details.append(self.formatStack(record.stack_info))
        return "\n".join([line, *(_indented(text) for text in details)])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: {time, level, logger, message[, exception, stack]}."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
        }
        if record.exc_info:
            entry["exception"] = _indented(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = _indented(self.formatStack(record.stack_info))
        return json.dumps(entry)  # ASCII-escaped: never a raw newline, never a bad byte


def configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
