"""``derms-gateway``: run the gateway, the demo, a simulator, print the message schemas, read
the audit log, or draw a command's report."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import click
from click.core import ParameterSource

from composition.audit_cli import audit
from composition.cli_base import (
    CONFIG_ENV,
    EXIT_FAILURE,
    LOG_FORMAT_ENV,
    GatewayGroup,
    InvalidConfig,
    config_option,
)
from composition.config import GatewayConfig, load_config
from composition.report_cli import report
from composition.runtime import settle_heap
from composition.status_cli import status
from unified.config import ConfigError
from unified.model import json_schemas
from unified.registry import registry_json_schemas

SHUTDOWN_GRACE_S = 10.0


def run_until_signal(
    main: Coroutine[Any, Any, Any],
    on_hangup: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> Any:
    """Run ``main`` and cancel it cleanly on SIGINT or SIGTERM (tasks see CancelledError);
    on SIGHUP run ``on_hangup`` (one at a time: a SIGHUP during a reload is taken after it).

    If the clean stop has not finished ``SHUTDOWN_GRACE_S`` after the signal (a task that
    swallowed its cancellation), the stuck tasks are logged with their stacks and the process
    exits with status 1 rather than hang; a second signal does the same at once.
    """
    log = logging.getLogger("gateway")

    async def runner() -> Any:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        signalled: list[int] = []

        def give_up(reason: str) -> None:
            log.error("shutdown stuck (%s); pending tasks:", reason)
            for pending in asyncio.all_tasks():
                if pending is not task:
                    frames = pending.get_stack(limit=8)
                    where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in frames)
                    log.error("  %s at %s", pending.get_name(), where)
            os._exit(EXIT_FAILURE)

        def on_signal(sig: int) -> None:
            signalled.append(sig)
            if len(signalled) > 1:
                give_up("second signal")
            task.cancel()
            loop.call_later(SHUTDOWN_GRACE_S, give_up, f"{SHUTDOWN_GRACE_S:g} s after signal")

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        reloads: set[asyncio.Task[None]] = set()
        lock = asyncio.Lock()

        async def hangup() -> None:
            assert on_hangup is not None
            async with lock:
                try:
                    await on_hangup()
                except Exception:
                    log.exception("reload failed; running as before")

        def on_sighup() -> None:
            reload = loop.create_task(hangup(), name="reload")
            reloads.add(reload)
            reload.add_done_callback(reloads.discard)

        if on_hangup is not None:
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
        try:
            return await main
        except asyncio.CancelledError:
            log.info("stopped by signal")
            return None
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if on_hangup is not None:
                loop.remove_signal_handler(signal.SIGHUP)
            for reload in reloads:
                reload.cancel()

    return asyncio.run(runner())


def _run_explained(
    main: Coroutine[Any, Any, Any],
    on_hangup: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> None:
    """``run_until_signal``, with a store that cannot be opened or written said in a sentence
    with what to do, and exit status 1, instead of a traceback."""
    from gateway.store import StoreError

    try:
        run_until_signal(main, on_hangup)
    except StoreError as exc:
        raise click.ClickException(_store_advice(exc)) from None
    except BaseExceptionGroup as group:
        found = group.subgroup(StoreError)
        if found is None:
            raise
        leaf: BaseException = found
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise click.ClickException(_store_advice(leaf)) from None


def _store_advice(error: BaseException) -> str:
    return (
        f"{error}\n"
        "The gateway cannot use this SQLite file: it is corrupt, not a database, or not "
        "readable and writable by this user (or its disk is full). Nothing was commanded. "
        "Check the file's permissions and free space; if it is damaged, restore it from a "
        "backup, or move it aside to start with an empty store (active commands in it are "
        "then lost: Grid DERMS must send them again)."
    )


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("derms-gateway")
    except PackageNotFoundError:
        installed = "unknown (run from a source tree that is not installed)"
    click.echo(f"derms-gateway {installed}")
    ctx.exit()


@click.group(
    cls=GatewayGroup,
    epilog=f"""\b
Exit status:
  0  done (a stop by SIGINT or SIGTERM is a clean stop)
  1  operational failure: a store, disk or peer that failed, a check that did not pass
  2  usage or configuration error: fix the command line or the configuration first

