"""The unified DERMS model: devices, topology, commands, acks and readings.

Conventions that hold everywhere in this model:

* Power is in kW with the **load convention**: positive means the device (or group) *imports*
  (consumes, charges), negative means it *exports* (generates, discharges). "Reduce load by 2 MW"
  is therefore a dispatch of ``-2000`` kW.
* Envelope limits are non-negative magnitudes: ``import_limit_kw`` caps net import,
  ``export_limit_kw`` caps net export. ``None`` means "no limit".
* Energy is in kWh, state of charge in percent (0-100), durations in seconds.
* Every timestamp is timezone-aware UTC; naive timestamps are rejected at the boundary.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    model_validator,
)

SCHEMA_VERSION: Final = "1"

ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
Identifier = Annotated[
    str,
    Field(pattern=ID_PATTERN, description="Identifier: letters, digits, '_', '.', ':', '-'"),
]


#: Timestamps outside this range are rejected at the boundary: they are a device with a reset
#: clock or a hostile peer, and near the ends of ``datetime`` converting to UTC (or adding a
#: duration) overflows.
EARLIEST: Final = datetime(1970, 1, 1, tzinfo=UTC)
LATEST: Final = datetime(2200, 1, 1, tzinfo=UTC)


def _to_utc(value: datetime) -> datetime:
    try:
        utc = value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError("timestamp out of range (1970-01-01 to 2200-01-01 UTC)") from None
    if not EARLIEST <= utc < LATEST:
        raise ValueError("timestamp out of range (1970-01-01 to 2200-01-01 UTC)")
    return utc


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]


def utc_from_timestamp(seconds: float) -> datetime | None:
    """A POSIX timestamp as an aware UTC datetime, or None when it is outside the sane range.

    Peers send 64-bit times (2030.5 ``TimeType``); ``datetime.fromtimestamp`` raises
    ``OverflowError``, ``OSError`` or ``ValueError`` on the far ones instead of answering.
    """
    if not EARLIEST.timestamp() <= seconds < LATEST.timestamp():
        return None
    return datetime.fromtimestamp(seconds, UTC)


def in_sane_range(value: datetime) -> datetime | None:
    """``value`` in UTC when it is aware and inside the sane range, else None."""
    if value.tzinfo is None:
        return None
    try:
        return _to_utc(value)
    except ValueError:
        return None


def utcnow() -> datetime:
    return datetime.now(UTC)


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- devices & topology


class DerClass(StrEnum):
    BATTERY = "battery"
    THERMOSTAT = "thermostat"
    EVSE = "evse"
    WATER_HEATER = "water_heater"
    PV = "pv"
    CI_SITE = "ci_site"


class TopologyLevel(StrEnum):
    SUBSTATION = "substation"
    FEEDER = "feeder"
    FEEDER_SECTION = "feeder_section"
    TRANSFORMER = "transformer"


TOPOLOGY_LEVELS: tuple[TopologyLevel, ...] = tuple(TopologyLevel)


class TopologyLocation(Frozen):
    """Where a device connects to the grid, from the substation down to its transformer."""

    substation: Identifier
    feeder: Identifier | None = None
    feeder_section: Identifier | None = None
    transformer: Identifier | None = None

    @model_validator(mode="after")
    def _no_gaps(self) -> TopologyLocation:
        # A feeder section is optional (not every utility models them); the rest nest strictly.
        if self.feeder is None and (self.feeder_section or self.transformer):
            raise ValueError("feeder_section / transformer given without a feeder")
        return self

    def at(self, level: TopologyLevel) -> str | None:
        return getattr(self, level.value)  # type: ignore[no-any-return]


class BatteryRatings(Frozen):
    """Nameplate limits of a battery or a battery inverter."""

    max_charge_kw: float = Field(gt=0, le=100_000, description="Maximum charge power, kW")
    max_discharge_kw: float = Field(gt=0, le=100_000, description="Maximum discharge power, kW")
    capacity_kwh: float = Field(gt=0, le=1_000_000, description="Usable energy capacity, kWh")


class BatteryConstraints(Frozen):
    """Customer constraints the gateway must respect whatever a program asks for."""

    reserve_soc_pct: float = Field(
        default=20.0, ge=0, le=100, description="Never discharge below this state of charge, %"
    )
    max_soc_pct: float = Field(
        default=100.0, ge=0, le=100, description="Never charge above this state of charge, %"
    )

    @model_validator(mode="after")
    def _ordered(self) -> BatteryConstraints:
        if self.reserve_soc_pct >= self.max_soc_pct:
            raise ValueError("reserve_soc_pct must be below max_soc_pct")
        return self


class Device(Frozen):
    device_id: Identifier
    der_class: DerClass
    location: TopologyLocation
    adapter: Identifier = Field(description="Name of the adapter configuration that reaches it")
    ratings: BatteryRatings
    constraints: BatteryConstraints = BatteryConstraints()
    programs: tuple[Identifier, ...] = ()
    rate_class: Identifier | None = Field(
        default=None, description="The customer's tariff or rate class"
    )


class Group(Frozen):
    """A topology group: every device whose location matches at ``level``.

    Groups are resolved against the registry when needed, so re-homing a device (field switching)
    is a registry update, not a change to the group or to active commands.
    """

    group_id: Identifier
    level: TopologyLevel
    name: Identifier = Field(description="The substation / feeder / ... identifier at that level")

    def contains(self, device: Device) -> bool:
        return device.location.at(self.level) == self.name


# --------------------------------------------------------------------------- quality & readings


class Quality(StrEnum):
    GOOD = "good"
    ESTIMATED = "estimated"
    SUBSTITUTED = "substituted"
    STALE = "stale"
    SUSPECT = "suspect"
    INVALID = "invalid"


class Quantity(StrEnum):
    POWER = "power"
    SOC = "soc"
    ENERGY_AVAILABLE = "energy_available"


UNITS: dict[Quantity, str] = {
    Quantity.POWER: "kW",
    Quantity.SOC: "%",
    Quantity.ENERGY_AVAILABLE: "kWh",
}


class Reading(Frozen):
    """One value from one device, with its unit, its quality and where it came from."""

    device_id: Identifier
    quantity: Quantity
    value: float
    unit: str
    timestamp: UtcDatetime
    quality: Quality = Quality.GOOD
    source: str = Field(description="Adapter or estimator that produced the value")


class EvSession(Frozen):
    """An EV charger's nature: what the plugged-in EV still wants (it never exports).

    ``energy_needed_kwh`` is the energy the driver still wants by ``departure`` (from the
    charger's charging needs, or to a full battery when only the EV's SoC is known); None when
    nothing says what the EV wants, and then nobody can promise anything with it.
    """

    energy_needed_kwh: float | None = Field(default=None, ge=0)
    departure: UtcDatetime | None = Field(default=None, description="When the EV leaves, if known")


class DeviceState(Frozen):
    """What an adapter learned in one poll of a device.

    ``soc_pct`` and ``capacity_kwh`` are a stored-energy device's (a battery's, or the comfort or
    tank headroom of a thermal load); an EV charger reports its plugged-in EV's need in ``ev``
    instead (``soc_pct`` is then the EV's own reported SoC, telemetry only).
    """

    device_id: Identifier
    timestamp: UtcDatetime
    power_kw: float = Field(description="Measured AC power, load convention (+import)")
    soc_pct: float | None = Field(default=None, ge=0, le=100)
    capacity_kwh: float | None = Field(default=None, ge=0)
    max_charge_kw: float | None = Field(default=None, ge=0)
    max_discharge_kw: float | None = Field(default=None, ge=0)
    setpoint_kw: float | None = Field(default=None, description="Active power setpoint in force")
    ev: EvSession | None = Field(
        default=None, description="EV chargers: the plugged-in EV's need; absent: none plugged in"
    )
    source: str

    def readings(self) -> list[Reading]:
        out = [self._reading(Quantity.POWER, self.power_kw)]
        if self.soc_pct is not None:
            out.append(self._reading(Quantity.SOC, self.soc_pct))
        return out

    def _reading(self, quantity: Quantity, value: float) -> Reading:
        return Reading(
            device_id=self.device_id,
            quantity=quantity,
            value=value,
            unit=UNITS[quantity],
            timestamp=self.timestamp,
            source=self.source,
        )


# --------------------------------------------------------------------------- commands


class Target(Frozen):
    """Who a command addresses: one topology group, or an explicit list of devices."""

    group_id: Identifier | None = None
    device_ids: tuple[Identifier, ...] | None = Field(default=None, min_length=1, max_length=10_000)

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        if (self.group_id is None) == (self.device_ids is None):
            raise ValueError("give exactly one of group_id or device_ids")
        if self.device_ids is not None and len(set(self.device_ids)) != len(self.device_ids):
            raise ValueError("device_ids contains duplicates")
        return self


MAX_DURATION_S = 7 * 24 * 3600


class CommandBase(Frozen):
    schema_version: Literal["1"] = SCHEMA_VERSION
    command_id: Identifier
    issued_at: UtcDatetime | None = Field(default=None, description="When Grid DERMS issued it")
    program: Identifier = Field(default="default", description="Program the command belongs to")
    priority: int = Field(
        default=0, ge=0, le=1000, description="Higher wins between programs on one device"
    )


class DispatchMode(StrEnum):
    DELTA = "delta"
    TARGET = "target"


class Dispatch(CommandBase):
    """Change (``delta``) or set (``target``) the net power of a group or of devices.

    ``delta``: the group's net power moves by ``kw`` from its baseline (what it would draw
    without this command). ``target``: the group's net power becomes ``kw``; the planner
    estimates the baseline each control period and allocates the difference (worked examples in
    :mod:`gateway.dispatch`). For an idle battery fleet the two coincide.
    """

    type: Literal["dispatch"] = "dispatch"
    target: Target
    mode: DispatchMode = DispatchMode.DELTA
    kw: float = Field(ge=-1_000_000, le=1_000_000, description="Signed kW, load convention")
    start: UtcDatetime
    duration_s: float = Field(gt=0, le=MAX_DURATION_S)
    ramp_s: float = Field(default=0, ge=0, le=3600, description="Linear ramp from start")

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.duration_s)

    @model_validator(mode="after")
    def _ramp_fits(self) -> Dispatch:
        if self.ramp_s > self.duration_s:
            raise ValueError("ramp_s is longer than duration_s")
        return self


class EnvelopeInterval(Frozen):
    start: UtcDatetime
    end: UtcDatetime
    import_limit_kw: float | None = Field(default=None, ge=0, le=1_000_000)
    export_limit_kw: float | None = Field(default=None, ge=0, le=1_000_000)
    connect: bool | None = Field(
        default=None,
        description="false: every DER of the target disconnects from the grid for the interval "
        "(IEEE 2030.5 opModConnect, SunSpec Conn); true: reconnect; absent: no instruction",
    )
    energize: bool | None = Field(
        default=None,
        description="false: every DER of the target ceases to energize (exchanges no power) for "
        "the interval (IEEE 2030.5 opModEnergize); true: may energize; absent: no instruction",
    )

    @model_validator(mode="after")
    def _valid(self) -> EnvelopeInterval:
        if self.end <= self.start:
            raise ValueError("interval end must be after its start")
        if (
            self.import_limit_kw is None
            and self.export_limit_kw is None
            and self.connect is None
            and self.energize is None
        ):
            raise ValueError(
                "interval sets none of import_limit_kw, export_limit_kw, connect, energize"
            )
        return self


class OperatingEnvelope(CommandBase):
    """Dynamic operating envelope: net import/export limits per interval. A safety constraint."""

    type: Literal["envelope"] = "envelope"
    target: Target
    intervals: tuple[EnvelopeInterval, ...] = Field(min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _ordered(self) -> OperatingEnvelope:
        for before, after in zip(self.intervals, self.intervals[1:], strict=False):
            if after.start < before.end:
                raise ValueError("intervals overlap or are out of order")
        return self

    @property
    def start(self) -> datetime:
        return self.intervals[0].start

    @property
    def end(self) -> datetime:
        return self.intervals[-1].end

    def interval_at(self, when: datetime) -> EnvelopeInterval | None:
        for interval in self.intervals:
            if interval.start <= when < interval.end:
                return interval
        return None


class DeviceSetpoint(CommandBase):
    """Hold one device at a power setpoint for a while."""

    type: Literal["setpoint"] = "setpoint"
    device_id: Identifier
    kw: float = Field(ge=-1_000_000, le=1_000_000, description="Signed kW, load convention")
    start: UtcDatetime
    duration_s: float = Field(gt=0, le=MAX_DURATION_S)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.duration_s)


class ServiceMode(StrEnum):
    ARBITRAGE = "arbitrage"
    """Batteries buy in cheap hours and sell in dear ones (EVs get their need at least cost)."""
    EV_COST = "ev_cost"
    """EVs charge at least cost by departure; batteries are left alone."""
    PEAK_SHAVE = "peak_shave"
    """Batteries and EVs keep the group's net import under ``peak_threshold_kw``."""
    AGGREGATOR_LIMIT = "aggregator_limit"
    """Every device of the group held within ``device_import_limit_kw`` /
    ``device_export_limit_kw`` (each device's own envelope) while the service runs."""
    FEED_TRIGGER = "feed_trigger"
    """While an external feed (``feed``) is past ``threshold``, the group responds
    (``response``); it releases when the feed is back by ``hysteresis`` or goes stale."""


