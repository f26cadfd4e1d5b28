"""``deploy/Containerfile``, read as a builder would (no container engine runs here): the base,
a non-root user, every package copied, the ports the gateway hosts, a command line the CLI
takes, and a HEALTHCHECK whose exact snippet is run against a local HTTP server."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from adapters.ocpp.central import OcppCentralConfig
from adapters.oem_vtn.vtn import OpenAdrVtnConfig
from adapters.sep2_der.server import Sep2ServerConfig
from composition.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
HEALTH_URL = "http://127.0.0.1:9108/health/live"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        keyword, _, rest = whole.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    assert not pending, "the file ends inside a continued line"
    return found


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(CONTAINERFILE)


def only(steps: list[tuple[str, str]], keyword: str) -> str:
    [value] = [rest for kw, rest in steps if kw == keyword]
    return value


def test_base_user_and_command_line(steps: list[tuple[str, str]]) -> None:
    assert steps[0] == ("FROM", "python:3.11-slim")
    user = [rest for kw, rest in steps if kw == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    # Its state lives in a volume the user owns; nothing else is writable for it.
    assert json.loads(only(steps, "VOLUME")) == ["/var/lib/derms-gateway"]
    assert "-o derms -g derms /var/lib/derms-gateway" in " ".join(r for _, r in steps)
    entrypoint = json.loads(only(steps, "ENTRYPOINT"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["derms-gateway"]
    assert entrypoint[0] in scripts
    cmd = json.loads(only(steps, "CMD"))
    assert cmd == ["run", "--config", "/etc/derms-gateway/gateway.toml"]
    options = {name for p in main.commands[cmd[0]].params for name in getattr(p, "opts", ())}
    assert {a for a in cmd[1:] if a.startswith("-")} <= options


def test_every_package_is_copied_and_installed(steps: list[tuple[str, str]]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied: set[str] = set()
    for keyword, rest in steps:
        if keyword == "COPY":
            *sources, _ = rest.split()
            copied.update(sources)
    assert packages <= copied
    assert {"pyproject.toml", "README.md"} <= copied  # README is the package's readme
    assert all((ROOT / source).exists() for source in copied)
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not ignored & copied
    assert any(kw == "RUN" and "pip install ." in rest for kw, rest in steps)


def test_it_exposes_the_default_port_of_every_endpoint_it_can_host(
    steps: list[tuple[str, str]],
) -> None:
    exposed = {int(port.split("/")[0]) for port in only(steps, "EXPOSE").split()}
    defaults = {
        model.model_fields["port"].default
        for model in (Sep2ServerConfig, OpenAdrVtnConfig, OcppCentralConfig)
    }
    assert defaults | {9108} <= exposed


# ----------------------------------------------------------------------------- HEALTHCHECK


class Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health/live" else 404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        Health.status = 200


def healthcheck(steps: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """The HEALTHCHECK's options and its exec-form command."""
    rest = only(steps, "HEALTHCHECK")
    options, _, command = rest.partition("CMD ")
    return shlex.split(options), json.loads(command)


def run_check(command: list[str], port: int, **env: str) -> int:
    assert command[0] == "python"  # the image's; this machine's Python stands in for it
    snippet = command[2].replace("127.0.0.1:9108", f"127.0.0.1:{port}")
    return subprocess.run(
        [sys.executable, *command[1:2], snippet],
        env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()} | env,
        capture_output=True,
        timeout=30,
        check=False,
    ).returncode


def test_the_healthcheck_snippet_passes_only_on_a_200(
    steps: list[tuple[str, str]], health_server: ThreadingHTTPServer
) -> None:
    options, command = healthcheck(steps)
    assert command[:2] == ["python", "-c"]
    assert HEALTH_URL in command[2]
    port = health_server.server_address[1]
    assert run_check(command, port) == 0
    # A proxy in the environment is not asked for a loopback address.
    assert (
        run_check(command, port, HTTP_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
        == 0
    )
    Health.status = 503
    assert run_check(command, port) == 1
    health_server.shutdown()
    health_server.server_close()
    assert run_check(command, port) == 1  # nothing listening: 1, never Docker's reserved 2
    # The snippet gives up before the engine's own timeout does.
    timeout = next(o for o in options if o.startswith("--timeout="))
    assert "timeout=4)" in command[2]
    assert int(timeout.removeprefix("--timeout=").rstrip("s")) > 4
