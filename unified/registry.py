"""Messages of the enrolment and topology API (``{root}/requests/registry``).

Grid DERMS, ADMS or an OEM onboarding service enrol, update and retire devices and patch the
topology through one request topic; every request is answered with a :class:`RegistryAck` and
every change is announced as a :class:`RegistryChange`. Requests are atomic (a bulk request is
applied whole or not at all), idempotent by ``request_id`` and optionally guarded by
``expected_version`` (the registry version the sender based it on).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, model_validator

from unified.model import (
    SCHEMA_VERSION,
    BatteryConstraints,
    BatteryRatings,
    DerClass,
    Device,
    Frozen,
    Identifier,
    Reason,
    TopologyLocation,
    UtcDatetime,
)

MAX_BULK = 10_000
"""Devices (or moves) in one request: a day's enrolments from one OEM fit in one message."""

MAX_PROBES = 256
"""Units one discover request may probe."""

Eligibility = Literal["eligible", "pending", "ineligible"]


class ProgramEnrolment(Frozen):
    """One device in one program: since when, and whether it may be called."""

    program_id: Identifier
    enrolled_at: UtcDatetime
    eligibility: Eligibility = "eligible"
    decided_by: Literal["rule", "customer_system"] = "rule"
    reason: str | None = Field(default=None, max_length=500, description="Why, when not eligible")


class DeviceEnrolment(Device):
    """A device as enrolled through the API: the unified :class:`Device` plus how to reach it.

    ``reach`` holds the adapter's settings, exactly as a ``[[devices]]`` entry of the config
    file would (``{"sunspec": {"host": ..., "port": ...}}``, ``{"mqtt": {...}}``); the gateway
    checks them against the adapter named in ``adapter`` before anything is applied.
    """

    reach: dict[str, Any] = Field(
        default_factory=dict,
        description="Adapter settings as in a [[devices]] config entry: sunspec / sep2 / mqtt",
    )


class _Request(Frozen):
    schema_version: Literal["1"] = SCHEMA_VERSION
    request_id: Identifier = Field(
        description="Idempotency key: the same request sent again gets the same ack, applied once"
    )
    expected_version: int | None = Field(
        default=None,
        ge=0,
        description="Apply only if the registry is still at this version (else version_conflict)",
    )


class EnrolDevices(_Request):
    op: Literal["enrol"]
    devices: tuple[DeviceEnrolment, ...] = Field(min_length=1, max_length=MAX_BULK)


class UpdateDevices(_Request):
    """Replace enrolled devices' records whole (class, ratings, constraints, rate class,
    location, programs, reach); the device id is the key."""

    op: Literal["update"]
    devices: tuple[DeviceEnrolment, ...] = Field(min_length=1, max_length=MAX_BULK)


class RetireDevices(_Request):
    op: Literal["retire"]
    device_ids: tuple[Identifier, ...] = Field(min_length=1, max_length=MAX_BULK)


class DeviceMove(Frozen):
    device_id: Identifier
    location: TopologyLocation


class SectionMove(Frozen):
    """Field switching: every device of ``feeder_section`` now hangs off ``feeder`` (and
    ``substation``), whatever feeder it was on."""

    feeder_section: Identifier
    feeder: Identifier
    substation: Identifier


class TopologyPatch(_Request):
    """Moves from ADMS, applied in order (section moves first, then device moves)."""

    op: Literal["topology"]
    section_moves: tuple[SectionMove, ...] = Field(default=(), max_length=MAX_BULK)
    moves: tuple[DeviceMove, ...] = Field(default=(), max_length=MAX_BULK)


class Approval(Frozen):
    """What the device cannot say about itself: where it is and what it is enrolled in."""

    device_id: Identifier
    location: TopologyLocation
    programs: tuple[Identifier, ...] = ()
    rate_class: Identifier | None = None
    constraints: BatteryConstraints = BatteryConstraints()


