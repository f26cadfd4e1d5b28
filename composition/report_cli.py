"""``derms-gateway report COMMAND_ID --format csv|svg --config FILE [--out FILE]``.

A dispatch's settled performance or an envelope's compliance at the meter, as CSV or an SVG
picture: the same bytes the live view serves for ``/view/reports/{command_id}.{format}``
(:mod:`adapters.operator.reports`). It reads the command store and the reading history named
by the configuration, also while the gateway runs (SQLite in WAL mode), and writes to neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import click

from adapters.operator.reports import (
    Rendered,
    ReportFormat,
    ReportUnavailable,
    load_report,
    render,
)
from composition.config import GatewayConfig, load_config
from gateway.history import ReadingHistory
from gateway.registry import Registry
from gateway.store import CommandStore, StoreError
from unified.config import ConfigError
from unified.model import utcnow

__all__ = ["report"]


async def _render(config: GatewayConfig, command_id: str, fmt: ReportFormat) -> Rendered:
    store_path = config.store.path
    if not store_path.exists():
        raise click.ClickException(f"no command store at {store_path}")
    history_path = config.history.resolved_path(store_path) if config.history.enabled else None
    registry = Registry([d.as_device() for d in config.devices], config.groups)
    async with contextlib.AsyncExitStack() as stack:
        store = await stack.enter_async_context(CommandStore(store_path))
        history = None
        if history_path is not None:
            if not history_path.exists():
                raise click.ClickException(f"no reading history at {history_path}")
            history = await stack.enter_async_context(
                ReadingHistory(history_path, interval_s=config.history.interval_s)
            )
        report = await load_report(
            command_id, store=store, history=history, registry=registry, now=utcnow()
        )
    return render(report, fmt)


@click.command("report")
@click.argument("command_id")
@click.option(
    "--format",
    "fmt",
    type=click.Choice([f.value for f in ReportFormat]),
    default=ReportFormat.CSV.value,
    show_default=True,
    help="csv: a table per interval; svg: a picture.",
)
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The gateway's configuration: where its store and history are.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Write to this file instead of standard output.",
)
def report(command_id: str, fmt: str, config_path: Path, out: Path | None) -> None:
    """A dispatch's performance report or an envelope's compliance, as CSV or SVG."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        rendered = asyncio.run(_render(config, command_id, ReportFormat(fmt)))
    except ReportUnavailable as exc:
        raise click.ClickException(f"{command_id}: {exc.detail}") from None
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    if out is None:
        sys.stdout.buffer.write(rendered.body)
        sys.stdout.buffer.flush()
        return
    out.write_bytes(rendered.body)
    click.echo(f"wrote {out} ({len(rendered.body)} bytes)", err=True)
