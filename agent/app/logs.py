"""Logging for a gateway: UTC ISO 8601 stamps, text or JSON lines, quiet protocol libraries.

Every line carries a UTC time with milliseconds (``2026-12-06T06:31:29.465Z``). ``--log-format
json`` writes one JSON object per line (``ts``, ``level``, ``logger``, ``msg`` and ``exc`` with
the traceback text when there is one) for journald and Loki.

The agent logs each device outage once and its end once (drivers and runtime). The protocol
libraries would add their own lines for the same event on every retry: pymodbus "Failed to
connect" every few seconds, asyncua a traceback each time a session's publish loop finds the
connection closed. :class:`LibraryNoise` turns those into DEBUG lines (shown only at DEBUG):
a library's line is demoted when it is about a connection that failed or was lost (its
exception is a ConnectionError, OSError or timeout, or its text says so). Every other warning
or error of the libraries still shows as it is.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

LIBRARIES = ("asyncua", "pymodbus", "paho", "urllib3", "influxdb_client")
CONNECTION_ERRORS = (ConnectionError, TimeoutError, OSError)
CONNECTION_TEXT = re.compile(
    r"failed to connect|connection (is )?(closed|lost|refused|reset)|cannot connect|not connected|"
    r"connection to .* (failed|lost)|no response|timed? ?out|retrying in|broken pipe", re.IGNORECASE)
FORMATS = ("text", "json")


def utc_stamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{utc_stamp(record.created)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": utc_stamp(record.created), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class LibraryNoise(logging.Filter):
    """Demote the protocol libraries' own lines about failed or lost connections to DEBUG (the
    agent logs each outage once); ``show_debug`` lets them through as DEBUG lines."""

    def __init__(self, show_debug: bool):
        super().__init__()
        self.show_debug = show_debug

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(LIBRARIES) or record.levelno >= logging.CRITICAL:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, CONNECTION_ERRORS) or (record.levelno >= logging.WARNING and exc is None
                                                  and CONNECTION_TEXT.search(record.getMessage())):
            if not self.show_debug:
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info, record.exc_text = None, None
        return True


def setup(level: str, fmt: str = "text") -> None:
    """Log to stderr from ``level`` in ``fmt`` (text or json); the protocol libraries from
    WARNING (INFO at DEBUG), without their connection chatter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(LibraryNoise(show_debug=level == "DEBUG"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    for lib in LIBRARIES:
        logging.getLogger(lib).setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)