class ApproveDevices(_Request):
    """Enrol devices that announced themselves (``registry/pending``): what they said of
    themselves plus the approval's location and programs. Same rules and ack as ``enrol``."""

    op: Literal["approve"]
    devices: tuple[Approval, ...] = Field(min_length=1, max_length=MAX_BULK)


class EligibilityDecision(Frozen):
    device_id: Identifier
    program_id: Identifier
    eligibility: Literal["eligible", "ineligible"]
    reason: str | None = Field(default=None, max_length=500)


class SetEligibility(_Request):
    """The utility's customer system decides on devices the program's rule let through
    (``pending``), or overrules an earlier decision. A device that fails the program's rule
    stays ineligible whatever is decided."""

    op: Literal["eligibility"]
    decisions: tuple[EligibilityDecision, ...] = Field(min_length=1, max_length=MAX_BULK)


class ScanTarget(Frozen):
    """Modbus TCP endpoints to probe for SunSpec batteries: one per unit id."""

    host: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:_-]+$")
    port: int = Field(default=502, ge=1, le=65535)
    unit_ids: tuple[int, ...] = Field(default=(1,), min_length=1, max_length=247)
    device_id_prefix: Identifier = Field(
        default="sunspec",
        description="A device found gets the id '{prefix}-{host}-{port}-{unit}'",
    )


class DiscoverDevices(_Request):
    """Probe endpoints for SunSpec batteries; each one found becomes a pending enrolment
    (``registry/pending``) with the ratings it reports, to be enrolled by ``approve``."""

    op: Literal["discover"]
    targets: tuple[ScanTarget, ...] = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _bounded(self) -> DiscoverDevices:
        units = sum(len(set(t.unit_ids)) for t in self.targets)
        if units > MAX_PROBES:
            raise ValueError(f"{units} units to probe; at most {MAX_PROBES} per request")
        return self


class GroupDefaults(Frozen):
    """What a group's DERs do when no event is active (a 2030.5 DefaultDERControl): limits
    (None: no limit) and how fast they may change their power."""

    group_id: Identifier
    import_limit_kw: float | None = Field(
        default=None, ge=0, le=1_000_000, description="Site import limit (opModImpLimW)"
    )
    export_limit_kw: float | None = Field(
        default=None, ge=0, le=1_000_000, description="Site export limit (opModExpLimW)"
    )
    generation_limit_kw: float | None = Field(
        default=None, ge=0, le=1_000_000, description="Device generation limit (opModGenLimW)"
    )
    load_limit_kw: float | None = Field(
        default=None, ge=0, le=1_000_000, description="Device load limit (opModLoadLimW)"
    )
    ramp_rate_pct_per_s: float | None = Field(
        default=None,
        gt=0,
        le=655.35,
        description="setGradW: % of rated power per second a DER may ramp at",
    )


class ClientRates(Frozen):
    """How often the gateway's clients (2030.5 sites) poll and post; None leaves one as it is."""

    poll_rate_s: int | None = Field(
        default=None, ge=1, le=86_400, description="EndDevice and FunctionSetAssignments lists"
    )
    der_poll_rate_s: int | None = Field(
        default=None, ge=1, le=86_400, description="DERProgram lists (controls)"
    )
    post_rate_s: int | None = Field(
        default=None, ge=1, le=86_400, description="Telemetry (MirrorUsagePoint postRate)"
    )


class SetDefaults(_Request):
    """Operations planning: a group's default control, served to its 2030.5 clients from the
    next GET (subscribers are notified), kept across restarts."""

    op: Literal["defaults"]
    defaults: GroupDefaults


class SetRates(_Request):
    """Operations planning: the poll and post rates the gateway asks of its clients."""

    op: Literal["rates"]
    rates: ClientRates


class GetRegistry(_Request):
    """Ask for the whole registry: it is published (retained) on ``registry/snapshot``."""

    op: Literal["get"]