\b
Environment:
  {CONFIG_ENV}      the configuration file, for commands that take --config
  {LOG_FORMAT_ENV}  text or json, as --log-format""",
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the installed version and exit.",
)
def main() -> None:
    """Edge DERMS protocol gateway.

    -v / -vv and --log-format may stand before or after the command name; every command that
    reads a configuration takes it as --config FILE (or DERMS_CONFIG).
    """


def _load(
    config_path: Path, model: type[GatewayConfig] = GatewayConfig, *, check_files: bool = True
) -> GatewayConfig:
    """The configuration, or exit status 2 with every problem in it."""
    try:
        return load_config(config_path, model, check_files=check_files)
    except ConfigError as exc:
        raise InvalidConfig(str(exc)) from None


@main.command(min_verbosity=1)
@config_option()
def run(config_path: Path) -> None:
    """Run the gateway with a TOML configuration file."""
    from composition.app import GatewayApp

    config = _load(config_path)
    try:
        app = GatewayApp(config)  # reads secrets and certificates (OCPP central)
    except ConfigError as exc:
        raise InvalidConfig(str(exc)) from None
    settle_heap()
    log = logging.getLogger("gateway")

    async def reload() -> None:
        """SIGHUP: read the file again; a file that does not parse changes nothing."""
        try:
            new = await asyncio.to_thread(load_config, config_path, GatewayConfig)
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded: %s", exc)
            return
        notes = await app.reload(new)
        for note in notes:
            log.warning("SIGHUP: %s", note)
        log.info("SIGHUP: configuration reloaded (%s)", config_path)

    _run_explained(app.run(), reload)


@main.command(min_verbosity=1)
@config_option()
def edge(config_path: Path) -> None:
    """Run the edge agent: the gateway core on site hardware plus its uplinks (``[upstream_sep2]``,
    ``[uplink_mqtt]``, ``[openadr_ven]``) and its ``[site_loop]``."""
    from composition.app import build_edge_agent
    from composition.config import EdgeAgentConfig

    config = _load(config_path, EdgeAgentConfig)
    assert isinstance(config, EdgeAgentConfig)
    try:
        agent = build_edge_agent(config)
    except ConfigError as exc:
        raise InvalidConfig(str(exc)) from None
    settle_heap()
    _run_explained(agent.run())


@main.command("check-config")
@config_option(required=False)
@click.argument(
    "legacy_path",
    metavar="[FILE]",
    required=False,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.pass_context
def check_config(ctx: click.Context, config_path: Path | None, legacy_path: Path | None) -> None:
    """Validate a configuration file and summarise it.

    FILE as an argument (check-config FILE) is the old form of --config FILE: deprecated.
    """
    from gateway.registry import Registry

    if legacy_path is not None:
        if ctx.get_parameter_source("config_path") is ParameterSource.COMMANDLINE:
            raise click.UsageError("give the configuration once: --config FILE")
        click.echo(
            "warning: check-config FILE is deprecated: use check-config --config FILE", err=True
        )
        config_path = legacy_path
    if config_path is None:
        raise click.UsageError(f"Missing option '--config' (or {CONFIG_ENV}).")
    config = _load(config_path)
    if config.ocpp_central is not None:
        from adapters.ocpp.central import OcppCentral
        from adapters.ocpp.charger import OcppCharger

        try:
            # Reads the chargers' secrets and the TLS files, as a start would.
            OcppCentral(config.ocpp_central, charger_factory=OcppCharger)
        except ConfigError as exc:
            raise InvalidConfig(str(exc)) from None
    registry = Registry([d.as_device() for d in config.devices], config.groups)
    click.echo(f"ok: gateway {config.gateway_id}, {len(registry)} device(s), groups:")
    for group_id in sorted(registry.groups()):
        click.echo(f"  {group_id}: {len(registry.members(group_id))} device(s)")
    for warning in config.security_warnings():
        click.echo(f"warning: {warning}")
    for name, login in config.broker_logins().items():
        if login.password_env is not None and not os.environ.get(login.password_env):
            click.echo(
                f"note: {name}.password_env: {login.password_env} is not set in this shell "
                "(it must be where the gateway runs)"
            )


@main.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write one <name>.schema.json per message into this folder.",
)
def schema(out: Path | None) -> None:
    """Print (or write) the JSON Schemas of the northbound messages."""
    from gateway.flex import flex_json_schemas

    schemas = json_schemas() | flex_json_schemas() | registry_json_schemas()
    if out is None:
        click.echo(json.dumps(schemas, indent=2))
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, body in schemas.items():
        (out / f"{name}.schema.json").write_text(json.dumps(body, indent=2) + "\n")
    click.echo(f"wrote {len(schemas)} schemas to {out}")


@main.command()
@click.option(
    "--duration",
    type=click.FloatRange(5, 3600),
    default=40.0,
    show_default=True,
    help="Seconds to run before exiting.",
)
@click.option("--batteries", type=click.IntRange(2, 500), default=6, show_default=True)
@click.option(
    "--broker",
    type=click.Choice(["auto", "mosquitto", "embedded"]),
    default="auto",
    show_default=True,
    help="auto: mosquitto if on PATH, else the embedded broker.",
)
def demo(duration: float, batteries: int, broker: str) -> None:
    """Self-contained demo: broker, simulated batteries, gateway and a scripted Grid DERMS."""
    from composition.demo import run_demo

    result = run_until_signal(run_demo(duration_s=duration, batteries=batteries, broker=broker))
    if result is not None and not result:
        sys.exit(EXIT_FAILURE)


@main.group()
def certs() -> None:
    """Development PKI for IEEE 2030.5 (P-256, ECDSA) and a certificate's LFDI / SFDI."""


