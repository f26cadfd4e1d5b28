"""The gateway as an OpenADR 2.0b VTN that OEM clouds join as VENs.

Each resource an OEM cloud lists in its METADATA report becomes a device in the gateway's
registry (``Registrar.add_device``) with an :class:`adapters.oem_vtn.resource.OadrResource`, so the
planner allocates group dispatches and envelopes over OEM resources exactly as over Modbus
batteries. A setpoint for such a device becomes an event for its VEN (new, modified or
cancelled: :func:`protocols.openadr.vtn_events.plan_event`); an opt-out comes back as
``Registrar.report_refusal`` so the planner re-allocates to other resources.

openleadr's ``OpenADRServer`` provides the HTTP routes, schema validation and message rendering,
but its VTN only queues events: it has no route for EiOpt, handles only the two telemetry report
kinds through callbacks it keeps in memory, always answers registration with code 200 (even a
refusal) and keeps everything in memory. So this service owns the behaviour:

* an aiohttp middleware in front of openleadr admits requests: size limit, no DTD, and for
  ``oadrCreatePartyRegistration`` the VEN name (and, with TLS, its certificate fingerprint) must
  be configured; a refusal is a proper ``oadrCreatedPartyRegistration`` with code 463, logged;
* ``on_poll`` (openleadr's external polling mode) serves our own per-VEN queue: re-registration
  requests, report requests (one ``oadrCreateReport`` per report), and the event distribution
  whenever an event changed;
* the event-response, report and registration handlers are replaced with ours, which see whole
  payloads (openleadr's external mode would drop the modification number of an opt response);
* EiOpt gets a route and handlers of ours (openleadr's ``OptService`` is a placeholder that
  ``OpenADRServer`` does not even route): ``oadrCreateOpt`` / ``oadrCancelOpt`` are validated by
  :func:`protocols.openadr.vtn_opts.read_opt` (a refusal is answered with its code, 452 / 454 /
  463, and changes nothing), persisted, and applied. An opt for one event is an opt response to
  it; an opt-out schedule keeps its resources out of dispatch during its windows (the adapter
  reports no state of charge and refuses setpoints) and a setpoint they carry when a window
  starts is refused once, so the planner re-allocates. Schedules that are over are pruned;
* registrations, resources, issued events and opt schedules live in SQLite, so after a restart
  the devices are in the registry before their VEN polls again and the VEN is sent its events
  once more (a 2.0b VEN handles the repeat idempotently);
* with ``require_signatures``, a message without an XML signature is refused (403) before
  openleadr sees it; openleadr itself refuses a signature that does not match the content (403)
  and a replayed one (463).

Nothing openleadr configures on its service *classes* (message signing, ``ven_lookup``) is used
as class state: we set it on this server's instances, so a second openleadr server in the same
process (tests, or a VEN bench) is unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Final, Protocol

from aiohttp import web
from openleadr import OpenADRServer  # type: ignore[import-untyped]
from openleadr.messaging import create_message  # type: ignore[import-untyped]
from openleadr.service import OptService  # type: ignore[import-untyped]
from openleadr.utils import certificate_fingerprint_from_der  # type: ignore[import-untyped]
from pydantic import Field, model_validator

from adapters.oem_vtn.resource import OadrResource, ResourceTelemetry
from gateway.aio import wait_inside_task_group
from gateway.devices import (
    AdapterError,
    DeviceAdapter,
    DeviceRejected,
    DeviceUnavailable,
    DispatchNotice,
)
from gateway.ports import RefusalHook
from gateway.store import SqliteStore
from protocols.openadr import OadrMessageError, decode, encode, quiet_openleadr
from protocols.openadr.messages import as_list, xml_text
from protocols.openadr.resource_status import read_resource_status
from protocols.openadr.vtn_events import (
    IssuedEvent,
    ResourceDescriptor,
    ResourceIdError,
    VtnProgram,
    announce_event,
    cancel_event,
    describe_resource,
    event_payload,
    is_live,
    plan_event,
    status_changes,
)
from protocols.openadr.vtn_opts import (
    OptRefused,
    OptSchedule,
    OptTarget,
    opt_out_in_force,
    read_opt,
)
from protocols.openadr.vtn_reports import SamplingRateError, granularity_for, read_sampling_rate
from protocols.tls import pin_openadr_tls
from unified.config import Section
from unified.model import (
    BatteryRatings,
    DerClass,
    Device,
    DeviceCommand,
    Identifier,
    TopologyLocation,
    utcnow,
)

__all__ = [
    "AllowedVen",
    "OpenAdrVtn",
    "OpenAdrVtnConfig",
    "Registrar",
    "ResourceRecord",
    "VenRegistration",
    "VtnStore",
    "VtnTlsConfig",
    "fingerprint_of_der",
]

log = logging.getLogger(__name__)

#: OpenADR 2.0b's TLS 1.2 suites (ECDSA first: the profile prefers P-256 certificates).
_NOT_AUTHORIZED: Final = 463
_FINGERPRINT: Final = r"^([0-9A-Fa-f]{2}:){9}[0-9A-Fa-f]{2}$"
_MAX_EVENTS_PER_DISTRIBUTION: Final = 500
_CLOCK_SKEW_S: Final = 120.0
_MAX_OPTS_PER_VEN: Final = 1_000
_EVENT_WRITE_TIMEOUT_S: Final = 10.0
_NOT_ALLOWED: Final = 451


def fingerprint_of_der(der: bytes) -> str:
    """OpenADR's certificate fingerprint: the last 10 bytes of SHA-256(DER), colon-separated."""
    return str(certificate_fingerprint_from_der(der))


# --------------------------------------------------------------------------- configuration


class VtnTlsConfig(Section):
    """Mutual TLS: our certificate and the CA that signs the VENs' certificates."""

    cert_path: Path
    key_path: Path
    ca_path: Path
    sign_messages: bool = Field(
        default=False, description="Sign outgoing messages (XML signature) with this key"
    )
    require_signatures: bool = Field(
        default=False, description="Refuse VEN messages without a valid XML signature"
    )


class ResourceDefault(Section):
    """What a plain resource id (a standard VEN's) stands for: its METADATA report says what
    it measures, not what it is."""

    der_class: DerClass
    rated_kw: float = Field(gt=0, le=10_000)
    capacity_kwh: float | None = Field(
        default=None, gt=0, le=1_000_000, description="None: one hour at rated power"
    )

    def as_tuple(self) -> tuple[DerClass, float, float]:
        return (self.der_class, self.rated_kw, self.capacity_kwh or self.rated_kw)


class AllowedVen(Section):
    """One OEM cloud allowed to register."""

    ven_name: Identifier = Field(description="The VEN's oadrVenName; prefixes its device ids")
    fingerprint: str | None = Field(
        default=None, pattern=_FINGERPRINT, description="Required with TLS"
    )
    location: TopologyLocation | None = Field(
        default=None, description="For resources whose id carries no location"
    )
    program: VtnProgram = VtnProgram()
    programs: dict[DerClass, VtnProgram] = Field(
        default_factory=dict, description="Per DER class, overriding 'program'"
    )
    max_resources: int = Field(default=10_000, ge=1, le=1_000_000)
    default_resource: ResourceDefault | None = Field(
        default=None,
        description="For plain resource ids (any standard VEN): what each one is; ids in the "
        "'name;class=...;kw=...' grammar describe themselves",
    )

    def describe(self, resource_id: str) -> ResourceDescriptor:
        default = self.default_resource
        return describe_resource(resource_id, None if default is None else default.as_tuple())

    def program_for(self, der_class: DerClass) -> VtnProgram:
        return self.programs.get(der_class, self.program)


