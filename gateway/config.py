"""Gateway configuration: one TOML file, validated in full before anything starts.

Errors name the exact place in the file (``devices[3].ratings.max_charge_kw``) and what is wrong,
because the person reading them is an integrator with a config file open, not a Python developer.
"""

from __future__ import annotations

import tomllib
from datetime import date
from pathlib import Path
from typing import Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adapters.mqtt_device import DeviceMqttConfig, MqttDeviceSettings
from adapters.sep2_der import Sep2DerEndpoint
from adapters.sunspec_battery import SunSpecEndpoint
from gateway.flex.baseline import BaselineConfig
from gateway.model import DerClass, Device, Group, Identifier
from gateway.ocpp_central import OcppCentralConfig
from gateway.openadr_ven import OpenAdrVenConfig
from gateway.openadr_vtn import OpenAdrVtnConfig
from gateway.sep2_server import Sep2ServerConfig


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists every issue found, one per line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"invalid configuration {source}:\n  " + "\n  ".join(problems))
        self.source = source
        self.problems = problems


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = Field(
        default="5", description="MQTT version; 3.1.1 only for brokers without MQTT 5"
    )
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    connect_timeout_s: float = Field(default=10.0, gt=0, le=120)


class TimingConfig(Section):
    control_period_s: float = Field(default=1.0, gt=0, le=60, description="Control loop period")
    poll_interval_s: float = Field(default=2.0, gt=0, le=3600, description="Device poll period")
    telemetry_period_s: float = Field(default=5.0, gt=0, le=3600)
    stale_after_s: float = Field(
        default=15.0, gt=0, description="A device with no reading this long counts as missing"
    )
    refresh_s: float = Field(
        default=60.0,
        gt=0,
        description="Re-send an unchanged setpoint this often (keeps reverts armed)",
    )
    io_timeout_s: float = Field(default=3.0, gt=0, le=60, description="Timeout for one device call")
    backoff_max_s: float = Field(default=30.0, gt=0, le=3600)
    deadband_kw: float = Field(
        default=0.05, ge=0, description="Setpoint changes smaller than this are not written"
    )

    @model_validator(mode="after")
    def _consistent(self) -> TimingConfig:
        if self.stale_after_s <= self.poll_interval_s:
            raise ValueError("stale_after_s must be longer than poll_interval_s")
        return self


class FlexConfigSection(Section):
    """``[flex]``: the flexibility forecast published per group (and served on request)."""

    period_s: float = Field(default=300.0, gt=0, le=86_400, description="Publish every ...")
    horizon_s: int = Field(default=24 * 3600, ge=300, le=7 * 24 * 3600)
    interval_s: int = Field(default=3600, ge=300, le=24 * 3600)
    outdoor_temp_c: float | None = Field(
        default=None,
        ge=-60,
        le=60,
        description="Used where no weather forecast (the weather topic) covers an interval",
    )
    groups: tuple[Identifier, ...] = Field(
        default=(), description="Groups to publish; empty = every substation and feeder"
    )


class StoreConfig(Section):
    path: Path = Path("derms-gateway.sqlite")


class HistoryConfig(Section):
    """``[history]``: durable per-device interval aggregates of the readings (``gateway.history``),
    used for settlement baselines and history-based forecasts. A separate SQLite file from the
    command store, so its volume never slows down command handling."""

    enabled: bool = True
    path: Path | None = Field(
        default=None, description="SQLite file; default: <store>.history.sqlite next to the store"
    )
    interval_s: int = Field(
        default=300, ge=1, le=3600, description="Bucket width, s; must divide 3600"
    )
    retention_days: float = Field(default=60.0, gt=0, le=3660)
    flush_s: float = Field(default=10.0, gt=0, le=3600, description="Write buffered buckets")
    prune_s: float = Field(default=3600.0, gt=0, description="Drop expired rows this often")
    max_pending: int = Field(
        default=200_000, ge=10, description="Buffered buckets; beyond, the oldest are dropped"
    )
    io_timeout_s: float = Field(default=30.0, gt=0, le=600, description="Timeout of one query")

    @model_validator(mode="after")
    def _divides_hour(self) -> HistoryConfig:
        if 3600 % self.interval_s:
            raise ValueError("interval_s must divide 3600 (so days and hours fall on the grid)")
        return self

    def resolved_path(self, store: Path) -> Path:
        if self.path is not None:
            return self.path
        return store.with_name(f"{store.stem}.history{store.suffix or '.sqlite'}")


