"""The command line every command shares: ``-v`` and ``--log-format`` before or after the command
name, ``--config`` / ``DERMS_CONFIG``, ``--version``, exit statuses 0 / 1 / 2, and JSON logs from
a real gateway process."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import composition.cli_base
from composition.cli import main
from composition.logs import LogFormat

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "gateway.toml"
# A gateway whose broker and battery refuse connections: it starts, logs, and waits.
UNREACHABLE = """gateway_id = "gw-logs"
[broker]
port = 1
[store]
path = "gw.sqlite"
[history]
enabled = false
[[devices]]
device_id = "b1"
der_class = "battery"
adapter = "sunspec_battery"
location = { substation = "s1", feeder = "f1" }
ratings = { max_charge_kw = 5, max_discharge_kw = 5, capacity_kwh = 10 }
sunspec = { host = "127.0.0.1", port = 1 }
"""


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def cli_process(*args: str) -> list[str]:
    return [sys.executable, "-m", "composition.cli", *args]


def process_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERMS_")}
    return env | {"PYTHONPATH": str(ROOT)} | extra


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_process(*args),
        cwd=ROOT,
        env=process_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def bad_config(tmp_path: Path) -> Path:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[devices]]\ndevice_id = "b 1"\n')
    return bad


# ----------------------------------------------------------------------------- shared options


@pytest.fixture
def logging_asked(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, LogFormat]]:
    """The (verbosity, format) each command set its logging up with."""
    asked: list[tuple[int, LogFormat]] = []

    @contextmanager
    def record(verbosity: int, log_format: LogFormat = "text") -> Iterator[None]:
        asked.append((verbosity, log_format))
        yield

    monkeypatch.setattr(composition.cli_base, "logging_to_stderr", record)
    return asked


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["schema"], (0, "text")),
        (["schema", "-vv"], (2, "text")),
        (["-vv", "schema"], (2, "text")),
        (["-v", "schema", "-v"], (2, "text")),
        (["schema", "--verbose"], (1, "text")),
        (["schema", "--log-format", "json"], (0, "json")),
        (["--log-format", "json", "schema", "-v"], (1, "json")),
        (["certs", "-v", "show", str(ROOT / "README.md"), "-v"], (2, "text")),
        (["audit", "verify", "--path", str(ROOT), "-vv", "--log-format", "json"], (2, "json")),
    ],
)
def test_verbosity_and_log_format_are_taken_anywhere_on_the_line(
    logging_asked: list[tuple[int, LogFormat]], args: list[str], expected: tuple[int, str]
) -> None:
    result = invoke(*args, env={"DERMS_LOG_FORMAT": ""})
    assert result.exit_code != 2, result.output  # not a usage error
    assert logging_asked[0] == expected  # (then the error's own record, for the last two)


def test_long_running_commands_log_info_without_v(
    logging_asked: list[tuple[int, LogFormat]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import composition.cli

    monkeypatch.setattr(composition.cli, "run_until_signal", lambda main: main.close())
    assert invoke("simulate", "battery").exit_code == 0
    assert invoke("simulate", "battery", "-vv").exit_code == 0
    assert logging_asked == [(1, "text"), (2, "text")]


def test_the_log_format_comes_from_the_environment_unless_given_on_the_line(
    logging_asked: list[tuple[int, LogFormat]],
) -> None:
    env = {"DERMS_LOG_FORMAT": "json"}
    assert invoke("schema", env=env).exit_code == 0
    assert invoke("schema", "--log-format", "text", env=env).exit_code == 0
    assert invoke("--log-format", "text", "schema", env=env).exit_code == 0
    assert [f for _, f in logging_asked] == ["json", "text", "text"]
    refused = invoke("schema", env={"DERMS_LOG_FORMAT": "xml"})
    assert refused.exit_code == 2
    assert "DERMS_LOG_FORMAT" in refused.stderr


def test_a_command_run_in_process_leaves_logging_as_it_was() -> None:
    root = logging.getLogger()
    before = (root.level, list(root.handlers), logging.getLogger("pymodbus").level)
    assert invoke("-vv", "--log-format", "json", "schema").exit_code == 0
    assert (root.level, list(root.handlers), logging.getLogger("pymodbus").level) == before


def test_version_comes_from_the_package_metadata() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"derms-gateway {version('derms-gateway')}\n"


def test_help_documents_exit_statuses_and_environment() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert any(line.startswith("0  done") for line in lines)
    assert any(line.startswith("1  operational failure") for line in lines)
    assert any(line.startswith("2  usage or configuration error") for line in lines)
    assert any(line.startswith("DERMS_CONFIG") for line in lines)
    assert any(line.startswith("DERMS_LOG_FORMAT") for line in lines)


# ----------------------------------------------------------------------------- --config, exit codes


def test_derms_config_stands_for_config_and_the_line_wins(tmp_path: Path) -> None:
    result = invoke("check-config", env={"DERMS_CONFIG": str(EXAMPLE)})
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: gateway north-substation-gw")
    over = invoke("check-config", "--config", str(EXAMPLE), env={"DERMS_CONFIG": "/nowhere"})
    assert over.exit_code == 0, over.output
    bad = invoke("check-config", env={"DERMS_CONFIG": str(bad_config(tmp_path))})
    assert bad.exit_code == 2
    assert "devices[0].device_id" in bad.stderr


def test_check_config_file_still_works_with_a_deprecation_warning() -> None:
    result = invoke("check-config", str(EXAMPLE))
    assert result.exit_code == 0
    assert result.stdout.startswith("ok: gateway north-substation-gw")
    assert "deprecated: use check-config --config FILE" in result.stderr
    twice = invoke("check-config", str(EXAMPLE), "--config", str(EXAMPLE))
    assert twice.exit_code == 2
    assert "give the configuration once" in twice.stderr


@pytest.mark.parametrize("command", [["check-config"], ["run"], ["edge"]])
def test_exit_status_2_for_an_invalid_missing_or_absent_config(
    tmp_path: Path, command: list[str]
) -> None:
    invalid = invoke(*command, "--config", str(bad_config(tmp_path)))
    assert invalid.exit_code == 2
    assert "invalid configuration" in invalid.stderr
    missing = invoke(*command, "--config", str(tmp_path / "missing.toml"))
    assert missing.exit_code == 2
    assert "does not exist" in missing.stderr
    absent = invoke(*command, env={"DERMS_CONFIG": ""})
    assert absent.exit_code == 2
    assert "Missing option '--config'" in absent.stderr


def test_exit_status_2_for_a_secret_file_the_config_names_but_is_missing(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(
        EXAMPLE.read_text().replace(
            "\n[broker]\n", "\n[broker]\nusername = 'gw'\npassword_file = 'gw.password'\n"
        )
    )
    result = invoke("check-config", "--config", str(config))
    assert result.exit_code == 2
    assert "broker.password_file" in result.stderr


# ----------------------------------------------------------------------------- JSON logs


def records(stderr: str) -> list[dict[str, object]]:
    """Every line of stderr as a JSON object with the four fields (fails on any other line)."""
    parsed = [json.loads(line) for line in stderr.splitlines()]
    for record in parsed:
        assert {"ts", "level", "logger", "msg"} <= set(record), record
        stamp = datetime.fromisoformat(str(record["ts"]))
        assert stamp.utcoffset() is not None
        assert stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    return parsed


def test_a_config_error_is_one_json_record_with_its_exit_status(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(bad_config(tmp_path)), "--log-format", "json")
    assert result.returncode == 2
    [record] = records(result.stderr)
    assert record["level"] == "ERROR"
    assert record["exit_code"] == 2
    assert "devices[0].device_id" in str(record["msg"])
    env = {"DERMS_LOG_FORMAT": "json", "DERMS_CONFIG": str(tmp_path / "bad.toml")}
    same = invoke("check-config", env=env)
    assert same.exit_code == 2
    assert records(same.stderr)[0]["msg"] == record["msg"]


def test_an_unexpected_error_is_a_json_record_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import composition.cli

    def broken() -> dict[str, object]:
        raise RuntimeError("schema generator broke")

    monkeypatch.setattr(composition.cli, "json_schemas", broken)
    result = invoke("schema", "--log-format", "json")
    assert result.exit_code == 1
    [record] = records(result.stderr)
    assert record["level"] == "ERROR"
    assert record["exit_code"] == 1
    exc = str(record["exc"])
    assert exc.startswith("Traceback (most recent call last):")
    assert "in schema" in exc
    assert exc.rstrip().endswith("RuntimeError: schema generator broke")
    # In text, Python's own traceback as before (and the same exit status).
    plain = invoke("schema")
    assert plain.exit_code == 1
    assert isinstance(plain.exception, RuntimeError)


def test_a_gateway_run_logs_json_lines_and_stops_cleanly(tmp_path: Path) -> None:
    """A real `derms-gateway run` with -vv after the command name: every stderr line is a JSON
    record, debug lines included, until SIGTERM stops it with status 0."""
    config = tmp_path / "gw.toml"
    config.write_text(UNREACHABLE)
    log = tmp_path / "stderr.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            cli_process("run", "--config", str(config), "-vv", "--log-format", "json"),
            cwd=ROOT,
            env=process_env(),
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        deadline = time.monotonic() + 30
        while "device b1 unavailable" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=20)
    assert code == 0, log.read_text()[-2000:]
    found = records(log.read_text())
    levels = {str(r["level"]) for r in found}
    assert {"DEBUG", "INFO", "WARNING"} <= levels
    assert {"logger": "gateway.supervisor", "level": "WARNING"}.items() <= next(
        r for r in found if "device b1 unavailable" in str(r["msg"])
    ).items()
    assert found[-1]["msg"] == "stopped by signal"