class GridService(CommandBase):
    """Run an autonomous grid service over a group for a window: the gateway plans the group's
    batteries and EVs over a horizon at the price schedules it holds (``prices``), under every
    envelope, re-plans as prices and states change, and each setpoint names this command. A
    dispatch of equal or higher priority takes the devices it covers."""

    type: Literal["service"] = "service"
    target: Target
    mode: ServiceMode
    start: UtcDatetime
    duration_s: float = Field(gt=0, le=MAX_DURATION_S)
    step_s: int = Field(default=900, ge=300, le=3600, description="Plan step, s")
    horizon_s: int = Field(default=86_400, ge=3600, le=2 * 86_400, description="Plan horizon, s")
    peak_threshold_kw: float | None = Field(default=None, ge=-1_000_000, le=1_000_000)
    peak_price_per_kw: float = Field(
        default=10.0, ge=0, le=10_000, description="Demand charge above the threshold, per kW"
    )
    feed: Identifier | None = Field(default=None, description="feed_trigger: the feed's name")
    threshold: float | None = Field(
        default=None, ge=-1e9, le=1e9, allow_inf_nan=False, description="feed_trigger"
    )
    trigger: Literal["above", "below"] = Field(
        default="above", description="feed_trigger: respond while the feed is above / below"
    )
    hysteresis: float = Field(
        default=0.0, ge=0, le=1e9, description="feed_trigger: how far back past the threshold "
        "the feed must go to release"
    )
    response: Literal["discharge", "pause_ev", "both"] = Field(
        default="both",
        description="feed_trigger: batteries discharge at their rating, EV chargers pause, or both",
    )

    device_import_limit_kw: float | None = Field(
        default=None, ge=0, le=1_000_000, description="aggregator_limit: per device, charging"
    )
    device_export_limit_kw: float | None = Field(
        default=None, ge=0, le=1_000_000, description="aggregator_limit: per device, discharging"
    )

    @model_validator(mode="after")
    def _threshold(self) -> GridService:
        if self.mode is ServiceMode.AGGREGATOR_LIMIT and (
            self.device_import_limit_kw is None and self.device_export_limit_kw is None
        ):
            raise ValueError(
                "aggregator_limit needs device_import_limit_kw or device_export_limit_kw"
            )
        if self.mode is ServiceMode.PEAK_SHAVE and self.peak_threshold_kw is None:
            raise ValueError("peak_shave needs peak_threshold_kw")
        if self.mode is ServiceMode.FEED_TRIGGER and (self.feed is None or self.threshold is None):
            raise ValueError("feed_trigger needs feed and threshold")
        if self.target.group_id is None:
            raise ValueError("a service targets a group (target.group_id)")
        return self

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.duration_s)


