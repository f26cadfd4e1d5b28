"""``derms-gateway status``: ask a running gateway's operator endpoint how it is.

The endpoint and the credentials come from the gateway's own configuration file (its
``[operator]`` section, alone: a problem elsewhere in the file must not keep an operator from
asking a gateway that runs), so an operator on the gateway's host needs nothing else. Exit
status: 0 ready, 1 running but not ready, 2 no answer (unreachable, refused, no usable answer).
"""

from __future__ import annotations

import base64
import json
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final

import click
from pydantic import ValidationError

from adapters.broker_security import CredentialsUnavailable
from adapters.operator.config import OperatorConfig
from composition.cli_base import config_option
from unified.config import ConfigError, describe_errors

__all__ = [
    "EXIT_NOT_READY",
    "EXIT_UNREACHABLE",
    "fetch_status",
    "format_status",
    "operator_section",
    "status",
]

EXIT_NOT_READY: Final = 1
EXIT_UNREACHABLE: Final = 2
_WILDCARDS: Final = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class StatusUnavailable(Exception):
    """No status could be had; the message says why, in a sentence for the operator."""


def operator_section(path: Path) -> OperatorConfig:
    """The ``[operator]`` section of a gateway's configuration file, its paths resolved against
    the file's folder; :class:`ConfigError` when it cannot be read or is invalid."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None
    section = data.get("operator", {})
    try:
        config = OperatorConfig.model_validate(section)
    except ValidationError as exc:
        raise ConfigError(str(path), [f"operator.{p}" for p in describe_errors(exc)]) from None
    return config.rebased(path.parent)


def status_url(config: OperatorConfig) -> str:
    """Where the endpoint answers, seen from this host (a wildcard address is asked on
    loopback)."""
    host = _WILDCARDS.get(config.host, config.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.port}/status"


def fetch_status(config: OperatorConfig, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """The gateway's ``/status`` document; :class:`StatusUnavailable` when there is none."""
    try:
        password = config.password()
    except CredentialsUnavailable as exc:
        raise StatusUnavailable(str(exc)) from None
    if password is None:
        where = (
            f"{config.password_env} is not set in this shell"
            if config.password_env is not None
            else "the configuration has no [operator] password_file or password_env"
        )
        raise StatusUnavailable(f"no operator password: {where}")
    token = base64.b64encode(f"{config.user}:{password}".encode()).decode()
    url = status_url(config)
    request = urllib.request.Request(
        url, headers={"Authorization": f"Basic {token}", "Accept": "application/json"}
    )
    # No proxy: the endpoint is on this host or a management network, never behind
    # whatever http_proxy this shell has for the internet.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = _detail(exc.read())
        if exc.code == 401:
            raise StatusUnavailable(
                f"{url}: refused (401): wrong user or password for [operator] user {config.user!r}"
            ) from None
        raise StatusUnavailable(f"{url}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusUnavailable(f"{url}: unreachable ({reason}); is the gateway running?") from None
    try:
        document = json.loads(body)
    except ValueError:
        raise StatusUnavailable(f"{url}: the answer is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("ready"), dict):
        raise StatusUnavailable(f"{url}: the answer is not a gateway status")
    return document


def _detail(body: bytes) -> str:
    try:
        return str(json.loads(body).get("detail", ""))[:300]
    except (ValueError, AttributeError):
        return body[:300].decode("utf-8", errors="replace")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def format_status(document: dict[str, Any]) -> str:
    """The status as an operator reads it on a terminal."""
    ready = document["ready"]
    lines = [
        f"gateway {document.get('gateway_id')} (derms-gateway {document.get('version')}), "
        f"up {_duration(float(document.get('uptime_s', 0)))} "
        f"(since {document.get('started_at')})",
        f"ready: {'yes' if ready.get('ok') else 'NO (' + ', '.join(ready.get('failed', [])) + ')'}",
    ]
    checks = ready.get("checks", {})
    width = max((len(name) for name in checks), default=0)
    for name, check in checks.items():
        mark = "ok  " if check.get("ok") else "FAIL"
        lines.append(f"  {mark}  {name:<{width}}  {check.get('detail', '')}")
    links = []
    for name, link in document.get("links", {}).items():
        text = f"{name} {'up' if link.get('connected') else 'DOWN'}"
        if "pending_acks" in link:
            text += f" ({link['pending_acks']} ack(s) queued)"
        links.append(text)
    lines.append("links: " + (", ".join(links) or "none"))
    devices = document.get("devices", {})
    lines.append(f"devices: {devices.get('online', 0)}/{devices.get('total', 0)} online")
    by_class = devices.get("by_class", {})
    width = max((len(name) for name in by_class), default=0)
    for name, counts in by_class.items():
        lines.append(f"  {name:<{width}}  {counts.get('online', 0)}/{counts.get('total', 0)}")
    commands = document.get("commands", {})
    states = ", ".join(f"{state} {n}" for state, n in commands.get("by_state", {}).items())
    lines.append(f"commands open: {commands.get('open', 0)}" + (f" ({states})" if states else ""))
    return "\n".join(lines)


@click.command("status")
@config_option(help="The running gateway's configuration (its [operator] endpoint and password).")
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0.1, 120),
    default=5.0,
    show_default=True,
    help="Seconds to wait for the answer.",
)
def status(config_path: Path, as_json: bool, timeout_s: float) -> None:
    """Ask a running gateway how it is: version, uptime, links, devices, open commands and
    readiness. Exit status 0 ready, 1 not ready, 2 no answer."""
    try:
        document = fetch_status(operator_section(config_path), timeout_s=timeout_s)
    except (ConfigError, StatusUnavailable) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(format_status(document))
    if not document["ready"].get("ok"):
        sys.exit(EXIT_NOT_READY)
