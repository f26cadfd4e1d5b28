"""The gateway's IEEE 2030.5 (CSIP / CSIP-AUS) server: DER clients poll it for their controls.

One aiohttp application holds the resource tree for every enrolled DER. Each DER is also a device in
the gateway registry, reached through an ``adapters.sep2_der.der.Sep2Der`` adapter that turns its
setpoint into a DERControl here (``publish`` / ``release``) and reads back what the client posted
(``snapshot``). The server is the adapter's transport: it knows 2030.5 resources, not the planner.

Resource tree (hrefs are server-relative; ``{e}`` is the client's EndDevice id)::

    /dcap  /tm  /edev  /edev/{e}  /edev/{e}/rg
    /edev/{e}/fsa[/{f}[/derp]]          one FunctionSetAssignments per program of the device
                                        (its own, its feeder's, its substation's ...), by
                                        primacy; ids kept per EndDevice (and across restarts)
    /edev/{e}/derp/{p}[/derc[/{c}] | /actderc | /dderc]
                                        one DERProgram per topology group of the device
    /edev/{e}/der[/{d}[/derp|/dercap|/derg|/ders|/dera]]
                                        one DER per device; devices enrolled with the same
                                        LFDI (``shares_end_device``) are DERs 2, 3, ... of one
                                        EndDevice, each with its own program for its controls
    /edev/{e}/rsps[/1[/rsp[/{r}]]]      replyTo of every control
    /edev/{e}/sub[/{s}]                 the client's Subscriptions (see below)
    /mup[/{m}]                          MirrorUsagePoints (telemetry)
    /edev/{e}/tp[/...]  /rt/{r}         Pricing: the client's price schedule as TariffProfiles
                                        (``adapters.sep2_der.pricing``; ``set_price``)
    /edev/{e}/drp[/1[/edc[/{c}] | /actedc]]
                                        DRLC for a thermal load (enrolled with a device_category):
                                        EndDeviceControls capping its duty cycle
                                        (``adapters.sep2_der.drlc``; ``publish_load_control``)

Who is asking: the LFDI of the TLS client certificate (or, for plain-HTTP development only, a
configured header). A client sees only its own EndDevice (an aggregator's certificate, configured
in ``aggregators``, the EndDevices it acts for: its ``/edev`` lists them); another client's
EndDevice tree answers 403 as envoy does (unknown EndDevice ids too, so ids cannot be
probed), another client's MirrorUsagePoint 404 (see ``_own_mirror``). Every error is a 2030.5
``<Error>`` body, every body is ``application/sep+xml`` with no charset parameter, and a request
that fails changes nothing: bodies are read with a size limit and a timeout and decoded
completely before any state changes.

Subscriptions: a client may subscribe to its own EndDeviceList, FunctionSetAssignmentsList,
TariffProfileList (a new price schedule for it), DERProgramLists, DERPrograms, DERControlLists
(``derc``, ``actderc``) and DefaultDERControls;
when a subscribed resource changes (publish, release, supersede, lapse; a new default or rate;
a subscription more or less) the server POSTs a ``Notification`` to the subscription's
notificationURI, whose host must be in ``notification_hosts`` (no other targets, no redirects:
the server must not become a proxy into its own network). Deliveries are queued
per subscription (bounded, oldest dropped), retried with jittered backoff, dropped after
``notification_attempts`` failures, and sent by one task the server owns, never on the request
path.

GET answers come from a bounded cache of encoded bodies (most polls find nothing changed, and
encoding was a third of the server's CPU): an entry names the path, the asking client and the
paging, and holds the client's generation (bumped by every change to what its documents show)
and, for documents that read differently as time passes (an event turning active or lapsing),
the next such boundary. ``/tm`` is never cached. Cached bodies carry an ``ETag``, so a client that
sends ``If-None-Match`` gets ``304 Not Modified``.

With ``state_file`` set, what the server serves survives a restart (``adapters.sep2_der.state``):
EndDevice and DERProgram ids, every control with its mRID and status, defaults changed at run
time. The supervisors re-apply the desired setpoint on connect, which finds the same control in
force and keeps it. Mirrored telemetry and DER resources are in memory: clients re-post them at
their postRate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import random
import re
import sqlite3
import ssl
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adapters.sep2_der import drlc
from adapters.sep2_der.pricing import COMPONENTS, TariffBook, TariffView, reading_type
from adapters.sep2_der.state import Sep2ServerState, StateSnapshot, StoredDevice, StoredProgram
from gateway.ports import RefusalHook
from gateway.quota import Quotas
from protocols.sep2 import (
    DER,
    MEDIA_TYPE,
    ActivePower,
    ConnectionPoint,
    CsipAusVersion,
    DateTimeInterval,
    DefaultDERControl,
    DemandResponseProgram,
    DemandResponseProgramList,
    DERAvailability,
    DERCapability,
    DERControl,
    DERControlBase,
    DERControlList,
    DERControlResponse,
    DERList,
    DERProgram,
    DERProgramList,
    DERSettings,
    DERStatus,
    DeviceCapability,
    DocumentTooLarge,
    EndDevice,
    EndDeviceList,
    Error,
    EventStatus,
    FunctionSetAssignments,
    FunctionSetAssignmentsList,
    Link,
    ListLink,
    MirrorMeterReading,
    MirrorMeterReadingList,
    MirrorUsagePoint,
    MirrorUsagePointList,
    Notification,
    Reading,
    ReadingType,
    Registration,
    Response,
    ResponseList,
    ResponseSet,
    ResponseSetList,
    Sep2Error,
    Sep2Model,
    Subscription,
    SubscriptionList,
    Time,
    check_media_type,
    decode_as,
    encode,
    from_watts,
    lfdi_from_fingerprint,
    normalize_lfdi,
    same_lfdi,
    sfdi_from_lfdi,
    with_check_digit,
)
from unified.config import Section
from unified.model import Identifier, LimitSource, utc_from_timestamp
from unified.prices import PriceSchedule

__all__ = [
    "DerSnapshot",
    "PowerSample",
    "PublishedControl",
    "ResponseCacheInfo",
    "Sep2AggregatorConfig",
    "Sep2DefaultEnvelope",
    "Sep2Enrollment",
    "Sep2ProgramConfig",
    "Sep2ResponseRecord",
    "Sep2Server",
    "Sep2ServerConfig",
    "Sep2TlsConfig",
]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Sep2Model)

# EventStatus.currentStatus values (2030.5 Table: EventStatus).
STATUS_SCHEDULED: Final = 0
STATUS_ACTIVE: Final = 1
STATUS_CANCELLED: Final = 2
STATUS_SUPERSEDED: Final = 4

# MirrorUsagePoint roleFlags bits.
_ROLE_PREMISES: Final = 0x02
_ROLE_DER: Final = 0x08
# ReadingType values we interpret: uom 38 = W; flowDirection 19 = reverse (export).
_UOM_WATTS: Final = 38
_FLOW_REVERSE: Final = 19
_QUALITY_FORECAST: Final = 0x40
# Response.status values and their meaning, for logs and for the core's ack mapping.
RESPONSE_STATUS: Final = {
    1: "received",
    2: "started",
    3: "completed",
    4: "opted_out",
    5: "opted_in",
    6: "cancelled",
    7: "superseded",
    8: "partially_opted_out",
    9: "partially_opted_in",
    10: "completed_no_user_participation",
    11: "acknowledged",
    12: "no_display",
    13: "aborted_server",
    14: "aborted_higher_priority",
    252: "rejected_invalid",
    253: "rejected_not_applicable",
    254: "rejected_expired",
}
_RESPONSE_REQUIRED: Final = "03"  # message received + specific response (started/completed/...)
_RSPS_ID: Final = 1  # one ResponseSet per device: DER controls
_INT_QUERY: Final = re.compile(r"^[0-9]{1,10}$")
_EDEV_PATH: Final = re.compile(r"^/edev/([0-9]{1,10})(?:/|$)")
_SUBSCRIBABLE: Final = re.compile(
    r"^/edev/([0-9]{1,10})/derp/([0-9]{1,10})(?:/(derc|actderc|dderc))?$"
)
# A DERProgramList, as listed under the EndDevice, its FunctionSetAssignments or its DER.
_SUBSCRIBABLE_PROGRAMS: Final = re.compile(
    r"^/edev/([0-9]{1,10})(?:/fsa/[0-9]{1,10}|/der/[0-9]{1,3})?/derp$"
)
_ONE_FSAS_PROGRAMS: Final = re.compile(r"^/edev/[0-9]{1,10}/fsa/([0-9]{1,10})/derp$")
_SUBSCRIBABLE_LOAD_CONTROLS: Final = re.compile(r"^/edev/[0-9]{1,10}/drp/1/(edc|actedc)$")
_ONE_DERS_PROGRAMS: Final = re.compile(r"^/edev/[0-9]{1,10}/der/([0-9]{1,3})/derp$")
_ENCODING_XML: Final = 0
_MAX_HISTORY: Final = 256


# --------------------------------------------------------------------------- configuration


class Sep2TlsConfig(Section):
    """Server certificate and the CA(s) whose client certificates are accepted.

    Notifications to ``https`` subscribers go out as a TLS *client*: a receiver that verifies
    client certificates (as a 2030.5 client's listener should) refuses a certificate whose
    extended key usage is serverAuth only. ``notify_cert_file`` / ``notify_key_file`` name a
    certificate with clientAuth for that (``derms-gateway certs issue DIR NAME`` issues one);
    without them the server certificate is used, and must carry clientAuth too.
    """

    cert_file: Path
    key_file: Path
    ca_file: Path
    notify_cert_file: Path | None = None
    notify_key_file: Path | None = None

    @model_validator(mode="after")
    def _notify_pair(self) -> Sep2TlsConfig:
        if (self.notify_cert_file is None) != (self.notify_key_file is None):
            raise ValueError("give both notify_cert_file and notify_key_file, or neither")
        return self

    def notification_identity(self) -> tuple[Path, Path]:
        """The certificate and key Notifications are sent with."""
        if self.notify_cert_file is not None and self.notify_key_file is not None:
            return self.notify_cert_file, self.notify_key_file
        return self.cert_file, self.key_file


class Sep2DefaultEnvelope(Section):
    """A group's DefaultDERControl: what its DERs do when no event is active (None = no limit)."""

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
        description="setGradW: how fast a DER may change its power, in % of its rated W per "
        "second (CSIP-AUS sites ramp at the default's rate after a control ends or on start)",
    )


class Sep2ProgramConfig(Section):
    """The DERProgram of one topology group. Lower ``primacy`` wins on the client."""

    group_id: Identifier
    primacy: int = Field(ge=0, le=255)
    description: str = Field(default="", max_length=32)
    default: Sep2DefaultEnvelope = Sep2DefaultEnvelope()
    randomize_start_s: int = Field(
        default=0,
        ge=-3600,
        le=3600,
        description="randomizeStart of its scheduled DERControls (each client draws its delay)",
    )
    randomize_duration_s: int = Field(
        default=0, ge=-3600, le=3600, description="randomizeDuration of its scheduled DERControls"
    )


class Sep2AggregatorConfig(Section):
    """An aggregator's client certificate (CSIP-AUS P-01): its EndDeviceList lists the
    EndDevices named here, and it reads and answers for each of them as that EndDevice would."""

    lfdi: str = Field(pattern=r"^[0-9A-Fa-f]{40}$", description="LFDI of its client certificate")
    end_devices: tuple[str, ...] = Field(
        min_length=1, max_length=1000, description="LFDIs of the EndDevices it acts for"
    )

    @model_validator(mode="after")
    def _lfdis(self) -> Sep2AggregatorConfig:
        pattern = re.compile(r"^[0-9A-Fa-f]{40}$")
        bad = [lfdi for lfdi in self.end_devices if not pattern.match(lfdi)]
        if bad:
            raise ValueError(f"end_devices: {bad[0]!r} is not an LFDI (40 hex digits)")
        if self.lfdi.upper() in {lfdi.upper() for lfdi in self.end_devices}:
            raise ValueError("an aggregator is not one of its own EndDevices")
        return self


class Sep2ServerConfig(Section):
    """The ``[sep2_server]`` section."""

    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535, description="0 = any free port")
    tls: Sep2TlsConfig | None = None
    dev_lfdi_header: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="Plain-HTTP development only: take the client's LFDI from this header",
    )
    csipaus: CsipAusVersion = CsipAusVersion.V1_2
    poll_rate_s: int = Field(default=300, ge=1, le=86_400, description="dcap/edev/fsa pollRate")
    der_poll_rate_s: int = Field(default=60, ge=1, le=86_400, description="DERProgram pollRate")
    post_rate_s: int = Field(default=60, ge=1, le=86_400, description="MirrorUsagePoint postRate")
    requests_per_client_per_s: float = Field(
        default=10.0,
        gt=0,
        le=100_000,
        description="Requests one client (its LFDI, or its address before it has one) may make "
        "per second on average; beyond it and the burst it gets 429 with Retry-After",
    )
    requests_per_client_burst: int = Field(default=100, ge=1, le=1_000_000)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=256 * 1024)
    body_timeout_s: float = Field(default=10.0, gt=0, le=300)
    keepalive_timeout_s: float = Field(default=75.0, gt=0, le=3600)
    listen_backlog: int = Field(
        default=1024,
        ge=16,
        le=65_535,
        description=(
            "Pending connections the kernel queues (capped by net.core.somaxconn): a fleet "
            "reconnecting after a restart overflows aiohttp's 128 and waits seconds on SYN retries"
        ),
    )
    default_page_limit: int = Field(default=1, ge=1, le=255, description="2030.5 default l=1")
    max_page_limit: int = Field(default=255, ge=1, le=1000)
    max_mirror_points: int = Field(default=8, ge=1, le=256, description="MUPs per client")
    max_readings_per_point: int = Field(default=32, ge=1, le=1024)
    unlisted_group_primacy: int = Field(
        default=100,
        ge=0,
        le=255,
        description=(
            "Primacy of groups without a [[programs]] entry, plus one step per topology level "
            "from the device's own program up (device +0, transformer +1, feeder section +2, "
            "feeder +3, substation +4, other groups +5): no two of a device's programs tie"
        ),
    )
    iana_pen: int = Field(default=0, ge=0, le=0xFFFF_FFFF, description="Goes into every mRID")
    notification_hosts: tuple[str, ...] = Field(
        default=("127.0.0.1", "localhost"),
        description="Hosts a Subscription's notificationURI may name (anything else is refused)",
    )
    max_subscriptions: int = Field(default=8, ge=0, le=256, description="Subscriptions per client")
    notification_queue: int = Field(
        default=16, ge=1, le=1024, description="Pending Notifications per subscription"
    )
    notification_timeout_s: float = Field(default=5.0, gt=0, le=120, description="Per attempt")
    notification_attempts: int = Field(
        default=5, ge=1, le=100, description="Attempts before a Notification is dropped"
    )
    notification_backoff_s: float = Field(
        default=1.0, gt=0, le=300, description="First retry delay; doubles per failure, jittered"
    )
    notification_backoff_max_s: float = Field(default=60.0, gt=0, le=3600)
    response_cache_entries: int = Field(
        default=8192,
        ge=0,
        le=1_000_000,
        description="Encoded GET responses kept, least recently used dropped first (a polling "
        "client reads about 6 documents: size it to 6x the fleet); 0 = no cache",
    )
    programs: tuple[Sep2ProgramConfig, ...] = ()
    aggregators: tuple[Sep2AggregatorConfig, ...] = ()
    state_file: Path | None = Field(
        default=None,
        description="SQLite file keeping what the server serves (EndDevice and DERProgram ids, "
        "DERControls with their mRIDs and status, defaults changed at run time) across "
        "restarts; None: kept in memory only",
    )

    @model_validator(mode="after")
    def _identity_source(self) -> Sep2ServerConfig:
        if self.tls is not None and self.dev_lfdi_header is not None:
            raise ValueError("dev_lfdi_header is for plain HTTP only; remove it when tls is set")
        if self.tls is None and self.dev_lfdi_header is None:
            raise ValueError(
                "without tls, clients cannot be identified: set tls (or, for "
                "development only, dev_lfdi_header)"
            )
        groups = [p.group_id for p in self.programs]
        if len(set(groups)) != len(groups):
            raise ValueError("programs: a group_id appears twice")
        aggregators = [a.lfdi.upper() for a in self.aggregators]
        if len(set(aggregators)) != len(aggregators):
            raise ValueError("aggregators: an LFDI appears twice")
        return self