RegistryRequest = Annotated[
    EnrolDevices
    | UpdateDevices
    | RetireDevices
    | TopologyPatch
    | ApproveDevices
    | SetEligibility
    | SetDefaults
    | SetRates
    | DiscoverDevices
    | GetRegistry,
    Field(discriminator="op"),
]
REGISTRY_REQUEST_ADAPTER: TypeAdapter[RegistryRequest] = TypeAdapter(RegistryRequest)


class RegistryAck(Frozen):
    """The answer to one registry request, on ``registry/acks/{request_id}``."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    request_id: Identifier
    state: Literal["accepted", "applied", "rejected"] = Field(
        description="accepted: a discover request is scanning (its applied ack follows)"
    )
    version: int = Field(description="The registry version after the request (or as it is)")
    timestamp: UtcDatetime
    devices: tuple[Identifier, ...] = Field(default=(), description="Devices it changed")
    reason: Reason | None = None
    detail: str | None = None


class RegistryEntry(Frozen):
    """One enrolled device as the registry holds it."""

    device: DeviceEnrolment
    programs: tuple[ProgramEnrolment, ...] = ()
    origin: Literal["config", "api", "endpoint"] = Field(
        description="config: defined (and refreshed) by the config file; api: owned by the API;"
        " endpoint: enrolled by the endpoint that reaches it (an OCPP charger at boot, an OEM"
        " cloud's resource), which describes its ratings each time it comes"
    )
    managed: bool = Field(
        default=False,
        description="An endpoint's device the API has changed: its stored location, programs,"
        " rate class and constraints win over what the endpoint says when it comes again",
    )
    enrolled_at: UtcDatetime
    updated_at: UtcDatetime


class PendingEnrolment(Frozen):
    """A device that announced itself (an MQTT birth) but is not enrolled: published on
    ``registry/pending`` and listed in the snapshot until an ``approve`` (or ``enrol``) request
    enrols it."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    device_id: Identifier
    der_class: DerClass
    adapter: Identifier
    ratings: BatteryRatings
    seen_at: UtcDatetime
    source: str = Field(max_length=256, description="What announced it, e.g. 'mqtt birth'")
    reach: dict[str, Any] = Field(
        default_factory=dict, description="How to reach it, as an enrolment's 'reach'"
    )
    description: str = Field(default="", max_length=256, description="Model, firmware")


class RegistryChange(Frozen):
    """What one applied request changed, on ``registry/changes`` (in version order)."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    version: int
    request_id: Identifier
    op: Literal[
        "enrol",
        "update",
        "retire",
        "topology",
        "approve",
        "eligibility",
        "config",
        "endpoint",
        "defaults",
        "rates",
    ]
    timestamp: UtcDatetime
    enrolled: tuple[Identifier, ...] = ()
    updated: tuple[Identifier, ...] = ()
    retired: tuple[Identifier, ...] = ()
    moved: tuple[Identifier, ...] = ()
    defaults: GroupDefaults | None = Field(default=None, description="op defaults: the new one")
    rates: ClientRates | None = Field(default=None, description="op rates: the rates now asked")


class RegistrySnapshot(Frozen):
    """The whole registry at one version, on ``registry/snapshot`` (retained)."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    version: int
    timestamp: UtcDatetime
    devices: tuple[RegistryEntry, ...]
    pending: tuple[PendingEnrolment, ...] = ()
    defaults: tuple[GroupDefaults, ...] = Field(
        default=(), description="Group default controls set through the API"
    )
    rates: ClientRates | None = Field(default=None, description="Client rates set through the API")


def registry_json_schemas() -> dict[str, dict[str, Any]]:
    return {
        "registry_request": REGISTRY_REQUEST_ADAPTER.json_schema(),
        "registry_ack": RegistryAck.model_json_schema(),
        "registry_change": RegistryChange.model_json_schema(),
        "registry_snapshot": RegistrySnapshot.model_json_schema(),
        "registry_pending": PendingEnrolment.model_json_schema(),
    }