class Cancel(CommandBase):
    type: Literal["cancel"] = "cancel"
    cancels: Identifier = Field(description="command_id of the command to cancel")


Command = Annotated[
    Dispatch | OperatingEnvelope | DeviceSetpoint | GridService | Cancel,
    Field(discriminator="type"),
]
ScheduledCommand = Dispatch | OperatingEnvelope | DeviceSetpoint | GridService


COMMAND_ADAPTER: TypeAdapter[
    Dispatch | OperatingEnvelope | DeviceSetpoint | GridService | Cancel
] = TypeAdapter(Command)


# --------------------------------------------------------------------------- acks


class AckState(StrEnum):
    RECEIVED = "received"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    ACTIVE = "active"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    FAILED = "failed"


TERMINAL_STATES = frozenset(
    {
        AckState.REJECTED,
        AckState.COMPLETED,
        AckState.CANCELLED,
        AckState.SUPERSEDED,
        AckState.FAILED,
    }
)

ALLOWED_TRANSITIONS: dict[AckState, frozenset[AckState]] = {
    AckState.RECEIVED: frozenset({AckState.ACCEPTED, AckState.REJECTED}),
    AckState.ACCEPTED: frozenset(
        {
            AckState.ACTIVE,
            AckState.CANCELLED,
            AckState.SUPERSEDED,
            AckState.FAILED,
            AckState.COMPLETED,
        }
    ),
    AckState.ACTIVE: frozenset(
        {AckState.COMPLETED, AckState.CANCELLED, AckState.SUPERSEDED, AckState.FAILED}
    ),
}