# --------------------------------------------------------------------------- public records


@dataclass(frozen=True, slots=True)
class Sep2Enrollment:
    """One DER the server accepts, as the adapter enrolls it."""

    device_id: str
    lfdi: str
    pin: int | None
    groups: tuple[str, ...]
    control_duration_s: int
    shares_end_device: bool = False
    """A further DER of the EndDevice already enrolled under the same LFDI (one client for a
    site with, say, PV and a battery): listed in its DERList, its controls in its own program."""
    device_category: str | None = None
    """A thermal load (2030.5 DeviceCategoryType, hex): its EndDevice gets a
    DemandResponseProgram for its EndDeviceControls (``adapters.sep2_der.drlc``)."""


@dataclass(frozen=True, slots=True)
class PowerSample:
    """The latest active power a client mirrored, in W with the **load convention** (+ import)."""

    watts: float
    received_at: datetime  # server clock: the age that matters for staleness
    measured_at: datetime | None  # end of the reading's interval, client clock
    quality_flags: int | None


@dataclass(frozen=True, slots=True)
class PublishedControl:
    """A DERControl this server published for a device."""

    mrid: str
    href: str
    power_kw: float | None
    start: int
    duration: int
    base: DERControlBase
    provenance: tuple[LimitSource, ...]


@dataclass(frozen=True, slots=True)
class DerSnapshot:
    """Everything a client told the server about its DER, plus the control in force."""

    capability: DERCapability | None
    settings: DERSettings | None
    status: DERStatus | None
    availability: DERAvailability | None
    der_power: PowerSample | None
    site_power: PowerSample | None
    active_control: PublishedControl | None
    last_seen: datetime | None
    connection_point_id: str | None = None
    """CSIP-AUS: the NMI of the site the client stands for, as it PUT it."""


class Sep2ResponseRecord(BaseModel):
    """A Response a client POSTed about one of its controls, tied back to the command."""

    model_config = ConfigDict(frozen=True)

    device_id: str
    control_mrid: str
    control_href: str
    status: int
    status_name: str
    created_at: datetime | None = Field(description="The client's createdDateTime")
    received_at: datetime
    power_kw: float | None = Field(description="Setpoint the control carried (None: release)")
    provenance: tuple[LimitSource, ...] = ()


ResponseListener = Callable[[Sep2ResponseRecord], None]


# --------------------------------------------------------------------------- internal state


@dataclass(slots=True)
class _Program:
    program_id: int
    group_id: str
    primacy: int
    description: str
    default_base: DERControlBase
    set_grad_w: int | None = None  # hundredths of a percent of rated W per second
    default_version: int = 1  # DefaultDERControl version: +1 on every change (as envoy)
    randomize_start_s: int = 0
    randomize_duration_s: int = 0


@dataclass(slots=True)
class _Control:
    control_id: int
    program_id: int
    mrid: str
    href: str
    created: int
    start: int
    duration: int
    base: DERControlBase
    power_kw: float | None
    provenance: tuple[LimitSource, ...]
    description: str
    status: int | None = None  # None: scheduled/active by time; else cancelled/superseded
    status_time: int = 0
    randomize_start: int | None = None
    randomize_duration: int | None = None
    fixed_end: bool = False  # scheduled for a dispatch's window: kept whole, never renewed
    device_id: str = ""  # the DER it is for (an EndDevice may have several)

    @property
    def command_id(self) -> str | None:
        return self.provenance[0].command_id if self.provenance else None

    @property
    def end(self) -> int:
        return self.start + self.duration

    def current_status(self, now: int) -> int:
        if self.status is not None:
            return self.status
        return STATUS_ACTIVE if self.start <= now else STATUS_SCHEDULED

    def published(self) -> PublishedControl:
        return PublishedControl(
            self.mrid,
            self.href,
            self.power_kw,
            self.start,
            self.duration,
            self.base,
            self.provenance,
        )


@dataclass(slots=True)
class _Mirror:
    mup_id: int
    point: MirrorUsagePoint  # without readings: what GET /mup/{m} serves
    reading_types: dict[str, ReadingType]  # MMR mRID (upper) → its ReadingType
    power: PowerSample | None = None

    @property
    def role(self) -> int:
        return int(self.point.role_flags or "0", 16)


@dataclass(slots=True)
class _Der:
    enrollment: Sep2Enrollment
    edev_id: int
    lfdi: str
    sfdi: int
    programs: list[_Program]
    changed_time: int
    registered_at: int
    posted_registration: bool = False
    capability: DERCapability | None = None
    settings: DERSettings | None = None
    status: DERStatus | None = None
    availability: DERAvailability | None = None
    connection_point_id: str | None = None  # CSIP-AUS: the site's NMI, as the client PUT it
    mirrors: dict[int, _Mirror] = field(default_factory=dict)
    controls: list[_Control] = field(default_factory=list)
    issued: dict[str, _Control] = field(default_factory=dict)  # mRID (upper) → control, bounded
    responses: deque[tuple[int, Response, Sep2ResponseRecord]] = field(
        default_factory=lambda: deque(maxlen=_MAX_HISTORY)
    )
    next_response_id: int = 1
    last_seen: datetime | None = None
    # Bumped (from the server's counter, so never reused) whenever anything a GET of this
    # client's documents shows changes: the response cache compares it.
    generation: int = 0
    der_id: int = 1  # its DER in the EndDevice's DERList
    host: _Der | None = None  # the EndDevice's first DER (None: this is it)
    members: list[_Der] = field(default_factory=list)  # further DERs of this EndDevice
    device_program: _Program | None = None  # its own program, when the EndDevice has several
    load_controls: list[drlc.LoadControl] = field(default_factory=list)  # DRLC, in memory
    # FunctionSetAssignments ids of the EndDevice (on the host): group_id -> id, never reused
    # for another group of this EndDevice; the groups it left keep theirs should it come back.
    fsa_ids: dict[str, int] = field(default_factory=dict)
    next_fsa: int = 1

    @property
    def ders(self) -> list[_Der]:
        """The EndDevice's DERs, this one first (call on the host)."""
        return [self, *self.members]

    def edev_programs(self) -> list[_Program]:
        """Every program of the EndDevice's DERs, once each (call on the host)."""
        seen: dict[int, _Program] = {}
        for der in self.ders:
            for program in der.programs:
                seen.setdefault(program.program_id, program)
        return list(seen.values())

    @property
    def base_href(self) -> str:
        return f"/edev/{self.edev_id}"

    @property
    def reply_to(self) -> str:
        return f"{self.base_href}/rsps/{_RSPS_ID}/rsp"

    def program(self, program_id: int) -> _Program | None:
        return next((p for p in self.edev_programs() if p.program_id == program_id), None)

    def primary_program(self) -> _Program:
        """The program a device's own setpoint goes into: the one the client ranks first."""
        return min(self.programs, key=lambda p: p.primacy)

    def program_for(self, group_id: str | None) -> _Program:
        """The program of ``group_id`` when the device is in that group, else the primary one:
        a command for a group goes into that group's program, at that program's primacy. On an
        EndDevice with several DERs, each DER's controls go into its own program."""
        if self.device_program is not None:
            return self.device_program
        found = next((p for p in self.programs if p.group_id == group_id), None)
        return found if found is not None else self.primary_program()


@dataclass(slots=True, eq=False)
class _Subscription:
    sub_id: int
    der: _Der
    program_id: int | None  # None for a DERProgramList
    # derc | actderc | dderc | derp (a DERProgram) | derpl (a DERProgramList) | edevl (the
    # client's EndDeviceList) | fsal (its FunctionSetAssignmentsList) | tpl (TariffProfileList)
    # | edc / actedc (its (Active)EndDeviceControlList, DRLC)
    kind: str
    model: Subscription  # as served, with its href
    pending: deque[bytes]  # encoded Notifications, oldest first
    failures: int = 0  # consecutive failed attempts of the oldest pending Notification
    retry_at: float = 0.0  # event-loop time
    inflight: asyncio.Task[None] | None = None

    @property
    def href(self) -> str:
        return self.model.href or ""


class ResponseCacheInfo(NamedTuple):
    """How the server's cache of encoded GET responses is doing (like ``functools.lru_cache``)."""

    hits: int
    misses: int
    entries: int
    capacity: int


@dataclass(frozen=True, slots=True)
class _CachedBody:
    generation: int  # the client's generation the body was built from
    built_at: int  # epoch second it was built at
    valid_until: int | None  # epoch second from which its content may be wrong (None: never)
    body: bytes
    etag: str


_CacheKey = tuple[str, int | None, int, int, int | None]  # path, EndDevice, s, l, a


class _ResponseCache:
    """Encoded bodies of GET responses, least recently used dropped first.

    An entry is used only while the client's generation is the one it was built from and the
    clock is in ``[built_at, valid_until)``: documents whose content depends on the time (an
    event turning active, a control lapsing) carry the next such boundary, so no entry is ever
    served past the moment its bytes would change. Stale entries are replaced when next asked
    for, or age out of the LRU order.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[_CacheKey, _CachedBody] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: _CacheKey, generation: int, now: int) -> _CachedBody | None:
        entry = self._entries.get(key)
        if entry is not None:
            if (
                entry.generation == generation
                and entry.built_at <= now
                and (entry.valid_until is None or now < entry.valid_until)
            ):
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            del self._entries[key]
        self.misses += 1
        return None

    def put(self, key: _CacheKey, entry: _CachedBody) -> None:
        if self.capacity == 0:
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def info(self) -> ResponseCacheInfo:
        return ResponseCacheInfo(self.hits, self.misses, len(self._entries), self.capacity)


def _etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison of an ``If-None-Match`` list against our (strong) tag."""
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


class _HttpError(Exception):
    """A 2030.5 error answer: HTTP status plus the message in the ``<Error>`` body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _forbidden(lfdi: str | None) -> _HttpError:
    who = lfdi.lower() if lfdi else "this client"
    return _HttpError(403, f"{who} is not scoped to access this resource")


# The narrower the group, the lower (stronger) the primacy of its unlisted program.
_LEVEL_STEP: Final = {
    "device": 0,
    "transformer": 1,
    "feeder_section": 2,
    "feeder": 3,
    "substation": 4,
}


def _unlisted_primacy(group_id: str, base: int) -> int:
    """A group without a [[programs]] entry: ``base`` plus its topology level's step, so the
    programs of one device (one group per level) never tie by accident."""
    step = _LEVEL_STEP.get(group_id.split(":", 1)[0], len(_LEVEL_STEP))
    return min(255, base + step)


def _mrid(kind: int, number: int, pen: int) -> str:
    """An mRID like envoy's: kind nibble, a number, the IANA PEN in the last 8 digits."""
    return f"{kind:01x}{number:023x}{pen:08x}"


def _default_base(default: Sep2DefaultEnvelope) -> DERControlBase:
    return DERControlBase(
        op_mod_imp_lim_w=_kw_to_power(default.import_limit_kw),
        op_mod_exp_lim_w=_kw_to_power(default.export_limit_kw),
        op_mod_gen_lim_w=_kw_to_power(default.generation_limit_kw),
        op_mod_load_lim_w=_kw_to_power(default.load_limit_kw),
    )


def _grad_w(default: Sep2DefaultEnvelope) -> int | None:
    rate = default.ramp_rate_pct_per_s
    return None if rate is None else round(rate * 100)


def _kw_to_power(kw: float | None) -> ActivePower | None:
    return None if kw is None else from_watts(kw * 1000)


def _dump_base(base: DERControlBase) -> dict[str, Any]:
    return base.model_dump(mode="json", exclude_none=True)


def _control_to_json(control: _Control, listed: bool) -> dict[str, Any]:
    return {
        "control_id": control.control_id,
        "program_id": control.program_id,
        "mrid": control.mrid,
        "href": control.href,
        "created": control.created,
        "start": control.start,
        "duration": control.duration,
        "base": _dump_base(control.base),
        "power_kw": control.power_kw,
        "provenance": [s.model_dump(mode="json") for s in control.provenance],
        "description": control.description,
        "status": control.status,
        "status_time": control.status_time,
        "randomize_start": control.randomize_start,
        "randomize_duration": control.randomize_duration,
        "fixed_end": control.fixed_end,
        "device_id": control.device_id,
        "listed": listed,
    }