class OpenAdrVtnConfig(Section):
    vtn_id: str = Field(default="derms-vtn", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535, description="0: any free port (tests)")
    listen_backlog: int = Field(
        default=1024,
        ge=16,
        le=65_535,
        description="Pending connections queued (capped by net.core.somaxconn); aiohttp's 128 "
        "overflows when many VENs reconnect at once",
    )
    path_prefix: str = "/OpenADR2/Simple/2.0b"
    tls: VtnTlsConfig | None = None
    allow_plain_http: bool = Field(
        default=False, description="Serve without TLS (development only)"
    )
    vens: tuple[AllowedVen, ...] = Field(min_length=1)
    store_path: Path = Path("derms-openadr-vtn.sqlite")
    poll_interval_s: int = Field(default=10, ge=1, le=3600, description="Asked of every VEN")
    report_interval_s: int = Field(default=10, ge=1, le=3600, description="Telemetry period")
    stale_after_s: float = Field(default=60.0, gt=0, description="Telemetry older is stale")
    offline_after_s: float = Field(
        default=60.0, gt=0, description="A VEN silent this long is unavailable"
    )
    retention_s: float = Field(default=86_400.0, gt=0, description="Keep ended events this long")
    max_message_bytes: int = Field(default=1_000_000, ge=10_000, le=1_048_576)

    @model_validator(mode="after")
    def _consistent(self) -> OpenAdrVtnConfig:
        problems = []
        if self.tls is None and not self.allow_plain_http:
            problems.append("no [tls] section: set allow_plain_http = true (development only)")
        if self.tls is not None:
            problems.extend(
                f"VEN {v.ven_name!r} needs a fingerprint with TLS"
                for v in self.vens
                if not v.fingerprint
            )
        names = [v.ven_name for v in self.vens]
        if len(set(names)) != len(names):
            problems.append("ven_name values are not unique")
        if self.stale_after_s <= self.report_interval_s:
            problems.append("stale_after_s must be longer than report_interval_s")
        if self.offline_after_s <= self.poll_interval_s:
            problems.append("offline_after_s must be longer than poll_interval_s")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def ven(self, ven_name: str) -> AllowedVen | None:
        return next((v for v in self.vens if v.ven_name == ven_name), None)


# --------------------------------------------------------------------------- the gateway side


class Registrar(Protocol):
    """What the VTN needs from the gateway core (``gateway.core.Gateway`` provides both; the
    composition root hands it over)."""

    def add_device(self, device: Device, adapter: DeviceAdapter) -> None: ...

    def report_refusal(self, command: DeviceCommand, error: AdapterError) -> None: ...


# --------------------------------------------------------------------------- persistence


class VenRegistration(Section):
    ven_name: str
    ven_id: str
    registration_id: str | None
    registered_at: datetime


