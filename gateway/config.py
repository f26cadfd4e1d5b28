"""Configuration sections of the domain core: control timing, stores, history, settlement, flex."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, model_validator

from gateway.delivery import DeliveryTuning
from gateway.flex.baseline import BaselineConfig
from unified.config import Section
from unified.model import DerClass, Group, Identifier, TopologyLocation

__all__ = [
    "AuditConfig",
    "AutoApproval",
    "CoreConfig",
    "DeliveryConfig",
    "FlexConfigSection",
    "HistoryConfig",
    "ProgramRule",
    "SettlementConfig",
    "StoreConfig",
    "TimingConfig",
]


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
    retention_days: float = Field(
        default=90.0,
        ge=1,
        le=3650,
        description="Commands that ended longer ago than this are deleted (open ones never)",
    )
    prune_s: float = Field(default=3600.0, gt=0, le=86_400, description="Prune this often")
    io_timeout_s: float = Field(default=30.0, gt=0, le=600, description="Timeout of one prune")


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


class AuditConfig(Section):
    """``[audit]``: the append-only audit log (``gateway.audit``, ``docs/security.md``):
    every command received, lifecycle step, device write and refusal, one JSON line each, in
    its own rotated files with a hash chain that ``derms-gateway audit verify`` checks."""

    enabled: bool = True
    path: Path | None = Field(
        default=None,
        description="Folder of audit.jsonl and its rotated files; default: <store stem>-audit "
        "next to the command store",
    )
    max_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=4096,
        description="audit.jsonl is rotated (renamed audit.jsonl.1, ...) before it grows beyond",
    )
    keep: int = Field(
        default=20, ge=1, le=10_000, description="Rotated files kept; the oldest beyond is deleted"
    )
    fsync: bool = Field(
        default=True,
        description="fsync every write batch (off: the OS decides when records reach the disk)",
    )
    max_queue: int = Field(
        default=100_000,
        ge=100,
        le=10_000_000,
        description="Records waiting for the writer; beyond, records are dropped and counted "
        "(an audit.gap record says how many)",
    )
    retry_s: float = Field(
        default=2.0, gt=0, le=600, description="After a write error, try again this often"
    )

    def resolved_path(self, store: Path) -> Path:
        if self.path is not None:
            return self.path
        return store.with_name(f"{store.stem}-audit")


def _check_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name: 'America/New_York')") from None
    return name


class SettlementConfig(Section):
    """``[settlement]``: a performance report after every dispatch that ran (needs history).

    Baselines compare clock hours of local calendar days, so the zone is not optional: with
    settlement on, ``timezone`` or ``group_timezones`` must be given (a configuration error
    otherwise: there is no silent UTC, which would settle a Friday 16:00 Pacific event as a
    Saturday)."""

    enabled: bool = True
    baseline: BaselineConfig = BaselineConfig()
    programs: dict[str, BaselineConfig] = Field(
        default_factory=dict,
        description="Baseline rule per dispatch program ([settlement.programs.<program>]), "
        "for programs settled on another rule than [settlement.baseline]; each table changes "
        "only the keys it gives ([settlement.baseline] supplies the rest)",
    )
    timezone: str | None = Field(
        default=None,
        description="IANA zone whose calendar days and clock hours baselines compare "
        "(e.g. 'America/Los_Angeles'); required with settlement on unless group_timezones "
        "covers every dispatched group",
    )
    group_timezones: dict[Identifier, str] = Field(
        default_factory=dict,
        description="Zone per group id ('substation:north', 'feeder:f7', a named group) for "
        "groups in another zone than 'timezone': a dispatch takes its target group's zone, "
        "else the zone its devices' groups agree on, else 'timezone'",
    )
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
    report_retention_days: float = Field(
        default=90.0,
        ge=1,
        le=3660,
        description="Performance reports generated longer ago are deleted from the history "
        "file (Grid DERMS must have fetched its copy by then: published retained when made, "
        "served on requests/performance until then)",
    )

    @model_validator(mode="before")
    @classmethod
    def _programs_inherit(cls, data: Any) -> Any:
        # A program's table overrides [settlement.baseline] key by key (a PJM program need not
        # repeat the interval and coverage settings).
        if isinstance(data, dict) and isinstance(data.get("programs"), dict):
            base = data.get("baseline", {})
            base = base.model_dump() if isinstance(base, BaselineConfig) else dict(base or {})
            data = dict(data)
            data["programs"] = {
                name: {**base, **table} if isinstance(table, dict) else table
                for name, table in data["programs"].items()
            }
        return data

    def baseline_for(self, program: str) -> BaselineConfig:
        """The baseline rule of ``program``: its own table, else ``[settlement.baseline]``."""
        return self.programs.get(program, self.baseline)

    @model_validator(mode="after")
    def _known_zones(self) -> SettlementConfig:
        if self.timezone is not None:
            _check_zone(self.timezone)
        for group_id, zone in self.group_timezones.items():
            try:
                _check_zone(zone)
            except ValueError as exc:
                raise ValueError(f"group_timezones[{group_id!r}]: {exc}") from None
        return self

    def zone_for(self, group_ids: Sequence[str]) -> ZoneInfo | None:
        """The zone of a dispatch: the first of ``group_ids`` (its target group, then the
        groups its devices are in) with a zone of its own, else ``timezone``; None: neither."""
        for group_id in group_ids:
            if group_id in self.group_timezones:
                return ZoneInfo(self.group_timezones[group_id])
        return None if self.timezone is None else ZoneInfo(self.timezone)


class DeliveryConfig(Section):
    """The closed loop on each running dispatch (``gateway.delivery``)."""

    closed_loop: bool = Field(
        default=True,
        description="Correct each dispatch by its measured response (off: open-loop allocation)",
    )
    smoothing_s: float = Field(
        default=60.0, gt=0, le=3600, description="Averaging time of the delivered response"
    )
    integral_s: float = Field(
        default=90.0, gt=0, le=86_400, description="Integral time of the correction"
    )
    tolerance: float = Field(
        default=0.1, gt=0, le=1, description="Delivery short beyond this fraction of the request"
    )
    tolerance_kw: float = Field(default=1.0, ge=0, description="... and beyond this many kW")
    settle_s: float = Field(
        default=300.0, ge=0, le=86_400, description="Time given to respond before short is said"
    )

    thermal_turn_s: float = Field(
        default=1800.0,
        gt=0,
        le=86_400,
        description="How long a thermal load called by a dispatch stays called before others",
    )

    release_s: float = Field(
        default=10_800.0,
        ge=0,
        le=86_400,
        description="Thermal loads of an ended dispatch are released one by one as the rebound "
        "leaves room (rebound_limit), and at the latest on a schedule spread over this long",
    )
    rebound_limit: float = Field(
        default=0.3,
        gt=0,
        le=10,
        description="After a dispatch, its thermal loads are released only while the measured "
        "rise above their pre-event baseline stays under this fraction of the request",
    )

    compliance_interval_s: int = Field(
        default=300,
        ge=10,
        le=3600,
        description="Interval of an envelope's compliance report (held or not, by its mean)",
    )

    def tuning(self) -> DeliveryTuning:
        return DeliveryTuning(
            smoothing_s=self.smoothing_s,
            integral_s=self.integral_s,
            tolerance=self.tolerance,
            tolerance_kw=self.tolerance_kw,
            settle_s=self.settle_s,
            rebound_limit=self.rebound_limit,
        )


class DispatchConfig(Section):
    """How the planner shares a dispatch (``gateway.dispatch``, ``gateway.allocation``)."""

    allocator: Literal["lp", "proportional"] = Field(
        default="lp",
        description="lp: a linear programme (HiGHS) over batteries, EV chargers, PV and sites: "
        "class cost, fairness and envelopes as hard limits; proportional: by headroom",
    )


class ProgramRule(Section):
    """Who may be enrolled in one program. A device listing a program with a rule is eligible
    only if it passes every condition given; a program without a rule takes every device and
    its commands may use any device of their target."""

    program_id: Identifier
    der_classes: tuple[DerClass, ...] = Field(default=(), description="Empty: any class")
    rate_classes: tuple[Identifier, ...] = Field(default=(), description="Empty: any rate class")
    groups: tuple[Identifier, ...] = Field(
        default=(),
        description="The device must be in one of these groups (e.g. 'feeder:north-f1'); "
        "empty: anywhere",
    )
    customer_check: bool = Field(
        default=False,
        description="Devices passing the rule stay 'pending' until the utility's customer "
        "system decides (an 'eligibility' request on requests/registry)",
    )


class AutoApproval(Section):
    """Enrol devices that announce themselves without waiting for an ``approve`` request: those
    matching ``adapter`` and ``device_id_prefix`` get this location and these programs."""

    adapter: Identifier | None = Field(default=None, description="None: any adapter")
    device_id_prefix: str = Field(default="", max_length=128)
    location: TopologyLocation
    programs: tuple[Identifier, ...] = ()
    rate_class: Identifier | None = None

    def matches(self, device_id: str, adapter: str) -> bool:
        return device_id.startswith(self.device_id_prefix) and self.adapter in (None, adapter)


class CoreConfig(Section):
    """The sections the domain core reads; the composition root's config extends it with the
    devices, endpoints and uplinks (one flat TOML file for the operator)."""

    gateway_id: Identifier = "gateway-1"
    store: StoreConfig = StoreConfig()
    history: HistoryConfig = HistoryConfig()
    audit: AuditConfig = AuditConfig()
    settlement: SettlementConfig = SettlementConfig()
    timing: TimingConfig = TimingConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    dispatch: DispatchConfig = DispatchConfig()
    flex: FlexConfigSection = FlexConfigSection()
    groups: tuple[Group, ...] = Field(
        default=(),
        description="Extra named groups; every substation/feeder/... also gets an implicit group",
    )
    auto_approve: tuple[AutoApproval, ...] = Field(
        default=(),
        description="Rules enrolling devices that announce themselves (first match wins)",
    )
    programs: tuple[ProgramRule, ...] = Field(
        default=(),
        description="Eligibility rules per program; a dispatch of a program with a rule uses "
        "only devices eligible in it",
    )