class Reason(StrEnum):
    """Machine-readable reasons on rejected / failed acks and on the errors topic."""

    MALFORMED_JSON = "malformed_json"
    SCHEMA_VIOLATION = "schema_violation"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_GROUP = "unknown_group"
    UNKNOWN_DEVICE = "unknown_device"
    UNKNOWN_COMMAND = "unknown_command"
    ALREADY_ENDED = "already_ended"
    WINDOW_INVALID = "window_invalid"
    BEYOND_RATINGS = "beyond_ratings"
    DUPLICATE_ID_CONFLICT = "duplicate_id_conflict"
    NOT_CANCELLABLE = "not_cancellable"
    NO_DEVICES = "no_devices"
    DEVICE_UNAVAILABLE = "device_unavailable"
    DEVICE_REJECTED = "device_rejected"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RESPONSE_TOPIC_REFUSED = "response_topic_refused"
    RATE_LIMITED = "rate_limited"
    VERSION_CONFLICT = "version_conflict"
    ALREADY_ENROLLED = "already_enrolled"
    ADAPTER_INVALID = "adapter_invalid"
    NOT_ELIGIBLE = "not_eligible"
    INTERNAL = "internal"


class Allocation(Frozen):
    """What one device was asked to do on behalf of a command, and why it differs if it does."""

    device_id: Identifier
    requested_kw: float
    commanded_kw: float
    limited_by: tuple[str, ...] = Field(
        default=(), description="Ids or names of what held the device below its request"
    )


