"""The edge agent: the gateway core on site hardware, taking its limits from a utility.

It is the same core (local adapters, command store, planner, local MQTT for a site controller),
assembled by the composition root, plus an upstream link: a 2030.5 client polling the utility's
(or a head-end gateway's) server. What the server puts in force at ``now`` becomes ordinary
unified commands in the local command book, so utility limits go through exactly the
validation, composition and ack lifecycle that Grid DERMS commands do:

* site limits (``opModImpLimW`` / ``opModExpLimW``) and the device limits
  (``opModLoadLimW`` / ``opModGenLimW``, the site's DER seen as one) → one
  ``OperatingEnvelope`` on the site group, the tighter of each pair;
* ``opModTargetW`` → a ``Dispatch`` (mode ``target``) on the site group.

The local control loop enforces them every cycle whether or not the uplink is up; the client
persists the DefaultDERControl so a restart during comms loss still honours it.

The 2030.5 link is optional: a site may instead take unified commands on its own Grid DERMS
link (the head end's broker, where a head end drives it as one ``edge_site`` device) or from a
utility's VTN through its ``[openadr_ven]``. Whatever the source, an envelope holds to its end,
then the site loop's configured fallback limits; ``[uplink_mqtt]`` carries acks and the loop's
samples to the head end through the durable outbox; :meth:`EdgeAgent.health` is the box's view,
served as ``/healthz`` on the operator endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from pydantic import Field

from adapters.openadr_ven.ven import OpenAdrVen
from adapters.operator.server import OperatorServer
from adapters.sep2_client.client import (
    EffectiveControls,
    Sep2Client,
    Sep2ClientConfig,
    TelemetrySample,
)
from edge_agent.health import (
    EdgeHealth,
    LimitsHealth,
    LinkHealth,
    LinkState,
    SiteLoopHealth,
    add_health_routes,
)
from edge_agent.outbox import Forwarder, FullPolicy, Outbox, OutboxFull
from edge_agent.site_loop import (
    LoopSample,
    SiteLoop,
    SiteLoopSettings,
    build_site_loop,
    core_envelope,
)
from edge_agent.uplink import MqttUplink
from gateway.aio import wait_inside_task_group
from gateway.commands import CommandRejected
from gateway.core import Gateway
from protocols.sep2 import (
    DERCapability,
    DERStatus,
    StateOfChargeStatus,
    WattHour,
    from_watts,
)
from unified.config import Section
from unified.model import (
    AckState,
    Cancel,
    Command,
    DerClass,
    Dispatch,
    DispatchMode,
    EnvelopeInterval,
    Identifier,
    OperatingEnvelope,
    Target,
    utcnow,
)

log = logging.getLogger(__name__)

# DERControlType bits (2030.5 Table): 4 fixedW, 5 maxLimW, 17/18 gen/load limits (CSIP), 22
# targetW; we advertise what the planner can honour for a storage site.
_MODES_SUPPORTED = (1 << 4) | (1 << 5) | (1 << 22)
_DER_TYPE_STORAGE = 80  # DERType: "storage only"
_DER_TYPE_PV_STORAGE = 83  # DERType: "combined PV and storage"


def _watt_hours(wh: float) -> WattHour:
    multiplier = 0
    while wh / 10**multiplier > 0xFFFF:
        multiplier += 1
    return WattHour(multiplier=multiplier, value=round(wh / 10**multiplier))


UTILITY_PRIORITY = 1000
_HORIZON = timedelta(hours=24)


class Sep2TlsFiles(Section):
    cert_file: Path
    key_file: Path
    ca_file: Path


class UpstreamSep2Config(Section):
    """``[upstream_sep2]``: the utility's 2030.5 server this site takes its limits from."""

    server_url: str = Field(description="Scheme, host and port, e.g. https://doe.example:8443")
    site_group: Identifier = Field(description="Local group the utility's controls apply to")
    lfdi: str | None = Field(
        default=None, description="Our LFDI; derived from tls.cert_file when omitted"
    )
    tls: Sep2TlsFiles | None = Field(default=None, description="Mutual TLS (required in the field)")
    state_path: Path = Path("edge-sep2-state.json")
    registration_pin: int | None = None
    poll_interval_s: float | None = Field(default=None, gt=0, description="Override pollRate")
    telemetry_interval_s: float | None = Field(default=None, gt=0)
    request_timeout_s: float = Field(default=10.0, gt=0, le=120)
    backoff_max_s: float = Field(default=300.0, gt=0)


