"""Assembly: the one place that knows every protocol.

:class:`GatewayApp` builds, from a :class:`GatewayConfig`, the endpoints devices reach us on (the
2030.5 server, the device MQTT link, the OpenADR VTN, the OCPP central), the device adapters, the
domain core (:class:`gateway.core.Gateway`), the uplinks that command it (Grid DERMS over MQTT,
our OpenADR VEN) and the operator endpoint (metrics, health, status), and runs them all in one
TaskGroup, one named task each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from adapters.edge_site import EdgeSiteDevice
from adapters.grid_derms.link import Northbound
from adapters.grid_derms.uplink import GridDermsUplink
from adapters.mqtt_devices.devices import (
    DeviceMqttLink,
    build_mqtt_adapter,
    pending_from_birth,
)
from adapters.ocpp.central import OcppCentral
from adapters.ocpp.charger import OcppCharger
from adapters.oem_vtn.vtn import OpenAdrVtn
from adapters.openadr_ven.ven import OpenAdrVen, capacity_from_registry, submit_to_book
from adapters.operator.auth import BasicAuth
from adapters.operator.peers import Peers
from adapters.operator.server import Extension, OperatorServer
from adapters.operator.view import add_view
from adapters.sep2_der.der import Sep2Der, refusals_to
from adapters.sep2_der.server import Sep2DefaultEnvelope, Sep2Server
from adapters.sunspec.battery import SunSpecBattery, SunSpecEndpoint
from adapters.sunspec.pv_inverter import SunSpecPvInverter
from composition.config import DeviceConfig, EdgeAgentConfig, GatewayConfig
from edge_agent.agent import EdgeAgent
from gateway.aio import wait_inside_task_group
from gateway.audit import RefusalRecorder
from gateway.core import Gateway
from gateway.devices import AdapterError, DeviceAdapter
from gateway.enrolment import AdapterFactory
from gateway.registry import Registry
from protocols.mqtt.devices import Birth
from unified.model import BatteryRatings, DerClass, Device, DeviceCommand, utcnow
from unified.registry import ClientRates, DiscoverDevices, GroupDefaults, PendingEnrolment

__all__ = ["GatewayApp", "build_adapters", "build_edge_agent"]


def build_adapters(
    config: GatewayConfig,
    sep2_server: Sep2Server | None,
    device_mqtt: DeviceMqttLink | None,
    report_refusal: Callable[[DeviceCommand, AdapterError], None],
) -> dict[str, DeviceAdapter]:
    """One adapter per configured device (devices the VTN and the central enrol come later)."""
    adapters: dict[str, DeviceAdapter] = {}
    registry = Registry([d.as_device() for d in config.devices], config.groups)
    groups = registry.groups()
    for device in config.devices:
        member_of = tuple(gid for gid, g in groups.items() if g.contains(device.as_device()))
        adapter = build_adapter(device, sep2_server, device_mqtt, report_refusal, member_of)
        if adapter is not None:
            adapters[device.device_id] = adapter
    return adapters


def build_adapter(
    device: DeviceConfig,
    sep2_server: Sep2Server | None,
    device_mqtt: DeviceMqttLink | None,
    report_refusal: Callable[[DeviceCommand, AdapterError], None],
    member_of: tuple[str, ...] = (),
) -> DeviceAdapter | None:
    """The adapter of one device entry (None: its endpoint is not configured here)."""
    if device.adapter == "sunspec_battery" and device.sunspec is not None:
        return SunSpecBattery(device.device_id, device.sunspec)
    if device.adapter == "sunspec_pv" and device.sunspec is not None:
        return SunSpecPvInverter(device.device_id, device.sunspec)
    if device.adapter == "edge_site" and device.edge_site is not None:
        return EdgeSiteDevice(device.device_id, device.edge_site, on_refusal=report_refusal)
    if device.adapter == "sep2_der" and device.sep2 is not None and sep2_server is not None:
        return Sep2Der(device.device_id, device.sep2, server=sep2_server, groups=member_of)
    if device.adapter in ("mqtt_thermostat", "mqtt_water_heater") and device_mqtt is not None:
        return build_mqtt_adapter(
            device.adapter,  # type: ignore[arg-type]
            device.device_id,
            device_mqtt,
            device.mqtt,
            on_opt_out=report_refusal,
        )
    return None


def enrolment_factory(
    config: GatewayConfig,
    sep2_server: Sep2Server | None,
    device_mqtt: DeviceMqttLink | None,
    report_refusal: Callable[[DeviceCommand, AdapterError], None],
) -> AdapterFactory:
    """How a device enrolled through the registry API is reached: its ``reach`` settings read
    as a ``[[devices]]`` entry of the config file would be (same checks, same adapters)."""

    def build(device: Device, reach: Mapping[str, Any]) -> DeviceAdapter:
        try:
            entry = DeviceConfig.model_validate(device.model_dump() | dict(reach))
        except ValidationError as exc:
            raise ValueError(_errors(exc)) from None
        if entry.sunspec is not None:
            endpoint = (entry.sunspec.host, entry.sunspec.port, entry.sunspec.unit_id)
            for other in config.devices:
                if other.sunspec is not None and endpoint == (
                    other.sunspec.host,
                    other.sunspec.port,
                    other.sunspec.unit_id,
                ):
                    raise ValueError(f"its SunSpec endpoint is {other.device_id!r}'s")
        groups = Registry([device]).groups()
        adapter = build_adapter(
            entry, sep2_server, device_mqtt, report_refusal, tuple(sorted(groups))
        )
        if adapter is None:
            raise ValueError(f"adapter {entry.adapter!r} has no endpoint on this gateway")
        return adapter

    return build


_SCAN_CONCURRENCY = 16
_PROBE_TIMEOUT_S = 5.0


async def scan_sunspec(request: DiscoverDevices) -> list[PendingEnrolment]:
    """Probe each target unit for a SunSpec battery (at most 16 at a time, 5 s each): every
    one that answers with its ratings becomes a pending enrolment, reached as it was found."""
    limit = asyncio.Semaphore(_SCAN_CONCURRENCY)

    async def probe(host: str, port: int, unit: int, prefix: str) -> PendingEnrolment | None:
        device_id = f"{prefix}-{host}-{port}-{unit}".replace(":", "-")[:128]
        endpoint = SunSpecEndpoint(host=host, port=port, unit_id=unit, timeout_s=1.0)
        adapter = SunSpecBattery(device_id, endpoint)
        async with limit:
            try:
                async with asyncio.timeout(_PROBE_TIMEOUT_S):
                    await adapter.connect()
                    state = await adapter.read()
            except (AdapterError, TimeoutError):
                return None
            finally:
                await adapter.close()
        if not (state.max_charge_kw and state.max_discharge_kw and state.capacity_kwh):
            return None
        return PendingEnrolment(
            device_id=device_id,
            der_class=DerClass.BATTERY,
            adapter="sunspec_battery",
            ratings=BatteryRatings(
                max_charge_kw=state.max_charge_kw,
                max_discharge_kw=state.max_discharge_kw,
                capacity_kwh=state.capacity_kwh,
            ),
            seen_at=utcnow(),
            source=f"sunspec scan {host}:{port} unit {unit}",
            reach={"sunspec": endpoint.model_dump(exclude_defaults=True) | {"host": host}},
        )

    probes = [
        probe(t.host, t.port, unit, t.device_id_prefix)
        for t in request.targets
        for unit in dict.fromkeys(t.unit_ids)
    ]
    return [p for p in await asyncio.gather(*probes) if p is not None]


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
        for e in exc.errors(include_url=False)[:8]
    )


class GatewayApp:
    """The gateway process: the core with every endpoint and uplink its config names.

    ``adapters`` replaces the configured devices' adapters (tests, benchmarks); the endpoints
    are built from the config either way.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        adapters: Mapping[str, DeviceAdapter] | None = None,
        operator_extensions: Sequence[Extension] = (),
    ) -> None:
        self.config = config
        self.sep2_server: Sep2Server | None = None
        if config.sep2_server is not None:
            self.sep2_server = Sep2Server(
                config.sep2_server, on_response=refusals_to(self._report_refusal)
            )
        self.device_mqtt: DeviceMqttLink | None = None
        if config.device_mqtt is not None:
            self.device_mqtt = DeviceMqttLink(config.device_mqtt, name=config.gateway_id)
        if adapters is None:
            adapters = build_adapters(
                config, self.sep2_server, self.device_mqtt, self._report_refusal
            )
        self.uplink = GridDermsUplink(
            config.broker, config.gateway_id, backoff_max_s=config.timing.backoff_max_s
        )
        self.core = Gateway(
            config,
            devices=[d.as_device() for d in config.devices],
            adapters=adapters,
            publisher=self.uplink,
            adapter_factory=enrolment_factory(
                config, self.sep2_server, self.device_mqtt, self._report_refusal
            ),
            scanner=scan_sunspec,
        )
        self.uplink.bind(self.core)
        if self.sep2_server is not None:
            _serve_settings(self.core, self.sep2_server)
        if self.device_mqtt is not None:
            core = self.core

            def announce(birth: Birth) -> None:
                core.propose_enrolment(pending_from_birth(birth))

            self.device_mqtt.on_unknown_birth = announce
        self.openadr_ven: OpenAdrVen | None = None
        if config.openadr_ven is not None:
            self.openadr_ven = OpenAdrVen(
                config.openadr_ven,
                submit=submit_to_book(
                    self.core.book, self.core.wake_control, source=self._openadr_source
                ),
                telemetry=self.core.group_telemetry,
                capacity=capacity_from_registry(self.core.registry),
                prices=self.core.put_prices,
            )
        self.ocpp_central: OcppCentral | None = None
        if config.ocpp_central is not None:
            self.ocpp_central = OcppCentral(
                config.ocpp_central, charger_factory=OcppCharger, registrar=self.core
            )
        self.openadr_vtn: OpenAdrVtn | None = None
        if config.openadr_vtn is not None:
            self.openadr_vtn = OpenAdrVtn(config.openadr_vtn, registrar=self.core)
        # Refused peers at the endpoints we host go into the audit trail.
        audit = self.core.audit
        if self.sep2_server is not None:
            self.sep2_server.on_refused = RefusalRecorder(audit, "sep2_server")
            self.core.price_listeners.append(self.sep2_server.set_price)  # 2030.5 Pricing
        if self.ocpp_central is not None:
            self.ocpp_central.on_refused = RefusalRecorder(audit, "ocpp_central")
        if self.openadr_vtn is not None:
            self.openadr_vtn.on_refused = RefusalRecorder(audit, "openadr_vtn")
        self.operator: OperatorServer | None = None
        if config.operator.enabled:
            op = config.operator
            extensions: list[Extension] = []
            if op.password_file is not None or op.password_env is not None:
                # The live view needs a password; without one the operator endpoint serves
                # metrics and health only (protected routes answer 403).
                view_auth = BasicAuth(
                    op.user, password_file=op.password_file, password_env=op.password_env
                )
                core = self.core

                def live_view(app: web.Application) -> None:
                    add_view(app, core, view_auth)

                extensions.append(live_view)
            self.operator = OperatorServer(
                config.operator,
                self.core,
                peers=Peers(
                    grid=self.uplink,
                    device_mqtt=self.device_mqtt,
                    sep2_server=self.sep2_server,
                    ocpp_central=self.ocpp_central,
                    openadr_vtn=self.openadr_vtn,
                    openadr_ven=self.openadr_ven,
                ),
                extensions=(*extensions, *operator_extensions),
            )
        self.ready = asyncio.Event()
        """Set once the core is loaded and every endpoint and uplink task is started."""

    @property
    def northbound(self) -> Northbound:
        """The Grid DERMS MQTT link (its connection state, for tests and the demo)."""
        return self.uplink.link

    def _openadr_source(self) -> str | None:
        return None if self.openadr_ven is None else self.openadr_ven.audit_source

    def _report_refusal(self, command: DeviceCommand, error: AdapterError) -> None:
        # Called by adapters and endpoints built before the core exists, only once it runs.
        self.core.report_refusal(command, error)

    async def reload(self, config: GatewayConfig) -> list[str]:
        """Apply a reloaded configuration (SIGHUP) without a restart: its ``[[devices]]`` are
        merged into the registry (new ones enrolled, changed ones updated, removed ones
        retired; what the registry API owns is left alone) and commands in force carry on.
        Returns what needs a restart instead (every other section, a device's new adapter)."""
        notes: list[str] = []
        before = self.config.model_dump(exclude={"devices"})
        after = config.model_dump(exclude={"devices"})
        changed = sorted(k for k in after if before.get(k) != after.get(k))
        if changed:
            notes.append("changed sections take effect at the next restart: " + ", ".join(changed))
        served = self.core.supervisors
        devices: list[tuple[Device, DeviceAdapter | None]] = []
        for entry in config.devices:
            device = entry.as_device()
            adapter = None
            if entry.device_id not in served:
                member_of = tuple(sorted(Registry([device]).groups()))
                adapter = build_adapter(
                    entry, self.sep2_server, self.device_mqtt, self._report_refusal, member_of
                )
            devices.append((device, adapter))
        notes += await self.core.reload_devices(devices)
        self.config = self.config.model_copy(update={"devices": config.devices})
        return notes

    async def run(self) -> None:
        """Run until cancelled: the core first (its command book loaded), then the endpoints
        devices reach us on, then the uplinks that command us."""
        async with asyncio.TaskGroup() as tg:
            if self.operator is not None:
                # First, so health checks answer (not ready) while the core loads its store.
                tg.create_task(self.operator.run(), name="operator")
            tg.create_task(self.core.run(), name="core")
            # Should the core fail to start, the group cancels this wait and raises its error.
            await self.core.ready.wait()
            if self.sep2_server is not None:
                tg.create_task(self.sep2_server.run(), name="sep2-server")
            if self.device_mqtt is not None:
                tg.create_task(self.device_mqtt.run(), name="device-mqtt")
            if self.openadr_vtn is not None:
                tg.create_task(self.openadr_vtn.run(), name="openadr-vtn")
            if self.ocpp_central is not None:
                tg.create_task(self.ocpp_central.run(), name="ocpp-central")
            tg.create_task(self.uplink.run(), name="northbound")
            if self.openadr_ven is not None:
                tg.create_task(self.openadr_ven.run(), name="openadr-ven")
            self.ready.set()
            await wait_inside_task_group()


def build_edge_agent(
    config: EdgeAgentConfig, *, adapters: Mapping[str, DeviceAdapter] | None = None
) -> EdgeAgent:
    """The site deployment: the gateway process its config describes, plus the upstream
    2030.5 client that takes the utility's limits into its command book."""
    return EdgeAgent(
        config.upstream_sep2,
        GatewayApp(config, adapters=adapters),
        site_loop=config.site_loop,
        uplink=config.uplink_mqtt,
    )


def _serve_settings(core: Gateway, server: Sep2Server) -> None:
    """Group default controls and client rates set through the registry API (operations
    planning) reach the 2030.5 server: applied at once and, at start, from the registry."""

    def why_not(group_id: str) -> str | None:
        return None if server.serves_group(group_id) else "no 2030.5 DERProgram serves it"

    def apply(item: GroupDefaults | ClientRates) -> None:
        if isinstance(item, ClientRates):
            server.set_rates(**item.model_dump())
            return
        envelope = Sep2DefaultEnvelope.model_validate(item.model_dump(exclude={"group_id"}))
        server.set_default(item.group_id, envelope)

    core.enrolment.serves_defaults = why_not
    core.enrolment.settings_listeners.append(apply)