class Delivery(Frozen):
    """A running dispatch's response as measured, beside what was asked and what was committed.

    All three are changes from the baseline, in kW (a shed is negative). ``delivered_kw`` is
    the estimated response of the devices the dispatch holds (their measured power minus the
    baseline each had before it was held, smoothed over a few minutes), with a 90 % interval.
    """

    requested_kw: float = Field(description="Change asked for now (ramp and target applied)")
    committed_kw: float = Field(
        description="Change the devices were asked for: the request corrected by the closed loop"
    )
    delivered_kw: float = Field(description="Estimated change delivered")
    delivered_lower_kw: float
    delivered_upper_kw: float
    devices: int = Field(ge=0, description="Devices the estimate covers")
    short: bool = Field(description="Delivery short of the request beyond tolerance")
    profiled: int = Field(
        default=0,
        ge=0,
        description="Of those, devices measured against the same-hour profile of their history "
        "(the others against their flat level before they were held)",
    )


class EnvelopeCompliance(Frozen):
    """A running envelope held against the group's measured net power (load convention).

    ``measured_kw`` sums the fresh readings of the group's members (a member without one counts
    with its learnt baseline). Time outside counts control periods in which the measured net
    power passed a limit by more than ``tolerance`` (2 %)."""

    import_limit_kw: float | None = None
    export_limit_kw: float | None = None
    measured_kw: float
    devices_reporting: int = Field(ge=0)
    devices_acting: int = Field(ge=0, description="Devices the envelope holds now")
    seconds_in_force: float = Field(ge=0)
    seconds_outside: float = Field(ge=0)
    worst_excursion_kw: float = Field(ge=0, description="Largest measured excess over a limit")
    outside: bool = Field(description="Outside a limit beyond tolerance now")


