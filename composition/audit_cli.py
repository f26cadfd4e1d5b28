"""``derms-gateway audit show|verify``: read and check the append-only audit log.

The log is found from a gateway's configuration (``--config``, its ``[audit] path``) or given
directly (``--path``, the folder or its ``audit.jsonl``). Both commands read every file of the
log in write order (rotated files first) and never write to it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from composition.cli_base import EXIT_FAILURE, GatewayGroup, InvalidConfig, config_option
from gateway.audit import CURRENT, read_lines, verify
from unified.config import ConfigError

__all__ = ["audit", "matches"]

F = TypeVar("F", bound=Callable[..., Any])


def _where(func: F) -> F:
    func = click.option(
        "--path",
        "path",
        type=click.Path(exists=True, path_type=Path),
        default=None,
        help="The audit log's folder (or its audit.jsonl).",
    )(func)
    return config_option(required=False, help="A gateway configuration file: its [audit] path.")(
        func
    )


def _locate(config_path: Path | None, path: Path | None) -> tuple[Path, str]:
    ctx = click.get_current_context()
    if path is not None and ctx.get_parameter_source("config_path") is ParameterSource.ENVIRONMENT:
        config_path = None  # an explicit --path wins over DERMS_CONFIG
    if (config_path is None) == (path is None):
        raise click.UsageError("give the log's --path or a gateway's --config (one of them)")
    if path is not None:
        return (path.parent, path.name) if path.is_file() else (path, CURRENT)
    from composition.config import load_config

    assert config_path is not None
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise InvalidConfig(str(exc)) from None
    return config.audit.resolved_path(config.store.path), CURRENT


def _time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _command_ids(details: object) -> Iterable[str]:
    """Command ids a record's details name: a command's own and what it cancels, and the
    provenance of a device write or release."""
    if not isinstance(details, dict):
        return
    for key in ("command", "released"):
        inner = details.get(key)
        if not isinstance(inner, dict):
            continue
        for field in ("command_id", "cancels"):
            if isinstance(inner.get(field), str):
                yield inner[field]
        for source in inner.get("provenance") or ():
            if isinstance(source, dict) and isinstance(source.get("command_id"), str):
                yield source["command_id"]


def matches(
    record: dict[str, Any],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    command_id: str | None = None,
    device_id: str | None = None,
    kinds: tuple[str, ...] = (),
) -> bool:
    """``kinds`` match exactly or by their first part (``command`` is every ``command.*``)."""
    if kinds:
        kind = str(record.get("kind"))
        if not any(kind == k or kind.startswith(f"{k}.") for k in kinds):
            return False
    if device_id is not None and record.get("device_id") != device_id:
        return False
    if command_id is not None and (
        record.get("command_id") != command_id
        and command_id not in _command_ids(record.get("details"))
    ):
        return False
    if since is not None or until is not None:
        try:
            ts = datetime.fromisoformat(str(record.get("ts")))
        except ValueError:
            return False
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        if (since is not None and ts < since) or (until is not None and ts > until):
            return False
    return True


def _line(record: dict[str, Any]) -> str:
    details = record.get("details")
    return "  ".join(
        (
            str(record.get("ts")),
            f"#{record.get('seq')}",
            f"{record.get('kind')!s:<19}",
            str(record.get("command_id") or "-"),
            str(record.get("device_id") or "-"),
            str(record.get("source") or "-"),
            "" if details is None else json.dumps(details, separators=(",", ":")),
        )
    ).rstrip()


@click.group(cls=GatewayGroup)
def audit() -> None:
    """Query and verify the append-only audit log (docs/security.md)."""


@audit.command("show")
@_where
@click.option("--since", help="Records at or after this ISO 8601 time (UTC if no offset).")
@click.option("--until", help="Records at or before this ISO 8601 time.")
@click.option("--command", "command_id", help="Records about this command id.")
@click.option("--device", "device_id", help="Records about this device id.")
@click.option(
    "--kind", "kinds", multiple=True, help="e.g. command.rejected, or command (repeatable)."
)
@click.option("--json", "as_json", is_flag=True, help="The matching lines exactly as stored.")
def show(
    config_path: Path | None,
    path: Path | None,
    since: str | None,
    until: str | None,
    command_id: str | None,
    device_id: str | None,
    kinds: tuple[str, ...],
    as_json: bool,
) -> None:
    """Print the matching records of every file of the log, oldest first."""
    directory, name = _locate(config_path, path)
    start, end = _time(since), _time(until)
    found = False
    for line in read_lines(directory, name):
        found = True
        record = line.record
        if record is None:
            click.echo(f"{line.place}: not an audit record, skipped (run audit verify)", err=True)
            continue
        if not matches(
            record,
            since=start,
            until=end,
            command_id=command_id,
            device_id=device_id,
            kinds=kinds,
        ):
            continue
        click.echo(line.raw.decode("utf-8", errors="replace") if as_json else _line(record))
    if not found:
        raise click.ClickException(f"no audit log in {directory}")


@audit.command("verify")
@_where
def verify_command(config_path: Path | None, path: Path | None) -> None:
    """Check the hash chain and sequence (exit 1 at the first break)."""
    directory, name = _locate(config_path, path)
    result = verify(directory, name)
    if not result.files:
        raise click.ClickException(f"no audit log in {directory}")
    span = f"seq {result.first_seq}..{result.last_seq}" if result.records else "no records"
    where = f"{result.records} records ({span}) in {len(result.files)} file(s) of {directory}"
    if result.ok:
        start = (
            "from the log's first record"
            if result.from_genesis
            else f"from seq {result.first_seq} (older files were rotated away)"
        )
        click.echo(f"ok: {where}; the chain is intact {start}")
        return
    click.echo(f"broken: {result.problems[0]}")
    for problem in result.problems[1:20]:
        click.echo(f"  also: {problem}")
    if len(result.problems) > 20:
        click.echo(f"  ... {len(result.problems) - 20} more")
    click.echo(f"read: {where}")
    sys.exit(EXIT_FAILURE)
