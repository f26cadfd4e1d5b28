"""Where every ``derms-gateway`` command's logs go: stderr, as plain text for a person at a
terminal (the default) or as one JSON object per line for a log shipper (``--log-format json``).

A JSON line always has ``ts`` (UTC, ISO 8601), ``level``, ``logger`` and ``msg``; then the
record's extra fields (``log.info("...", extra={"device_id": d})``), and ``exc`` with the whole
traceback when an exception was logged. ``json.dumps`` escapes newlines, so a traceback never
splits a record over lines.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Final, Literal

__all__ = ["LOG_FORMATS", "JsonFormatter", "LogFormat", "logging_to_stderr"]

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# What every LogRecord carries; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES: Final = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))
) | {"message", "asctime", "taskName"}

# pymodbus logs every timeout and refused connection itself; the supervisor already reports
# those once per outage, in domain terms. The others narrate their internals.
_NOISY: Final = ("pymodbus", "amqtt", "transitions", "aiosqlite")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra field that JSON cannot hold is logged as its text, never lost
        # to a TypeError inside logging.
        return json.dumps(entry, default=str)


@contextmanager
def logging_to_stderr(verbosity: int, log_format: LogFormat = "text") -> Iterator[None]:
    """While inside, every logger's records at the level ``verbosity`` asks (0 warnings, 1 info,
    2 and more debug) go to stderr in ``log_format``, and Python warnings with them (so that in
    JSON every line is a record); on the way out the previous setup is put back, so a command
    run in-process (a test's ``CliRunner``) leaves logging as it found it."""
    level = logging.DEBUG if verbosity > 1 else logging.INFO if verbosity == 1 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    saved_root = (root.level, root.handlers[:])
    saved_noisy = {name: logging.getLogger(name).level for name in _NOISY}
    root.handlers = [handler]
    root.setLevel(level)
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(level, logging.CRITICAL))
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for name, saved in saved_noisy.items():
            logging.getLogger(name).setLevel(saved)
        root.setLevel(saved_root[0])
        root.handlers = saved_root[1]
        handler.close()