class ComplianceInterval(Frozen):
    """One interval of an envelope's compliance report: the measured net power against the
    limits in force (time-weighted over the control periods that fell in it)."""

    start: UtcDatetime
    end: UtcDatetime
    import_limit_kw: float | None = None
    export_limit_kw: float | None = None
    mean_measured_kw: float
    max_measured_kw: float
    min_measured_kw: float
    seconds_measured: float = Field(ge=0)
    seconds_outside: float = Field(ge=0)
    held: bool = Field(description="The interval's mean was inside every limit (+ tolerance)")


class EnvelopeReport(Frozen):
    """What an envelope did, once it has ended: its compliance interval by interval, the worst
    excursion, and which devices acted to hold it (``performance/{command_id}``, retained)."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    type: Literal["envelope_compliance"] = "envelope_compliance"
    command_id: Identifier
    target: Target
    start: UtcDatetime
    end: UtcDatetime
    generated_at: UtcDatetime
    interval_s: int = Field(gt=0)
    tolerance: float = Field(ge=0, description="Share of the limit an excess must pass to count")
    intervals: tuple[ComplianceInterval, ...]
    intervals_total: int = Field(ge=0)
    intervals_held: int = Field(ge=0)
    seconds_in_force: float = Field(ge=0)
    seconds_outside: float = Field(ge=0)
    worst_excursion_kw: float = Field(ge=0)
    devices_acted: tuple[str, ...] = Field(
        description="Devices the envelope held at some time (sorted; the first 1,000)"
    )
    devices_acted_count: int = Field(ge=0)


class Ack(Frozen):
    schema_version: Literal["1"] = SCHEMA_VERSION
    command_id: Identifier
    state: AckState
    timestamp: UtcDatetime
    reason: Reason | None = None
    detail: str | None = None
    allocations: tuple[Allocation, ...] = ()
    shortfall_kw: float | None = Field(
        default=None, description="Part of the request that could not be allocated"
    )
    delivery: Delivery | None = Field(
        default=None, description="A running dispatch's measured response (absent: none yet)"
    )
    compliance: EnvelopeCompliance | None = Field(
        default=None, description="A running envelope against the measured net power"
    )


class ErrorMessage(Frozen):
    """Published on ``errors`` for input that cannot be attributed to a command id."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    timestamp: UtcDatetime
    reason: Reason
    detail: str
    topic: str
    payload_excerpt: str = Field(max_length=512)
    command_id: str | None = None


# --------------------------------------------------------------------------- device commands