class UplinkMqttConfig(Section):
    """``[uplink_mqtt]``: the head end's broker, and the outbox that buffers for it."""

    host: str
    port: int = Field(default=8883, ge=1, le=65535)
    site_id: Identifier
    tls: Sep2TlsFiles | None = Field(default=None, description="Mutual TLS (required in the field)")
    outbox_path: Path = Path("edge-outbox.sqlite")
    max_records: int = Field(default=100_000, ge=1)
    max_bytes: int | None = Field(default=50_000_000, ge=1, description="Payload bytes at most")
    full_policy: FullPolicy = FullPolicy.DROP_OLDEST
    backfill_per_s: float = Field(default=50.0, gt=0)
    backoff_max_s: float = Field(
        default=30.0, gt=0, le=3600, description="Longest wait between reconnection attempts"
    )


class HostedCore(Protocol):
    """The site's gateway process as the composition root built it: the core and its endpoints,
    run together; ``ready`` once the core's command book is loaded."""

    @property
    def core(self) -> Gateway: ...

    @property
    def ready(self) -> asyncio.Event: ...

    async def run(self) -> None: ...

    @property
    def operator(self) -> OperatorServer | None:
        """The operator endpoint, where the edge agent serves its health view (None: off)."""
        ...

    @property
    def openadr_ven(self) -> OpenAdrVen | None:
        """The site's OpenADR VEN toward a utility's VTN, if configured."""
        ...


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def _tighter(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


class EdgeAgent:
    def __init__(
        self,
        upstream: UpstreamSep2Config | None,
        host: HostedCore,
        *,
        site_loop: SiteLoopSettings | None = None,
        uplink: UplinkMqttConfig | None = None,
    ) -> None:
        self.upstream = upstream
        self.host = host
        self.gateway = host.core
        group = upstream.site_group if upstream is not None else None
        if group is None and site_loop is not None:
            group = site_loop.group
        if group is None:
            raise ValueError(
                "an edge agent needs the site's group: [upstream_sep2] site_group or "
                "[site_loop] group"
            )
        if group not in self.gateway.registry.groups():
            raise ValueError(f"site group {group!r} is not a group")
        self.site_group: str = group
        """The local group that is "the site": what upstream controls apply to and what is
        reported upstream as one DER."""
        self.site_loop: SiteLoop | None = None
        """The metered loop holding the site's envelope at the connection point, if configured
        (it drives the PV and battery it names; the core plans them but does not write)."""
        if site_loop is not None:
            self.site_loop = build_site_loop(self.gateway, site_loop, site_loop.group or group)
        self.outbox: Outbox | None = None
        self.uplink: MqttUplink | None = None
        self.forwarder: Forwarder | None = None
        if uplink is not None:
            self._open_uplink(uplink)
        self.client: Sep2Client | None = None
        """The 2030.5 client toward the utility (None: commands come over the core's own
        Grid DERMS link, e.g. from the head end's broker)."""
        self.lfdi: str | None = None
        self.audit_source = "edge-agent"
        if upstream is not None:
            self._open_sep2(upstream)
        self._in_force: dict[str, str] = {}
        """kind ("envelope" / "target") → command id currently standing for the utility."""
        self.last_controls: EffectiveControls | None = None
        if host.operator is not None:
            add_health_routes(host.operator, self.health)

    def _open_sep2(self, upstream: UpstreamSep2Config) -> None:
        ssl_context = None
        lfdi = upstream.lfdi
        if upstream.tls is not None:
            from protocols.sep2 import lfdi_from_cert
            from protocols.tls import client_ssl_context

            ssl_context = client_ssl_context(
                upstream.tls.cert_file, upstream.tls.key_file, upstream.tls.ca_file
            )
            lfdi = lfdi or lfdi_from_cert(upstream.tls.cert_file.read_bytes())
        if lfdi is None:
            raise ValueError("upstream_sep2 needs an lfdi or a tls.cert_file to derive it from")
        self.lfdi = lfdi
        self.audit_source = f"sep2-server:{upstream.server_url};client-lfdi={lfdi}"
        """Who commands this site, for the audit log: the utility's server, as our LFDI."""
        self.client = Sep2Client(
            Sep2ClientConfig(
                server_url=upstream.server_url,
                lfdi=lfdi,
                state_path=upstream.state_path,
                registration_pin=upstream.registration_pin,
                poll_interval_s=upstream.poll_interval_s,
                telemetry_interval_s=upstream.telemetry_interval_s,
                request_timeout_s=upstream.request_timeout_s,
                backoff_max_s=upstream.backoff_max_s,
            ),
            on_envelope=self.apply_controls,
            ssl_context=ssl_context,
            read_telemetry=self.site_telemetry,
            der_capability=self.site_capability(),
            read_der_status=self.site_status,
        )

    def _open_uplink(self, config: UplinkMqttConfig) -> None:
        """Acks and the site loop's samples go to the head end through the durable outbox."""
        tls = None
        if config.tls is not None:
            from protocols.tls import broker_client_context

            tls = broker_client_context(
                ca_file=config.tls.ca_file,
                cert_file=config.tls.cert_file,
                key_file=config.tls.key_file,
            )
        outbox = Outbox(
            config.outbox_path,
            max_records=config.max_records,
            max_bytes=config.max_bytes,
            policy=config.full_policy,
        )
        self.outbox = outbox
        self.uplink = MqttUplink(
            config.host,
            config.port,
            config.site_id,
            tls_context=tls,
            backoff_max_s=config.backoff_max_s,
            backlog=lambda: outbox.depth,
        )
        self.forwarder = Forwarder(outbox, self.uplink.send, backfill_per_s=config.backfill_per_s)

        def keep(stream: str, payload: bytes) -> None:
            with contextlib.suppress(OutboxFull):  # counted and logged by the outbox
                outbox.append(stream, payload)

        self.gateway.ack_listeners.append(lambda ack: keep("acks", ack.model_dump_json().encode()))
        if self.site_loop is not None:
            self.site_loop.on_sample = lambda sample: keep(
                "site", _sample_json(sample, self.storage_summary())
            )

    @property
    def _site(self) -> Target:
        return Target(group_id=self.site_group)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.host.run(), name="edge-gateway")
            await self.host.ready.wait()
            if self.site_loop is not None:
                tg.create_task(self.site_loop.run(), name="edge-site-loop")
            if self.uplink is not None and self.forwarder is not None:
                tg.create_task(self.uplink.run(), name="edge-uplink")
                tg.create_task(self.forwarder.run(), name="edge-outbox")
            if self.client is None:
                await wait_inside_task_group()
            else:
                async with self.client:
                    await wait_inside_task_group()

    # ------------------------------------------------------------------ upstream → local
    async def apply_controls(self, controls: EffectiveControls) -> None:
        """Turn the controls in force upstream into local commands (idempotent per content)."""
        self.last_controls = controls
        now = utcnow()
        end = controls.valid_until or controls.at + _HORIZON
        end = max(end, now + timedelta(seconds=1))
        imp = _tighter(controls.import_limit_kw, controls.load_limit_kw)
        exp = _tighter(controls.export_limit_kw, controls.generation_limit_kw)
        envelope: Command | None = None
        # opModConnect / opModEnergize (CSIP-AUS ALL-11/12): the site's DERs disconnect or
        # cease to energize, as the local envelope says to every device of the site.
        switch = (controls.connect, controls.energize)
        switched = switch != (None, None)
        if imp is not None or exp is not None or switched:
            envelope = OperatingEnvelope(
                command_id=f"sep2-env-{_fingerprint(imp, exp, end, *(switch if switched else ()))}",
                program="utility-sep2-limits",
                priority=UTILITY_PRIORITY,
                target=self._site,
                intervals=(
                    EnvelopeInterval(
                        start=now,
                        end=end,
                        import_limit_kw=imp,
                        export_limit_kw=exp,
                        connect=controls.connect,
                        energize=controls.energize,
                    ),
                ),
            )
        target: Command | None = None
        if controls.target_kw is not None:
            target = Dispatch(
                command_id=f"sep2-tgt-{_fingerprint(controls.target_kw, end)}",
                program="utility-sep2-target",
                priority=UTILITY_PRIORITY,
                target=self._site,
                mode=DispatchMode.TARGET,
                kw=controls.target_kw,
                start=now,
                duration_s=max(1.0, (end - now).total_seconds()),
            )
        storage: Command | None = None
        if controls.storage_target_kw is not None:
            # CSIP-AUS opModStorageTargetW: the site's storage charges (+) / discharges (-) at
            # that power, alongside (never instead of) the site limits above.
            batteries = tuple(
                d.device_id
                for d in self.gateway.registry.members(self.site_group)
                if d.der_class is DerClass.BATTERY
            )
            storage = Dispatch(
                command_id=f"sep2-sto-{_fingerprint(controls.storage_target_kw, end)}",
                program="utility-sep2-storage",
                priority=UTILITY_PRIORITY,
                target=Target(device_ids=batteries) if batteries else self._site,
                mode=DispatchMode.TARGET,
                kw=controls.storage_target_kw,
                start=now,
                duration_s=max(1.0, (end - now).total_seconds()),
            )
        await self._stand("envelope", envelope)
        await self._stand("target", target)
        await self._stand("storage", storage)

    async def _stand(self, kind: str, command: Command | None) -> None:
        previous = self._in_force.get(kind)
        if command is not None and previous != command.command_id:
            ack = await self._submit(command)
            if ack is not None and ack not in (AckState.REJECTED,):
                self._in_force[kind] = command.command_id
            # The same program supersedes the previous one when the new one starts (now).
            return
        if command is None and previous is not None:
            await self._submit(Cancel(command_id=f"{previous}-end", cancels=previous))
            del self._in_force[kind]

    async def _submit(self, command: Command) -> AckState | None:
        try:
            ack = await self.gateway.submit(command, source=self.audit_source)
        except CommandRejected as exc:
            log.warning("utility control %s not applied: %s", command.command_id, exc)
            return None
        if ack.state is AckState.REJECTED:
            log.warning(
                "utility control %s rejected: %s %s", command.command_id, ack.reason, ack.detail
            )
        return ack.state

    # ------------------------------------------------------------------ health
    def health(self) -> EdgeHealth:
        """What the box is doing now: ``ok`` while the site loop holds the site (or, with no
        loop, while the core runs), each uplink, the outbox, devices and the limits in force."""
        now = utcnow()
        problems: list[str] = []
        links: dict[str, LinkHealth] = {}
        if self.uplink is not None:
            up = self.uplink
            links["head_end_mqtt"] = LinkHealth(
                state=up.state,
                since=None if up.changed_at is None else datetime.fromtimestamp(up.changed_at, UTC),
                last_error=up.last_error,
                losses=up.losses,
            )
        if self.client is not None:
            reachable = self.client.reachable
            links["upstream_sep2"] = LinkHealth(
                state="unknown" if reachable is None else "up" if reachable else "down"
            )
        ven = self.host.openadr_ven
        if ven is not None:
            links["openadr_ven"] = LinkHealth(
                state="unknown" if ven.reachable is None else "up" if ven.reachable else "down"
            )
        states = {link.state for link in links.values()}
        uplink: LinkState = (
            "down" if "down" in states else "up" if states == {"up"} else "unknown"
        )
        loop_health: SiteLoopHealth | None = None
        if self.site_loop is not None:
            loop = self.site_loop
            last = loop.samples[-1] if loop.samples else None
            in_force = loop.limits(now)
            limits = LimitsHealth(
                import_limit_kw=in_force.import_limit_kw,
                export_limit_kw=in_force.export_limit_kw,
                import_source=in_force.import_source,
                export_source=in_force.export_source,
            )
            age = None if last is None else (now - last.at).total_seconds()
            out = None if last is None else last.outputs
            loop_health = SiteLoopHealth(
                period_s=loop.config.period_s,
                latency_s=loop.latency_percentiles(),
                last_error=None if last is None else last.error,
                import_limit_kw=in_force.import_limit_kw,
                export_limit_kw=in_force.export_limit_kw,
                last_step_at=None if last is None else last.at,
                last_step_age_s=age,
                net_kw=None if last is None or last.net_kw != last.net_kw else last.net_kw,
                battery_kw=None if out is None else out.battery_kw,
                pv_cap_kw=None if out is None else out.pv_cap_kw,
            )
            if age is None or age > max(3 * loop.config.period_s, 5.0):
                problems.append("site loop not stepping")
            elif last is not None and last.error is not None:
                problems.append(f"site loop blind: {last.error}")
        else:
            imp, exp = core_envelope(self.gateway, self.site_group)(now)
            limits = LimitsHealth(
                import_limit_kw=imp,
                export_limit_kw=exp,
                import_source=None if imp is None else "envelope",
                export_source=None if exp is None else "envelope",
            )
        available = {
            device_id: supervisor.available
            for device_id, supervisor in sorted(self.gateway.supervisors.items())
        }
        outbox = self.outbox
        return EdgeHealth(
            ok=not problems,
            problems=problems,
            uplink=uplink,
            uplinks=links,
            outbox_depth=None if outbox is None else outbox.depth,
            outbox_dropped=0 if outbox is None else outbox.dropped,
            site_loop=loop_health,
            limits=limits,
            devices_online=sum(available.values()),
            devices_total=len(available),
            devices_available=available,
        )

    # ------------------------------------------------------------------ local → upstream
    def site_capability(self) -> DERCapability:
        """The site's DERs seen as one: what the head end allocates against. Charge and
        discharge rates and energy are the storage's (PV can only be curtailed, which the
        measured site power shows); the nameplate output adds the PV."""
        members = self.gateway.registry.members(self.site_group)
        storage = [d for d in members if d.der_class is not DerClass.PV]
        pv = [d for d in members if d.der_class is DerClass.PV]
        charge = sum(d.ratings.max_charge_kw for d in storage)
        discharge = sum(d.ratings.max_discharge_kw for d in storage)
        energy = sum(d.ratings.capacity_kwh for d in storage)
        generation = sum(d.ratings.max_discharge_kw for d in pv)
        return DERCapability(
            # opModTargetW, opModFixedW, opModMaxLimW, gen/load and import/export limits
            modes_supported=f"{_MODES_SUPPORTED:08X}",
            type=_DER_TYPE_PV_STORAGE if pv else _DER_TYPE_STORAGE,
            rtg_max_w=from_watts(max(charge, discharge + generation) * 1000),
            rtg_max_charge_rate_w=from_watts(charge * 1000),
            rtg_max_discharge_rate_w=from_watts(discharge * 1000),
            rtg_max_wh=_watt_hours(energy * 1000),
        )

    def storage_summary(self) -> dict[str, float | None]:
        """The site's storage as one (what a site sample tells the head end): SoC weighted
        by capacity over the batteries reporting one, energy and rates from the ratings."""
        site = self.gateway.registry.members(self.site_group)
        members = [d for d in site if d.der_class is not DerClass.PV]
        states = self.gateway.device_states(utcnow())
        energy = capacity = 0.0
        for device in members:
            state = states.get(device.device_id)
            if state is not None and state.soc_pct is not None:
                energy += state.soc_pct / 100 * device.ratings.capacity_kwh
                capacity += device.ratings.capacity_kwh
        return {
            "soc_pct": None if capacity <= 0 else round(energy / capacity * 100, 2),
            "capacity_kwh": sum(d.ratings.capacity_kwh for d in members),
            "max_charge_kw": sum(d.ratings.max_charge_kw for d in members),
            "max_discharge_kw": sum(d.ratings.max_discharge_kw for d in members),
        }

    async def site_status(self) -> DERStatus:
        now = utcnow()
        group = self.site_group
        members = self.gateway.registry.members(group)
        states = self.gateway.device_states(now)
        energy = capacity = 0.0
        for device in members:
            state = states.get(device.device_id)
            if state is not None and state.soc_pct is not None:
                energy += state.soc_pct / 100 * device.ratings.capacity_kwh
                capacity += device.ratings.capacity_kwh
        soc = None
        if capacity > 0:
            soc = StateOfChargeStatus(
                date_time=int(now.timestamp()), value=round(energy / capacity * 10_000)
            )
        return DERStatus(reading_time=int(now.timestamp()), state_of_charge_status=soc)

    async def site_telemetry(self) -> TelemetrySample:
        """The site's power for the head end: at the meter when the site loop has a fresh
        reading (``site_kw``; the DERs' own is the meter less the load it infers), else the
        sum of the site's devices for both."""
        now = utcnow()
        loop = self.site_loop
        if loop is not None and loop.samples:
            last = loop.samples[-1]
            fresh = (now - last.at).total_seconds() <= max(3 * loop.config.period_s, 5.0)
            if fresh and last.net_kw == last.net_kw and last.outputs is not None:  # not NaN
                return TelemetrySample(
                    site_kw=last.net_kw,
                    der_kw=last.net_kw - last.outputs.load_kw,
                    timestamp=last.at,
                )
        group = self.site_group
        for telemetry in self.gateway.group_telemetry(now):
            if telemetry.group_id == group:
                return TelemetrySample(
                    site_kw=telemetry.power_kw, der_kw=telemetry.power_kw, timestamp=now
                )
        return TelemetrySample(timestamp=now)


def _sample_json(sample: LoopSample, storage: dict[str, float | None] | None = None) -> bytes:
    out = sample.outputs
    limits = sample.limits
    return json.dumps(
        (storage or {})
        | {
            "import_limit_kw": None if limits is None else limits.import_limit_kw,
            "export_limit_kw": None if limits is None else limits.export_limit_kw,
            "import_source": None if limits is None else limits.import_source,
            "export_source": None if limits is None else limits.export_source,
            "at": sample.at.isoformat(),
            "net_kw": None if sample.net_kw != sample.net_kw else sample.net_kw,  # NaN: blind
            "battery_kw": None if out is None else out.battery_kw,
            "pv_cap_kw": None if out is None else out.pv_cap_kw,
            "load_kw": None if out is None else out.load_kw,
            "error": sample.error,
        }
    ).encode()
