"""``deploy/systemd/derms-gateway.service``: the hardening it promises, a command line the CLI
takes, paths that match the service's own directories and ``deploy/gateway.toml``, and what
``systemd-analyze`` says of it where that is installed."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from composition.cli import SHUTDOWN_GRACE_S, main
from composition.cli_base import EXIT_USAGE
from composition.config import load_config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "derms-gateway.service"
SERVICE_CONFIG = ROOT / "deploy" / "gateway.toml"


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) pairs in order (a key may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines are not read here"
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: {raw!r}"
        assert current is not None, f"line {number}: a setting before any [section]"
        current.append((key.strip(), value.strip()))
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for key, value in read_unit(UNIT)["Service"]:
        values.setdefault(key, []).append(value)
    return values


def one(service: dict[str, list[str]], key: str) -> str:
    assert key in service, f"{key}= is missing"
    [value] = service[key]
    return value


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min)?", value)
    assert match, value
    return float(match[1]) * (60 if match[2] == "min" else 1)


def test_the_unit_is_hardened(service: dict[str, list[str]]) -> None:
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "CapabilityBoundingSet": "",
        "DynamicUser": "yes",
        "User": "derms",
    }
    assert {key: one(service, key) for key in expected} == expected
    assert set(one(service, "RestrictAddressFamilies").split()) == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
    }
    filters = service["SystemCallFilter"]
    assert "@system-service" in filters[0].split()
    assert all(f.startswith("~") for f in filters[1:])  # later lines only take away
    assert one(service, "UMask") == "0077"


def test_it_restarts_on_failure_but_not_on_a_configuration_error(
    service: dict[str, list[str]],
) -> None:
    assert one(service, "Type") in ("exec", "simple")
    assert one(service, "Restart") == "on-failure"
    assert seconds(one(service, "RestartSec")) >= 1
    assert one(service, "RestartPreventExitStatus") == str(EXIT_USAGE)
    # The gateway's own deadline for a clean stop, then a margin to flush its stores.
    assert seconds(one(service, "TimeoutStopSec")) >= SHUTDOWN_GRACE_S + 10


def test_the_command_line_is_one_the_cli_takes(service: dict[str, list[str]]) -> None:
    argv = shlex.split(one(service, "ExecStart"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert PurePosixPath(argv[0]).name in scripts
    assert PurePosixPath(argv[0]).is_absolute()
    command = main.commands[argv[1]]
    assert command.name == "run"
    options = {name for p in command.params for name in getattr(p, "opts", ())}
    assert {a for a in argv[2:] if a.startswith("-")} <= options
    config = PurePosixPath(argv[argv.index("--config") + 1])
    # The configuration is where ConfigurationDirectory= puts the folder; the service starts
    # in the one StateDirectory= makes writable for it.
    assert config.parent == PurePosixPath("/etc", one(service, "ConfigurationDirectory"))
    state = PurePosixPath("/var/lib", one(service, "StateDirectory"))
    assert PurePosixPath(one(service, "WorkingDirectory")) == state
    for setting in service.get("Environment", []):
        name, _, value = setting.partition("=")
        if name == "DERMS_LOG_FORMAT":
            assert value in ("text", "json")


def test_the_service_config_writes_only_to_the_state_directory_and_reads_credentials(
    service: dict[str, list[str]],
) -> None:
    config = load_config(SERVICE_CONFIG, check_files=False)
    state = Path("/var/lib", one(service, "StateDirectory"))
    written = [
        config.store.path,
        config.history.resolved_path(config.store.path),
        config.audit.resolved_path(config.store.path),
    ]
    assert all(path.is_relative_to(state) for path in written), written
    # LoadCredential=ID:/folder gives each file in the folder as <ID>_<file name>, at
    # /run/credentials/<unit>/ (a config file cannot say $CREDENTIALS_DIRECTORY).
    credential_id, _, folder = one(service, "LoadCredential").partition(":")
    assert PurePosixPath(folder).parent == PurePosixPath(
        "/etc", one(service, "ConfigurationDirectory")
    )
    secret = config.broker.password_file
    assert secret is not None
    assert secret.parent == Path("/run/credentials", UNIT.name)
    assert secret.name.startswith(f"{credential_id}_")


systemd_analyze = shutil.which("systemd-analyze")


@pytest.mark.skipif(systemd_analyze is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_it_and_rates_its_exposure_ok(
    service: dict[str, list[str]], tmp_path: Path
) -> None:
    assert systemd_analyze is not None
    # verify checks that ExecStart's program exists: stand in this machine's Python for it.
    program = shlex.split(one(service, "ExecStart"))[0]
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(program, sys.executable))
    verified = subprocess.run(
        [systemd_analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr.strip() == "", verified.stderr
    security = subprocess.run(
        [systemd_analyze, "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in security.stderr:
        pytest.skip("this systemd-analyze has no offline security review (systemd < 250)")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert match, security.stdout[-2000:] + security.stderr
    assert float(match[1]) <= 2.0, security.stdout  # systemd rates 0-2 "OK"