class LimitSource(Frozen):
    """Why a device is held where it is: the command (or rule) that produced a limit."""

    command_id: str
    kind: Literal[
        "dispatch",
        "setpoint",
        "envelope",
        "rating",
        "reserve_soc",
        "max_soc",
        "ev_energy_need",
        "release",
        "idle",
    ]


class DeviceCommand(Frozen):
    """The single instruction a device adapter applies, with its provenance.

    Either a setpoint (``power_kw``), or autonomous operation (``power_kw`` None) within
    optional limits: an operating envelope over a group becomes a standing per-device share of
    it for the devices that run on their own, so the limit holds without the gateway chasing
    their measured power (which would flap on and off as the device obeys).
    """

    device_id: Identifier
    power_kw: float | None = Field(
        description="Setpoint (load convention); None returns the device to autonomous operation"
    )
    import_limit_kw: float | None = Field(
        default=None, ge=0, description="While autonomous: never import (consume) more than this"
    )
    export_limit_kw: float | None = Field(
        default=None, ge=0, description="While autonomous: never export (generate) more than this"
    )
    provenance: tuple[LimitSource, ...] = ()
    connect: bool | None = Field(
        default=None, description="false: disconnect from the grid; true: reconnect (envelopes)"
    )
    energize: bool | None = Field(
        default=None, description="false: cease to energize; true: may energize (envelopes)"
    )


# --------------------------------------------------------------------------- telemetry


class DeviceTelemetry(Frozen):
    schema_version: Literal["1"] = SCHEMA_VERSION
    device_id: Identifier
    timestamp: UtcDatetime
    available: bool
    power_kw: float | None = None
    soc_pct: float | None = None
    setpoint_kw: float | None = Field(
        default=None, description="What the gateway currently asks of it"
    )
    quality: Quality
    provenance: tuple[LimitSource, ...] = ()


class GroupTelemetry(Frozen):
    schema_version: Literal["1"] = SCHEMA_VERSION
    group_id: Identifier
    timestamp: UtcDatetime
    power_kw: float = Field(
        description="Best estimate of the group's total (load convention): fresh readings plus "
        "estimates for devices that are missing or whose readings were excluded"
    )
    power_lower_kw: float | None = Field(default=None, description="Prediction interval, low")
    power_upper_kw: float | None = Field(default=None, description="Prediction interval, high")
    confidence: float | None = Field(default=None, description="Of that interval, e.g. 0.9")
    measured_kw: float = Field(description="Sum of the fresh, accepted readings only")
    setpoint_kw: float = Field(description="Sum of what the gateway currently asks of them")
    devices_total: int
    devices_reporting: int
    devices_missing: int
    devices_excluded: int = Field(default=0, description="Reported, but the value was rejected")
    devices_estimated: int = Field(default=0, description="Filled in by the estimator")
    method: str = Field(default="sum", description="How power_kw was obtained")
    quality: Quality
    energy_available_kwh: float = Field(description="Energy above reserve in reporting batteries")
    active_commands: tuple[str, ...] = ()
    envelope: EnvelopeInterval | None = None


class GatewayStatus(Frozen):
    schema_version: Literal["1"] = SCHEMA_VERSION
    gateway_id: str
    state: Literal["online", "offline"]
    timestamp: UtcDatetime
    version: str = ""
    devices: int = 0
    groups: tuple[str, ...] = ()


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schemas of every message on the northbound interface, by name."""
    models: dict[str, type[BaseModel]] = {
        "ack": Ack,
        "error": ErrorMessage,
        "device_telemetry": DeviceTelemetry,
        "group_telemetry": GroupTelemetry,
        "status": GatewayStatus,
        "envelope_report": EnvelopeReport,
        "device": Device,
        "group": Group,
        "reading": Reading,
    }
    schemas = {"command": COMMAND_ADAPTER.json_schema()}
    schemas.update({name: model.model_json_schema() for name, model in models.items()})
    return schemas