class ResourceRecord(Section):
    """A resource a VEN described, and which report values belong to it."""

    device_id: str
    ven_name: str
    resource_id: str
    usage_rid: str | None = None
    usage_specifier: str | None = None
    usage_factor_kw: float = 1.0
    status_rid: str | None = None
    status_specifier: str | None = None
    usage_period_s: float | None = Field(
        default=None, description="Report period requested (within the VEN's oadrSamplingRate)"
    )
    status_period_s: float | None = None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS vtn_vens (ven_name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vtn_resources (device_id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vtn_events (event_id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vtn_opts (
    ven_name TEXT NOT NULL,
    opt_id   TEXT NOT NULL,
    record   TEXT NOT NULL,
    PRIMARY KEY (ven_name, opt_id)
);
"""


class VtnStore(SqliteStore):
    """Registrations, resources, issued events and opt schedules, one JSON row each."""

    schema = _SCHEMA
    name = "VTN store"

    async def _rows(self, table: str) -> list[str]:
        async with self.db.execute(f"SELECT record FROM {table}") as cur:
            return [str(r[0]) for r in await cur.fetchall()]

    async def load(
        self,
    ) -> tuple[list[VenRegistration], list[ResourceRecord], list[IssuedEvent]]:
        vens = [VenRegistration.model_validate_json(r) for r in await self._rows("vtn_vens")]
        resources = [
            ResourceRecord.model_validate_json(r) for r in await self._rows("vtn_resources")
        ]
        events = [IssuedEvent.model_validate_json(r) for r in await self._rows("vtn_events")]
        return vens, resources, events

    async def load_opts(self) -> list[OptSchedule]:
        return [OptSchedule.model_validate_json(r) for r in await self._rows("vtn_opts")]

    async def save_opt(self, opt: OptSchedule) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO vtn_opts (ven_name, opt_id, record) VALUES (?, ?, ?)",
            (opt.ven_name, opt.opt_id, opt.model_dump_json()),
        )
        await self.db.commit()

    async def delete_opts(self, keys: list[tuple[str, str]]) -> None:
        await self.db.executemany("DELETE FROM vtn_opts WHERE ven_name = ? AND opt_id = ?", keys)
        await self.db.commit()

    async def save_ven(self, ven: VenRegistration) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO vtn_vens (ven_name, record) VALUES (?, ?)",
            (ven.ven_name, ven.model_dump_json()),
        )
        await self.db.commit()

    async def save_resources(self, resources: list[ResourceRecord]) -> None:
        await self.db.executemany(
            "INSERT OR REPLACE INTO vtn_resources (device_id, record) VALUES (?, ?)",
            [(r.device_id, r.model_dump_json()) for r in resources],
        )
        await self.db.commit()

    async def save_event(self, event: IssuedEvent) -> None:
        await self.save_events([event])

    async def save_events(self, events: list[IssuedEvent]) -> None:
        """One transaction (one fsync) for a whole batch of new or modified events."""
        await self.db.executemany(
            "INSERT OR REPLACE INTO vtn_events (event_id, record) VALUES (?, ?)",
            [(event.event_id, event.model_dump_json()) for event in events],
        )
        await self.db.commit()

    async def delete_events(self, event_ids: list[str]) -> None:
        await self.db.executemany(
            "DELETE FROM vtn_events WHERE event_id = ?", [(e,) for e in event_ids]
        )
        await self.db.commit()


# --------------------------------------------------------------------------- runtime state


@dataclass(slots=True)
class _Telemetry:
    power_kw: float | None = None
    power_at: datetime | None = None
    soc_pct: float | None = None
    soc_at: datetime | None = None


@dataclass(slots=True)
class _Session:
    """What one VEN is owed on its next polls; rebuilt at start, not persisted."""

    last_seen: datetime | None = None
    events_dirty: bool = True
    outbox: deque[tuple[str, dict[str, Any]]] = field(default_factory=deque)


def _power_factor_kw(measurement: object) -> float | None:
    """kW per reported unit of a usage description, or None when it is not real power."""
    if not isinstance(measurement, Mapping):
        return None
    unit = str(measurement.get("unit") or "")
    base = {"W": 1e-3, "kW": 1.0, "MW": 1e3}.get(unit)
    if base is None:
        return None
    scale = {"none": 1.0, "k": 1e3, "M": 1e6, "m": 1e-3, None: 1.0, "": 1.0}.get(
        measurement.get("scale")
    )
    return None if scale is None else base * scale


class _OptEndpoint(OptService):  # type: ignore[misc]
    """EiOpt, which ``OpenADRServer`` neither routes nor implements (placeholder handlers).

    Its base class still does the useful part (schema validation, the VEN lookup, TLS
    fingerprint and signature checks); only ``handle_message`` is replaced, because openleadr's
    overwrites every answer's response code with 200 and a refused opt must say why.
    """

    async def handle_message(
        self, message_type: str, payload: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        handler = self.handlers.get(message_type)
        if handler is None:
            answer: tuple[str, dict[str, Any]] = self.error_response(
                "oadrResponse", 459, f"{message_type} is not an EiOpt message"
            )
            return answer
        result: tuple[str, dict[str, Any]] = await handler(payload)
        return result


class OpenAdrVtn:
    """The VTN service. Run :meth:`run` inside the gateway's task group; cancel it to stop."""

    def __init__(
        self,
        config: OpenAdrVtnConfig,
        *,
        registrar: Registrar,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self._registrar = registrar
        self._clock = clock
        self._store = VtnStore(config.store_path)
        self.registrations: dict[str, VenRegistration] = {}
        self.resources: dict[str, ResourceRecord] = {}
        self.adapters: dict[str, OadrResource] = {}
        self.events: dict[str, IssuedEvent] = {}
        self._by_device: dict[str, str] = {}
        self._by_rid: dict[tuple[str, str], tuple[str, str]] = {}
        self._telemetry: dict[str, _Telemetry] = {}
        self._sessions: dict[str, _Session] = {}
        self._lock = asyncio.Lock()
        # Group commit of issued events: a dispatch over many resources issues many events at
        # once; they are planned one by one but written in one transaction by the writer task.
        self._unsaved: dict[str, IssuedEvent] = {}
        self._batch: asyncio.Future[None] | None = None
        self._flush = asyncio.Event()
        self._writer_running = False
        self._refused_logged: set[tuple[str, str]] = set()
        self.on_refused: RefusalHook | None = None
        """Told of every refused request: ``(source, reason, detail)`` (the audit trail)."""
        self.answered: Counter[int] = Counter()
        """Requests answered, by HTTP status (the operator's metrics)."""
        self.refusals: Counter[str] = Counter()
        """Requests refused before openleadr, by reason: ``invalid``, ``not_authorised``,
        ``registration`` (a VEN not configured, or with another certificate)."""
        self.opts: dict[tuple[str, str], OptSchedule] = {}
        """EiOpt schedules by (VEN name, optID), windowed or for one event."""
        self._opts_by_device: dict[str, list[OptSchedule]] = {}
        self._opt_seq = 0
        self._opt_refused: set[tuple[str, int]] = set()
        self._opts_changed = asyncio.Event()
        self._windows: dict[str, tuple[datetime, datetime]] = {}
        """Dispatch windows by command id (from notices): an event lasts its dispatch."""
        self._notices: asyncio.Queue[tuple[str, DispatchNotice]] = asyncio.Queue()
        self._events_changed = asyncio.Event()
        self.ready = asyncio.Event()
        self.port: int | None = None
        """The port actually bound (useful with ``port = 0``)."""

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        quiet_openleadr()
        async with self._store:
            await self._load()
            server = self._build_server()
            runner = web.AppRunner(server.app, access_log=None, handle_signals=False)
            await runner.setup()
            try:
                site = web.TCPSite(
                    runner,
                    self.config.host,
                    self.config.port,
                    ssl_context=self._ssl_context(),
                    backlog=self.config.listen_backlog,
                )
                await site.start()
                self.port = _bound_port(runner)
                scheme = "https" if self.config.tls else "http"
                log.info(
                    "OpenADR VTN %s listening on %s://%s:%s%s",
                    self.config.vtn_id,
                    scheme,
                    self.config.host,
                    self.port,
                    self.config.path_prefix,
                )
                self.ready.set()
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._housekeeping(), name="openadr-vtn:housekeeping")
                    tg.create_task(self._opt_watch(), name="openadr-vtn:opt-schedules")
                    tg.create_task(self._event_writer(), name="openadr-vtn:event-writer")
                    tg.create_task(self._notice_worker(), name="openadr-vtn:notices")
                    tg.create_task(self._status_clock(), name="openadr-vtn:event-status")
                    await wait_inside_task_group()
            finally:
                self.ready.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await runner.cleanup()

    async def _load(self) -> None:
        vens, resources, events = await self._store.load()
        self.registrations = {v.ven_name: v for v in vens if self.config.ven(v.ven_name)}
        for event in sorted(events, key=lambda e: e.updated_at):
            self.events[event.event_id] = event
            self._by_device[event.device_id] = event.event_id
        for record in resources:
            allowed = self.config.ven(record.ven_name)
            if allowed is None:
                log.warning(
                    "VEN %s is no longer configured: its resources stay out", record.ven_name
                )
                continue
            try:
                descriptor = allowed.describe(record.resource_id)
            except ResourceIdError as exc:
                log.warning("stored resource %s unreadable: %s", record.device_id, exc)
                continue
            self._enrol(allowed, descriptor, record)
        for name in self.registrations:
            # Re-send every VEN its events once after a restart: we cannot know what it saw.
            self._session(name).events_dirty = True
        if self.events:
            live = sum(1 for e in self.events.values() if is_live(e, self._clock()))
            log.info("OpenADR VTN restored %d event(s), %d live", len(self.events), live)
        for opt in sorted(await self._store.load_opts(), key=lambda o: (o.received_at, o.seq)):
            if self.config.ven(opt.ven_name) is not None:
                self.opts[(opt.ven_name, opt.opt_id)] = opt
                self._opt_seq = max(self._opt_seq, opt.seq + 1)
        self._index_opts()
        if self.opts:
            log.info("OpenADR VTN restored %d opt schedule(s)", len(self.opts))

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls is None:
            return None
        ctx = pin_openadr_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(str(tls.cert_path), str(tls.key_path))
        ctx.load_verify_locations(cafile=str(tls.ca_path))
        return ctx

    def _build_server(self) -> Any:
        cfg = self.config
        openleadr_log = logging.getLogger("openleadr")
        level = openleadr_log.level
        openleadr_log.setLevel(logging.ERROR)  # its constructor warns about options we replace
        try:
            server = OpenADRServer(
                vtn_id=cfg.vtn_id,
                http_host=cfg.host,
                http_port=cfg.port,
                http_path_prefix=cfg.path_prefix,
                requested_poll_freq=timedelta(seconds=cfg.poll_interval_s),
                show_fingerprint=False,
            )
        finally:
            openleadr_log.setLevel(level)
        cert = key = None
        if cfg.tls is not None and cfg.tls.sign_messages:
            cert, key = cfg.tls.cert_path.read_bytes(), cfg.tls.key_path.read_bytes()
        opt_service = _OptEndpoint(cfg.vtn_id)
        opt_service.handlers = {
            "oadrCreateOpt": self._on_create_opt,
            "oadrCancelOpt": self._on_cancel_opt,
        }
        server.services["opt_service"] = opt_service
        server.app.router.add_post(f"{cfg.path_prefix}/EiOpt", opt_service.handler)
        for service in server.services.values():
            service._create_message = partial(create_message, cert=cert, key=key)
            service.ven_lookup = self._ven_lookup
            service.verify_message_signatures = bool(cfg.tls and cfg.tls.require_signatures)
        server.add_handler("on_poll", self._on_poll)
        server.add_handler("on_request_event", self._on_request_event)
        server.add_handler("on_create_party_registration", self._on_create_party_registration)
        handlers: dict[str, dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]] = {
            "event_service": {"oadrCreatedEvent": self._on_created_event},
            "report_service": {
                "oadrRegisterReport": self._on_register_report,
                "oadrUpdateReport": self._on_update_report,
                "oadrCreatedReport": self._on_created_report,
            },
            "registration_service": {
                "oadrCancelPartyRegistration": self._on_cancel_party_registration
            },
        }
        for service_name, table in handlers.items():
            server.services[service_name].handlers.update(table)
        server.app.middlewares.append(self._admission)
        return server

    # ------------------------------------------------------------------ admission
    @web.middleware
    async def _admission(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Refuse what must not reach openleadr (and thus never reaches a device)."""
        response = await self._admit(request, handler)
        self.answered[response.status] += 1
        return response

    async def _admit(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        limit = self.config.max_message_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._refuse_http(request, 413, f"message larger than {limit} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse_http(request, 413, f"message larger than {limit} bytes")
        if len(body) > limit:
            return self._refuse_http(request, 413, f"message larger than {limit} bytes")
        if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
            return self._refuse_http(request, 400, "XML with a DTD is not accepted")
        if not request.headers.get("Content-Type", "").lower().startswith("application/xml"):
            # openleadr means to answer 400 here, but its error class takes other arguments
            # than it passes: a TypeError, and so an HTTP 500.
            return self._refuse_http(request, 415, "Content-Type must be application/xml")
        tls = self.config.tls
        if tls is not None and tls.require_signatures and b"SignatureValue" not in body:
            # openleadr would fail on the missing signature with an HTTP 500: say what is wrong.
            return self._refuse_http(request, 403, "message is not signed (signatures required)")
        if request.path.endswith("/EiRegisterParty") and b"oadrCreatePartyRegistration" in body:
            refusal = self._check_registration(request, body)
            if refusal is not None:
                return refusal
        response = await handler(request)
        if response.status == 500:
            # openleadr answers 500 for anything its parser raises on, bad input included (a
            # number of 5000 digits, a duration of 10^10 days). Read the message again, only
            # here: if it does not decode, the fault is the sender's and it says why.
            try:
                decode(body, max_bytes=limit)
            except OadrMessageError as exc:
                return self._refuse_http(request, 400, "invalid message", detail=str(exc))
        return response

    def _refuse_http(
        self, request: web.Request, status: int, reason: str, *, detail: str | None = None
    ) -> web.Response:
        peer = _peer_fingerprint(request) or str(request.remote)
        if (peer, reason) not in self._refused_logged:  # a VEN retries every poll: say it once
            self._refused_logged.add((peer, reason))
            log.warning("OpenADR VTN refused a request from %s: %s", peer, detail or reason)
        text = reason if detail is None else f"{reason}: {detail[:300]}"
        kind = "invalid" if status in (400, 413, 415) else "not_authorised"
        self.refusals[kind] += 1
        if self.on_refused is not None:
            self.on_refused(f"openadr-ven:{peer}", kind, text)
        return web.Response(status=status, text=text, content_type="text/plain")

    def _check_registration(self, request: web.Request, body: bytes) -> web.Response | None:
        try:
            message_type, payload = decode(body, max_bytes=self.config.max_message_bytes)
        except OadrMessageError as exc:
            return self._refuse_http(request, 400, f"invalid registration: {exc}")
        if message_type != "oadrCreatePartyRegistration":
            return None
        name = str(payload.get("ven_name") or "")
        allowed = self.config.ven(name)
        reason: str | None = None
        if allowed is None:
            reason = f"VEN name {name[:64]!r} is not configured"
        elif self.config.tls is not None:
            presented = _peer_fingerprint(request)
            if presented is None:
                reason = "no client certificate"
            elif allowed.fingerprint is None or presented.upper() != allowed.fingerprint.upper():
                reason = f"certificate fingerprint {presented} does not match the configuration"
        if reason is None:
            return None
        self.refusals["registration"] += 1
        key = (name[:64], reason)
        if key not in self._refused_logged:  # a refused VEN retries forever: say it once
            self._refused_logged.add(key)
            log.warning("OpenADR VTN refused registration from %s: %s", request.remote, reason)
        answer = encode(
            "oadrCreatedPartyRegistration",
            {
                "response": {
                    "response_code": _NOT_AUTHORIZED,
                    "response_description": xml_text(reason),
                    "request_id": xml_text(payload.get("request_id") or ""),
                },
                "ven_id": None,
                "registration_id": None,
                "vtn_id": self.config.vtn_id,
                "profiles": [
                    {"profile_name": "2.0b", "transports": [{"transport_name": "simpleHttp"}]}
                ],
            },
        )
        return web.Response(body=answer, content_type="application/xml")

    # ------------------------------------------------------------------ registration
    def _ven_lookup(self, ven_id: str) -> dict[str, Any] | None:
        for reg in self.registrations.values():
            if reg.ven_id == ven_id and reg.registration_id is not None:
                allowed = self.config.ven(reg.ven_name)
                return {
                    "ven_id": reg.ven_id,
                    "ven_name": reg.ven_name,
                    "registration_id": reg.registration_id,
                    "fingerprint": None if allowed is None else allowed.fingerprint,
                }
        return None

    def _registered_name(self, ven_id: object) -> str | None:
        found = self._ven_lookup(str(ven_id)) if ven_id is not None else None
        return None if found is None else str(found["ven_name"])

    async def _on_create_party_registration(self, payload: dict[str, Any]) -> tuple[str, str]:
        """Only admitted VENs get here (see :meth:`_check_registration`)."""
        name = str(payload["ven_name"])
        previous = self.registrations.get(name)
        ven_id = previous.ven_id if previous else f"{name}-{uuid.uuid4().hex[:12]}"
        if previous is not None and previous.registration_id is not None:
            registration_id = previous.registration_id  # a repeated registration: same answer
        else:
            registration_id = uuid.uuid4().hex
        registration = VenRegistration(
            ven_name=name,
            ven_id=ven_id,
            registration_id=registration_id,
            registered_at=self._clock(),
        )
        await self._store.save_ven(registration)
        self.registrations[name] = registration
        session = self._session(name)
        session.outbox.clear()
        session.events_dirty = True
        session.last_seen = self._clock()
        self._refused_logged = {k for k in self._refused_logged if k[0] != name}
        log.info("OpenADR VEN %s registered as %s", name, ven_id)
        return ven_id, registration_id

    async def _on_cancel_party_registration(
        self, payload: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        name = self._registered_name(payload.get("ven_id"))
        if name is not None:
            registration = self.registrations[name].model_copy(update={"registration_id": None})
            await self._store.save_ven(registration)
            self.registrations[name] = registration
            self._session(name).outbox.clear()
            log.info("OpenADR VEN %s cancelled its registration", name)
        return "oadrCanceledPartyRegistration", {
            "registration_id": xml_text(payload.get("registration_id") or ""),
            "ven_id": xml_text(payload.get("ven_id") or ""),
        }

    def _session(self, ven_name: str) -> _Session:
        return self._sessions.setdefault(ven_name, _Session())

    # ------------------------------------------------------------------ polling and events
    async def _on_poll(self, ven_id: str) -> tuple[str, dict[str, Any]] | None:
        name = self._registered_name(ven_id)
        if name is None:
            return "oadrRequestReregistration", {"ven_id": xml_text(ven_id)}
        session = self._session(name)
        session.last_seen = self._clock()
        if session.outbox:
            return session.outbox.popleft()
        if session.events_dirty:
            session.events_dirty = False
            return "oadrDistributeEvent", {"events": self._distribution(name)}
        return None

    async def _on_request_event(self, ven_id: str) -> list[dict[str, Any]] | None:
        name = self._registered_name(ven_id)
        if name is None:
            return None
        session = self._session(name)
        session.last_seen = self._clock()
        session.events_dirty = False
        return self._distribution(name) or None

    def _distribution(self, ven_name: str) -> list[dict[str, Any]]:
        """Every event the VEN must know about: live ones, and cancellations not yet answered."""
        registration = self.registrations[ven_name]
        now = self._clock()
        chosen = [
            e
            for e in self.events.values()
            if e.ven_name == ven_name
            and (is_live(e, now) or (e.cancelled and not e.acknowledged_cancel and e.end > now))
        ]
        chosen.sort(key=lambda e: (e.start, e.event_id))
        return [
            event_payload(e, now, registration.ven_id)
            for e in chosen[:_MAX_EVENTS_PER_DISTRIBUTION]
        ]

    async def _on_created_event(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Opt responses. A repeat changes nothing; an opt-out re-allocates the resource."""
        name = self._registered_name(payload.get("ven_id"))
        if name is None:
            return "oadrResponse", {}
        for response in as_list(payload.get("event_responses")):
            if not isinstance(response, Mapping):
                continue
            event = self.events.get(str(response.get("event_id")))
            if event is None or event.ven_name != name:
                log.debug("VEN %s answered unknown event %s", name, response.get("event_id"))
                continue
            modification, opt = response.get("modification_number"), response.get("opt_type")
            if modification != event.modification_number or opt not in ("optIn", "optOut"):
                continue  # an answer to an older modification, superseded since
            code = response.get("response_code")
            await self._take_event_opt(
                name,
                event,
                opt,
                detail=str(response.get("response_description") or ""),
                code=code if isinstance(code, int) else None,
            )
        return "oadrResponse", {}

    async def _take_event_opt(
        self, name: str, event: IssuedEvent, opt: str, *, detail: str, code: int | None = None
    ) -> None:
        """The VEN opted in or out of the event's current modification (an opt response, or an
        EiOpt naming the event). A repeat changes nothing; an opt-out re-allocates."""
        modification = event.modification_number
        if event.opt == opt and event.opt_modification == modification:
            return  # a repeated answer
        updated = event.model_copy(
            update={
                "opt": opt,
                "opt_modification": modification,
                "acknowledged_cancel": event.cancelled,
                "updated_at": self._clock(),
            }
        )
        async with self._lock:
            await self._store.save_event(updated)
            self.events[updated.event_id] = updated
        if opt != "optOut" or event.cancelled:
            return
        log.info(
            "OpenADR VEN %s opted out of event %s (%s, modification %s)",
            name,
            event.event_id,
            event.device_id,
            modification,
        )
        if (event.event_id, modification) in self._opt_refused:
            return  # an opt schedule already refused this modification
        self._opt_refused.add((event.event_id, modification))
        self._registrar.report_refusal(
            event.command(),
            DeviceRejected(
                event.device_id,
                f"VEN {name} opted out of event {event.event_id} "
                f"(modification {modification}){': ' + detail if detail else ''}",
                code=code,
            ),
        )
        if not event.confirmed:
            # Out of a dispatch it was only told of: the planner leaves it out, so no setpoint
            # will confirm the notice; withdraw it now rather than after the grace period.
            async with self._lock:
                current = self.events.get(event.event_id)
                if (
                    current is not None
                    and not current.confirmed
                    and is_live(current, self._clock())
                ):
                    withdrawn = cancel_event(current, self._clock()).model_copy(
                        update={"opt": opt, "opt_modification": modification}
                    )
                    await self._store.save_event(withdrawn)
                    self._expose([withdrawn])

    # ------------------------------------------------------------------ EiOpt
    @staticmethod
    def _opt_answer(
        message_type: str, payload: Mapping[str, Any], code: int = 200, description: str = "OK"
    ) -> tuple[str, dict[str, Any]]:
        return message_type, {
            "opt_id": xml_text(str(payload.get("opt_id") or "")[:128]),
            "response": {
                "response_code": code,
                "response_description": xml_text(description),
                "request_id": xml_text(str(payload.get("request_id") or "")[:128]),
            },
        }

    def _read_opt(self, name: str, payload: Mapping[str, Any]) -> OptSchedule:
        allowed = self.config.ven(name)
        registration = self.registrations.get(name)
        if allowed is None or registration is None:
            raise OptRefused(_NOT_AUTHORIZED, f"VEN {name} is not registered")
        targets = []
        for record in self.resources.values():
            if record.ven_name != name:
                continue
            der_class = allowed.describe(record.resource_id).der_class
            context = allowed.program_for(der_class).market_context
            targets.append(OptTarget(record.device_id, record.resource_id, context))
        now = self._clock()
        opt = read_opt(
            payload,
            ven_name=name,
            ven_id=registration.ven_id,
            targets=targets,
            market_contexts={
                allowed.program.market_context,
                *(p.market_context for p in allowed.programs.values()),
            },
            events={
                e.event_id: (e.modification_number, e.device_id)
                for e in self.events.values()
                if e.ven_name == name and is_live(e, now)
            },
            now=now,
            seq=self._opt_seq,
        )
        owned = sum(1 for ven, _ in self.opts if ven == name)
        if (name, opt.opt_id) not in self.opts and owned >= _MAX_OPTS_PER_VEN:
            raise OptRefused(_NOT_ALLOWED, f"more than {_MAX_OPTS_PER_VEN} opt schedules")
        return opt

    async def _on_create_opt(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """``oadrCreateOpt``: validate, persist, answer, then apply (nothing when refused)."""
        name = self._registered_name(payload.get("ven_id"))
        if name is None:
            return self._opt_answer("oadrCreatedOpt", payload, _NOT_AUTHORIZED, "not registered")
        try:
            opt = self._read_opt(name, payload)
        except OptRefused as exc:
            log.warning(
                "OpenADR VEN %s: opt %s refused (%d): %s",
                name,
                str(payload.get("opt_id"))[:64],
                exc.code,
                exc.description,
            )
            return self._opt_answer("oadrCreatedOpt", payload, exc.code, exc.description)
        key = (name, opt.opt_id)
        previous = self.opts.get(key)
        if previous is not None and previous.same_request(opt):
            return self._opt_answer("oadrCreatedOpt", payload)  # a repeated delivery
        async with self._lock:
            await self._store.save_opt(opt)
            self.opts[key] = opt
            self._opt_seq += 1
            self._index_opts()
        if opt.event_id is not None:
            log.info(
                "OpenADR VEN %s: %s of event %s (EiOpt %s)",
                name,
                opt.opt_type,
                opt.event_id,
                opt.opt_id,
            )
            event = self.events.get(opt.event_id)
            if event is not None:
                reason = f"EiOpt {opt.opt_id}{': ' + opt.reason if opt.reason else ''}"
                await self._take_event_opt(name, event, opt.opt_type, detail=reason)
        else:
            log.info(
                "OpenADR VEN %s: %s schedule %s for %d resource(s), %s",
                name,
                opt.opt_type,
                opt.opt_id,
                len(opt.device_ids),
                ", ".join(
                    f"{w.start:%Y-%m-%dT%H:%M:%SZ}..{w.end:%H:%M:%SZ}" for w in opt.windows[:3]
                ),
            )
            self._enforce_opts()
            self._opts_changed.set()
        return self._opt_answer("oadrCreatedOpt", payload)

    async def _on_cancel_opt(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        name = self._registered_name(payload.get("ven_id"))
        if name is None:
            return self._opt_answer("oadrCanceledOpt", payload, _NOT_AUTHORIZED, "not registered")
        key = (name, str(payload.get("opt_id")))
        if key not in self.opts:
            log.warning("OpenADR VEN %s cancelled unknown opt %s", name, key[1][:64])
            return self._opt_answer(
                "oadrCanceledOpt", payload, 452, f"unknown optID {key[1][:64]!r}"
            )
        async with self._lock:
            await self._store.delete_opts([key])
            del self.opts[key]
            self._index_opts()
        log.info("OpenADR VEN %s cancelled opt %s", name, key[1])
        self._opts_changed.set()
        return self._opt_answer("oadrCanceledOpt", payload)

    def _index_opts(self) -> None:
        by_device: dict[str, list[OptSchedule]] = {}
        for opt in self.opts.values():
            if opt.windows:
                for device_id in opt.device_ids:
                    by_device.setdefault(device_id, []).append(opt)
        self._opts_by_device = by_device

    def opt_out_in_force(self, device_id: str) -> OptSchedule | None:
        """The opt-out schedule keeping the resource out of dispatch now, if any."""
        return opt_out_in_force(self._opts_by_device.get(device_id, ()), device_id, self._clock())

    def _enforce_opts(self) -> None:
        """A resource opted out now that carries a setpoint: refuse it once, so the planner
        re-allocates (and then releases it, which cancels the event)."""
        now = self._clock()
        for device_id, event_id in list(self._by_device.items()):
            event = self.events.get(event_id)
            if event is None or not is_live(event, now) or event.power_kw is None:
                continue
            opt = opt_out_in_force(self._opts_by_device.get(device_id, ()), device_id, now)
            if opt is None:
                continue
            if event.opt == "optOut" and event.opt_modification == event.modification_number:
                continue  # refused already through its event response
            key = (event.event_id, event.modification_number)
            if key in self._opt_refused:
                continue
            self._opt_refused.add(key)
            log.info(
                "OpenADR VEN %s opt-out schedule %s covers %s: event %s refused",
                opt.ven_name,
                opt.opt_id,
                device_id,
                event.event_id,
            )
            self._registrar.report_refusal(
                event.command(), DeviceRejected(device_id, _opt_out_reason(opt, now))
            )

    async def _opt_watch(self) -> None:
        """Apply opt windows as they start, and forget schedules that are over."""
        while True:
            now = self._clock()
            over = [
                key
                for key, opt in self.opts.items()
                if opt.expired(now)
                or (opt.event_id is not None and not self._event_live(opt.event_id, now))
            ]
            if over:
                async with self._lock:
                    await self._store.delete_opts(over)
                    for key in over:
                        self.opts.pop(key, None)
                    self._index_opts()
                log.debug("OpenADR VTN pruned %d opt schedule(s)", len(over))
            self._enforce_opts()
            boundaries = [
                t
                for opt in self.opts.values()
                for w in opt.windows
                for t in (w.start, w.end)
                if t > now
            ]
            delay = 60.0
            if boundaries:
                delay = min(delay, max(0.05, (min(boundaries) - now).total_seconds()))
            self._opts_changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._opts_changed.wait()

    def _event_live(self, event_id: str, now: datetime) -> bool:
        event = self.events.get(event_id)
        return event is not None and is_live(event, now)

    # ------------------------------------------------------------------ reports
    async def _on_register_report(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """METADATA: enrol the resources and ask for their telemetry (through polls)."""
        name = self._registered_name(payload.get("ven_id"))
        if name is None:
            return "oadrRegisteredReport", {"report_requests": []}
        allowed = self.config.ven(name)
        assert allowed is not None  # registrations are only kept for configured VENs
        found: dict[str, dict[str, Any]] = {}
        # One request per (report, period): each rID is asked for at a period inside the
        # sampling rate its VEN offered, so rIDs of one report may need different periods.
        requests: dict[tuple[str, timedelta], list[str]] = {}
        wanted = timedelta(seconds=self.config.report_interval_s)
        for report in as_list(payload.get("reports")):
            if not isinstance(report, Mapping):
                continue
            report_name = str(report.get("report_name") or "")
            kind = {
                "METADATA_TELEMETRY_USAGE": "usage",
                "METADATA_TELEMETRY_STATUS": "status",
            }.get(report_name)
            if kind is None:
                continue  # history and custom reports are offered, not needed
            specifier = str(report.get("report_specifier_id"))
            for description in as_list(report.get("report_descriptions")):
                if not isinstance(description, Mapping):
                    continue
                source = description.get("report_data_source") or {}
                resource_id = source.get("resource_id") if isinstance(source, Mapping) else None
                r_id = description.get("r_id")
                if resource_id is None or r_id is None:
                    continue
                try:
                    period = granularity_for(wanted, read_sampling_rate(description))
                except SamplingRateError as exc:
                    self._warn_once(name, f"rID {str(r_id)[:64]!r} not requested: {exc}")
                    continue
                entry = found.setdefault(str(resource_id), {})
                if kind == "usage":
                    factor = _power_factor_kw(description.get("measurement"))
                    if factor is None:
                        self._warn_once(name, f"usage of {resource_id} is not real power")
                        continue
                    entry.update(
                        usage_rid=str(r_id),
                        usage_specifier=specifier,
                        usage_factor_kw=factor,
                        usage_period_s=period.total_seconds(),
                    )
                else:
                    entry.update(
                        status_rid=str(r_id),
                        status_specifier=specifier,
                        status_period_s=period.total_seconds(),
                    )
                requests.setdefault((specifier, period), []).append(str(r_id))
        records = self._enrol_all(allowed, found)
        if records:
            await self._store.save_resources(records)
        session = self._session(name)
        for (specifier_id, period), r_ids in requests.items():
            if period != wanted:
                log.info(
                    "OpenADR VEN %s: %d rID(s) of %s requested every %s s (its sampling rate)",
                    name,
                    len(r_ids),
                    specifier_id[:64],
                    f"{period.total_seconds():g}",
                )
            session.outbox.append(self._report_request(specifier_id, r_ids, period))
        return "oadrRegisteredReport", {"report_requests": []}

    @staticmethod
    def _report_request(
        specifier_id: str, r_ids: list[str], period: timedelta
    ) -> tuple[str, dict[str, Any]]:
        """An ``oadrCreateReport`` for ``r_ids`` every ``period`` (zero: one report, once)."""
        return "oadrCreateReport", {
            "request_id": uuid.uuid4().hex,
            "report_requests": [
                {
                    "report_request_id": uuid.uuid4().hex,
                    "report_specifier": {
                        "report_specifier_id": xml_text(specifier_id),
                        "granularity": period,
                        "report_back_duration": period,
                        "specifier_payloads": [
                            {"r_id": xml_text(r), "reading_type": "Direct Read"} for r in r_ids
                        ],
                    },
                }
            ],
        }

    async def _on_created_report(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "oadrResponse", {}

    async def _on_update_report(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        name = self._registered_name(payload.get("ven_id"))
        if name is None:
            return "oadrUpdatedReport", {}
        now = self._clock()
        for report in as_list(payload.get("reports")):
            if not isinstance(report, Mapping):
                continue
            for interval in as_list(report.get("intervals")):
                if isinstance(interval, Mapping):
                    self._take_sample(name, interval, now)
        return "oadrUpdatedReport", {}

    def _take_sample(self, ven_name: str, interval: Mapping[str, Any], now: datetime) -> None:
        report_payload = interval.get("report_payload")
        if not isinstance(report_payload, Mapping):
            return
        key = (ven_name, str(report_payload.get("r_id")))
        target = self._by_rid.get(key)
        if target is None:
            self._warn_once(ven_name, f"reports unknown rID {key[1][:64]!r}")
            return
        device_id, kind = target
        at = interval.get("dtstart")
        if not isinstance(at, datetime) or at.tzinfo is None:
            at = now
        if (at - now).total_seconds() > _CLOCK_SKEW_S:
            self._warn_once(ven_name, f"reports from the future for {device_id} (clock skew)")
            return
        seen = self._telemetry.setdefault(device_id, _Telemetry())
        if kind == "status":
            self._take_status(ven_name, device_id, report_payload, at, seen)
            return
        value = report_payload.get("value")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            self._warn_once(ven_name, f"sent a non-numeric value for {device_id}")
            return
        if seen.power_at is None or at >= seen.power_at:
            factor = self.resources[device_id].usage_factor_kw
            seen.power_kw, seen.power_at = float(value) * factor, at

    def _take_status(
        self,
        ven_name: str,
        device_id: str,
        report_payload: Mapping[str, Any],
        at: datetime,
        seen: _Telemetry,
    ) -> None:
        """TELEMETRY_STATUS (:mod:`protocols.openadr.resource_status`): offline or overridden
        means no state of charge, so the planner commits nothing to the resource."""
        status = read_resource_status(report_payload)
        if status is None:
            self._warn_once(ven_name, f"sent an unreadable status for {device_id}")
            return
        if seen.soc_at is not None and at < seen.soc_at:
            return
        soc = status.capacity_pct
        if soc is not None and not 0 <= soc <= 100:
            self._warn_once(ven_name, f"status of {device_id} outside 0-100 %")
            return
        if not status.online or status.manual_override:
            soc = None
        seen.soc_pct, seen.soc_at = soc, at

    def request_report(self, ven_name: str) -> bool:
        """Ask a VEN for a one-shot report of all its telemetry (on its next poll)."""
        by_specifier: dict[str, list[str]] = {}
        for record in self.resources.values():
            if record.ven_name != ven_name:
                continue
            for spec, rid in (
                (record.usage_specifier, record.usage_rid),
                (record.status_specifier, record.status_rid),
            ):
                if spec is not None and rid is not None:
                    by_specifier.setdefault(spec, []).append(rid)
        if ven_name not in self.registrations or not by_specifier:
            return False
        session = self._session(ven_name)
        for spec, rids in by_specifier.items():
            session.outbox.append(self._report_request(spec, rids, timedelta(0)))
        return True

    def _warn_once(self, ven_name: str, what: str) -> None:
        key = (ven_name, what)
        if key not in self._refused_logged:
            self._refused_logged.add(key)
            log.warning("OpenADR VEN %s %s", ven_name, what)

    # ------------------------------------------------------------------ enrolment
    def _enrol_all(
        self, allowed: AllowedVen, found: Mapping[str, Mapping[str, Any]]
    ) -> list[ResourceRecord]:
        records = []
        for resource_id, rids in found.items():
            try:
                descriptor = allowed.describe(resource_id)
            except ResourceIdError as exc:
                self._warn_once(allowed.ven_name, f"resource refused: {exc}")
                continue
            owned = sum(1 for r in self.resources.values() if r.ven_name == allowed.ven_name)
            device_id = f"{allowed.ven_name}.{descriptor.name}"
            if device_id not in self.resources and owned >= allowed.max_resources:
                self._warn_once(allowed.ven_name, f"exceeds {allowed.max_resources} resources")
                break
            record = ResourceRecord(
                device_id=device_id,
                ven_name=allowed.ven_name,
                resource_id=resource_id,
                **rids,
            )
            if self._enrol(allowed, descriptor, record):
                records.append(record)
        return records

    def _enrol(
        self, allowed: AllowedVen, descriptor: ResourceDescriptor, record: ResourceRecord
    ) -> bool:
        """Add the resource to the registry once; later METADATA only refreshes its rIDs."""
        existing = self.resources.get(record.device_id)
        if existing is not None and existing.resource_id != record.resource_id:
            self._warn_once(
                allowed.ven_name,
                f"changed resource {record.device_id}; ratings and location stay as first "
                "described until the gateway restarts",
            )
            record = record.model_copy(update={"resource_id": existing.resource_id})
        location = descriptor.location or allowed.location
        if location is None:
            self._warn_once(allowed.ven_name, f"resource {descriptor.name} has no location")
            return False
        for old in (existing.usage_rid, existing.status_rid) if existing else ():
            if old is not None:
                self._by_rid.pop((allowed.ven_name, old), None)
        self.resources[record.device_id] = record
        if record.usage_rid is not None:
            self._by_rid[(allowed.ven_name, record.usage_rid)] = (record.device_id, "usage")
        if record.status_rid is not None:
            self._by_rid[(allowed.ven_name, record.status_rid)] = (record.device_id, "status")
        if record.device_id in self.adapters:
            self.adapters[record.device_id].stale_after_s = self._stale_after(record)
            return True
        program = allowed.program_for(descriptor.der_class)
        try:
            device = Device(
                device_id=record.device_id,
                der_class=descriptor.der_class,
                location=location,
                adapter="openadr_vtn",
                ratings=BatteryRatings(
                    max_charge_kw=descriptor.rated_kw,
                    max_discharge_kw=descriptor.rated_kw,
                    capacity_kwh=descriptor.capacity_kwh,
                ),
                programs=(program.program,),
            )
        except ValueError as exc:
            self._warn_once(allowed.ven_name, f"resource {descriptor.name} refused: {exc}")
            del self.resources[record.device_id]
            return False
        adapter = OadrResource(
            record.device_id,
            self,
            ven_name=allowed.ven_name,
            resource_id=record.resource_id,
            rated_kw=descriptor.rated_kw,
            capacity_kwh=descriptor.capacity_kwh,
            stale_after_s=self._stale_after(record),
        )
        self.adapters[record.device_id] = adapter
        try:
            self._registrar.add_device(device, adapter)
        except ValueError as exc:
            log.warning("OpenADR resource %s not enrolled: %s", record.device_id, exc)
            return True
        log.info(
            "OpenADR resource %s enrolled (%s, %g kW, %s)",
            record.device_id,
            descriptor.der_class.value,
            descriptor.rated_kw,
            location.model_dump(exclude_none=True),
        )
        return True

    def _stale_after(self, record: ResourceRecord) -> float:
        """``stale_after_s``, stretched in proportion when the VEN's sampling rate made us ask
        for a longer report period than ``report_interval_s``."""
        wanted = self.config.report_interval_s
        longest = max((p for p in (record.usage_period_s, record.status_period_s) if p), default=0)
        return self.config.stale_after_s * max(1.0, longest / wanted)

    # ------------------------------------------------------------------ ResourceChannel
    def ven_ready(self, device_id: str) -> str | None:
        record = self.resources.get(device_id)
        if record is None:
            return "unknown resource"
        registration = self.registrations.get(record.ven_name)
        if registration is None or registration.registration_id is None:
            return f"VEN {record.ven_name} is not registered"
        seen = self._session(record.ven_name).last_seen
        if seen is None:
            return f"VEN {record.ven_name} has not polled since the gateway started"
        silent = (self._clock() - seen).total_seconds()
        if silent > self.config.offline_after_s:
            return f"VEN {record.ven_name} silent for {silent:.0f} s"
        return None

    def opted_out(self, device_id: str) -> str | None:
        opt = self.opt_out_in_force(device_id)
        return None if opt is None else _opt_out_reason(opt, self._clock())

    def telemetry(self, device_id: str) -> ResourceTelemetry | None:
        seen = self._telemetry.get(device_id)
        if seen is None:
            return None
        return ResourceTelemetry(seen.power_kw, seen.power_at, seen.soc_pct, seen.soc_at)

    async def issue(self, command: DeviceCommand) -> None:
        record = self.resources.get(command.device_id)
        adapter = self.adapters.get(command.device_id)
        if record is None or adapter is None:
            raise DeviceRejected(command.device_id, "not an OpenADR resource of this VTN")
        allowed = self.config.ven(record.ven_name)
        if allowed is None:
            raise DeviceRejected(command.device_id, f"VEN {record.ven_name} not configured")
        descriptor = allowed.describe(record.resource_id)
        command_id = command.provenance[0].command_id if command.provenance else None
        window = self._windows.get(command_id) if command_id is not None else None
        async with self._lock:
            now = self._clock()
            previous = self._unsaved.get(command.device_id)
            if previous is None:
                previous_id = self._by_device.get(command.device_id)
                previous = self.events.get(previous_id) if previous_id else None
            if (
                previous is not None
                and command.power_kw is not None
                and is_live(previous, now)
                and previous.start > now
                and previous.command_id != command_id
            ):
                # Another dispatch calls the resource before the one it was told of starts:
                # withdraw that notice (its setpoint comes at its start, as for any device).
                withdrawn = cancel_event(previous, now)
                await self._store.save_event(withdrawn)
                self._unsaved.pop(command.device_id, None)
                self._expose([withdrawn])
                previous = None
            event = plan_event(
                previous,
                command,
                ven_name=record.ven_name,
                resource_id=record.resource_id,
                rated_kw=adapter.rated_kw,
                program=allowed.program_for(descriptor.der_class),
                now=now,
                new_event_id=f"ev-{uuid.uuid4().hex[:20]}",
                window_end=None if window is None else window[1],
            )
            if event is None:
                return
            if not self._writer_running:  # not started (or stopping): write it ourselves
                try:
                    await self._store.save_event(event)
                except Exception as exc:
                    raise DeviceUnavailable(
                        command.device_id, f"could not store its event: {exc!r}"
                    ) from exc
                self._expose([event])
                batch = None
            else:
                self._unsaved[command.device_id] = event
                if self._batch is None:
                    self._batch = asyncio.get_running_loop().create_future()
                    # Its issuers may all be gone (cancelled) by the time it fails.
                    self._batch.add_done_callback(_retrieve)
                batch = self._batch
                self._flush.set()
        if batch is not None:
            # Stored (with everything else issued meanwhile) before any VEN can see it. The
            # shield keeps one caller's cancellation from failing the whole batch.
            try:
                async with asyncio.timeout(_EVENT_WRITE_TIMEOUT_S):
                    await asyncio.shield(batch)
            except AdapterError:
                raise
            except Exception as exc:  # the store failed or hung: the supervisor retries
                raise DeviceUnavailable(
                    command.device_id, f"could not store its event: {exc!r}"
                ) from exc
        log.info(
            "OpenADR event %s for %s: modification %d, %s",
            event.event_id,
            event.device_id,
            event.modification_number,
            "cancelled"
            if event.cancelled
            else f"{event.signal_name} {event.signal_type} {event.value:g}",
        )

    def _expose(self, events: list[IssuedEvent]) -> None:
        """Stored events become what VENs are served (caller holds the lock)."""
        for event in events:
            self.events[event.event_id] = event
            self._by_device[event.device_id] = event.event_id
            self._session(event.ven_name).events_dirty = True
        self._events_changed.set()

    # ------------------------------------------------------------------ advance notice
    def announce(self, device_id: str, notice: DispatchNotice) -> None:
        """A dispatch told ahead by the core (through the resource's adapter); handled in order
        by :meth:`_notice_worker`, since storing its event is I/O."""
        if notice.kind != "dispatch":
            return  # an envelope's limits become events as they apply, not ahead
        if notice.withdrawn:
            self._windows.pop(notice.command_id, None)
        else:
            self._windows[notice.command_id] = (notice.start, notice.end)
        self._notices.put_nowait((device_id, notice))

    async def _notice_worker(self) -> None:
        while True:
            device_id, notice = await self._notices.get()
            try:
                await self._take_notice(device_id, notice)
            except Exception:  # the setpoint still comes at the start: log and go on
                log.exception("OpenADR notice of %s for %s failed", notice.command_id, device_id)

    async def _take_notice(self, device_id: str, notice: DispatchNotice) -> None:
        record = self.resources.get(device_id)
        adapter = self.adapters.get(device_id)
        allowed = self.config.ven(record.ven_name) if record is not None else None
        if record is None or adapter is None or allowed is None:
            return
        async with self._lock:
            now = self._clock()
            previous = self._unsaved.get(device_id) or self.current_event(device_id)
            if notice.withdrawn:
                if (
                    previous is None
                    or previous.command_id != notice.command_id
                    or not is_live(previous, now)
                ):
                    return
                event: IssuedEvent | None = cancel_event(previous, now)
            else:
                if self.opt_out_in_force(device_id) is not None:
                    return  # opted out now; it may be called at the start, if it is back
                event = announce_event(
                    previous,
                    command_id=notice.command_id,
                    device_id=device_id,
                    start=notice.start,
                    end=notice.end,
                    expected_kw=notice.expected_kw,
                    ven_name=record.ven_name,
                    resource_id=record.resource_id,
                    rated_kw=adapter.rated_kw,
                    program=allowed.program_for(allowed.describe(record.resource_id).der_class),
                    now=now,
                    new_event_id=f"ev-{uuid.uuid4().hex[:20]}",
                )
            if event is None:
                return
            await self._store.save_event(event)
            self._unsaved.pop(device_id, None)
            self._expose([event])
        log.info(
            "OpenADR event %s for %s: %s dispatch %s (%s..%s)",
            event.event_id,
            device_id,
            "withdrawn:" if notice.withdrawn else "notice of",
            notice.command_id,
            f"{notice.start:%Y-%m-%dT%H:%M:%SZ}",
            f"{notice.end:%H:%M:%SZ}",
        )

    async def _status_clock(self) -> None:
        """Send each VEN its events again when one's status changes (far → near → active →
        completed), and cancel a notified event the planner did not confirm after its start."""
        last = self._clock()
        while True:
            now = self._clock()
            wake: list[datetime] = []
            unconfirmed: list[IssuedEvent] = []
            for event in list(self.events.values()):
                if not is_live(event, last):
                    continue
                change = status_changes(event, last)
                if change is not None and change <= now:
                    self._session(event.ven_name).events_dirty = True
                    change = status_changes(event, now)
                if change is not None:
                    wake.append(change)
                if not event.confirmed and is_live(event, now):
                    deadline = event.start + timedelta(seconds=self._grace(event))
                    if deadline <= now:
                        unconfirmed.append(event)
                    else:
                        wake.append(deadline)
            if unconfirmed:
                await self._cancel_unconfirmed(unconfirmed)
            last = now
            delay = 60.0
            if wake:
                delay = min(delay, max(0.02, (min(wake) - now).total_seconds()))
            self._events_changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._events_changed.wait()

    def _grace(self, event: IssuedEvent) -> float:
        allowed = self.config.ven(event.ven_name)
        if allowed is None:
            return 0.0
        der_class = allowed.describe(event.resource_id).der_class
        return float(allowed.program_for(der_class).unconfirmed_grace_s)

    async def _cancel_unconfirmed(self, events: list[IssuedEvent]) -> None:
        async with self._lock:
            now = self._clock()
            cancelled = []
            for event in events:
                current = self.events.get(event.event_id)
                if current is None or current.confirmed or not is_live(current, now):
                    continue
                if event.device_id in self._unsaved:
                    continue  # a setpoint for it is being stored right now
                cancelled.append(cancel_event(current, now))
            if not cancelled:
                return
            await self._store.save_events(cancelled)
            self._expose(cancelled)
        for event in cancelled:
            log.info(
                "OpenADR event %s for %s cancelled: dispatch %s did not call the resource",
                event.event_id,
                event.device_id,
                event.command_id,
            )

    async def _event_writer(self) -> None:
        """Write each batch of issued events in one transaction, then expose them."""
        self._writer_running = True
        try:
            while True:
                await self._flush.wait()
                async with self._lock:
                    self._flush.clear()
                    batch, self._unsaved = list(self._unsaved.values()), {}
                    done, self._batch = self._batch, None
                    if not batch or done is None:
                        continue
                    try:
                        async with asyncio.timeout(_EVENT_WRITE_TIMEOUT_S):
                            await self._store.save_events(batch)
                    except Exception as exc:  # the issuers see it; the events stay unissued
                        log.error("storing %d OpenADR events failed: %s", len(batch), exc)
                        done.set_exception(exc)
                        continue
                    self._expose(batch)
                    done.set_result(None)
        finally:
            self._writer_running = False
            pending, self._batch = self._batch, None
            self._unsaved.clear()
            if pending is not None and not pending.done():
                pending.set_exception(DeviceRejected("openadr-vtn", "the VTN is stopping"))

    # ------------------------------------------------------------------ introspection
    def events_for(self, device_id: str) -> Iterator[IssuedEvent]:
        return (e for e in self.events.values() if e.device_id == device_id)

    def current_event(self, device_id: str) -> IssuedEvent | None:
        event_id = self._by_device.get(device_id)
        return None if event_id is None else self.events.get(event_id)

    # ------------------------------------------------------------------ housekeeping
    async def _housekeeping(self) -> None:
        """Forget events long over, so neither memory nor the store grows without bound."""
        while True:
            await asyncio.sleep(min(60.0, self.config.retention_s))
            now = self._clock()
            horizon = timedelta(seconds=self.config.retention_s)
            old = [
                e.event_id
                for e in self.events.values()
                if (e.cancelled or e.end <= now) and max(e.end, e.updated_at) + horizon <= now
            ]
            if not old:
                continue
            async with self._lock:
                await self._store.delete_events(old)
                gone = set(old)
                self._opt_refused = {k for k in self._opt_refused if k[0] not in gone}
                for event_id in old:
                    event = self.events.pop(event_id)
                    if self._by_device.get(event.device_id) == event_id:
                        del self._by_device[event.device_id]


def _opt_out_reason(opt: OptSchedule, now: datetime) -> str:
    window = opt.window_at(now)
    until = f" until {window.end:%Y-%m-%dT%H:%M:%SZ}" if window is not None else ""
    reason = f": {opt.reason}" if opt.reason else ""
    return f"VEN {opt.ven_name} opted out{until} (EiOpt {opt.opt_id}{reason})"


def _peer_fingerprint(request: web.Request) -> str | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return fingerprint_of_der(der) if der else None


def _bound_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