def _optional_int(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _control_from_json(item: dict[str, Any]) -> _Control:
    power = item["power_kw"]
    if power is not None and not isinstance(power, int | float):
        raise TypeError("power_kw")
    return _Control(
        control_id=int(item["control_id"]),
        program_id=int(item["program_id"]),
        mrid=str(item["mrid"]),
        href=str(item["href"]),
        created=int(item["created"]),
        start=int(item["start"]),
        duration=int(item["duration"]),
        base=DERControlBase.model_validate(item["base"]),
        power_kw=None if power is None else float(power),
        provenance=tuple(LimitSource.model_validate(s) for s in item["provenance"]),
        description=str(item["description"]),
        status=_optional_int(item["status"]),
        status_time=int(item["status_time"]),
        randomize_start=_optional_int(item["randomize_start"]),
        randomize_duration=_optional_int(item["randomize_duration"]),
        fixed_end=bool(item["fixed_end"]),
        device_id=str(item.get("device_id", "")),
    )


_DER_KINDS: Final[dict[str, type[Sep2Model]]] = {
    "dercap": DERCapability,
    "derg": DERSettings,
    "ders": DERStatus,
    "dera": DERAvailability,
}
_DER_FIELDS: Final = {
    "dercap": "capability",
    "derg": "settings",
    "ders": "status",
    "dera": "availability",
}


# --------------------------------------------------------------------------- the server


class Sep2Server:
    """The shared 2030.5 server. Enroll DERs (through their adapters), then ``start`` it."""

    def __init__(
        self,
        config: Sep2ServerConfig,
        *,
        on_response: ResponseListener | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._on_response = on_response
        self._clock = clock
        self._ders: dict[str, _Der] = {}  # by device_id
        self._by_lfdi: dict[str, _Der] = {}  # by uppercase LFDI
        self._by_edev: dict[int, _Der] = {}
        self._programs: dict[str, _Program] = {}  # by group_id
        self._mirrors: dict[int, tuple[_Der, _Mirror]] = {}
        self._next_edev = 1
        self._next_program = 1
        self._next_control = 1
        self._next_mup = 1
        self._runner: web.AppRunner | None = None
        self._start_lock = asyncio.Lock()
        self._port: int | None = None
        self._subscriptions: dict[int, _Subscription] = {}
        self._next_subscription = 1
        self._notify_wake = asyncio.Event()
        self._notifier: asyncio.Task[None] | None = None
        self._notify_ssl: ssl.SSLContext | None = None
        self._random = random.Random()
        self._cache = _ResponseCache(config.response_cache_entries)
        self.quotas = Quotas(config.requests_per_client_per_s, config.requests_per_client_burst)
        self.on_refused: RefusalHook | None = None
        """Told of every request refused for who sent it (403 out of scope, 429 over quota):
        ``(source, reason, detail)`` (the audit trail)."""
        """Per-client request quotas; ``quotas.refused`` counts the 429s by client."""
        self.answered: Counter[int] = Counter()
        """Requests answered, by HTTP status (the operator's metrics)."""
        self._quota_logged: set[str] = set()
        self._generations = itertools.count(1)
        self._configured = {p.group_id: p for p in config.programs}
        self._aggregators = {
            normalize_lfdi(a.lfdi): tuple(dict.fromkeys(normalize_lfdi(e) for e in a.end_devices))
            for a in config.aggregators
        }
        self._early_defaults: dict[str, Sep2DefaultEnvelope] = {}
        self.poll_rate_s = config.poll_rate_s
        self.der_poll_rate_s = config.der_poll_rate_s
        self.post_rate_s = config.post_rate_s
        self._state = None if config.state_file is None else Sep2ServerState(config.state_file)
        self._stored: StateSnapshot | None = None  # what the state file held when loaded
        self._dirty_devices: set[str] = set()
        self._dirty_programs: set[str] = set()
        self._persist_wake = asyncio.Event()
        self._persist_stop = False
        self._persister: asyncio.Task[None] | None = None
        self._tariffs = TariffBook()  # price schedules served as 2030.5 Pricing (§10.5)
        self.unreadable_state_rows = 0
        """Rows of the state file that could not be read back (skipped)."""
        for program in config.programs:  # configured groups get the low, stable ids
            self._program(program.group_id)

    # ----------------------------------------------------------------------- enrollment

    def enroll(self, enrollment: Sep2Enrollment) -> None:
        """Accept one DER. Its LFDI must be unique; its groups become its DERPrograms."""
        lfdi = normalize_lfdi(enrollment.lfdi)
        if enrollment.device_id in self._ders:
            raise ValueError(f"device {enrollment.device_id!r} is already enrolled")
        if lfdi in self._by_lfdi and enrollment.shares_end_device:
            self._enroll_member(self._by_lfdi[lfdi], enrollment)
            return
        if lfdi in self._by_lfdi:
            other = self._by_lfdi[lfdi].enrollment.device_id
            raise ValueError(f"LFDI {lfdi} of {enrollment.device_id!r} is already {other!r}'s")
        if lfdi in self._aggregators:
            raise ValueError(f"LFDI {lfdi} of {enrollment.device_id!r} is an aggregator's")
        groups = enrollment.groups or (f"device:{enrollment.device_id}",)
        now = int(self._clock())
        der = _Der(
            enrollment=enrollment,
            edev_id=self._next_edev,
            lfdi=lfdi,
            sfdi=sfdi_from_lfdi(lfdi),
            programs=[self._program(g) for g in dict.fromkeys(groups)],
            changed_time=now,
            registered_at=now,
            generation=next(self._generations),
        )
        self._next_edev += 1
        saved = None if self._stored is None else self._stored.devices.get(enrollment.device_id)
        if saved is not None:  # enrolled after the state was loaded: its saved tree back
            self._restore_der(der, saved)
        self._assign_fsas(der)
        self._warn_ties(der)
        self._ders[enrollment.device_id] = der
        self._by_lfdi[lfdi] = der
        self._by_edev[der.edev_id] = der
        self._mark(der)

    def _enroll_member(self, host: _Der, enrollment: Sep2Enrollment) -> None:
        """A further DER of ``host``'s EndDevice. From now on every DER of that EndDevice has
        its own program (``device:{id}``) for its controls, so a client tells them apart."""
        if host.device_program is None:
            host.device_program = self._program(f"device:{host.enrollment.device_id}")
            host.programs.insert(0, host.device_program)
        device_program = self._program(f"device:{enrollment.device_id}")
        groups = dict.fromkeys(enrollment.groups)
        member = _Der(
            enrollment=enrollment,
            edev_id=host.edev_id,
            lfdi=host.lfdi,
            sfdi=host.sfdi,
            programs=[device_program, *(self._program(g) for g in groups)],
            changed_time=host.changed_time,
            registered_at=host.registered_at,
            generation=next(self._generations),
            der_id=len(host.ders) + 1,
            host=host,
            device_program=device_program,
        )
        host.members.append(member)
        self._ders[enrollment.device_id] = member
        self._assign_fsas(host)
        self._touch(host)
        self._mark(host)
        self._mark(member)

    def regroup(self, device_id: str, groups: tuple[str, ...]) -> bool:
        """The device's topology groups changed (the registry moved it to another feeder, say):
        its programs, and so its EndDevice's FunctionSetAssignments, follow at once, and the
        subscribers of its FunctionSetAssignmentsList, EndDeviceList, DERProgramLists and
        TariffProfileList are told. A control of a program the device left is cancelled (its
        client no longer sees that program; the next cycle plans the device anew). Returns
        whether anything changed."""
        der, member = self._hosting(device_id)
        wanted = dict.fromkeys(groups or (f"device:{device_id}",))
        if member.device_program is not None:
            wanted = {member.device_program.group_id: None, **dict.fromkeys(groups)}
        programs = [self._program(g) for g in wanted]
        if {p.program_id for p in programs} == {p.program_id for p in member.programs}:
            return False  # the same groups (perhaps listed in another order): nothing moved
        member.programs = programs
        now = self._now()
        for control in der.controls:
            if (
                control.device_id == device_id
                and control.status is None
                and not any(p.program_id == control.program_id for p in programs)
            ):
                control.status = STATUS_CANCELLED
                control.status_time = now
        self._assign_fsas(der)
        self._warn_ties(member)
        log.info(
            "2030.5 EndDevice %s of %s regrouped: programs %s",
            der.base_href,
            device_id,
            ", ".join(p.group_id for p in programs),
        )
        self._mark(member)
        self._changed(der)
        self._notify_lists(der, ("fsal", "edevl", "derpl", "tpl"))
        return True

    def _assign_fsas(self, host: _Der) -> None:
        """Give each program of ``host``'s EndDevice its FunctionSetAssignments id (once)."""
        for program in sorted(host.edev_programs(), key=lambda p: (p.primacy, p.program_id)):
            if program.group_id not in host.fsa_ids:
                host.fsa_ids[program.group_id] = host.next_fsa
                host.next_fsa += 1
        host.next_fsa = max(host.next_fsa, max(host.fsa_ids.values(), default=0) + 1)

    @staticmethod
    def _warn_ties(der: _Der) -> None:
        """Two of a device's programs at one primacy leave the client to break the tie (by
        creation time, then by the tighter limit): configured that way, say so once."""
        seen: dict[int, str] = {}
        for program in der.programs:
            other = seen.setdefault(program.primacy, program.group_id)
            if other != program.group_id:
                log.warning(
                    "2030.5: %s is in programs %s and %s of equal primacy %d: its client breaks "
                    "the tie (the newer control, then the tighter limit)",
                    der.enrollment.device_id,
                    other,
                    program.group_id,
                    program.primacy,
                )

    def _fsas(self, host: _Der) -> list[tuple[int, _Program]]:
        """The EndDevice's FunctionSetAssignments, strongest program first: a client walking
        them in order meets the programs in the order one list of them would give."""
        programs = sorted(host.edev_programs(), key=lambda p: (p.primacy, p.program_id))
        return [(host.fsa_ids[p.group_id], p) for p in programs if p.group_id in host.fsa_ids]

    def _program(self, group_id: str) -> _Program:
        program = self._programs.get(group_id)
        if program is not None:
            return program
        configured = self._configured.get(group_id)
        default = configured.default if configured else Sep2DefaultEnvelope()
        early = self._early_defaults.pop(group_id, None)
        saved = None if self._stored is None else self._stored.programs.get(group_id)
        program = _Program(
            program_id=self._next_program if saved is None else saved.program_id,
            group_id=group_id,
            primacy=(
                configured.primacy
                if configured
                else _unlisted_primacy(group_id, self.config.unlisted_group_primacy)
            ),
            description=(configured.description if configured else "") or group_id[:32],
            default_base=_default_base(default),
            set_grad_w=_grad_w(default),
            randomize_start_s=configured.randomize_start_s if configured else 0,
            randomize_duration_s=configured.randomize_duration_s if configured else 0,
        )
        if saved is None:
            self._next_program += 1
        else:
            self._restore_default(program, saved)
        self._programs[group_id] = program
        self._mark_program(program)
        if early is not None:
            self.set_default(group_id, early)  # one version on, as any run-time change
        return program

    def serves_group(self, group_id: str) -> bool:
        """True when ``group_id`` can have a default control here: a DERProgram serves it, or
        it is one of the configured programs (served once a DER of it enrols)."""
        return group_id in self._programs or group_id in self._configured

    # ----------------------------------------------------------------------- run-time changes

    def set_default(self, group_id: str, default: Sep2DefaultEnvelope) -> bool:
        """Change a group's DefaultDERControl while running: its version goes up, every client
        in the group sees it on its next GET, and its subscribers are notified. False when no
        enrolled device is in that group (nothing serves its program)."""
        program = self._programs.get(group_id)
        if program is None:
            # Served from when a DER of the group enrols (a default set before the server's
            # DERs are back after a restart, or for a group not yet populated).
            self._early_defaults[group_id] = default
            return False
        base, grad = _default_base(default), _grad_w(default)
        if (program.default_base, program.set_grad_w) == (base, grad):
            return True
        program.default_base, program.set_grad_w = base, grad
        program.default_version += 1
        self._mark_program(program)
        log.info(
            "2030.5 DefaultDERControl of %s is now version %d", group_id, program.default_version
        )
        for der in self._ders.values():
            if any(p is program for p in der.programs):
                self._touch(der)
                self._notify_default(der.host or der, program)
        return True

    def set_rates(
        self,
        *,
        poll_rate_s: int | None = None,
        der_poll_rate_s: int | None = None,
        post_rate_s: int | None = None,
    ) -> None:
        """Change the pollRate / postRate the server asks of clients, while running: every
        client sees them on its next GET of the documents that carry them."""
        for name, value in (
            ("poll_rate_s", poll_rate_s),
            ("der_poll_rate_s", der_poll_rate_s),
            ("post_rate_s", post_rate_s),
        ):
            if value is not None and not 1 <= value <= 86_400:
                raise ValueError(f"{name} {value} outside 1..86400 s")  # nothing changed yet
        for name, value in (
            ("poll_rate_s", poll_rate_s),
            ("der_poll_rate_s", der_poll_rate_s),
            ("post_rate_s", post_rate_s),
        ):
            if value is not None:
                setattr(self, name, value)
        for der in self._ders.values():
            self._touch(der)
            kinds: tuple[str, ...] = ("edevl", "fsal", "tpl") if poll_rate_s is not None else ()
            kinds += ("derpl",) if der_poll_rate_s is not None else ()
            if kinds:
                self._notify_lists(der, kinds)

    def set_price(self, schedule: PriceSchedule) -> bool:
        """Serve a price schedule (Grid DERMS's ``prices``) to the clients in its scope (every
        client for the gateway-wide scope) as their TariffProfiles (``adapters.sep2_der.pricing``).
        False when one as new or newer is held for its scope and kind (nothing changes)."""
        if not self._tariffs.put(schedule):
            return False
        log.info("2030.5 pricing: %s/%s schedule from %s", *schedule.key, schedule.issued_at)
        for der in self._ders.values():
            self._touch(der)
        for der in self._ders.values():  # each EndDevice now served this schedule: tell it
            if der.host is None and schedule in self._tariff_view(der).profiles.values():
                self._notify_lists(der, ("tpl", "fsal"))
        return True

    def _tariff_view(self, der: _Der) -> TariffView:
        programs = sorted(der.edev_programs(), key=lambda p: (p.primacy, p.program_id))
        profiles = self._tariffs.for_groups([p.group_id for p in programs])
        return TariffView(
            der.base_href,
            profiles,
            self.config.iana_pen,
            v13=self.config.csipaus == CsipAusVersion.V1_3,
            replaced=self._tariffs.replaced(profiles),
        )

    def _notify_default(self, der: _Der, program: _Program) -> None:
        for sub in self._subscriptions_of(der):
            if sub.kind != "dderc" or sub.program_id != program.program_id:
                continue
            self._enqueue(sub, self._default_control(der, program))
        self._notify_wake.set()

    # ----------------------------------------------------------------------- persistence

    def _mark(self, der: _Der) -> None:
        if self._state is not None:
            self._dirty_devices.add(der.enrollment.device_id)
            self._persist_wake.set()

    def _mark_program(self, program: _Program) -> None:
        if self._state is not None:
            self._dirty_programs.add(program.group_id)
            self._persist_wake.set()

    def _configured_default(self, group_id: str) -> tuple[DERControlBase, int | None]:
        configured = self._configured.get(group_id)
        default = configured.default if configured else Sep2DefaultEnvelope()
        return _default_base(default), _grad_w(default)

    def _restore(self, stored: StateSnapshot) -> None:
        """Serve what was served before the restart: saved ids back to the programs and
        EndDevices that had them (nobody has seen the ids given before this, the server was
        not listening), new ones past every saved id, and each device's controls."""
        self._stored = stored
        self.unreadable_state_rows += stored.counters.get("unreadable", 0)
        top_program = max((p.program_id for p in stored.programs.values()), default=0)
        top_edev = max((d.edev_id for d in stored.devices.values()), default=0)
        self._next_program = max(top_program + 1, stored.counters.get("next_program", 1))
        self._next_edev = max(top_edev + 1, stored.counters.get("next_edev", 1))
        self._next_control = max(self._next_control, stored.counters.get("next_control", 1))
        for program in self._programs.values():
            saved = stored.programs.get(program.group_id)
            if saved is None:
                program.program_id = self._next_program
                self._next_program += 1
            else:
                program.program_id = saved.program_id
                self._restore_default(program, saved)
            self._mark_program(program)
        self._by_edev.clear()
        for der in self._ders.values():
            if der.host is not None:
                continue  # a further DER: its EndDevice's id, below
            saved_der = stored.devices.get(der.enrollment.device_id)
            if saved_der is None:
                der.edev_id = self._next_edev
                self._next_edev += 1
            else:
                self._restore_der(der, saved_der)
            self._by_edev[der.edev_id] = der
            self._touch(der)
            self._mark(der)
            for member in der.members:
                member.edev_id = der.edev_id
                self._mark(member)
        log.info(
            "2030.5 server state from %s: %d EndDevices, %d programs",
            self.config.state_file,
            len(stored.devices),
            len(stored.programs),
        )

    def _restore_default(self, program: _Program, saved: StoredProgram) -> None:
        """A default changed at run time comes back; a default whose configuration changed
        since is the configured one, one version on (clients see it changed)."""
        try:
            body = saved.body
            config_base = DERControlBase.model_validate(body["config_base"])
            saved_base = DERControlBase.model_validate(body["default_base"])
            saved_grad = body.get("set_grad_w")
            config_grad = body.get("config_grad_w")
            version = int(body["default_version"])
            if not (saved_grad is None or isinstance(saved_grad, int)):
                raise TypeError("set_grad_w")
        except (KeyError, TypeError, ValueError, ValidationError):
            self.unreadable_state_rows += 1
            return
        if (config_base, config_grad) == self._configured_default(program.group_id):
            program.default_base, program.set_grad_w = saved_base, saved_grad
            program.default_version = version
        else:
            changed = (program.default_base, program.set_grad_w) != (saved_base, saved_grad)
            program.default_version = version + 1 if changed else version

    def _restore_der(self, der: _Der, saved: StoredDevice) -> None:
        der.edev_id = saved.edev_id
        fsa = saved.body.get("fsa")
        if isinstance(fsa, dict) and all(
            isinstance(g, str) and isinstance(f, int) and f > 0 for g, f in fsa.items()
        ):
            der.fsa_ids = dict(fsa)
            next_fsa = saved.body.get("next_fsa")
            der.next_fsa = next_fsa if isinstance(next_fsa, int) and next_fsa > 0 else 1
            self._assign_fsas(der)
        elif fsa is not None:
            self.unreadable_state_rows += 1
        items = saved.body.get("controls")
        restored: list[_Control] = []
        listed: list[_Control] = []
        for item in items if isinstance(items, list) else ():
            try:
                control = _control_from_json(item)
            except (KeyError, TypeError, ValueError, ValidationError):
                self.unreadable_state_rows += 1
                continue
            control.device_id = control.device_id or der.enrollment.device_id
            restored.append(control)
            # New controls' hrefs must not repeat a restored one's, whatever the counter says.
            self._next_control = max(self._next_control, control.control_id + 1)
            # A control of a program the device is no longer in is no longer listed.
            if item.get("listed") and der.program(control.program_id) is not None:
                listed.append(control)
        issued = {c.mrid.upper(): c for c in restored}
        issued.update(der.issued)
        der.issued = issued
        der.controls = listed + der.controls

    def _collect(self) -> StateSnapshot:
        changes = StateSnapshot(
            counters={
                "next_edev": self._next_edev,
                "next_program": self._next_program,
                "next_control": self._next_control,
            }
        )
        for group_id in self._dirty_programs:
            program = self._programs.get(group_id)
            if program is None:
                continue
            config_base, config_grad = self._configured_default(group_id)
            changes.programs[group_id] = StoredProgram(
                group_id,
                program.program_id,
                {
                    "default_base": _dump_base(program.default_base),
                    "set_grad_w": program.set_grad_w,
                    "default_version": program.default_version,
                    "config_base": _dump_base(config_base),
                    "config_grad_w": config_grad,
                },
            )
        for device_id in self._dirty_devices:
            der = self._ders.get(device_id)
            if der is None:
                continue
            listed = {id(c) for c in der.controls}
            known = list(der.issued.values())
            known += [c for c in der.controls if c.mrid.upper() not in der.issued]
            changes.devices[device_id] = StoredDevice(
                device_id,
                der.edev_id,
                {
                    "lfdi": der.lfdi,
                    "controls": [_control_to_json(c, id(c) in listed) for c in known],
                    "fsa": dict(der.fsa_ids),
                    "next_fsa": der.next_fsa,
                },
            )
        self._dirty_programs = set()
        self._dirty_devices = set()
        return changes

    async def _persist_loop(self) -> None:
        """Writes what changed, off the event loop, batched: a dispatch that publishes to
        every device in one control period is one write."""
        state = self._state
        assert state is not None
        while True:
            await self._persist_wake.wait()
            self._persist_wake.clear()
            changes = self._collect()
            try:
                await asyncio.to_thread(state.save, changes)
            except (sqlite3.Error, OSError) as exc:
                log.error("2030.5 server state not saved to %s: %s", state.path, exc)
                self._dirty_programs |= changes.programs.keys()
                self._dirty_devices |= changes.devices.keys()
                if self._persist_stop:
                    return
                await asyncio.sleep(5.0)
                self._persist_wake.set()
                continue
            if self._persist_stop and not (self._dirty_devices or self._dirty_programs):
                return

    def _der(self, device_id: str) -> _Der:
        try:
            return self._ders[device_id]
        except KeyError:
            raise KeyError(f"device {device_id!r} is not enrolled on the 2030.5 server") from None

    def _hosting(self, device_id: str) -> tuple[_Der, _Der]:
        """(the EndDevice's host, the device's own DER): the host keeps the controls of all
        its DERs, each marked with the device it is for."""
        member = self._der(device_id)
        return (member.host or member), member

    def edev_href(self, device_id: str) -> str:
        """The EndDevice href of an enrolled device (for diagnostics and tests)."""
        return self._der(device_id).base_href

    # ----------------------------------------------------------------------- adapter side

    def _now(self) -> int:
        return int(self._clock())

    def _touch(self, der: _Der) -> None:
        """Something a GET of ``der``'s documents shows has changed: its cached bodies are stale
        (its EndDevice's too, when it is a further DER of one)."""
        der.generation = next(self._generations)
        if der.host is not None:
            der.host.generation = next(self._generations)

    def cache_info(self) -> ResponseCacheInfo:
        """Hits, misses and size of the cache of encoded GET responses."""
        return self._cache.info()

    def _now_dt(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _prune(self, der: _Der, now: int) -> None:
        """Drop ended controls from the lists (their mRIDs stay known for late Responses).
        A control that lapsed changes the lists, so subscribers are told."""
        kept = [c for c in der.controls if c.end > now]
        if len(kept) != len(der.controls):
            der.controls = kept
            self._changed(der)

    def publish(
        self,
        device_id: str,
        base: DERControlBase,
        *,
        power_kw: float | None,
        provenance: tuple[LimitSource, ...] = (),
        description: str = "",
        until: int | None = None,
        group_id: str | None = None,
    ) -> PublishedControl:
        """Make ``base`` the device's control from now on, superseding the one before (and a
        control scheduled for the same dispatch; those scheduled for others stay). ``until``:
        the end of the dispatch it carries out, when known; the control then lasts until it.
        ``group_id``: the group the command addresses; the control goes into that group's
        program when the device is in it (the primary program otherwise).

        Idempotent: the supervisor re-applies an unchanged setpoint every refresh, and that must
        not churn events on the client. An identical active control is kept until half of its
        duration is left; then a fresh one takes over back to back (events are immutable in
        2030.5, so extending one means superseding it).
        """
        der, member = self._hosting(device_id)
        now = self._now()
        self._prune(der, now)
        duration = member.enrollment.control_duration_s
        if until is not None and until > now:
            duration = until - now
        current = self._in_force(der, now, device_id)
        command_id = provenance[0].command_id if provenance else None
        if (
            current is not None
            and current.base == base
            and current.power_kw == power_kw
            and (current.fixed_end or current.end - now > duration / 2)
        ):
            return current.published()
        for control in der.controls:
            # What is in force now, and what was scheduled for this very dispatch, is replaced;
            # controls scheduled for other dispatches ahead stay.
            if control.device_id != device_id:
                continue
            if control.status is None and (
                control.start <= now
                or (command_id is not None and control.command_id == command_id)
            ):
                control.status = STATUS_SUPERSEDED
                control.status_time = now
        return self._add_control(
            member,
            base,
            start=now,
            duration=duration,
            power_kw=power_kw,
            provenance=provenance,
            description=description,
            fixed_end=until is not None,
            group_id=group_id,
        )

    def schedule(
        self,
        device_id: str,
        base: DERControlBase,
        *,
        start: int,
        end: int,
        power_kw: float | None,
        provenance: tuple[LimitSource, ...],
        description: str = "",
        group_id: str | None = None,
    ) -> PublishedControl | None:
        """A DERControl for a dispatch ahead (in ``group_id``'s program when the device is in
        that group): listed as scheduled from now, active over
        [``start``, ``end``) with the program's randomizeStart / randomizeDuration. Controls in
        force stay. Idempotent per dispatch (its command id, in ``provenance``); None when the
        window has started or is empty (the setpoint then comes through :meth:`publish`)."""
        der, member = self._hosting(device_id)
        now = self._now()
        self._prune(der, now)
        if start <= now or end <= start:
            return None
        command_id = provenance[0].command_id if provenance else None
        for control in der.controls:
            if (
                control.device_id == device_id
                and control.status is None
                and command_id is not None
                and control.command_id == command_id
                and (control.start, control.end, control.base) == (start, end, base)
            ):
                return control.published()
        if command_id is not None:
            self.withdraw(device_id, command_id)
        program = member.program_for(group_id)
        return self._add_control(
            member,
            base,
            start=start,
            duration=end - start,
            power_kw=power_kw,
            provenance=provenance,
            description=description,
            fixed_end=True,
            randomize_start=program.randomize_start_s or None,
            randomize_duration=program.randomize_duration_s or None,
            group_id=group_id,
        )

    def withdraw(self, device_id: str, command_id: str) -> PublishedControl | None:
        """Cancel the controls scheduled or in force for one dispatch (cancelled, not
        deleted); returns the last one cancelled, if any."""
        der, _ = self._hosting(device_id)
        now = self._now()
        cancelled: _Control | None = None
        for control in der.controls:
            if control.device_id != device_id:
                continue
            if control.status is None and control.command_id == command_id and control.end > now:
                control.status = STATUS_CANCELLED
                control.status_time = now
                cancelled = control
        if cancelled is None:
            return None
        self._changed(der)
        return cancelled.published()

    def _add_control(
        self,
        member: _Der,
        base: DERControlBase,
        *,
        start: int,
        duration: int,
        power_kw: float | None,
        provenance: tuple[LimitSource, ...],
        description: str,
        fixed_end: bool = False,
        randomize_start: int | None = None,
        randomize_duration: int | None = None,
        group_id: str | None = None,
    ) -> PublishedControl:
        now = self._now()
        der = member.host or member
        program = member.program_for(group_id)
        control_id = self._next_control
        self._next_control += 1
        # mRIDs must never repeat across restarts (a client would take a new event for one it
        # already answered), so the number part is random rather than the control id.
        mrid = _mrid(3, uuid.uuid4().int >> 36, self.config.iana_pen)
        control = _Control(
            control_id=control_id,
            program_id=program.program_id,
            mrid=mrid,
            href=f"{der.base_href}/derp/{program.program_id}/derc/{control_id}",
            created=now,
            start=start,
            duration=duration,
            base=base,
            power_kw=power_kw,
            provenance=provenance,
            description=description[:32],
            status_time=now,
            randomize_start=randomize_start,
            randomize_duration=randomize_duration,
            fixed_end=fixed_end,
            device_id=member.enrollment.device_id,
        )
        der.controls.append(control)
        der.issued[mrid.upper()] = control
        while len(der.issued) > _MAX_HISTORY:
            del der.issued[next(iter(der.issued))]
        self._changed(der)
        return control.published()

    def release(self, device_id: str) -> PublishedControl | None:
        """Cancel the device's control in force: marked cancelled (not deleted), so the client
        sees the change and falls back to the DefaultDERControl; controls scheduled ahead for
        other dispatches stay. Returns what was cancelled, if anything."""
        der, _ = self._hosting(device_id)
        now = self._now()
        self._prune(der, now)
        cancelled: _Control | None = None
        for control in der.controls:
            if control.device_id != device_id:
                continue
            if control.status is None and control.start <= now:  # not those scheduled ahead
                control.status = STATUS_CANCELLED
                control.status_time = now
                cancelled = control
        if cancelled is None:
            return None
        self._changed(der)
        return cancelled.published()

    # ----------------------------------------------------------------------- DRLC (§10.4)

    def publish_load_control(
        self,
        device_id: str,
        duty_cycle_pct: int,
        *,
        provenance: tuple[LimitSource, ...] = (),
        description: str = "",
    ) -> drlc.LoadControl:
        """Cap a thermal load's duty cycle with an EndDeviceControl in force from now for the
        device's control duration; it supersedes the one in force, or renews it when that one
        caps the same and is past half its time."""
        der, member = self._hosting(device_id)
        category = member.enrollment.device_category
        if category is None:
            raise ValueError(f"{device_id!r} was not enrolled as a load (device_category)")
        if not 0 <= duty_cycle_pct <= 100:
            raise ValueError(f"duty cycle {duty_cycle_pct} % outside 0..100")
        now = self._now()
        duration = member.enrollment.control_duration_s
        der.load_controls = [c for c in der.load_controls if c.end > now]
        live = [c for c in der.load_controls if c.device_id == device_id and c.in_force(now)]
        for control in live:
            if control.duty_cycle_pct == duty_cycle_pct and now < control.start + duration // 2:
                return control  # the same cap, still fresh
        for control in live:
            control.status, control.status_time = drlc.STATUS_SUPERSEDED, now
        control = drlc.LoadControl(
            control_id=self._next_control,
            mrid=_mrid(6, self._next_control, self.config.iana_pen),
            device_id=device_id,
            device_category=category,
            created=now,
            start=now,
            duration=duration,
            duty_cycle_pct=duty_cycle_pct,
            provenance=provenance,
            description=description or f"duty cycle at most {duty_cycle_pct} %",
        )
        self._next_control += 1
        der.load_controls.append(control)
        self._load_controls_changed(der)
        log.info(
            "2030.5 EndDeviceControl %s: %s at most %d %%", control.mrid, device_id, duty_cycle_pct
        )
        return control

    def release_load_control(self, device_id: str) -> drlc.LoadControl | None:
        """Cancel the thermal load's EndDeviceControl in force (the device runs freely)."""
        der, _ = self._hosting(device_id)
        now = self._now()
        cancelled = None
        for control in der.load_controls:
            if control.device_id == device_id and control.in_force(now):
                control.status, control.status_time = drlc.STATUS_CANCELLED, now
                cancelled = control
        if cancelled is not None:
            self._load_controls_changed(der)
        return cancelled

    def _load_controls_changed(self, der: _Der) -> None:
        """Stale cached documents; the subscribers of its EndDeviceControlLists are told."""
        self._touch(der)
        now = self._now()
        for sub in self._subscriptions_of(der):
            if sub.kind in ("edc", "actedc"):
                active = sub.kind == "actedc"
                controls = der.load_controls
                limit = sub.model.limit
                model = drlc.control_list(der.base_href, controls, now, 0, limit, active=active)
                self._enqueue(sub, model)
        self._notify_wake.set()

    def load_control(self, device_id: str) -> drlc.LoadControl | None:
        """The thermal load's EndDeviceControl in force, if any."""
        der, _ = self._hosting(device_id)
        now = self._now()
        live = [c for c in der.load_controls if c.device_id == device_id and c.in_force(now)]
        return max(live, key=lambda c: c.control_id, default=None)

    @staticmethod
    def _has_loads(der: _Der) -> bool:
        return any(d.enrollment.device_category is not None for d in der.ders)

    def _own_drp(self, request: web.Request) -> _Der:
        der = self._own(request)
        if not self._has_loads(der):
            raise _HttpError(404, "no DemandResponseProgram for this EndDevice")
        if "p" in request.match_info and int(request.match_info["p"]) != drlc.DRP_ID:
            raise _HttpError(404, "no such DemandResponseProgram")
        return der

    def _drp_model(self, der: _Der, now: int) -> DemandResponseProgram:
        """At the primacy of the EndDevice's first program (its group's)."""
        mrid = _mrid(5, der.edev_id, self.config.iana_pen)
        primacy = der.primary_program().primacy
        return drlc.program(der.base_href, mrid, der.load_controls, now, primacy)

    @staticmethod
    def _load_boundary(der: _Der, now: int) -> int | None:
        times = [c.end for c in der.load_controls] + [
            c.start for c in der.load_controls if c.start > now
        ]
        return min((t for t in times if t > now), default=None)

    async def _get_drp_list(self, request: web.Request) -> web.Response:
        der = self._own(request)
        start, limit, after = self._paging(request)

        def build(now: int) -> tuple[Sep2Model, int | None]:
            every = (
                [self._drp_model(der, now)]
                if self._has_loads(der)
                else []
            )
            page = tuple(every[start : start + limit])
            model = DemandResponseProgramList(
                href=f"{der.base_href}/drp",
                all=len(every),
                results=len(page),
                poll_rate=self.der_poll_rate_s,
                items=page,
            )
            return model, self._load_boundary(der, now)

        return self._cached(request, der, build, (start, limit, after))

    async def _get_drp(self, request: web.Request) -> web.Response:
        der = self._own_drp(request)

        def build(now: int) -> tuple[Sep2Model, int | None]:
            model = self._drp_model(der, now)
            return model, self._load_boundary(der, now)

        return self._cached(request, der, build)

    async def _get_edc_list(self, request: web.Request) -> web.Response:
        der = self._own_drp(request)
        start, limit, after = self._paging(request)
        active = request.path.endswith("/actedc")

        def build(now: int) -> tuple[Sep2Model, int | None]:
            der.load_controls = [c for c in der.load_controls if c.end > now]
            model = drlc.control_list(
                der.base_href, der.load_controls, now, start, limit, active=active
            )
            return model, self._load_boundary(der, now)

        return self._cached(request, der, build, (start, limit, after))

    async def _get_edc(self, request: web.Request) -> web.Response:
        der = self._own_drp(request)
        wanted = int(request.match_info["c"])
        control = next((c for c in der.load_controls if c.control_id == wanted), None)
        if control is None:
            raise _HttpError(404, "no such EndDeviceControl")

        def build(now: int) -> tuple[Sep2Model, int | None]:
            return drlc.end_device_control(der.base_href, control, now), self._load_boundary(
                der, now
            )

        return self._cached(request, der, build)

    def _in_force(self, der: _Der, now: int, device_id: str) -> _Control | None:
        live = [
            c
            for c in der.controls
            if c.device_id == device_id and c.status is None and c.start <= now < c.end
        ]
        return max(live, key=lambda c: (c.created, c.control_id), default=None)

    def snapshot(self, device_id: str) -> DerSnapshot:
        """What the client last reported, and the control in force now."""
        der, member = self._hosting(device_id)
        now = self._now()
        der_power = site_power = None
        for mirror in der.mirrors.values():
            sample = mirror.power
            if sample is None:
                continue
            if mirror.role & _ROLE_DER:
                if der_power is None or sample.received_at > der_power.received_at:
                    der_power = sample
            elif mirror.role & _ROLE_PREMISES and (
                site_power is None or sample.received_at > site_power.received_at
            ):
                site_power = sample
        control = self._in_force(der, now, device_id)
        return DerSnapshot(
            capability=member.capability,
            settings=member.settings,
            status=member.status,
            availability=member.availability,
            der_power=der_power,
            site_power=site_power,
            active_control=None if control is None else control.published(),
            last_seen=der.last_seen,
            connection_point_id=der.connection_point_id,
        )

    def responses(self, device_id: str) -> tuple[Sep2ResponseRecord, ...]:
        """Responses the device POSTed, oldest first (the last 256)."""
        der, _ = self._hosting(device_id)
        return tuple(record for _, _, record in der.responses if record.device_id == device_id)

    # ----------------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the 2030.5 server is not started")
        return self._port

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls is not None else "http"
        host = self.config.host
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    def make_app(self) -> web.Application:
        """The aiohttp application (routes + error and identity handling)."""
        app = web.Application(
            client_max_size=self.config.max_body_bytes,
            middlewares=[self._error_middleware, self._quota_middleware],
        )
        r = app.router
        get = [
            ("/dcap", self._get_dcap),
            ("/tm", self._get_time),
            ("/edev/{e:\\d+}", self._get_edev),
            ("/edev/{e:\\d+}/rg", self._get_registration),
            ("/edev/{e:\\d+}/fsa", self._get_fsa_list),
            ("/edev/{e:\\d+}/fsa/{f:\\d+}", self._get_fsa),
            ("/edev/{e:\\d+}/fsa/{f:\\d+}/derp", self._get_derp_list),
            ("/edev/{e:\\d+}/derp", self._get_derp_list),
            ("/edev/{e:\\d+}/derp/{p:\\d+}", self._get_derp),
            ("/edev/{e:\\d+}/derp/{p:\\d+}/derc", self._get_derc_list),
            ("/edev/{e:\\d+}/derp/{p:\\d+}/actderc", self._get_actderc_list),
            ("/edev/{e:\\d+}/derp/{p:\\d+}/derc/{c:\\d+}", self._get_derc),
            ("/edev/{e:\\d+}/derp/{p:\\d+}/dderc", self._get_dderc),
            ("/edev/{e:\\d+}/der", self._get_der_list),
            ("/edev/{e:\\d+}/der/{d:\\d+}", self._get_der),
            ("/edev/{e:\\d+}/der/{d:\\d+}/derp", self._get_derp_list),
            ("/edev/{e:\\d+}/rsps", self._get_rsps_list),
            ("/edev/{e:\\d+}/rsps/{r:\\d+}", self._get_rsps),
            ("/edev/{e:\\d+}/rsps/{r:\\d+}/rsp/{n:\\d+}", self._get_response),
        ]
        drp = "/edev/{e:\\d+}/drp"
        get += [
            (drp, self._get_drp_list),
            (drp + "/{p:\\d+}", self._get_drp),
            (drp + "/{p:\\d+}/edc", self._get_edc_list),
            (drp + "/{p:\\d+}/actedc", self._get_edc_list),
            (drp + "/{p:\\d+}/edc/{c:\\d+}", self._get_edc),
        ]
        tp = "/edev/{e:\\d+}/tp"
        rc = tp + "/{t:\\d+}/rc/{r:\\d+}"
        get += [
            (tp, self._get_tariff_profiles),
            (tp + "/{t:\\d+}", self._get_tariff_profile),
            (tp + "/{t:\\d+}/rc", self._get_rate_components),
            (tp + "/{t:\\d+}/ctti", self._get_time_tariff_intervals),
            (rc, self._get_rate_component),
            (rc + "/tti", self._get_time_tariff_intervals),
            (rc + "/acttti", self._get_time_tariff_intervals),
            (rc + "/tti/{i:\\d+}", self._get_time_tariff_interval),
            (rc + "/tti/{i:\\d+}/cti", self._get_consumption_tariff_intervals),
            (rc + "/tti/{i:\\d+}/cti/{c:\\d+}", self._get_consumption_tariff_intervals),
            ("/rt/{r:\\d+}", self._get_reading_type),
        ]
        for path, handler in get:
            r.add_get(path, handler)
        r.add_route("GET", "/edev", self._get_edev_list)
        r.add_route("POST", "/edev", self._post_edev)
        r.add_get("/edev/{e:\\d+}/cp", self._get_connection_point)
        r.add_put("/edev/{e:\\d+}/cp", self._put_connection_point)
        r.add_post("/edev/{e:\\d+}/cp", self._put_connection_point)
        for kind in ("dercap", "derg", "ders", "dera"):
            path = f"/edev/{{e:\\d+}}/der/{{d:\\d+}}/{kind}"
            r.add_get(path, self._get_der_resource)
            r.add_put(path, self._put_der_resource)
        r.add_get("/edev/{e:\\d+}/rsps/{r:\\d+}/rsp", self._get_response_list)
        r.add_post("/edev/{e:\\d+}/rsps/{r:\\d+}/rsp", self._post_response)
        r.add_get("/edev/{e:\\d+}/sub", self._get_subscription_list)
        r.add_post("/edev/{e:\\d+}/sub", self._post_subscription)
        r.add_get("/edev/{e:\\d+}/sub/{s:\\d+}", self._get_subscription)
        r.add_delete("/edev/{e:\\d+}/sub/{s:\\d+}", self._delete_subscription)
        r.add_get("/mup", self._get_mup_list)
        r.add_post("/mup", self._post_mup)
        r.add_get("/mup/{m:\\d+}", self._get_mup)
        r.add_post("/mup/{m:\\d+}", self._post_mmr)
        return app

    async def start(self) -> None:
        """Bind and serve. Idempotent (every adapter's ``connect`` may call it)."""
        async with self._start_lock:
            if self._runner is not None:
                return
            if self._state is not None and self._stored is None:
                try:
                    stored = await asyncio.to_thread(self._state.load)
                except (sqlite3.Error, OSError) as exc:
                    raise OSError(f"2030.5 server state {self._state.path}: {exc}") from exc
                self._restore(stored)
            tls = self.config.tls
            ssl_context: ssl.SSLContext | None = None
            if tls is not None:
                from protocols.tls import (
                    allows_client_auth,
                    client_ssl_context,
                    server_ssl_context,
                )

                # Reads key files: keep the blocking part off the loop.
                ssl_context = await asyncio.to_thread(
                    server_ssl_context, tls.cert_file, tls.key_file, tls.ca_file
                )
                # Notifications to https URIs go out with a clientAuth certificate and trust
                # only receivers chained to the same CA as the clients.
                cert_file, key_file = tls.notification_identity()
                if not await asyncio.to_thread(allows_client_auth, cert_file):
                    log.warning(
                        "2030.5 Notifications are sent with %s, whose extended key usage lacks "
                        "clientAuth: receivers that verify client certificates will refuse "
                        "them (set [sep2_server.tls] notify_cert_file / notify_key_file)",
                        cert_file,
                    )
                self._notify_ssl = await asyncio.to_thread(
                    client_ssl_context, cert_file, key_file, tls.ca_file
                )
            runner = web.AppRunner(
                self.make_app(),
                access_log=None,
                keepalive_timeout=self.config.keepalive_timeout_s,
                shutdown_timeout=2.0,
            )
            await runner.setup()
            try:
                site = web.TCPSite(
                    runner,
                    self.config.host,
                    self.config.port,
                    ssl_context=ssl_context,
                    backlog=self.config.listen_backlog,
                )
                await site.start()
            except BaseException:
                await runner.cleanup()
                raise
            address = runner.addresses[0]
            self._port = int(address[1])
            self._runner = runner
            self._notifier = asyncio.create_task(self._notify_loop(), name="sep2-notifier")
            if self._state is not None:
                self._persist_stop = False
                self._persister = asyncio.create_task(self._persist_loop(), name="sep2-state")
            log.info("2030.5 server listening on %s", self.url)

    async def stop(self) -> None:
        """Stop serving and notifying (pending Notifications are dropped). Safe to call more
        than once."""
        async with self._start_lock:
            notifier, self._notifier = self._notifier, None
            if notifier is not None:
                notifier.cancel()
                await asyncio.wait({notifier})  # (a cancel of stop() itself propagates)
            runner, self._runner = self._runner, None
            if runner is not None:
                await runner.cleanup()
            persister, self._persister = self._persister, None
            if persister is not None:  # let it write what is still unsaved, then end
                self._persist_stop = True
                self._persist_wake.set()
                await asyncio.wait({persister})

    async def run(self) -> None:
        """Serve until cancelled (for a task in the gateway's TaskGroup)."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.stop())

    async def __aenter__(self) -> Sep2Server:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------------- HTTP plumbing

    def _reply(
        self,
        model: Sep2Model | None,
        status: int = 200,
        *,
        location: str | None = None,
    ) -> web.Response:
        headers = {"Location": location} if location else {}
        if model is None:
            return web.Response(status=status, headers=headers)
        # Setting Content-Type in the headers (not content_type=) keeps aiohttp from appending
        # "; charset=utf-8": 2030.5 clients compare the media type exactly.
        headers["Content-Type"] = MEDIA_TYPE
        return web.Response(
            body=encode(model, csipaus=self.config.csipaus), status=status, headers=headers
        )

    def _list(
        self,
        request: web.Request,
        der: _Der | None,
        list_type: Callable[..., Sep2Model],
        href: str,
        items: Callable[[], list[Any]],
        poll_rate_s: int | None = None,
    ) -> web.Response:
        """A list resource whose items do not depend on time: one page of ``items()``."""
        start, limit, after = self._paging(request)

        def build(_now: int) -> tuple[Sep2Model, None]:
            every = items()
            page = tuple(every[start : start + limit])
            rate = {} if poll_rate_s is None else {"poll_rate": poll_rate_s}
            return list_type(href=href, all=len(every), results=len(page), items=page, **rate), None

        return self._cached(request, der, build, (start, limit, after))

    def _cached(
        self,
        request: web.Request,
        der: _Der | None,
        build: Callable[[int], tuple[Sep2Model, int | None]],
        paging: tuple[int, int, int | None] = (0, 0, None),
    ) -> web.Response:
        """Answer a GET with cached bytes, building and encoding the document only when they
        are missing or stale.

        ``build(now)`` returns the document and the epoch second from which it would read
        differently by time alone (None: only a change of state alters it). The key is the path,
        the asking client's EndDevice (``/dcap``, ``/edev`` and ``/mup`` are per client on a
        shared path) and the paging; nothing else in the request changes the bytes (``Accept``
        is not negotiated: every body is ``application/sep+xml``). Call this only once the
        client is known to own the resource: the key names the client, it does not authorise.
        """
        now = self._now()
        start, limit, after = paging
        key: _CacheKey = (request.path, None if der is None else der.edev_id, start, limit, after)
        entry = self._cache.get(key, 0 if der is None else der.generation, now)
        if entry is None:
            model, valid_until = build(now)
            body = encode(model, csipaus=self.config.csipaus)
            etag = f'"{hashlib.blake2b(body, digest_size=12).hexdigest()}"'
            # The generation after building: building may prune a lapsed control (a change).
            generation = 0 if der is None else der.generation
            entry = _CachedBody(generation, now, valid_until, body, etag)
            self._cache.put(key, entry)
        if_none_match = request.headers.get("If-None-Match")
        if if_none_match is not None and _etag_matches(if_none_match, entry.etag):
            return web.Response(status=304, headers={"ETag": entry.etag})
        return web.Response(
            body=entry.body, headers={"Content-Type": MEDIA_TYPE, "ETag": entry.etag}
        )

    @staticmethod
    def _next_boundary(der: _Der, now: int) -> int | None:
        """When ``der``'s control documents next read differently by time alone: a scheduled
        control turning active, or a listed one lapsing out of the lists."""
        times = [c.end for c in der.controls]
        times += [c.start for c in der.controls if c.status is None and c.start > now]
        return min(times, default=None)

    def _error(
        self, status: int, message: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        response = self._reply(Error(reason_code=0, message=message), status)
        for name, value in (headers or {}).items():
            response.headers[name] = value
        return response

    @web.middleware
    async def _error_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await self._answer(request, handler)
        self.answered[response.status] += 1
        return response

    async def _answer(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except _HttpError as exc:
            if exc.status >= 500:
                log.error("2030.5 %s %s: %s", request.method, request.path, exc.message)
            elif exc.status == 403 and self.on_refused is not None:
                self.on_refused(
                    f"sep2:{self._who(request)}",
                    "forbidden",
                    f"{request.method} {request.path[:200]}: {exc.message[:200]}",
                )
            return self._error(exc.status, exc.message)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return self._error(exc.status, exc.reason, headers)
        except Exception:
            # A bug of ours: log it, answer in 2030.5 form, and keep serving everyone else.
            log.exception("2030.5 %s %s failed", request.method, request.path)
            return self._error(500, "internal server error")

    @web.middleware
    async def _quota_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        source = self._who(request)
        if self.quotas.take(source, time.monotonic()):
            return await handler(request)
        if source not in self._quota_logged and len(self._quota_logged) < 10_000:
            self._quota_logged.add(source)
            log.warning(
                "2030.5 client %s: more than %g requests/s (burst %d); answered 429 (logged once)",
                source,
                self.quotas.rate_per_s,
                self.quotas.burst,
            )
        if self.on_refused is not None:
            self.on_refused(
                f"sep2:{source}", "rate_limited", f"{request.method} {request.path[:200]}"
            )
        retry_after = max(1, math.ceil(1.0 / self.quotas.rate_per_s))
        return self._error(
            429, "too many requests: slow down to the pollRate", {"Retry-After": str(retry_after)}
        )

    def _who(self, request: web.Request) -> str:
        try:
            lfdi = self._lfdi(request)
        except _HttpError:
            lfdi = None
        return lfdi or f"address:{request.remote}"

    def _lfdi(self, request: web.Request) -> str | None:
        """The requesting client's LFDI (uppercase), from its certificate or the dev header."""
        if self.config.tls is not None:
            ssl_object = (
                request.transport.get_extra_info("ssl_object") if request.transport else None
            )
            if ssl_object is None:
                return None
            der = ssl_object.getpeercert(binary_form=True)
            if not der:
                return None
            return lfdi_from_fingerprint(hashlib.sha256(der).hexdigest())
        header = self.config.dev_lfdi_header
        raw = request.headers.get(header) if header else None
        if raw is None:
            return None
        try:
            return normalize_lfdi(raw)
        except Sep2Error:
            raise _HttpError(400, f"header {header} is not an LFDI (40 hex digits)") from None

    def _client(self, request: web.Request) -> tuple[str | None, _Der | None]:
        lfdi = self._lfdi(request)
        der = self._by_lfdi.get(lfdi) if lfdi is not None else None
        if der is not None:
            der.last_seen = self._now_dt()
        return lfdi, der

    def _own(self, request: web.Request) -> _Der:
        """The client's own DER, if ``{e}`` in the path is its EndDevice (or one an aggregator
        client acts for); 403 otherwise."""
        lfdi, der = self._client(request)
        edev = int(request.match_info["e"])
        if der is None and lfdi in self._aggregators:
            der = next((d for d in self._aggregated(lfdi) if d.edev_id == edev), None)
        if der is None or der.edev_id != edev:
            raise _forbidden(lfdi)
        return der

    def _aggregated(self, lfdi: str | None) -> list[_Der]:
        """The enrolled EndDevices an aggregator client acts for, by EndDevice id."""
        lfdis = self._aggregators.get(lfdi or "", ())
        found = [self._by_lfdi[x] for x in lfdis if x in self._by_lfdi]
        return sorted(found, key=lambda d: d.edev_id)

    def _uncached(self, request: web.Request, model: Sep2Model) -> web.Response:
        """An aggregator's DeviceCapability / EndDeviceList: built for each request (the cache
        keys a document by one EndDevice; an aggregator's spans several)."""
        del request
        return web.Response(
            body=encode(model, csipaus=self.config.csipaus),
            headers={"Content-Type": MEDIA_TYPE},
        )

    def _paging(self, request: web.Request) -> tuple[int, int, int | None]:
        def number(name: str) -> int | None:
            raw = request.query.get(name)
            if raw is None:
                return None
            if not _INT_QUERY.match(raw):
                raise _HttpError(400, f"query parameter {name}={raw!r} is not a whole number")
            return int(raw)

        start = number("s") or 0
        limit = number("l")
        limit = self.config.default_page_limit if limit is None else limit
        return start, min(limit, self.config.max_page_limit), number("a")

    async def _body(self, request: web.Request, cls: type[M]) -> M:
        """Read and decode a request body completely before anything changes."""
        if not check_media_type(request.headers.get("Content-Type")):
            raise _HttpError(415, f"Content-Type must be {MEDIA_TYPE}")
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _HttpError(413, f"body of {request.content_length} bytes exceeds {limit} bytes")
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                data = await request.read()
        except TimeoutError:
            raise _HttpError(408, "request body not received in time") from None
        if not data:
            raise _HttpError(400, f"empty body; expected a {cls.xml_tag}")
        try:
            return decode_as(cls, data, max_bytes=limit)
        except DocumentTooLarge as exc:
            raise _HttpError(413, str(exc)) from None
        except Sep2Error as exc:
            raise _HttpError(400, str(exc)) from None

    # ----------------------------------------------------------------------- discovery

    async def _get_dcap(self, request: web.Request) -> web.Response:
        lfdi, der = self._client(request)
        if der is None and lfdi in self._aggregators:
            return self._uncached(
                request,
                DeviceCapability(
                    href="/dcap",
                    poll_rate=self.poll_rate_s,
                    time_link=Link(href="/tm"),
                    end_device_list_link=ListLink(href="/edev", all=len(self._aggregated(lfdi))),
                    mirror_usage_point_list_link=ListLink(
                        href="/mup", all=sum(len(d.mirrors) for d in self._aggregated(lfdi))
                    ),
                ),
            )

        def build(_now: int) -> tuple[Sep2Model, None]:
            mirrors = 0 if der is None else len(der.mirrors)
            return DeviceCapability(
                href="/dcap",
                poll_rate=self.poll_rate_s if der is not None else None,
                time_link=Link(href="/tm"),
                end_device_list_link=ListLink(href="/edev", all=0 if der is None else 1),
                mirror_usage_point_list_link=ListLink(href="/mup", all=mirrors),
            ), None

        return self._cached(request, der, build)

    async def _get_time(self, request: web.Request) -> web.Response:
        self._client(request)
        # Never cached: it is the clock. UTC with no DST: the controls carry epoch times, so
        # local-time fields add only risk.
        return self._reply(
            Time(
                href="/tm",
                current_time=self._now(),
                dst_end_time=0,
                dst_offset=0,
                dst_start_time=0,
                quality=4,
                tz_offset=0,
            )
        )

    def _end_device(self, der: _Der) -> EndDevice:
        base = der.base_href
        return EndDevice(
            href=base,
            der_list_link=ListLink(href=f"{base}/der", all=1),
            lfdi=der.lfdi,
            sfdi=der.sfdi,
            changed_time=der.changed_time,
            enabled=True,
            function_set_assignments_list_link=ListLink(
                href=f"{base}/fsa", all=len(self._fsas(der))
            ),
            registration_link=Link(href=f"{base}/rg") if der.enrollment.pin is not None else None,
            subscription_list_link=ListLink(
                href=f"{base}/sub", all=len(self._subscriptions_of(der))
            ),
            connection_point_link=Link(href=f"{base}/cp"),
        )

    async def _get_edev_list(self, request: web.Request) -> web.Response:
        lfdi, der = self._client(request)
        if der is None and lfdi in self._aggregators:
            start, limit, _ = self._paging(request)
            every = self._aggregated(lfdi)
            page = tuple(self._end_device(d) for d in every[start : start + limit])
            return self._uncached(
                request,
                EndDeviceList(
                    href="/edev",
                    all=len(every),
                    results=len(page),
                    poll_rate=self.poll_rate_s,
                    items=page,
                ),
            )
        return self._list(
            request,
            der,
            EndDeviceList,
            "/edev",
            lambda: [] if der is None else [self._end_device(der)],
            self.poll_rate_s,
        )

    async def _get_edev(self, request: web.Request) -> web.Response:
        der = self._own(request)
        return self._cached(request, der, lambda _: (self._end_device(der), None))

    async def _post_edev(self, request: web.Request) -> web.Response:
        """In-band registration. DERs are enrolled by configuration (an unknown device is never
        accepted), so this only confirms the client's own, already-enrolled EndDevice."""
        lfdi, der = self._client(request)
        posted = await self._body(request, EndDevice)
        if der is None:
            raise _forbidden(lfdi)
        if (posted.lfdi is not None and not same_lfdi(posted.lfdi, der.lfdi)) or (
            posted.sfdi != der.sfdi
        ):
            raise _HttpError(403, "lFDI/sFDI do not match the client certificate")
        if not der.posted_registration:
            der.posted_registration = True
            self._touch(der)
        # A repeat (an inverter restarted, or never saw our first answer) is pointed at the
        # EndDevice it already has, as before: envoy answers 409, which leaves such a client
        # without its EndDevice's address.
        return self._reply(None, 201, location=der.base_href)

    async def _get_registration(self, request: web.Request) -> web.Response:
        der = self._own(request)
        pin = der.enrollment.pin
        if pin is None:
            raise _HttpError(404, "no Registration for this EndDevice")
        return self._cached(
            request,
            der,
            lambda _: (
                Registration(
                    href=f"{der.base_href}/rg",
                    date_time_registered=der.registered_at,
                    pin=with_check_digit(pin),
                ),
                None,
            ),
        )

    async def _get_fsa_list(self, request: web.Request) -> web.Response:
        der = self._own(request)
        return self._list(
            request,
            der,
            FunctionSetAssignmentsList,
            f"{der.base_href}/fsa",
            lambda: self._fsa_items(der),
            self.poll_rate_s,
        )

    def _fsa_items(self, der: _Der) -> list[FunctionSetAssignments]:
        """One FunctionSetAssignments per program of the EndDevice, strongest first. The
        EndDevice's DRLC program hangs off the first; its pricing off the FSA of the group whose
        price schedule it is served (the first FSA for the gateway-wide one), so a client that
        walks every FSA meets each program and each TariffProfile once."""
        fsas = self._fsas(der)
        if not fsas:
            return []
        view = self._tariff_view(der)
        scope = self._tariffs.scope_for([p.group_id for _, p in fsas])
        priced = next((f for f, p in fsas if p.group_id == scope), fsas[0][0])
        return [
            self._fsa(der, fsa_id, program, first=i == 0, view=view if fsa_id == priced else None)
            for i, (fsa_id, program) in enumerate(fsas)
        ]

    def _fsa(
        self,
        der: _Der,
        fsa_id: int,
        program: _Program,
        *,
        first: bool,
        view: TariffView | None,
    ) -> FunctionSetAssignments:
        href = f"{der.base_href}/fsa/{fsa_id}"
        return FunctionSetAssignments(
            href=href,
            der_program_list_link=ListLink(href=f"{href}/derp", all=1),
            demand_response_program_list_link=(
                ListLink(href=f"{der.base_href}/drp", all=1)
                if first and self._has_loads(der)
                else None
            ),
            tariff_profile_list_link=(
                None
                if view is None
                else ListLink(href=f"{der.base_href}/tp", all=len(view.profiles))
            ),
            time_link=Link(href="/tm"),
            # One group's assignment: the same mRID under every EndDevice it is made to (as
            # its DERProgram's), so an aggregator sees one FSA shared by its EndDevices.
            mrid=_mrid(4, program.program_id, self.config.iana_pen),
            description=program.description,
        )

    def _one_fsa(self, der: _Der, fsa_id: int) -> FunctionSetAssignments:
        href = f"{der.base_href}/fsa/{fsa_id}"
        found = next((f for f in self._fsa_items(der) if f.href == href), None)
        if found is None:
            raise _HttpError(404, "no such FunctionSetAssignments")
        return found

    def _fsa_program(self, der: _Der, fsa_id: int) -> _Program:
        found = next((p for f, p in self._fsas(der) if f == fsa_id), None)
        if found is None:
            raise _HttpError(404, "no such FunctionSetAssignments")
        return found

    async def _get_fsa(self, request: web.Request) -> web.Response:
        der = self._own(request)
        fsa = self._one_fsa(der, int(request.match_info["f"]))
        return self._cached(request, der, lambda _: (fsa, None))

    # ----------------------------------------------------------------------- pricing (§10.5)

    def _own_tariff(self, request: web.Request) -> tuple[_Der, TariffView, int, int]:
        """The client's view, its profile ``t`` and component ``r`` (0 when not in the path);
        404 for ones it is not served."""
        der = self._own(request)
        view = self._tariff_view(der)
        t = int(request.match_info.get("t", "0"))
        r = int(request.match_info.get("r", "0"))
        if "t" in request.match_info and t not in view.profiles:
            raise _HttpError(404, "no such TariffProfile for this EndDevice")
        if "r" in request.match_info and r not in COMPONENTS:
            raise _HttpError(404, "no such RateComponent")
        return der, view, t, r

    async def _get_tariff_profiles(self, request: web.Request) -> web.Response:
        der, view, _, _ = self._own_tariff(request)
        start, limit, after = self._paging(request)

        def build(_now: int) -> tuple[Sep2Model, None]:
            return view.profile_list(start, limit, self.poll_rate_s), None

        return self._cached(request, der, build, (start, limit, after))

    async def _get_tariff_profile(self, request: web.Request) -> web.Response:
        der, view, t, _ = self._own_tariff(request)
        return self._cached(request, der, lambda _: (view.profile(t), None))

    async def _get_rate_components(self, request: web.Request) -> web.Response:
        der, view, t, _ = self._own_tariff(request)
        start, limit, after = self._paging(request)
        return self._cached(
            request, der, lambda _: (view.components(t, start, limit), None), (start, limit, after)
        )

    async def _get_rate_component(self, request: web.Request) -> web.Response:
        der, view, t, r = self._own_tariff(request)
        return self._cached(request, der, lambda _: (view.component(t, r), None))

    async def _get_time_tariff_intervals(self, request: web.Request) -> web.Response:
        der, view, t, r = self._own_tariff(request)
        start, limit, after = self._paging(request)
        kind = request.path.rsplit("/", 1)[1]

        def build(now: int) -> tuple[Sep2Model, int | None]:
            if kind == "ctti":
                model = view.combined(t, now, start, limit)
            else:
                model = view.intervals(t, r, now, start, limit, active=kind == "acttti")
            return model, view.next_boundary(now)

        return self._cached(request, der, build, (start, limit, after))

    def _own_interval(self, request: web.Request) -> tuple[_Der, TariffView, int, int, int]:
        der, view, t, r = self._own_tariff(request)
        i = int(request.match_info["i"]) - 1
        if not view.has_interval(t, i):
            raise _HttpError(404, "no such TimeTariffInterval")
        return der, view, t, r, i

    async def _get_time_tariff_interval(self, request: web.Request) -> web.Response:
        der, view, t, r, i = self._own_interval(request)

        def build(now: int) -> tuple[Sep2Model, int | None]:
            return view.interval(t, r, i, now), view.next_boundary(now)

        return self._cached(request, der, build)

    async def _get_consumption_tariff_intervals(self, request: web.Request) -> web.Response:
        der, view, t, r, i = self._own_interval(request)
        if "c" in request.match_info:
            if request.match_info["c"] != "1":
                raise _HttpError(404, "no such ConsumptionTariffInterval")
            return self._cached(request, der, lambda _: (view.consumption(t, r, i), None))
        return self._cached(request, der, lambda _: (view.consumption_list(t, r, i), None))

    async def _get_reading_type(self, request: web.Request) -> web.Response:
        r = int(request.match_info["r"])
        if r not in COMPONENTS:
            raise _HttpError(404, "no such ReadingType")
        _, der = self._client(request)
        return self._cached(request, der, lambda _: (reading_type(r), None))

    # ----------------------------------------------------------------------- programs & controls

    def _listed_controls(self, der: _Der, program: _Program, now: int) -> list[_Control]:
        self._prune(der, now)
        return self._sorted_controls(der, program)

    @staticmethod
    def _sorted_controls(der: _Der, program: _Program) -> list[_Control]:
        controls = [c for c in der.controls if c.program_id == program.program_id]
        # envoy's order: start ascending, then newest first, so a superseding control precedes
        # the one it supersedes.
        controls.sort(key=lambda c: (c.start, -c.created, -c.control_id))
        return controls

    def _der_program(self, der: _Der, program: _Program, now: int) -> DERProgram:
        href = f"{der.base_href}/derp/{program.program_id}"
        controls = self._listed_controls(der, program, now)
        active = sum(1 for c in controls if c.current_status(now) == STATUS_ACTIVE)
        return DERProgram(
            href=href,
            mrid=_mrid(2, program.program_id, self.config.iana_pen),
            description=program.description,
            active_der_control_list_link=ListLink(href=f"{href}/actderc", all=active),
            default_der_control_link=Link(href=f"{href}/dderc"),
            der_control_list_link=ListLink(href=f"{href}/derc", all=len(controls)),
            primacy=program.primacy,
        )

    def _own_program(self, request: web.Request) -> tuple[_Der, _Program]:
        der = self._own(request)
        program = der.program(int(request.match_info["p"]))
        if program is None:
            raise _HttpError(404, "no such DERProgram for this EndDevice")
        return der, program

    async def _get_derp_list(self, request: web.Request) -> web.Response:
        der = self._own(request)
        programs = der.edev_programs()
        if "f" in request.match_info:  # the program of one FunctionSetAssignments
            programs = [self._fsa_program(der, int(request.match_info["f"]))]
        if "d" in request.match_info:  # the programs associated with one DER
            programs = self._own_der(request).programs
        start, limit, after = self._paging(request)

        def build(now: int) -> tuple[Sep2Model, int | None]:
            # (a DERProgram counts the active controls: it changes with time too)
            model = self._program_list(der, request.path, now, start, limit, programs)
            return model, self._next_boundary(der, now)

        return self._cached(request, der, build, (start, limit, after))

    def _program_list(
        self,
        der: _Der,
        href: str,
        now: int,
        start: int,
        limit: int,
        programs: list[_Program] | None = None,
    ) -> DERProgramList:
        every = der.edev_programs() if programs is None else programs
        programs = sorted(every, key=lambda p: (p.primacy, p.program_id))
        page = tuple(self._der_program(der, p, now) for p in programs[start : start + limit])
        return DERProgramList(
            href=href,
            all=len(programs),
            results=len(page),
            poll_rate=self.der_poll_rate_s,
            items=page,
        )

    def _program_list_model(self, der: _Der, sub: Subscription, now: int) -> DERProgramList:
        programs = None
        one = _ONE_DERS_PROGRAMS.match(sub.subscribed_resource)
        if one is not None:  # the programs associated with one DER of the EndDevice
            member = next((d for d in der.ders if d.der_id == int(one.group(1))), der)
            programs = member.programs
        fsa = _ONE_FSAS_PROGRAMS.match(sub.subscribed_resource)
        if fsa is not None:  # one FunctionSetAssignments' program (none once it is gone)
            fsa_id = int(fsa.group(1))
            programs = [p for f, p in self._fsas(der) if f == fsa_id]
        return self._program_list(der, sub.subscribed_resource, now, 0, sub.limit, programs)

    async def _get_derp(self, request: web.Request) -> web.Response:
        der, program = self._own_program(request)

        def build(now: int) -> tuple[Sep2Model, int | None]:
            return self._der_program(der, program, now), self._next_boundary(der, now)

        return self._cached(request, der, build)

    def _der_control(self, der: _Der, control: _Control, now: int) -> DERControl:
        return DERControl(
            href=control.href,
            reply_to=der.reply_to,
            response_required=_RESPONSE_REQUIRED,
            mrid=control.mrid,
            description=control.description or None,
            version=1,
            creation_time=control.created,
            event_status=EventStatus(
                current_status=control.current_status(now),
                date_time=control.status_time,
                potentially_superseded=False,
            ),
            interval=DateTimeInterval(duration=control.duration, start=control.start),
            randomize_duration=control.randomize_duration,
            randomize_start=control.randomize_start,
            der_control_base=control.base,
        )

    def _control_list(self, request: web.Request, *, suffix: str) -> web.Response:
        der, program = self._own_program(request)
        start, limit, after = self._paging(request)

        def build(now: int) -> tuple[Sep2Model, int | None]:
            self._prune(der, now)
            model = self._control_list_model(der, program, now, suffix, start, limit, after)
            return model, self._next_boundary(der, now)

        return self._cached(request, der, build, (start, limit, after))

    def _control_list_model(
        self,
        der: _Der,
        program: _Program,
        now: int,
        suffix: str,
        start: int,
        limit: int,
        after: int | None = None,
    ) -> DERControlList:
        """A page of a program's ``derc`` (every listed control) or ``actderc`` (active ones)."""
        controls = self._sorted_controls(der, program)
        if suffix == "actderc":
            controls = [c for c in controls if c.current_status(now) == STATUS_ACTIVE]
        if after is not None:
            # "a": only items whose primary key (interval start) is at or after that time.
            controls = [c for c in controls if c.start >= after]
        page = tuple(self._der_control(der, c, now) for c in controls[start : start + limit])
        return DERControlList(
            href=f"{der.base_href}/derp/{program.program_id}/{suffix}",
            subscribable=1,
            all=len(controls),
            results=len(page),
            items=page,
        )

    async def _get_derc_list(self, request: web.Request) -> web.Response:
        return self._control_list(request, suffix="derc")

    async def _get_actderc_list(self, request: web.Request) -> web.Response:
        return self._control_list(request, suffix="actderc")

    async def _get_derc(self, request: web.Request) -> web.Response:
        der, program = self._own_program(request)
        wanted = int(request.match_info["c"])

        def build(now: int) -> tuple[Sep2Model, int | None]:
            for control in self._listed_controls(der, program, now):
                if control.control_id == wanted:
                    return self._der_control(der, control, now), self._next_boundary(der, now)
            raise _HttpError(404, f"no DERControl {wanted} in this DERProgram")

        return self._cached(request, der, build)

    async def _get_dderc(self, request: web.Request) -> web.Response:
        der, program = self._own_program(request)
        # Always 200, with an empty DERControlBase when the group has no default (as envoy).
        # The default comes from the configuration: it changes only with a restart.
        return self._cached(request, der, lambda _: (self._default_control(der, program), None))

    def _default_control(self, der: _Der, program: _Program) -> DefaultDERControl:
        return DefaultDERControl(
            href=f"{der.base_href}/derp/{program.program_id}/dderc",
            mrid=_mrid(1, program.program_id, self.config.iana_pen),
            version=program.default_version % 65_536,
            der_control_base=program.default_base,
            set_grad_w=program.set_grad_w,
            subscribable=1,
        )

    # ----------------------------------------------------------------------- DER resources

    def _der_resource(self, der: _Der) -> DER:
        href = f"{der.base_href}/der/{der.der_id}"
        return DER(
            href=href,
            associated_der_program_list_link=ListLink(href=f"{href}/derp", all=len(der.programs)),
            der_availability_link=Link(href=f"{href}/dera"),
            der_capability_link=Link(href=f"{href}/dercap"),
            der_settings_link=Link(href=f"{href}/derg"),
            der_status_link=Link(href=f"{href}/ders"),
        )

    def _own_der(self, request: web.Request) -> _Der:
        """One DER of the client's own EndDevice, by its number in the DERList."""
        host = self._own(request)
        wanted = int(request.match_info["d"])
        der = next((d for d in host.ders if d.der_id == wanted), None)
        if der is None:
            raise _HttpError(404, "no such DER")
        return der

    async def _get_der_list(self, request: web.Request) -> web.Response:
        der = self._own(request)
        return self._list(
            request,
            der,
            DERList,
            f"{der.base_href}/der",
            lambda: [self._der_resource(d) for d in der.ders],
            self.der_poll_rate_s,
        )

    async def _get_der(self, request: web.Request) -> web.Response:
        der = self._own_der(request)
        return self._cached(request, der, lambda _: (self._der_resource(der), None))

    async def _get_der_resource(self, request: web.Request) -> web.Response:
        der = self._own_der(request)
        kind = request.path.rsplit("/", 1)[1]
        stored: Sep2Model | None = getattr(der, _DER_FIELDS[kind])
        if stored is None:
            raise _HttpError(404, f"{_DER_KINDS[kind].xml_tag} has not been PUT yet")
        return self._cached(request, der, lambda _: (stored, None))

    # ----------------------------------------------------------------------- CSIP-AUS site

    async def _get_connection_point(self, request: web.Request) -> web.Response:
        """The site's connection point (NMI). Before any PUT, 200 with an empty id (envoy)."""
        der = self._own(request)
        return self._cached(
            request,
            der,
            lambda _: (
                ConnectionPoint(
                    href=f"{der.base_href}/cp",
                    connection_point_id=der.connection_point_id or "",
                ),
                None,
            ),
        )

    async def _put_connection_point(self, request: web.Request) -> web.Response:
        """PUT (or POST) the NMI: 201 with its Location even when it only updates (envoy)."""
        der = self._own(request)
        posted = await self._body(request, ConnectionPoint)
        nmi = (posted.connection_point_id or "").strip()
        if len(nmi) > 32:
            raise _HttpError(400, "connectionPointId longer than 32 characters")
        if nmi != (der.connection_point_id or ""):
            der.connection_point_id = nmi or None
            self._touch(der)
        return self._reply(None, 201, location=f"{der.base_href}/cp")

    async def _put_der_resource(self, request: web.Request) -> web.Response:
        der = self._own_der(request)
        kind = request.path.rsplit("/", 1)[1]
        cls: type[Sep2Model] = _DER_KINDS[kind]
        model = await self._body(request, cls)
        setattr(der, _DER_FIELDS[kind], model.model_copy(update={"href": request.path}))
        self._touch(der)
        return self._reply(None, 204)

    # ----------------------------------------------------------------------- responses

    def _response_set(self, der: _Der) -> ResponseSet:
        href = f"{der.base_href}/rsps/{_RSPS_ID}"
        return ResponseSet(
            href=href,
            mrid=_mrid(0xA, der.edev_id, self.config.iana_pen),
            description="DER controls",
            response_list_link=ListLink(href=f"{href}/rsp", all=len(der.responses)),
        )

    async def _get_rsps_list(self, request: web.Request) -> web.Response:
        der = self._own(request)
        href = f"{der.base_href}/rsps"
        return self._list(request, der, ResponseSetList, href, lambda: [self._response_set(der)])

    def _own_rsps(self, request: web.Request) -> _Der:
        der = self._own(request)
        if int(request.match_info["r"]) != _RSPS_ID:
            raise _HttpError(404, "no such ResponseSet")
        return der

    async def _get_rsps(self, request: web.Request) -> web.Response:
        der = self._own_rsps(request)
        return self._cached(request, der, lambda _: (self._response_set(der), None))

    async def _get_response_list(self, request: web.Request) -> web.Response:
        der = self._own_rsps(request)
        start, limit, after = self._paging(request)

        def build(_now: int) -> tuple[Sep2Model, None]:
            newest_first = [
                Response.model_validate(r.model_dump()) for _, r, _ in reversed(der.responses)
            ]
            page = tuple(newest_first[start : start + limit])
            return ResponseList(
                href=der.reply_to, all=len(newest_first), results=len(page), items=page
            ), None

        return self._cached(request, der, build, (start, limit, after))

    async def _get_response(self, request: web.Request) -> web.Response:
        der = self._own_rsps(request)
        wanted = int(request.match_info["n"])

        def build(_now: int) -> tuple[Sep2Model, None]:
            for number, response, _ in der.responses:
                if number == wanted:
                    return DERControlResponse.model_validate(response.model_dump()), None
            raise _HttpError(404, f"no Response {wanted}")

        return self._cached(request, der, build)

    async def _post_response(self, request: web.Request) -> web.Response:
        der = self._own_rsps(request)
        posted = await self._body(request, Response)
        if not same_lfdi(posted.end_device_lfdi, der.lfdi):
            raise _HttpError(400, f"endDeviceLFDI {posted.end_device_lfdi} is not this client's")
        control = der.issued.get(posted.subject.upper())
        if control is None:
            raise _HttpError(400, f"subject {posted.subject} is not a control of this EndDevice")
        if posted.status is None:
            raise _HttpError(400, "Response without status")
        number = der.next_response_id
        der.next_response_id += 1
        href = f"{der.reply_to}/{number}"
        created = posted.created_date_time
        record = Sep2ResponseRecord(
            device_id=control.device_id or der.enrollment.device_id,
            control_mrid=control.mrid,
            control_href=control.href,
            status=posted.status,
            status_name=RESPONSE_STATUS.get(posted.status, "unknown"),
            created_at=None if created is None else utc_from_timestamp(created),
            received_at=self._now_dt(),
            power_kw=control.power_kw,
            provenance=control.provenance,
        )
        stored = Response(
            href=href,
            created_date_time=created,
            end_device_lfdi=posted.end_device_lfdi,
            status=posted.status,
            subject=posted.subject,
        )
        der.responses.append((number, stored, record))
        self._touch(der)
        if self._on_response is not None:
            try:
                self._on_response(record)
            except Exception:  # a listener's bug must not turn the client's POST into a 500
                log.exception("2030.5 response listener failed")
        return self._reply(None, 201, location=href)

    # ----------------------------------------------------------------------- subscriptions

    def _subscriptions_of(self, der: _Der) -> list[_Subscription]:
        return [s for s in self._subscriptions.values() if s.der is der]

    def _own_subscription(self, request: web.Request) -> _Subscription:
        der = self._own(request)
        sub = self._subscriptions.get(int(request.match_info["s"]))
        if sub is None or sub.der is not der:
            raise _HttpError(404, "no such Subscription for this EndDevice")
        return sub

    async def _get_subscription_list(self, request: web.Request) -> web.Response:
        der = self._own(request)
        start, limit, after = self._paging(request)

        def build(_now: int) -> tuple[Sep2Model, None]:
            subs = sorted(self._subscriptions_of(der), key=lambda s: s.sub_id)
            page = tuple(s.model for s in subs[start : start + limit])
            href = f"{der.base_href}/sub"
            return SubscriptionList(href=href, all=len(subs), results=len(page), items=page), None

        return self._cached(request, der, build, (start, limit, after))

    async def _get_subscription(self, request: web.Request) -> web.Response:
        sub = self._own_subscription(request)
        return self._cached(request, sub.der, lambda _: (sub.model, None))

    async def _delete_subscription(self, request: web.Request) -> web.Response:
        sub = self._own_subscription(request)
        del self._subscriptions[sub.sub_id]
        self._touch(sub.der)
        sub.pending.clear()
        if sub.inflight is not None:
            sub.inflight.cancel()  # no Notification after the DELETE has been answered
        self._notify_lists(sub.der, ("edevl",))
        return self._reply(None, 204)

    def _subscribed(
        self, der: _Der, lfdi: str | None, resource: str
    ) -> tuple[_Program | None, str]:
        """The client's own subscribable resource named by ``resource``: 403 for anyone else's
        (as envoy answers), 400 for a resource that cannot be subscribed to."""
        edev = _EDEV_PATH.match(resource)
        if edev is not None and int(edev.group(1)) != der.edev_id:
            raise _forbidden(lfdi)
        if _SUBSCRIBABLE_PROGRAMS.match(resource):
            fsa = _ONE_FSAS_PROGRAMS.match(resource)
            if fsa is not None:
                self._fsa_program(der, int(fsa.group(1)))  # 404 for an FSA it does not have
            return None, "derpl"
        if resource == "/edev":
            return None, "edevl"  # the client's own EndDeviceList
        if resource == f"{der.base_href}/fsa":
            return None, "fsal"
        if resource == f"{der.base_href}/tp":
            return None, "tpl"  # its TariffProfileList (Pricing)
        load_controls = _SUBSCRIBABLE_LOAD_CONTROLS.match(resource)
        if load_controls is not None and self._has_loads(der):
            return None, load_controls.group(1)  # its (Active)EndDeviceControlList (DRLC)
        match = _SUBSCRIBABLE.match(resource)
        if match is None:
            raise _HttpError(
                400,
                f"{resource!r} is not subscribable: the EndDeviceList, FunctionSetAssignmentsList, "
                "TariffProfileList, (Active)EndDeviceControlLists, DERProgramLists, DERPrograms, "
                "DERControlLists and DefaultDERControls are",
            )
        program = der.program(int(match.group(2)))
        if program is None:
            raise _forbidden(lfdi)  # another group's program: not this client's resource
        return program, match.group(3) or "derp"

    def _check_notification_uri(self, uri: str) -> None:
        """Only http(s) to an allowed host: the server must not POST into arbitrary networks."""
        try:
            parts = urlsplit(uri)
            port = parts.port
        except ValueError:
            raise _HttpError(400, f"notificationURI {uri!r} is not a URL") from None
        host = (parts.hostname or "").lower()
        allowed = {h.lower().strip("[]") for h in self.config.notification_hosts}
        if parts.scheme not in ("http", "https") or not host:
            raise _HttpError(400, "notificationURI must be an absolute http(s) URL")
        if parts.username is not None or parts.password is not None:
            raise _HttpError(400, "notificationURI must not carry credentials")
        if host not in allowed:
            raise _HttpError(400, f"notificationURI host {host!r} is not an allowed host")
        if port == 0:
            raise _HttpError(400, "notificationURI port 0")

    async def _post_subscription(self, request: web.Request) -> web.Response:
        der = self._own(request)
        lfdi = der.lfdi
        posted = await self._body(request, Subscription)
        program, kind = self._subscribed(der, lfdi, posted.subscribed_resource)
        if posted.encoding != _ENCODING_XML:
            raise _HttpError(400, f"encoding {posted.encoding} is not supported (0 = XML only)")
        self._check_notification_uri(posted.notification_uri)
        if len(self._subscriptions_of(der)) >= self.config.max_subscriptions:
            raise _HttpError(400, f"at most {self.config.max_subscriptions} Subscriptions")
        sub_id = self._next_subscription
        self._next_subscription += 1
        href = f"{der.base_href}/sub/{sub_id}"
        model = posted.model_copy(
            update={"href": href, "limit": min(posted.limit, self.config.max_page_limit)}
        )
        self._subscriptions[sub_id] = _Subscription(
            sub_id=sub_id,
            der=der,
            program_id=None if program is None else program.program_id,
            kind=kind,
            model=model,
            pending=deque(maxlen=self.config.notification_queue),
        )
        self._touch(der)
        self._notify_lists(der, ("edevl",))  # its EndDevice lists one more Subscription
        return self._reply(None, 201, location=href)

    def _notify_lists(self, der: _Der, kinds: tuple[str, ...]) -> None:
        """Lists of the client's that changed (``kinds``): tell their subscribers."""
        for sub in self._subscriptions_of(der):
            if sub.kind == "edevl" and "edevl" in kinds:
                items = (self._end_device(der),)
                self._enqueue(
                    sub,
                    EndDeviceList(
                        href="/edev", all=1, results=1, poll_rate=self.poll_rate_s, items=items
                    ),
                )
            elif sub.kind == "tpl" and "tpl" in kinds:
                view = self._tariff_view(der)
                self._enqueue(sub, view.profile_list(0, sub.model.limit, self.poll_rate_s))
            elif sub.kind == "derpl" and "derpl" in kinds:
                self._enqueue(sub, self._program_list_model(der, sub.model, self._now()))
            elif sub.kind == "fsal" and "fsal" in kinds:
                fsas = self._fsa_items(der)
                page = tuple(fsas[: sub.model.limit])
                self._enqueue(
                    sub,
                    FunctionSetAssignmentsList(
                        href=f"{der.base_href}/fsa",
                        all=len(fsas),
                        results=len(page),
                        poll_rate=self.poll_rate_s,
                        items=page,
                    ),
                )
        self._notify_wake.set()

    def _changed(self, der: _Der) -> None:
        """``der``'s controls changed: its cached documents are stale, and every subscription to
        one of its control lists gets a Notification.

        Called on the request path and from ``publish``/``release``: it only encodes and
        enqueues (a full queue drops its oldest entry: every Notification carries the whole
        list, so the newest one supersedes it); the notifier task does the network I/O.
        """
        self._touch(der)
        self._mark(der)
        subs = [
            s
            for s in self._subscriptions_of(der)
            if s.kind not in ("dderc", "edevl", "fsal", "tpl", "edc", "actedc")
        ]
        if not subs:
            return
        now = self._now()
        der.controls = [c for c in der.controls if c.end > now]  # no recursion into _prune
        for sub in subs:
            if sub.kind == "derpl":  # a DERProgram counts its active controls
                self._enqueue(sub, self._program_list_model(der, sub.model, now))
                continue
            program = der.program(sub.program_id) if sub.program_id is not None else None
            if program is None:
                continue
            resource: Sep2Model
            if sub.kind == "derp":
                resource = self._der_program(der, program, now)
            else:
                resource = self._control_list_model(der, program, now, sub.kind, 0, sub.model.limit)
            self._enqueue(sub, resource)
        self._notify_wake.set()

    def _enqueue(self, sub: _Subscription, resource: Sep2Model) -> None:
        notification = Notification(
            subscribed_resource=sub.model.subscribed_resource,
            resource=resource,
            status=0,
            subscription_uri=sub.href,
        )
        if len(sub.pending) == sub.pending.maxlen:
            log.debug("2030.5 notification queue of %s full: oldest dropped", sub.href)
            if sub.inflight is None:
                sub.failures = 0  # they were the dropped Notification's failures
        sub.pending.append(encode(notification, csipaus=self.config.csipaus))

    def _next_lapse(self) -> float | None:
        """Seconds until a subscribed control ends (its list changes then), if any."""
        clock = self._clock()
        ends = [
            c.end - clock
            for der in {id(s.der): s.der for s in self._subscriptions.values()}.values()
            for c in der.controls
        ]
        return min(ends, default=None)

    async def _notify_loop(self) -> None:
        """The server's notifier: starts deliveries, notices lapsed controls; owns the
        deliveries' HTTP session and cancels them when the server stops."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(
            ssl=self._notify_ssl if self._notify_ssl is not None else True, limit=32
        )
        timeout = aiohttp.ClientTimeout(total=cfg.notification_timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            try:
                while True:
                    self._notify_wake.clear()
                    try:
                        waits = self._start_deliveries(session, loop.time())
                    except Exception:  # a bug of ours must not end notifications for good
                        log.exception("2030.5 notifier failed")
                        waits = [1.0]
                    wait = min([60.0, *waits])
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._notify_wake.wait()
            finally:
                inflight = [s.inflight for s in self._subscriptions.values() if s.inflight]
                for task in inflight:
                    task.cancel()
                await asyncio.gather(*inflight, return_exceptions=True)
                dropped = sum(len(s.pending) for s in self._subscriptions.values())
                for sub in self._subscriptions.values():
                    sub.pending.clear()
                    sub.failures = 0
                if dropped:
                    log.info("2030.5 server stopping: %d pending Notifications dropped", dropped)

    def _start_deliveries(self, session: aiohttp.ClientSession, now: float) -> list[float]:
        """Notice lapses, start due deliveries; return the delays until the next things due."""
        for der in {id(s.der): s.der for s in self._subscriptions.values()}.values():
            self._prune(der, self._now())  # a lapse queues a Notification
        waits: list[float] = []
        for sub in list(self._subscriptions.values()):
            if sub.inflight is not None or not sub.pending:
                continue
            if sub.retry_at <= now:
                sub.inflight = asyncio.create_task(
                    self._deliver(session, sub), name=f"sep2-notify{sub.href}"
                )
            else:
                waits.append(sub.retry_at - now)
        lapse = self._next_lapse()
        if lapse is not None:
            waits.append(max(lapse, 0.2))
        return waits

    async def _deliver(self, session: aiohttp.ClientSession, sub: _Subscription) -> None:
        """One attempt at the oldest pending Notification of ``sub``."""
        cfg = self.config
        uri = sub.model.notification_uri
        body = sub.pending.popleft()
        error: str | None = None
        try:
            # No redirects: the allowlist is about where the server sends, not where it starts.
            async with session.post(
                uri, data=body, headers={"Content-Type": MEDIA_TYPE}, allow_redirects=False
            ) as resp:
                if not 200 <= resp.status < 300:
                    error = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except asyncio.CancelledError:
            if sub.sub_id in self._subscriptions and len(sub.pending) < (sub.pending.maxlen or 0):
                sub.pending.appendleft(body)  # counted as pending when the server stops
            raise
        finally:
            sub.inflight = None
            self._notify_wake.set()
        if error is None:
            sub.failures = 0
            sub.retry_at = 0.0
            return
        sub.failures += 1
        if sub.failures >= cfg.notification_attempts:
            log.warning(
                "2030.5 Notification for %s to %s dropped after %d attempts (last: %s)",
                sub.href,
                uri,
                sub.failures,
                error,
            )
            sub.failures = 0
            sub.retry_at = 0.0
            return
        log.debug("2030.5 Notification for %s to %s failed: %s", sub.href, uri, error)
        if sub.sub_id in self._subscriptions and len(sub.pending) < (sub.pending.maxlen or 0):
            sub.pending.appendleft(body)  # else newer Notifications superseded it
        delay = min(
            cfg.notification_backoff_max_s, cfg.notification_backoff_s * 2 ** (sub.failures - 1)
        )
        sub.retry_at = asyncio.get_running_loop().time() + delay * self._random.uniform(0.5, 1.0)

    # ----------------------------------------------------------------------- mirror usage points

    def _own_mirror(self, request: web.Request) -> tuple[_Der, _Mirror]:
        """The client's own MUP. Anything else is 404, not 403: MUP ids are not per-device, and
        after a gateway restart (state is in memory) a client's old href may be unknown or even
        another client's; 404 is what tells a client to POST its MirrorUsagePoint again."""
        lfdi, der = self._client(request)
        found = self._mirrors.get(int(request.match_info["m"]))
        if found is None or not (
            found[0] is der or (der is None and found[0] in self._aggregated(lfdi))
        ):
            raise _HttpError(404, "no such MirrorUsagePoint for this client")
        return found

    def _mirror_view(self, mirror: _Mirror) -> MirrorUsagePoint:
        return mirror.point.model_copy(
            update={
                "href": f"/mup/{mirror.mup_id}",
                "post_rate": self.post_rate_s,
                "mirror_meter_readings": tuple(
                    MirrorMeterReading(mrid=mrid, reading_type=rt)
                    for mrid, rt in mirror.reading_types.items()
                ),
            }
        )

    async def _get_mup_list(self, request: web.Request) -> web.Response:
        lfdi, der = self._client(request)
        start, limit, after = self._paging(request)
        if der is None and lfdi in self._aggregators:  # its EndDevices' MirrorUsagePoints
            every = [m for d in self._aggregated(lfdi) for m in d.mirrors.values()]
            every.sort(key=lambda m: m.mup_id)
            page = tuple(self._mirror_view(m) for m in every[start : start + limit])
            return self._uncached(
                request,
                MirrorUsagePointList(
                    href="/mup",
                    all=len(every),
                    results=len(page),
                    poll_rate=self.post_rate_s,
                    items=page,
                ),
            )

        def build(_now: int) -> tuple[Sep2Model, None]:
            mirrors = [] if der is None else sorted(der.mirrors.values(), key=lambda m: m.mup_id)
            page = tuple(self._mirror_view(m) for m in mirrors[start : start + limit])
            return MirrorUsagePointList(
                href="/mup",
                all=len(mirrors),
                results=len(page),
                poll_rate=self.post_rate_s,
                items=page,
            ), None

        return self._cached(request, der, build, (start, limit, after))

    async def _get_mup(self, request: web.Request) -> web.Response:
        der, mirror = self._own_mirror(request)
        return self._cached(request, der, lambda _: (self._mirror_view(mirror), None))

    async def _post_mup(self, request: web.Request) -> web.Response:
        lfdi, der = self._client(request)
        posted = await self._body(request, MirrorUsagePoint)
        if der is None and lfdi in self._aggregators:  # for the EndDevice it names
            named = [d for d in self._aggregated(lfdi) if same_lfdi(posted.device_lfdi, d.lfdi)]
            der = named[0] if named else None
        if der is None:
            raise _forbidden(lfdi)
        if not same_lfdi(posted.device_lfdi, der.lfdi):
            raise _HttpError(403, f"deviceLFDI {posted.device_lfdi} is not this client's")
        existing = next(
            (m for m in der.mirrors.values() if m.point.mrid.upper() == posted.mrid.upper()), None
        )
        if existing is None and len(der.mirrors) >= self.config.max_mirror_points:
            raise _HttpError(400, f"at most {self.config.max_mirror_points} MirrorUsagePoints")
        try:
            int(posted.role_flags or "0", 16)
        except ValueError:
            raise _HttpError(400, "roleFlags is not hex") from None
        types = dict(existing.reading_types) if existing else {}
        for mmr in posted.mirror_meter_readings:
            if mmr.reading_type is None and mmr.mrid.upper() not in types:
                raise _HttpError(400, f"MirrorMeterReading {mmr.mrid} has no ReadingType")
            if mmr.reading_type is not None:
                types[mmr.mrid.upper()] = mmr.reading_type
        if len(types) > self.config.max_readings_per_point:
            raise _HttpError(400, f"at most {self.config.max_readings_per_point} readings per MUP")
        point = posted.model_copy(update={"mirror_meter_readings": (), "href": None})
        if existing is None:
            mirror = _Mirror(self._next_mup, point, types)
            self._next_mup += 1
            der.mirrors[mirror.mup_id] = mirror
            self._mirrors[mirror.mup_id] = (der, mirror)
            status = 201
        else:
            mirror = existing
            mirror.point, mirror.reading_types = point, types
            status = 204  # envoy: re-POST of a known MUP answers 204 with its Location
        self._touch(der)
        self._ingest(mirror, posted.mirror_meter_readings)
        return self._reply(None, status, location=f"/mup/{mirror.mup_id}")

    async def _post_mmr(self, request: web.Request) -> web.Response:
        der, mirror = self._own_mirror(request)
        data = await self._body(request, Sep2Model)
        if isinstance(data, MirrorMeterReading):
            readings: tuple[MirrorMeterReading, ...] = (data,)
        elif isinstance(data, MirrorMeterReadingList):
            readings = data.items
        else:
            raise _HttpError(
                400, f"expected MirrorMeterReading(List), got {type(data).xml_tag or 'another'}"
            )
        types = dict(mirror.reading_types)
        for mmr in readings:
            key = mmr.mrid.upper()
            if mmr.reading_type is not None:
                types[key] = mmr.reading_type
            elif key not in types:
                raise _HttpError(
                    400, f"MirrorMeterReading {mmr.mrid} was never declared and has no ReadingType"
                )
        if len(types) > self.config.max_readings_per_point:
            raise _HttpError(400, f"at most {self.config.max_readings_per_point} readings per MUP")
        if types != mirror.reading_types:  # the MUP as served lists them; readings it does not
            mirror.reading_types = types
            self._touch(der)
        self._ingest(mirror, readings)
        return self._reply(None, 201)

    def _ingest(self, mirror: _Mirror, readings: Sequence[MirrorMeterReading]) -> None:
        """Keep the newest active-power reading of the point, as watts in the load convention.

        ReadingType.flowDirection says which way positive values flow: 1 (forward, delivered to
        the customer) means + is import, 19 (reverse) means + is export and the sign flips.
        Forecast readings (qualityFlags bit 6) are not measurements and are skipped.
        """
        received = self._now_dt()
        for mmr in readings:
            rt = mirror.reading_types.get(mmr.mrid.upper())
            if rt is None or rt.uom != _UOM_WATTS or rt.phase not in (None, 0):
                continue
            candidates: list[tuple[Reading, DateTimeInterval | None]] = []
            if mmr.reading is not None:
                candidates.append((mmr.reading, None))
            for reading_set in mmr.mirror_reading_sets:
                candidates += [(r, reading_set.time_period) for r in reading_set.readings]
            best: tuple[int, float, int | None] | None = None
            for reading, set_period in candidates:
                if reading.value is None:
                    continue
                flags = int(reading.quality_flags, 16) if reading.quality_flags else None
                if flags is not None and flags & _QUALITY_FORECAST:
                    continue
                period = reading.time_period or set_period
                end = 0 if period is None else period.start + period.duration
                watts = reading.value * 10.0 ** (rt.power_of_ten_multiplier or 0)
                if rt.flow_direction == _FLOW_REVERSE:
                    watts = -watts
                if best is None or end >= best[0]:
                    best = (end, watts, flags)
            if best is not None:
                end, watts, flags = best
                mirror.power = PowerSample(
                    watts=watts + 0.0,
                    received_at=received,
                    measured_at=utc_from_timestamp(end) if end else None,
                    quality_flags=flags,
                )