@certs.command("ca")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default="derms-dev-ca", show_default=True)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing CA (every certificate it issued then fails to verify).",
)
def certs_ca(directory: Path, name: str, force: bool) -> None:
    """Create a development CA (<name>.pem, <name>.key) in DIRECTORY."""
    from composition.certs import make_ca

    existing = [p for p in (directory / f"{name}.pem", directory / f"{name}.key") if p.exists()]
    if existing and not force:
        raise click.ClickException(
            f"{existing[0]} exists: replacing the CA would make every certificate it issued fail "
            "to verify. Use another --name or DIRECTORY, or --force."
        )
    try:
        ca = make_ca(directory, name)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot create the CA in {directory}: {exc}") from None
    click.echo(f"CA certificate: {ca.cert_path}\nCA key:         {ca.key_path}")


@certs.command("issue")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
@click.option(
    "--ca-name",
    default="derms-dev-ca",
    show_default=True,
    help="The CA in DIRECTORY that signs (from `certs ca`).",
)
@click.option("--server", is_flag=True, help="A server certificate (serverAuth, host names).")
@click.option("--host", "hosts", multiple=True, help="Server host name or IP (repeatable).")
@click.option(
    "--org",
    "organization",
    default=None,
    help="Subject O (an OCPP charger certificate carries the CPO's name: [ocpp_central] cpo_name).",
)
def certs_issue(
    directory: Path,
    name: str,
    ca_name: str,
    server: bool,
    hosts: tuple[str, ...],
    organization: str | None,
) -> None:
    """Issue a device (or --server) certificate signed by the CA in DIRECTORY.

    NAME is the subject CN: for an OCPP charger (security profile 3), its charge point id.
    """
    from composition.certs import load_ca, make_cert

    try:
        ca = load_ca(directory / f"{ca_name}.pem", directory / f"{ca_name}.key")
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot load CA {ca_name!r} from {directory}: {exc}") from None
    kwargs = {"hosts": hosts} if hosts else {}
    issued = make_cert(ca, directory, name, server=server, organization=organization, **kwargs)
    click.echo(f"certificate: {issued.cert_path}\nkey:         {issued.key_path}")
    click.echo(f"LFDI: {issued.lfdi}\nSFDI: {issued.sfdi}")


