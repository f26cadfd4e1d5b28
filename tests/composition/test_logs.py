"""``--log-format json``: one JSON object per record and line, with its fields, extras and the
traceback of a logged exception."""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from composition.logs import JsonFormatter, logging_to_stderr


def logged(monkeypatch: pytest.MonkeyPatch, emit: object) -> list[dict[str, object]]:
    """What ``emit()`` logs under ``logging_to_stderr(2, "json")``, each stderr line parsed."""
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    with logging_to_stderr(2, "json"):
        assert callable(emit)
        emit()
    lines = stderr.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_each_record_is_one_line_with_ts_level_logger_msg_and_extras(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = logging.getLogger("gateway.test")

    def emit() -> None:
        log.debug("polled %d devices", 3)
        log.warning("two\nlines", extra={"device_id": "bat-1", "path": Path("/x"), "kw": -2.5})

    first, second = logged(monkeypatch, emit)
    assert first == {
        "ts": first["ts"],
        "level": "DEBUG",
        "logger": "gateway.test",
        "msg": "polled 3 devices",
    }
    stamp = datetime.fromisoformat(str(first["ts"]))
    assert stamp.utcoffset() == timedelta(0)
    assert second["msg"] == "two\nlines"  # escaped: still one line on stderr
    assert (second["device_id"], second["path"], second["kw"]) == ("bat-1", "/x", -2.5)
    assert "exc" not in second


def test_a_logged_exception_carries_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise ValueError("register 40072 out of range")

    def emit() -> None:
        try:
            fail()
        except ValueError:
            logging.getLogger("adapters.sunspec").exception("poll failed")

    [record] = logged(monkeypatch, emit)
    assert record["level"] == "ERROR"
    assert record["msg"] == "poll failed"
    exc = str(record["exc"])
    assert exc.startswith("Traceback (most recent call last):")
    assert "in fail" in exc
    assert exc.endswith("ValueError: register 40072 out of range")


def test_python_warnings_are_records_too(monkeypatch: pytest.MonkeyPatch) -> None:
    def emit() -> None:
        warnings.warn("old option", UserWarning, stacklevel=1)

    [record] = logged(monkeypatch, emit)
    assert (record["level"], record["logger"]) == ("WARNING", "py.warnings")
    assert "UserWarning: old option" in str(record["msg"])


def test_the_formatter_alone() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a %s", ("b",), None)
    record.stack_info = "Stack (most recent call last):\n  here"
    parsed = json.loads(JsonFormatter().format(record))
    assert (parsed["msg"], parsed["stack"]) == ("a b", record.stack_info)
    assert "\n" not in JsonFormatter().format(record)
