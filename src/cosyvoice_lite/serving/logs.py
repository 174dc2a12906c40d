"""Structured logs: one JSON object per line, with the request fields passed in ``extra``; or
plain text, those fields appended as ``key=value``."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from typing import Any

# uvicorn's records carry their message again with terminal colours: not for a log line
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NEEDS_QUOTES = re.compile(r'[\s"=]')


def printable(text: str) -> str:
    """``text`` with control characters as backslash-x escapes: a client's path, percent-decoded, is
    logged; a %0a in it had written a forged line of its own into the text log."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group(0)):02x}", text)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's ``extra``: what the logging call added to the standard attributes."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _text_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    # a value a client chose (a voice's name, an id) never starts a line or a field of its own
    text = printable(text)
    if not text or _NEEDS_QUOTES.search(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``: the request fields (request_id,
    duration_ms, ...) the JSON lines carry, on the record's line (they had been dropped)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        fields = " ".join(f"{key}={_text_value(value)}" for key, value in _fields(record).items())
        if not fields:
            return super().formatMessage(record)
        message = printable(record.message)
        if "=" in message or '"' in message:  # a client's path could add a field ("status=500")
            message = _text_value(message)
        if message != record.message:
            record = logging.makeLogRecord({**vars(record), "message": message})
        return f"{super().formatMessage(record)} {fields}"


def configure(level: int = logging.INFO, json_lines: bool = True) -> None:
    """Log to stderr, as JSON lines (default) or plain text."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
