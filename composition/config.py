"""Gateway configuration: one TOML file, validated in full before anything starts.

The file is the core's sections (:class:`gateway.config.CoreConfig`) plus each adapter family's
endpoint and uplink sections; this module alone knows them all. Errors name the exact place in
the file (``devices[3].ratings.max_charge_kw``) and what is wrong.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Self

from pydantic import Field, ValidationError, model_validator

from adapters.broker_security import BrokerLogin
from adapters.edge_site import EdgeSiteEndpoint
from adapters.grid_derms.config import BrokerConfig
from adapters.mqtt_devices.devices import DeviceMqttConfig, MqttDeviceSettings
from adapters.ocpp.central import OcppCentralConfig
from adapters.oem_vtn.vtn import OpenAdrVtnConfig
from adapters.openadr_ven.ven import OpenAdrVenConfig
from adapters.operator.config import OperatorConfig
from adapters.sep2_der.der import Sep2DerEndpoint
from adapters.sep2_der.server import Sep2ServerConfig
from adapters.sunspec.battery import SunSpecEndpoint
from edge_agent.agent import UplinkMqttConfig, UpstreamSep2Config
from edge_agent.site_loop import SiteLoopSettings
from gateway.config import CoreConfig
from unified.config import ConfigError, describe_errors, rebase
from unified.model import DerClass, Device

__all__ = ["MQTT_ADAPTERS", "DeviceConfig", "GatewayConfig", "load_config", "parse_config"]


MQTT_ADAPTERS: dict[str, DerClass] = {
    "mqtt_thermostat": DerClass.THERMOSTAT,
    "mqtt_water_heater": DerClass.WATER_HEATER,
}


class DeviceConfig(Device):
    """A device as configured: the unified :class:`Device` plus how to reach it."""

    sunspec: SunSpecEndpoint | None = None
    sep2: Sep2DerEndpoint | None = Field(
        default=None, description="A 2030.5 client (inverter, battery) that polls our server"
    )
    mqtt: MqttDeviceSettings | None = Field(
        default=None, description="A device on the device MQTT broker (thermostat, water heater)"
    )
    edge_site: EdgeSiteEndpoint | None = Field(
        default=None, description="An edge site (derms-gateway edge) on the head end's broker"
    )

    @model_validator(mode="after")
    def _reachable(self) -> DeviceConfig:
        if self.adapter == "sunspec_battery":
            if self.sunspec is None:
                raise ValueError("adapter 'sunspec_battery' needs a [devices.sunspec] endpoint")
            if self.der_class is not DerClass.BATTERY:
                raise ValueError("adapter 'sunspec_battery' only drives der_class 'battery'")
        elif self.adapter == "sunspec_pv":
            if self.sunspec is None:
                raise ValueError("adapter 'sunspec_pv' needs a [devices.sunspec] endpoint")
            if self.der_class is not DerClass.PV:
                raise ValueError("adapter 'sunspec_pv' only drives der_class 'pv'")
        elif self.adapter == "edge_site":
            if self.edge_site is None:
                raise ValueError("adapter 'edge_site' needs a [devices.edge_site] endpoint")
        elif self.adapter == "sep2_der":
            if self.sep2 is None:
                raise ValueError("adapter 'sep2_der' needs a [devices.sep2] endpoint (lfdi)")
        elif self.adapter in MQTT_ADAPTERS:
            wanted = MQTT_ADAPTERS[self.adapter]
            if self.der_class is not wanted:
                raise ValueError(f"adapter {self.adapter!r} only drives der_class {wanted.value!r}")
        else:
            known = ", ".join(
                repr(a)
                for a in ("sunspec_battery", "sunspec_pv", "sep2_der", "edge_site", *MQTT_ADAPTERS)
            )
            raise ValueError(f"unknown adapter {self.adapter!r} (known: {known})")
        return self

    def as_device(self) -> Device:
        return Device.model_validate(
            self.model_dump(exclude={"sunspec", "sep2", "mqtt", "edge_site"})
        )


class GatewayConfig(CoreConfig):
    """The whole configuration file: the core's sections plus devices, endpoints and uplinks."""

    broker: BrokerConfig = BrokerConfig()
    devices: tuple[DeviceConfig, ...] = Field(
        default=(),
        description="Configured devices; more may enrol at run time (OEM clouds, EV chargers)",
    )
    device_mqtt: DeviceMqttConfig | None = Field(
        default=None,
        description="The broker that thermostats and water heaters talk to ('mqtt_*' devices)",
    )
    ocpp_central: OcppCentralConfig | None = Field(
        default=None,
        description="An OCPP 1.6J / 2.0.1 central system for EV chargers (each becomes a device)",
    )
    sep2_server: Sep2ServerConfig | None = Field(
        default=None, description="Host an IEEE 2030.5 server for DER clients ('sep2_der' devices)"
    )
    openadr_vtn: OpenAdrVtnConfig | None = Field(
        default=None,
        description="Host an OpenADR 2.0b VTN that OEM clouds join as VENs; their reported "
        "resources become devices",
    )
    openadr_ven: OpenAdrVenConfig | None = Field(
        default=None, description="Take orders from a utility's OpenADR 2.0b VTN as a VEN"
    )
    operator: OperatorConfig = Field(
        default=OperatorConfig(),
        description="The operator endpoint: Prometheus metrics, health checks, status",
    )

    @model_validator(mode="after")
    def _unique(self) -> GatewayConfig:
        problems = []
        seen: set[str] = set()
        for device in self.devices:
            if device.device_id in seen:
                problems.append(f"device_id {device.device_id!r} appears twice")
            seen.add(device.device_id)
        endpoints: dict[tuple[str, int, int], str] = {}
        for device in self.devices:
            if device.sunspec is not None:
                key = (device.sunspec.host, device.sunspec.port, device.sunspec.unit_id)
                if key in endpoints:
                    problems.append(
                        f"devices {endpoints[key]!r} and {device.device_id!r} share the endpoint "
                        f"{key[0]}:{key[1]} unit {key[2]}"
                    )
                endpoints[key] = device.device_id
        for device in self.devices:
            if (
                device.sunspec is not None
                and device.sunspec.setpoint_revert_s <= self.timing.refresh_s
            ):
                problems.append(
                    f"device {device.device_id!r}: sunspec.setpoint_revert_s "
                    f"({device.sunspec.setpoint_revert_s}) must exceed timing.refresh_s "
                    f"({self.timing.refresh_s:g}), or the battery reverts between refreshes"
                )
        # No [[devices]] is a valid start: devices enrol through the registry API (and the
        # registry's store may hold them already), or from an OCPP central or OpenADR VTN.
        if self.ocpp_central is not None:
            for charger in self.ocpp_central.chargers:
                if charger.resolved_device_id in seen:
                    problems.append(
                        f"OCPP charger {charger.charge_point_id!r} would enrol as device "
                        f"{charger.resolved_device_id!r}, which [[devices]] already has"
                    )
        mqtt_devices = [d for d in self.devices if d.adapter in MQTT_ADAPTERS]
        if mqtt_devices and self.device_mqtt is None:
            problems.append("devices with an 'mqtt_*' adapter need a [device_mqtt] section")
        for device in mqtt_devices:
            hold = (device.mqtt or MqttDeviceSettings()).hold_s
            if hold <= self.timing.refresh_s:
                problems.append(
                    f"device {device.device_id!r}: mqtt.hold_s ({hold:g}) must exceed "
                    f"timing.refresh_s ({self.timing.refresh_s:g}), or events lapse between "
                    "refreshes"
                )
        for device in self.devices:
            site = device.edge_site
            if site is not None and site.hold_s <= 2 * self.timing.refresh_s:
                problems.append(
                    f"device {device.device_id!r}: edge_site.hold_s must exceed twice "
                    "timing.refresh_s, or the site's commands lapse between refreshes"
                )
        if self.sep2_server is None and any(d.adapter == "sep2_der" for d in self.devices):
            problems.append("devices with adapter 'sep2_der' need a [sep2_server] section")
        lfdis: dict[str, str] = {}
        for device in self.devices:
            if device.sep2 is not None:
                lfdi = device.sep2.lfdi.lower()
                if device.sep2.shares_end_device and lfdi not in lfdis:
                    problems.append(
                        f"device {device.device_id!r}: sep2.shares_end_device needs a device "
                        f"with LFDI {lfdi} before it"
                    )
                if lfdi in lfdis and not device.sep2.shares_end_device:
                    problems.append(
                        f"devices {lfdis[lfdi]!r} and {device.device_id!r} share LFDI {lfdi}"
                    )
                lfdis[lfdi] = device.device_id
                if device.sep2.control_duration_s <= 2 * self.timing.refresh_s:
                    problems.append(
                        f"device {device.device_id!r}: sep2.control_duration_s must exceed twice "
                        "timing.refresh_s, or controls lapse between refreshes"
                    )
        rules = {"baseline": self.settlement.baseline}
        rules |= {f"programs.{k}": v for k, v in self.settlement.programs.items()}
        for name, rule in rules.items():
            if rule.interval_s % self.history.interval_s:
                problems.append(
                    f"settlement.{name}.interval_s ({rule.interval_s}) must be "
                    f"a multiple of history.interval_s ({self.history.interval_s})"
                )
        settlement = self.settlement
        if (
            settlement.enabled
            and self.history.enabled
            and settlement.timezone is None
            and not settlement.group_timezones
        ):
            problems.append(
                "settlement.timezone is required when settlement is on: baselines compare local "
                'calendar days and clock hours (set e.g. timezone = "America/Los_Angeles", or '
                "group_timezones per group, or settlement.enabled = false)"
            )
        group_ids = [g.group_id for g in self.groups]
        if len(set(group_ids)) != len(group_ids):
            problems.append("group_id values are not unique")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def relative_to(self, base: Path) -> Self:
        """Relative file paths (store, keys, certificates) resolved against the config file's
        folder, not against wherever the process happened to be started."""
        update: dict[str, object] = {
            "store": self.store.model_copy(update=rebase(base, self.store, "path")),
            "history": self.history.model_copy(update=rebase(base, self.history, "path")),
            "broker": self.broker.rebased(base),
            "audit": self.audit.model_copy(update=rebase(base, self.audit, "path")),
            "operator": self.operator.rebased(base),
        }
        if self.device_mqtt is not None:
            update["device_mqtt"] = self.device_mqtt.rebased(base)
        if self.openadr_ven is not None:
            update["openadr_ven"] = self.openadr_ven.model_copy(
                update=rebase(base, self.openadr_ven, "store_path")
            )
        vtn = self.openadr_vtn
        if vtn is not None:
            vtn_update: dict[str, object] = dict(rebase(base, vtn, "store_path"))
            if vtn.tls is not None:
                vtn_update["tls"] = vtn.tls.model_copy(
                    update=rebase(base, vtn.tls, "cert_path", "key_path", "ca_path")
                )
            update["openadr_vtn"] = vtn.model_copy(update=vtn_update)
        central = self.ocpp_central
        if central is not None:
            chargers = tuple(
                c.model_copy(update=rebase(base, c, "password_file")) for c in central.chargers
            )
            central_update: dict[str, object] = dict(
                rebase(base, central, "cert_file", "key_file", "ca_file")
            )
            update["ocpp_central"] = central.model_copy(
                update={**central_update, "chargers": chargers}
            )
        if self.sep2_server is not None and self.sep2_server.tls is not None:
            tls = self.sep2_server.tls
            tls = tls.model_copy(
                update=rebase(
                    base,
                    tls,
                    "cert_file",
                    "key_file",
                    "ca_file",
                    "notify_cert_file",
                    "notify_key_file",
                )
            )
            update["sep2_server"] = self.sep2_server.model_copy(update={"tls": tls})
        return self.model_copy(update=update)

    def broker_logins(self) -> dict[str, BrokerLogin]:
        """The MQTT links' logins, by section name."""
        logins: dict[str, BrokerLogin] = {"broker": self.broker}
        if self.device_mqtt is not None:
            logins["device_mqtt"] = self.device_mqtt
        return logins

    def file_problems(self) -> list[str]:
        """Secret and certificate files the configuration names that cannot be read."""
        logins = self.broker_logins().items()
        problems = [problem for name, login in logins for problem in login.file_problems(name)]
        if self.operator.enabled:
            problems += self.operator.file_problems()
        return problems

    def security_warnings(self) -> list[str]:
        """What is allowed but weak (plain-text passwords, no TLS off this host, keys others
        can read), one sentence each."""
        out = self.broker.warnings("broker", self.broker.host)
        if self.device_mqtt is not None:
            out += self.device_mqtt.warnings("device_mqtt", self.device_mqtt.host)
        return out + self.operator.warnings()


