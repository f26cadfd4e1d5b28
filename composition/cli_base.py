"""What every ``derms-gateway`` command shares: ``-v`` and ``--log-format`` anywhere on the line
(``derms-gateway run --config F -v`` as well as ``derms-gateway -v run --config F``), its logging
set up before it runs, ``--config FILE`` (or ``DERMS_CONFIG``), and its exit status:

* 0: done (a stop by SIGINT or SIGTERM is a clean stop);
* 1: an operational failure (a store, disk or peer that failed, a check that did not pass);
* 2: a usage or configuration error (click's own for usage; ``InvalidConfig``): starting again
  will not help until a person changes the command line or the configuration.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar, cast

import click

from composition.logs import LOG_FORMATS, LogFormat, logging_to_stderr

__all__ = [
    "CONFIG_ENV",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "LOG_FORMAT_ENV",
    "GatewayCommand",
    "GatewayGroup",
    "InvalidConfig",
    "config_option",
    "verbosity",
]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2  # click's UsageError exits with 2 too
CONFIG_ENV: Final = "DERMS_CONFIG"
LOG_FORMAT_ENV: Final = "DERMS_LOG_FORMAT"

# ctx.meta is one dict shared by a command's context and its parents', so the options given
# before the subcommand and after it add up there. (DERMS_LOG_FORMAT is read when the command
# runs rather than as click's envvar, which every level would read and could not tell from a
# flag given at another level.)
_VERBOSITY: Final = "derms_gateway.verbosity"
_LOG_FORMAT: Final = "derms_gateway.log_format"

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)


class InvalidConfig(click.ClickException):
    """The configuration (or a file it names) cannot be used as it is: exit status 2."""

    exit_code = EXIT_USAGE


def verbosity(ctx: click.Context) -> int:
    """How many ``-v`` the command line has, wherever they stand."""
    return int(ctx.meta.get(_VERBOSITY, 0))


def log_format(ctx: click.Context) -> LogFormat:
    """``--log-format`` wherever it stands, else ``DERMS_LOG_FORMAT``, else text."""
    chosen = ctx.meta.get(_LOG_FORMAT) or os.environ.get(LOG_FORMAT_ENV) or "text"
    if chosen not in LOG_FORMATS:
        raise click.UsageError(
            f"{LOG_FORMAT_ENV}={chosen!r}: the log format is one of {', '.join(LOG_FORMATS)}"
        )
    return cast("LogFormat", chosen)


def _count_verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
    ctx.meta[_VERBOSITY] = verbosity(ctx) + value


def _choose_log_format(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:  # the last one on the line wins
        ctx.meta[_LOG_FORMAT] = value


def _shared_options() -> list[click.Parameter]:
    return [
        click.Option(
            ["-v", "--verbose"],
            count=True,
            expose_value=False,
            callback=_count_verbose,
            help="-v for info, -vv for debug logs (before or after the command name).",
        ),
        click.Option(
            ["--log-format"],
            type=click.Choice(LOG_FORMATS),
            default=None,
            expose_value=False,
            callback=_choose_log_format,
            help=f"Logs on stderr as text or one JSON object per line (default: {LOG_FORMAT_ENV}, "
            "else text).",
        ),
    ]


class GatewayCommand(click.Command):
    """A command that takes the shared options and has its logging set up before it runs.

    ``min_verbosity=1`` is for the commands that run until stopped: their info lines are the
    operator's record of what the gateway did, so they show without ``-v``.
    """

    def __init__(self, *args: Any, min_verbosity: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(_shared_options())
        self.min_verbosity = min_verbosity

    def invoke(self, ctx: click.Context) -> Any:
        with logging_to_stderr(max(self.min_verbosity, verbosity(ctx)), log_format(ctx)):
            return super().invoke(ctx)


class GatewayGroup(click.Group):
    """A group whose commands and subgroups take the shared options; at the root, an error
    that ends the command is one JSON record too when the logs are JSON."""

    command_class = GatewayCommand
    group_class = type  # subgroups are GatewayGroups

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(_shared_options())

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.parent is not None:
            return super().invoke(ctx)
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):
            raise
        except click.ClickException as exc:
            if log_format(ctx) != "json":
                raise
            _log_fatal(ctx, exc.format_message(), exc.exit_code)
        except Exception as exc:
            if log_format(ctx) != "json":
                raise
            _log_fatal(ctx, f"stopped by an unexpected error: {exc!r}", EXIT_FAILURE, exc)


def _log_fatal(
    ctx: click.Context, message: str, code: int, error: BaseException | None = None
) -> NoReturn:
    """Say why the command ends as one JSON record (with the traceback of an unexpected
    error) instead of click's text or Python's, then exit with ``code``."""
    with logging_to_stderr(verbosity(ctx), "json"):
        log.error(message, exc_info=error, extra={"exit_code": code})
    raise click.exceptions.Exit(code)


def config_option(
    *, required: bool = True, help: str = "The gateway's TOML configuration file."
) -> Callable[[F], F]:
    """``--config FILE``, the same on every command that reads a configuration."""
    return click.option(
        "--config",
        "config_path",
        envvar=CONFIG_ENV,
        show_envvar=True,
        required=required,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help=help,
    )