class SettlementConfig(Section):
    """``[settlement]``: a performance report after every dispatch that ran (needs history)."""

    enabled: bool = True
    baseline: BaselineConfig = BaselineConfig()
    timezone: str = Field(default="UTC", description="IANA zone whose calendar days count")
    holidays: tuple[date, ...] = Field(default=(), description="Days settled like weekends")
    delay_s: float = Field(
        default=60.0,
        ge=0,
        le=86_400,
        description="Wait this long after the last settlement interval ends (late readings)",
    )
    fallback_window_s: int = Field(
        default=3600,
        ge=1,
        le=86_400,
        description="Without enough similar days: mean of this long before the event (flagged)",
    )

    @model_validator(mode="after")
    def _known_zone(self) -> SettlementConfig:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {self.timezone!r}") from None
        return self


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

    @model_validator(mode="after")
    def _reachable(self) -> DeviceConfig:
        if self.adapter == "sunspec_battery":
            if self.sunspec is None:
                raise ValueError("adapter 'sunspec_battery' needs a [devices.sunspec] endpoint")
            if self.der_class is not DerClass.BATTERY:
                raise ValueError("adapter 'sunspec_battery' only drives der_class 'battery'")
        elif self.adapter == "sep2_der":
            if self.sep2 is None:
                raise ValueError("adapter 'sep2_der' needs a [devices.sep2] endpoint (lfdi)")
        elif self.adapter in MQTT_ADAPTERS:
            wanted = MQTT_ADAPTERS[self.adapter]
            if self.der_class is not wanted:
                raise ValueError(f"adapter {self.adapter!r} only drives der_class {wanted.value!r}")
        else:
            known = ", ".join(repr(a) for a in ("sunspec_battery", "sep2_der", *MQTT_ADAPTERS))
            raise ValueError(f"unknown adapter {self.adapter!r} (known: {known})")
        return self

    def as_device(self) -> Device:
        return Device.model_validate(self.model_dump(exclude={"sunspec", "sep2", "mqtt"}))


class GatewayConfig(Section):
    gateway_id: Identifier = "gateway-1"
    broker: BrokerConfig = BrokerConfig()
    store: StoreConfig = StoreConfig()
    history: HistoryConfig = HistoryConfig()
    settlement: SettlementConfig = SettlementConfig()
    timing: TimingConfig = TimingConfig()
    flex: FlexConfigSection = FlexConfigSection()
    groups: tuple[Group, ...] = Field(
        default=(),
        description="Extra named groups; every substation/feeder/... also gets an implicit group",
    )
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
        if not self.devices and self.ocpp_central is None and self.openadr_vtn is None:
            problems.append(
                "no devices: configure [[devices]], or an [ocpp_central] or [openadr_vtn] that "
                "enrols them at run time"
            )
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
        if self.sep2_server is None and any(d.adapter == "sep2_der" for d in self.devices):
            problems.append("devices with adapter 'sep2_der' need a [sep2_server] section")
        lfdis: dict[str, str] = {}
        for device in self.devices:
            if device.sep2 is not None:
                lfdi = device.sep2.lfdi.lower()
                if lfdi in lfdis:
                    problems.append(
                        f"devices {lfdis[lfdi]!r} and {device.device_id!r} share LFDI {lfdi}"
                    )
                lfdis[lfdi] = device.device_id
                if device.sep2.control_duration_s <= 2 * self.timing.refresh_s:
                    problems.append(
                        f"device {device.device_id!r}: sep2.control_duration_s must exceed twice "
                        "timing.refresh_s, or controls lapse between refreshes"
                    )
        if self.settlement.baseline.interval_s % self.history.interval_s:
            problems.append(
                f"settlement.baseline.interval_s ({self.settlement.baseline.interval_s}) must be "
                f"a multiple of history.interval_s ({self.history.interval_s})"
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
        }
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
        if self.sep2_server is not None and self.sep2_server.tls is not None:
            tls = self.sep2_server.tls
            tls = tls.model_copy(update=rebase(base, tls, "cert_file", "key_file", "ca_file"))
            update["sep2_server"] = self.sep2_server.model_copy(update={"tls": tls})
        return self.model_copy(update=update)


def rebase(base: Path, section: BaseModel, *fields: str) -> dict[str, Path]:
    """The relative file paths among ``fields`` of ``section``, made relative to ``base``."""
    out: dict[str, Path] = {}
    for name in fields:
        value = getattr(section, name)
        if isinstance(value, Path) and not value.is_absolute():
            out[name] = base / value
    return out


def _describe(exc: ValidationError) -> list[str]:
    problems = []
    errors = exc.errors(include_url=False)
    if len(errors) > 1:
        # pydantic adds "too short" for a list whose only items were invalid: noise, not news.
        errors = [e for e in errors if e["type"] != "too_short"] or errors
    for err in errors:
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        problems.append(f"{loc or '(top level)'}: {err['msg']}")
    return problems


def parse_config(
    data: dict[str, object], source: str = "<dict>", model: type[GatewayConfig] = GatewayConfig
) -> GatewayConfig:
    """Validate ``data`` as ``model`` (the gateway's config, or an extension of it such as the
    edge agent's), reporting every problem with its place."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _describe(exc)) from None


def load_config(path: Path, model: type[GatewayConfig] = GatewayConfig) -> GatewayConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None
    config = parse_config(data, str(path), model)
    return config.relative_to(path.parent)