class EdgeAgentConfig(GatewayConfig):
    """The edge agent's file: a gateway's sections plus its uplinks (``[upstream_sep2]``,
    ``[uplink_mqtt]``) and ``[site_loop]``. Without ``[upstream_sep2]`` the site takes its
    commands over its Grid DERMS link (``[broker]``, e.g. the head end's broker) and
    ``[site_loop] group`` names the site."""

    upstream_sep2: UpstreamSep2Config | None = Field(
        default=None, description="The utility's (or head end's) 2030.5 server"
    )
    site_loop: SiteLoopSettings | None = Field(
        default=None, description="The metered site loop (meter at the connection point)"
    )
    uplink_mqtt: UplinkMqttConfig | None = Field(
        default=None, description="The head end's broker and the store-and-forward outbox"
    )

    @model_validator(mode="after")
    def _names_the_site(self) -> Self:
        if self.upstream_sep2 is None and (self.site_loop is None or self.site_loop.group is None):
            raise ValueError(
                "the edge agent needs [upstream_sep2] (with its site_group) or [site_loop] group"
            )
        return self

    def relative_to(self, base: Path) -> Self:
        config = super().relative_to(base)
        changes: dict[str, object] = {}
        upstream = config.upstream_sep2
        if upstream is not None:
            update: dict[str, object] = dict(rebase(base, upstream, "state_path"))
            if upstream.tls is not None:
                update["tls"] = upstream.tls.model_copy(
                    update=rebase(base, upstream.tls, "cert_file", "key_file", "ca_file")
                )
            changes["upstream_sep2"] = upstream.model_copy(update=update)
        uplink = config.uplink_mqtt
        if uplink is not None:
            moved: dict[str, object] = dict(rebase(base, uplink, "outbox_path"))
            if uplink.tls is not None:
                moved["tls"] = uplink.tls.model_copy(
                    update=rebase(base, uplink.tls, "cert_file", "key_file", "ca_file")
                )
            changes["uplink_mqtt"] = uplink.model_copy(update=moved)
        return config.model_copy(update=changes)


def parse_config(
    data: dict[str, object], source: str = "<dict>", model: type[GatewayConfig] = GatewayConfig
) -> GatewayConfig:
    """Validate ``data`` as ``model`` (the gateway's config, or an extension of it such as the
    edge agent's), reporting every problem with its place."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, describe_errors(exc)) from None


def load_config(
    path: Path, model: type[GatewayConfig] = GatewayConfig, *, check_files: bool = True
) -> GatewayConfig:
    """Read, validate and resolve ``path``; ``check_files``: also require the secret and
    certificate files it names to be readable (off only for tools that create them)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None
    config = parse_config(data, str(path), model).relative_to(path.parent)
    # Checked here, once paths are resolved, so a missing certificate stops `run` and shows
    # in `check-config` rather than as a link that keeps failing to connect.
    problems = config.file_problems() if check_files else []
    if problems:
        raise ConfigError(str(path), problems)
    return config