@certs.command("show")
@click.argument("certificate", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def certs_show(certificate: Path) -> None:
    """Print a certificate's LFDI and SFDI (what an installer hands the utility)."""
    from composition.certs import describe_text
    from protocols.sep2.errors import InvalidCertificate

    try:
        click.echo(describe_text(certificate))
    except (ValueError, InvalidCertificate) as exc:
        raise click.ClickException(f"{certificate}: not a certificate ({exc})") from None
    except OSError as exc:
        raise click.ClickException(f"{certificate}: cannot read it ({exc})") from None


@main.group()
def broker() -> None:
    """The brokers' side of the security model: identities, ACL, TLS listener."""


@broker.command("provision")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@config_option(help="The gateway's configuration ([broker], [device_mqtt], the MQTT devices).")
@click.option("--grid-derms-user", default="grid-derms", show_default=True)
@click.option(
    "--gateway-user",
    default=None,
    help="The gateway's user name (default: [broker] username, else the gateway id).",
)
@click.option(
    "--auth",
    type=click.Choice(["password", "certificate"]),
    default=None,
    help="How clients log in (default: certificate where the config gives the gateway a "
    "client certificate and no password, else password).",
)
@click.option(
    "--ca-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A development CA (from `certs ca`) to issue the broker's certificate and, for "
    "certificate logins, each identity's. Without it, supply your PKI's files.",
)
@click.option("--ca-name", default="derms-dev-ca", show_default=True)
@click.option(
    "--install-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where OUT_DIR will live on the broker host (the paths in mosquitto.conf).",
)
@click.option("--rotate-secrets", is_flag=True, help="Replace existing passwords and certificates.")
def broker_provision(
    out_dir: Path,
    config_path: Path,
    grid_derms_user: str,
    gateway_user: str | None,
    auth: str | None,
    ca_dir: Path | None,
    ca_name: str,
    install_dir: Path | None,
    rotate_secrets: bool,
) -> None:
    """Write OUT_DIR: per broker a mosquitto.conf, ACL and password file; secrets/ (one 0600
    file per secret); gateway-snippet.toml. Only Grid DERMS may command, only the gateway may
    answer, each device only its own topics, nobody anonymous (docs/security.md)."""
    from composition.broker_provision import AuthMode, ProvisionError, provision
    from composition.certs import load_ca

    config = _load(config_path, check_files=False)
    ca = None
    if ca_dir is not None:
        try:
            ca = load_ca(ca_dir / f"{ca_name}.pem", ca_dir / f"{ca_name}.key")
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"cannot load CA {ca_name!r} from {ca_dir}: {exc}") from None
    try:
        done = provision(
            config,
            out_dir,
            grid_user=grid_derms_user,
            gateway_user=gateway_user,
            auth=cast("AuthMode | None", auth),  # click.Choice has checked it
            ca=ca,
            install_dir=install_dir,
            rotate=rotate_secrets,
        )
    except ProvisionError as exc:
        raise InvalidConfig(str(exc)) from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {out_dir}: {exc}") from None
    for plan in done.plans:
        click.echo(f"{plan.folder}/: {plan.host}:{plan.port} ({plan.auth} logins)")
        for user, role in plan.roles.items():
            click.echo(f"  {user}: {role}")
    if done.new_secrets:
        click.echo(f"new secrets: {', '.join(done.new_secrets)}")
    if done.kept_secrets:
        click.echo(f"kept secrets: {', '.join(done.kept_secrets)}")
    for item in done.to_supply:
        click.echo(f"supply: {item}")
    click.echo(f"gateway settings: {out_dir / 'gateway-snippet.toml'}")


@main.group()
def simulate() -> None:
    """Run a device simulator standalone (for integrators testing their own tools)."""


@simulate.command("battery", min_verbosity=1)
@click.option("--port", type=click.IntRange(1, 65535), default=5020, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--unit-id", type=click.IntRange(1, 247), default=1, show_default=True)
@click.option("--capacity-kwh", type=click.FloatRange(min=0.1), default=13.5, show_default=True)
@click.option("--max-charge-kw", type=click.FloatRange(min=0.1), default=5.0, show_default=True)
@click.option("--max-discharge-kw", type=click.FloatRange(min=0.1), default=5.0, show_default=True)
@click.option("--soc", type=click.FloatRange(0, 100), default=60.0, show_default=True)
@click.option(
    "--time-scale",
    type=click.FloatRange(min=0.001),
    default=1.0,
    show_default=True,
    help="Speed up state-of-charge changes by this factor.",
)
@click.option(
    "--legacy",
    is_flag=True,
    help="Show the legacy models (1, 103, 120, 121, 123, 124) instead of the 7xx ones.",
)
def simulate_battery(
    port: int,
    host: str,
    unit_id: int,
    capacity_kwh: float,
    max_charge_kw: float,
    max_discharge_kw: float,
    soc: float,
    time_scale: float,
    legacy: bool,
) -> None:
    """A SunSpec (models 1, 701, 702, 704, 713, 802; or legacy 1xx) battery on Modbus TCP."""
    from simulators.sunspec_battery import serve_battery

    click.echo(f"SunSpec battery on {host}:{port} unit {unit_id} (map at 40000); Ctrl-C stops it")
    run_until_signal(
        serve_battery(
            port,
            host=host,
            unit_id=unit_id,
            capacity_kwh=capacity_kwh,
            max_charge_kw=max_charge_kw,
            max_discharge_kw=max_discharge_kw,
            legacy=legacy,
            initial_soc_pct=soc,
            time_scale=time_scale,
        )
    )


main.add_command(audit)
main.add_command(status)
main.add_command(report)


if __name__ == "__main__":
    main()
