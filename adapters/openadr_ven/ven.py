"""The gateway (or an edge agent) as an OpenADR 2.0b VEN toward a utility's VTN.

openleadr's ``OpenADRClient`` swallows every transport and protocol error into ``(None, {})``,
schedules its polls on APScheduler and keeps its state in memory, so a restart re-randomizes
``startafter`` and re-answers events from scratch. This service uses only openleadr's message
layer (through :mod:`protocols.openadr.messages`) and owns the behaviour:

* one asyncio poll loop, jittered, that polls again at once while the VTN has more messages
  (2.0b delivers one message per poll), with jittered exponential backoff while the VTN is
  unreachable, logging once when it is lost and once when it is back;
* every ``oadrDistributeEvent`` goes through the pure reconciler
  (:func:`protocols.openadr.reconcile`); its result is written to SQLite *before* any command is
  submitted, so a crash can only lead to an idempotent resubmission, never to a re-draw or a
  lost cancel;
* commands reach the gateway through an injected ``submit`` callback; a refused command turns
  the event's opt-in into an opt-out with the gateway's reason;
* TELEMETRY_USAGE and TELEMETRY_STATUS reports are offered at registration and sent as the VTN
  requests them (periodic, or one-shot: one report, then the request is done), from an injected
  group-telemetry callback; a request for anything else (HISTORY_USAGE, unknown rIDs) is
  answered with 461 naming the refused requests;
* with a ``[tls]`` section: TLS 1.2 with the OpenADR suites, our client certificate, and the
  VTN's certificate checked against the configured CA (an untrusted one is reported as such).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import re
import ssl
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import aiohttp
from pydantic import Field

from gateway.aio import raise_if_cancelling, wait_inside_task_group
from gateway.commands import CommandBook, CommandRejected
from gateway.registry import Registry
from gateway.store import SqliteStore
from protocols.openadr import (
    Distribution,
    GroupCapacity,
    OadrMessageError,
    OptResponse,
    PriceInterval,
    VenProgramConfig,
    VenState,
    decode,
    encode,
    parse_distribution,
    pending_commands,
    price_intervals,
    quiet_openleadr,
    reconcile,
    settle,
)
from protocols.openadr.messages import as_list, xml_text
from protocols.openadr.resource_status import ResourceStatus, status_payload
from protocols.openadr.resource_status import install as install_resource_status
from protocols.tls import pin_openadr_tls
from unified.config import Section
from unified.model import Ack, AckState, Command, GroupTelemetry, Quality, Reason, utcnow
from unified.prices import MAX_POINTS, MIN_STEP_S, PriceKind, PricePoint, PriceSchedule

PutPrices = Callable[[PriceSchedule], Awaitable[str | None]]
"""The core's price store (``Gateway.put_prices``): where ELECTRICITY_PRICE events go."""

__all__ = [
    "CapacitySource",
    "OpenAdrVen",
    "OpenAdrVenConfig",
    "OpenAdrVenError",
    "Registration",
    "RegistrationRefused",
    "Submit",
    "TelemetrySource",
    "VenStore",
    "VenTlsConfig",
    "VtnProtocolError",
    "VtnUnavailable",
    "capacity_from_registry",
    "submit_to_book",
]

log = logging.getLogger(__name__)

Submit = Callable[[Command], Awaitable[Ack]]
"""Hands one unified command to the gateway (``CommandBook.submit`` wrapped) and returns its ack."""
TelemetrySource = Callable[[datetime], Iterable[GroupTelemetry]]
"""The gateway's current group telemetry (``Gateway.group_telemetry``)."""
CapacitySource = Callable[[str], GroupCapacity | None]
"""Shed / import capacity of a group, for SIMPLE fractions and ``x-loadControlCapacity``."""

_REPORT_NOT_SUPPORTED: Final = 461
_NEVER_S: Final = 10 * 365 * 86_400.0
_USAGE_SPECIFIER: Final = "derms-telemetry-usage"
_STATUS_SPECIFIER: Final = "derms-telemetry-status"
#: Poll answers meaning "who are you?": 452 invalid ID, 463 not authorized (unregistered).
_UNKNOWN_VEN_CODES: Final = frozenset({452, 463})
_DATA_QUALITY: Final[dict[Quality, str]] = {
    Quality.GOOD: "Quality Good - Non Specific",
    Quality.ESTIMATED: "Quality Good - Non Specific",
    Quality.SUBSTITUTED: "No New Value - Previous Value Used",
    Quality.STALE: "Quality Bad - Last Known Value",
    Quality.SUSPECT: "Quality Bad - Non Specific",
    Quality.INVALID: "No Quality - No Value",
}


def submit_to_book(
    book: CommandBook,
    wake: Callable[[], None] | None = None,
    *,
    source: Callable[[], str | None] | None = None,
) -> Submit:
    """The ``submit`` callback for a gateway: the book's ack, a refusal as a rejected ack, and
    ``wake`` (the control loop's event) so an accepted command is planned at once. ``source``
    names the sender for the audit log at each submission (:attr:`OpenAdrVen.audit_source`)."""

    async def submit(command: Command) -> Ack:
        now = utcnow()
        try:
            ack = await book.submit(command, now, source=None if source is None else source())
        except CommandRejected as exc:  # the id was used for different content
            return Ack(
                command_id=command.command_id,
                state=AckState.REJECTED,
                timestamp=now,
                reason=exc.reason,
                detail=exc.detail,
            )
        if wake is not None:
            wake()
        return ack

    return submit


def capacity_from_registry(registry: Registry) -> CapacitySource:
    """Ratings-based capacity: what a group could shed (discharge) and import (charge)."""

    def capacity(group_id: str) -> GroupCapacity | None:
        if registry.group(group_id) is None:
            return None
        members = registry.members(group_id)
        return GroupCapacity(
            shed_kw=sum(d.ratings.max_discharge_kw for d in members),
            import_kw=sum(d.ratings.max_charge_kw for d in members),
        )

    return capacity


# --------------------------------------------------------------------------- configuration


class VenTlsConfig(Section):
    """Mutual TLS toward the VTN (OpenADR requires it in production)."""

    cert_path: Path
    key_path: Path
    ca_path: Path
    check_hostname: bool = True


class OpenAdrVenConfig(Section):
    vtn_url: str = Field(description="Base URL, e.g. https://vtn.example/OpenADR2/Simple/2.0b")
    program: VenProgramConfig
    store_path: Path = Path("derms-openadr-ven.sqlite")
    tls: VenTlsConfig | None = None
    poll_interval_s: float | None = Field(
        default=None, gt=0, le=86_400, description="None: the poll frequency the VTN asks for"
    )
    poll_jitter: float = Field(default=0.1, ge=0, le=0.5, description="± fraction of the interval")
    max_messages_per_poll: int = Field(default=20, ge=1, le=1000)
    io_timeout_s: float = Field(default=10.0, gt=0, le=120)
    submit_timeout_s: float = Field(default=10.0, gt=0, le=120)
    backoff_initial_s: float = Field(default=1.0, gt=0, le=600)
    backoff_max_s: float = Field(default=60.0, gt=0, le=3600)
    report_min_period_s: float = Field(default=10.0, gt=0)
    report_max_period_s: float = Field(default=3600.0, gt=0)
    max_message_bytes: int = Field(default=1_000_000, ge=10_000)


# --------------------------------------------------------------------------- errors


class OpenAdrVenError(Exception):
    """Base class of the VEN's errors."""


class VtnUnavailable(OpenAdrVenError):
    """The VTN could not be reached, timed out, or answered with an HTTP error."""

    def __init__(self, url: str, detail: str, status: int | None = None) -> None:
        super().__init__(f"{url}: {detail}")
        self.url = url
        self.detail = detail
        self.status = status


class VtnProtocolError(OpenAdrVenError):
    """The VTN answered, but not with a usable OpenADR message or with an error code."""

    def __init__(self, message_type: str | None, detail: str, code: int | None = None) -> None:
        super().__init__(f"{message_type or 'message'}: {detail}")
        self.message_type = message_type
        self.detail = detail
        self.code = code


class RegistrationRefused(OpenAdrVenError):
    def __init__(self, code: int | None, description: str) -> None:
        super().__init__(f"registration refused ({code}): {description}")
        self.code = code
        self.description = description


# --------------------------------------------------------------------------- persistence


class Registration(Section):
    ven_id: str
    registration_id: str
    vtn_id: str | None = None
    poll_interval_s: float = 10.0


_SCHEMA = """
CREATE TABLE IF NOT EXISTS openadr_ven_meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS openadr_ven_events (
    event_id  TEXT PRIMARY KEY,
    record    TEXT NOT NULL
);
"""


class VenStore(SqliteStore):
    """The VEN's durable state: its registration and one row per event record (JSON)."""

    schema = _SCHEMA
    name = "VEN store"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._saved: dict[str, str] = {}

    async def load(self) -> tuple[Registration | None, VenState]:
        registration = None
        async with self.db.execute(
            "SELECT value FROM openadr_ven_meta WHERE key = 'registration'"
        ) as cur:
            row = await cur.fetchone()
        if row is not None:
            registration = Registration.model_validate_json(str(row[0]))
        async with self.db.execute("SELECT event_id, record FROM openadr_ven_events") as cur:
            rows = await cur.fetchall()
        self._saved = {str(r[0]): str(r[1]) for r in rows}
        state = VenState.model_validate(
            {"events": {eid: _json_obj(text) for eid, text in self._saved.items()}}
        )
        return registration, state

    async def save_registration(self, registration: Registration | None) -> None:
        if registration is None:
            await self.db.execute("DELETE FROM openadr_ven_meta WHERE key = 'registration'")
        else:
            await self.db.execute(
                "INSERT OR REPLACE INTO openadr_ven_meta (key, value) VALUES ('registration', ?)",
                (registration.model_dump_json(),),
            )
        await self.db.commit()

    async def save_state(self, state: VenState) -> None:
        """Write the records that changed, in one transaction."""
        current = {eid: record.model_dump_json() for eid, record in state.events.items()}
        changed = [(eid, text) for eid, text in current.items() if self._saved.get(eid) != text]
        gone = [(eid,) for eid in self._saved if eid not in current]
        if not changed and not gone:
            return
        await self.db.executemany(
            "INSERT OR REPLACE INTO openadr_ven_events (event_id, record) VALUES (?, ?)", changed
        )
        await self.db.executemany("DELETE FROM openadr_ven_events WHERE event_id = ?", gone)
        await self.db.commit()
        self._saved = current


def _json_obj(text: str) -> Any:
    return json.loads(text)


# --------------------------------------------------------------------------- reports


@dataclass(slots=True)
class _ReportRequest:
    """One report the VTN asked for: sample every ``granularity``, send every ``back``."""

    request_id: str
    specifier_id: str
    r_ids: tuple[str, ...]
    granularity_s: float
    back_s: float
    next_sample: datetime
    next_send: datetime
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def one_shot(self) -> bool:
        return self.back_s <= 0 and self.granularity_s <= 0


def _seconds(value: object) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return 0.0


# --------------------------------------------------------------------------- the service


def _price_schedule(
    group: str, intervals: list[PriceInterval], issued: datetime, source: str
) -> PriceSchedule | None:
    """One schedule from a group's price intervals: on the largest step that divides every
    interval (at least 5 min), from the first interval on as long as they follow each other
    (a gap or an overlap ends it: the rest waits for the next distribution)."""
    intervals = sorted(intervals, key=lambda i: i.start)
    step = 0
    for interval in intervals:
        step = math.gcd(step, round(interval.duration_s))
    if step < MIN_STEP_S or step > 86_400:
        log.warning("OpenADR prices for %s: intervals of %d s cannot be stepped", group, step)
        return None
    points: list[PricePoint] = []
    cursor = intervals[0].start
    for interval in intervals:
        if interval.start != cursor:
            log.warning(
                "OpenADR prices for %s: a gap or overlap at %s; later intervals not used yet",
                group,
                interval.start.isoformat(),
            )
            break
        for k in range(round(interval.duration_s) // step):
            points.append(
                PricePoint(
                    start=interval.start + timedelta(seconds=k * step),
                    price=round(interval.price_per_kwh, 6),
                )
            )
        cursor = interval.start + timedelta(seconds=interval.duration_s)
    currency = intervals[0].currency
    return PriceSchedule(
        issued_at=issued,
        scope=group,
        kind=PriceKind.REAL_TIME,
        currency=currency if currency is not None and re.fullmatch(r"[A-Z]{3}", currency)
        else "USD",
        step_s=step,
        points=tuple(points[:MAX_POINTS]),
        source=f"openadr:{source}"[:128],
    )


class OpenAdrVen:
    """A pull-mode OpenADR 2.0b VEN that turns a utility's events into unified commands.

    Run it with :meth:`run` inside the gateway's task group; cancel that task to stop it.
    """

    def __init__(
        self,
        config: OpenAdrVenConfig,
        *,
        submit: Submit,
        telemetry: TelemetrySource | None = None,
        capacity: CapacitySource | None = None,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
        prices: PutPrices | None = None,
    ) -> None:
        if "ELECTRICITY_PRICE" in config.program.signals and prices is None:
            raise ValueError("a VEN that accepts ELECTRICITY_PRICE events needs a price store")
        self.config = config
        self._submit = submit
        self._prices = prices
        self._prices_put: dict[str, tuple[tuple[float, float, float], ...]] = {}
        self._telemetry = telemetry
        self._capacity = capacity
        self._clock = clock
        self._rng = rng or random.SystemRandom()
        self._store = VenStore(config.store_path)
        self._session: aiohttp.ClientSession | None = None
        self.registration: Registration | None = None
        self.state = VenState()
        self.reachable: bool | None = None
        self.polls: Counter[str] = Counter()
        """Poll cycles with the VTN by outcome, ``ok`` or ``failed`` (the operator's metrics)."""
        # Reports registered and events requested since the (re-)registration or the start.
        self._synced = False
        self.ready = asyncio.Event()
        self._reports: dict[str, _ReportRequest] = {}
        self._report_wake = asyncio.Event()
        self._unhandled_logged: set[str] = set()
        # Reverse of the target map: which OpenADR resource id names each group in reports.
        self._resources: dict[str, str] = {}
        program = config.program
        if program.default_group is not None:
            self._resources[program.default_group] = program.default_group
        for key, group in program.targets.items():
            kind, _, name = key.partition(":")
            if kind == "resource_id":
                self._resources[group] = name
            else:
                self._resources.setdefault(group, group)

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        quiet_openleadr()
        install_resource_status()
        timeout = aiohttp.ClientTimeout(total=self.config.io_timeout_s)
        context = self._ssl_context()
        # Without a TLS section, https still verifies the VTN against the system CAs.
        connector = aiohttp.TCPConnector(ssl=context if context is not None else True)
        async with (
            self._store,
            aiohttp.ClientSession(
                timeout=timeout,
                connector=connector,
                headers={"Content-Type": "application/xml"},
            ) as session,
        ):
            self._session = session
            self.registration, self.state = await self._store.load()
            if pending_commands(self.state):
                log.info("resubmitting unconfirmed OpenADR commands from the last run")
                await self._flush(announce=False)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._poll_loop(), name="openadr-ven:poll")
                    tg.create_task(self._report_loop(), name="openadr-ven:reports")
                    self.ready.set()
                    await wait_inside_task_group()
            finally:
                self._session = None

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_path))
        pin_openadr_tls(context)
        context.check_hostname = tls.check_hostname
        context.load_cert_chain(str(tls.cert_path), str(tls.key_path))
        return context

    # ------------------------------------------------------------------ poll loop
    async def _poll_loop(self) -> None:
        backoff = self.config.backoff_initial_s
        while True:
            try:
                if self.registration is None:
                    await self._register()
                if not self._synced:
                    await self._register_reports()
                    await self._request_events()
                    self._synced = True
                await self._flush(announce=True)
                await self._poll_until_empty()
            except (VtnUnavailable, VtnProtocolError, RegistrationRefused) as exc:
                self.polls["failed"] += 1
                self._mark_down(exc)
                delay = backoff * self._rng.uniform(0.5, 1.0)
                backoff = min(backoff * 2, self.config.backoff_max_s)
            except Exception:  # e.g. the store's disk: the loop must outlive one bad cycle
                self.polls["failed"] += 1
                log.exception("OpenADR VEN poll cycle failed")
                delay = backoff * self._rng.uniform(0.5, 1.0)
                backoff = min(backoff * 2, self.config.backoff_max_s)
            else:
                self.polls["ok"] += 1
                self._mark_up()
                backoff = self.config.backoff_initial_s
                delay = self._poll_delay()
            await asyncio.sleep(delay)

    def _poll_delay(self) -> float:
        base = self.config.poll_interval_s
        if base is None:
            base = self.registration.poll_interval_s if self.registration else 10.0
        jitter = self.config.poll_jitter
        return max(0.05, base * self._rng.uniform(1 - jitter, 1 + jitter))

    def _mark_down(self, exc: OpenAdrVenError) -> None:
        if self.reachable is not False:
            log.warning("OpenADR VTN lost: %s (retrying with backoff)", exc)
        else:
            log.debug("OpenADR VTN still unavailable: %s", exc)
        self.reachable = False

    def _mark_up(self) -> None:
        if self.reachable is False:
            log.info("OpenADR VTN reachable again")
        self.reachable = True

    async def _poll_until_empty(self) -> None:
        """2.0b hands out one message per poll: keep polling while there is one."""
        for _ in range(self.config.max_messages_per_poll):
            registration = self._registered()
            try:
                message_type, payload = await self._exchange(
                    "OadrPoll", "oadrPoll", {"ven_id": xml_text(registration.ven_id)}
                )
            except VtnProtocolError as exc:
                if exc.code in _UNKNOWN_VEN_CODES:
                    # The VTN does not know our venID: register afresh next cycle (after the
                    # backoff this error brings), rather than polling with it forever.
                    log.warning("OpenADR VTN does not know our venID (%s); registering afresh", exc)
                    await self._forget_registration()
                raise
            if message_type in ("oadrResponse", ""):
                return
            await self._handle(message_type, payload)
        log.warning(
            "OpenADR VTN still had messages after %d polls; continuing next cycle",
            self.config.max_messages_per_poll,
        )

    async def _handle(self, message_type: str, payload: dict[str, Any]) -> None:
        if message_type == "oadrDistributeEvent":
            await self._on_distribution(payload)
        elif message_type == "oadrRequestReregistration":
            await self._send_response("EiRegisterParty", None)
            log.info("OpenADR VTN asked us to re-register")
            try:
                await self._register(reregister=True)
            except RegistrationRefused as exc:
                # It no longer knows our ids (reset, restored from an older backup): asking
                # again with them would be refused again on every poll, forever.
                log.warning("OpenADR VTN refused our old ids (%s); registering afresh", exc)
                await self._forget_registration()
                await self._register()
            await self._register_reports()
            await self._request_events()
        elif message_type == "oadrCancelPartyRegistration":
            await self._on_cancel_registration(payload)
        elif message_type == "oadrCreateReport":
            await self._on_report_requests(payload, created_reply=True)
        elif message_type == "oadrCancelReport":
            await self._on_cancel_report(payload)
        elif message_type == "oadrRegisterReport":
            # Reports in the VTN → VEN direction: we need none of them.
            await self._exchange(
                "EiReport",
                "oadrRegisteredReport",
                {
                    "response": self._ok(payload.get("request_id")),
                    "report_requests": [],
                    "ven_id": xml_text(self._registered().ven_id),
                },
                check=False,
            )
        elif message_type not in self._unhandled_logged:
            self._unhandled_logged.add(message_type)
            log.warning("ignoring OpenADR message %s from the VTN", message_type)

    # ------------------------------------------------------------------ registration
    def _registered(self) -> Registration:
        if self.registration is None:
            raise VtnProtocolError(None, "not registered")
        return self.registration

    async def _register(self, *, reregister: bool = False) -> None:
        previous = self.registration
        _, query = await self._exchange(
            "EiRegisterParty", "oadrQueryRegistration", {"request_id": self._new_id()}
        )
        poll = _seconds(query.get("requested_oadr_poll_freq")) or 10.0
        message_type, payload = await self._exchange(
            "EiRegisterParty",
            "oadrCreatePartyRegistration",
            {
                "request_id": self._new_id(),
                "ven_name": xml_text(self.config.program.ven_name),
                "ven_id": xml_text(previous.ven_id) if previous else None,
                "registration_id": (
                    xml_text(previous.registration_id) if previous and reregister else None
                ),
                "http_pull_model": True,
                "xml_signature": False,
                "report_only": False,
                "profile_name": "2.0b",
                "transport_name": "simpleHttp",
                "transport_address": None,  # pull: none (left out: protocols.openadr.templates)
            },
            check=False,
        )
        response = payload.get("response") or {}
        code = response.get("response_code")
        if message_type != "oadrCreatedPartyRegistration" or code != 200:
            raise RegistrationRefused(code, str(response.get("response_description", "")))
        ven_id, registration_id = payload.get("ven_id"), payload.get("registration_id")
        if not ven_id or not registration_id:
            raise RegistrationRefused(code, "the VTN returned no venID / registrationID")
        poll = _seconds(payload.get("requested_oadr_poll_freq")) or poll
        self.registration = Registration(
            ven_id=str(ven_id),
            registration_id=str(registration_id),
            vtn_id=None if payload.get("vtn_id") is None else str(payload["vtn_id"]),
            poll_interval_s=min(max(poll, 1.0), 86_400.0),
        )
        await self._store.save_registration(self.registration)
        log.info(
            "registered with the OpenADR VTN as %s (registration %s, poll every %gs)",
            self.registration.ven_id,
            self.registration.registration_id,
            self.registration.poll_interval_s,
        )

    async def _on_cancel_registration(self, payload: dict[str, Any]) -> None:
        registration = self._registered()
        await self._exchange(
            "EiRegisterParty",
            "oadrCanceledPartyRegistration",
            {
                "response": self._ok(payload.get("request_id")),
                "registration_id": xml_text(registration.registration_id),
                "ven_id": xml_text(registration.ven_id),
            },
            check=False,
        )
        log.warning("the OpenADR VTN cancelled our registration; registering again")
        await self._forget_registration()

    async def _forget_registration(self) -> None:
        """The next cycle registers afresh: no venID, no registrationID."""
        self.registration = None
        self._synced = False
        self._reports.clear()
        await self._store.save_registration(None)

    async def _request_events(self) -> None:
        """Sync events after (re-)registration; the poll loop only sees changes after this."""
        registration = self._registered()
        message_type, payload = await self._exchange(
            "EiEvent",
            "oadrRequestEvent",
            {"request_id": self._new_id(), "ven_id": xml_text(registration.ven_id)},
        )
        if message_type == "oadrDistributeEvent":
            await self._on_distribution(payload)

    # ------------------------------------------------------------------ events
    async def _on_distribution(self, payload: dict[str, Any]) -> None:
        distribution = parse_distribution(payload)
        now = self._clock()
        capacity = self._capacities()
        state, commands, responses = reconcile(
            self.state, distribution, now, self._draw, self.config.program, capacity
        )
        # Persist draws and outboxes before acting on them: after a crash we resubmit the same
        # commands (the book is idempotent) instead of drawing again or forgetting a cancel.
        await self._store.save_state(state)
        self.state = state
        log.debug(
            "distribution %s: %d event(s), %d command(s)",
            distribution.request_id,
            len(distribution.events),
            len(commands),
        )
        await self._put_prices(distribution, now)
        changed = await self._flush(announce=False)
        final = [changed.pop(r.event_id, r) for r in responses]
        if final:
            await self._send_event_responses(distribution.request_id, final)
        if changed:
            await self._send_event_responses(None, list(changed.values()))

    async def _put_prices(self, distribution: Distribution, now: datetime) -> None:
        """ELECTRICITY_PRICE events (the program accepts them) into the price store: per group,
        one real-time schedule from the intervals of every price event in force or to come
        (a distribution lists all of them), so it wins where it covers over a day-ahead one."""
        if self._prices is None:
            return
        by_group: dict[str, list[PriceInterval]] = {}
        for interval in price_intervals(distribution, self.config.program, now):
            by_group.setdefault(interval.group_id, []).append(interval)
        for group, intervals in sorted(by_group.items()):
            schedule = _price_schedule(group, intervals, now, self.audit_source)
            if schedule is None:
                continue
            content = tuple((p.start.timestamp(), float(schedule.step_s), p.price)
                            for p in schedule.points)
            if self._prices_put.get(group) == content:
                continue  # the same prices again (a redelivery): no re-plan
            try:
                warning = await self._prices(schedule)
            except Exception as exc:  # the core refused it (e.g. an unknown group): say so
                log.warning("OpenADR prices for %s not used: %s", group, exc)
                continue
            self._prices_put[group] = content
            log.info(
                "OpenADR prices for %s: %d points of %d s from %s%s",
                group,
                len(schedule.points),
                schedule.step_s,
                schedule.points[0].start.isoformat(),
                f" ({warning})" if warning else "",
            )

    def _draw(self, event_id: str, max_s: float) -> float:
        return self._rng.uniform(0.0, max_s)

    def _capacities(self) -> dict[str, GroupCapacity]:
        if self._capacity is None:
            return {}
        program = self.config.program
        groups = set(program.targets.values())
        if program.default_group is not None:
            groups.add(program.default_group)
        out = {}
        for group in sorted(groups):
            cap = self._capacity(group)
            if cap is not None:
                out[group] = cap
        return out

    async def _flush(self, *, announce: bool) -> dict[str, OptResponse]:
        """Submit every outbox and settle it. Returns the responses that changed (opt-outs
        because the gateway refused a command); with ``announce`` they are sent at once."""
        changed: dict[str, OptResponse] = {}
        # Settling can add cancels (of the accepted part of a refused event): a second round.
        for _ in range(3):
            pending = pending_commands(self.state)
            if not pending:
                break
            progressed = False
            for event_id, outbox in pending.items():
                outcomes: dict[str, tuple[AckState, str | None, str | None]] = {}
                complete = True
                for command in outbox:
                    ack = await self._submit_one(command)
                    if ack is None:
                        complete = False
                        break
                    outcomes[command.command_id] = (
                        ack.state,
                        ack.reason.value if ack.reason else None,
                        ack.detail,
                    )
                if not complete:
                    continue  # keep the outbox; resubmitted next cycle (idempotent)
                self.state, response = settle(
                    self.state, event_id, outcomes, self._clock(), self.config.program
                )
                progressed = True
                if response is not None:
                    log.warning(
                        "opting out of OpenADR event %s: %s", event_id, response.description
                    )
                    changed[event_id] = response
            await self._store.save_state(self.state)
            if not progressed:
                break
        if announce and changed:
            await self._send_event_responses(None, list(changed.values()))
            return {}
        return changed

    @property
    def audit_source(self) -> str:
        """Who commands us, for the audit log: the VTN by the id it gave at registration (its
        URL until then)."""
        registration = self.registration
        vtn = registration.vtn_id if registration is not None else None
        return f"openadr-vtn:{vtn or self.config.vtn_url}"

    async def _submit_one(self, command: Command) -> Ack | None:
        """The gateway's ack, or None when it could not answer (retry later)."""
        try:
            async with asyncio.timeout(self.config.submit_timeout_s):
                ack = await self._submit(command)
        except TimeoutError:
            raise_if_cancelling()
            log.warning("gateway did not answer command %s in time", command.command_id)
            return None
        except Exception:
            log.exception("gateway failed on command %s", command.command_id)
            return Ack(
                command_id=command.command_id,
                state=AckState.REJECTED,
                timestamp=self._clock(),
                reason=Reason.INTERNAL,
                detail="the gateway raised while handling the command",
            )
        return ack

    async def _send_event_responses(
        self, request_id: str | None, responses: list[OptResponse]
    ) -> None:
        registration = self._registered()
        rid = xml_text(request_id or self._new_id())
        await self._exchange(
            "EiEvent",
            "oadrCreatedEvent",
            {
                "response": {"response_code": 200, "response_description": "OK", "request_id": rid},
                "event_responses": [
                    {
                        # An opt-out is an answer, not an error: 200 with optOut, as certified
                        # VTNs expect; why goes in the description (its code stays in our log).
                        "response_code": 200,
                        "response_description": xml_text(r.description),
                        "request_id": rid,
                        "event_id": xml_text(r.event_id),
                        "modification_number": r.modification_number,
                        "opt_type": r.opt_type.value,
                    }
                    for r in responses
                ],
                "ven_id": xml_text(registration.ven_id),
            },
            check=False,
        )

    # ------------------------------------------------------------------ reports
    def _report_groups(self) -> list[tuple[str, str]]:
        """``(group_id, resource_id)`` of every group the program maps to."""
        return sorted(self._resources.items())

    async def _register_reports(self) -> None:
        registration = self._registered()
        self._reports.clear()
        groups = self._report_groups()
        if not groups or self._telemetry is None:
            return
        now = self._clock()
        sampling = {
            "min_period": timedelta(seconds=self.config.report_min_period_s),
            "max_period": timedelta(seconds=self.config.report_max_period_s),
            "on_change": False,
        }
        duration = timedelta(seconds=self.config.report_max_period_s)

        def description(
            r_id: str, resource: str, report_type: str, reading: str, measurement: Any
        ) -> dict[str, Any]:
            return {
                "r_id": xml_text(r_id),
                "report_data_source": {"resource_id": xml_text(resource)},
                "report_subject": None,
                "report_type": report_type,
                "reading_type": reading,
                "market_context": None,
                "sampling_rate": sampling,
                "measurement": measurement,
            }

        power = {
            "name": "powerReal",
            "description": "RealPower",
            "unit": "W",
            "scale": "k",
            "power_attributes": {"hertz": 50, "voltage": 230, "ac": True},
        }
        reports = [
            {
                "report_specifier_id": _USAGE_SPECIFIER,
                "report_name": "METADATA_TELEMETRY_USAGE",
                "report_request_id": None,
                "created_date_time": now,
                "duration": duration,
                "report_descriptions": [
                    description(f"usage:{g}", res, "usage", "Direct Read", power)
                    for g, res in groups
                ],
            },
            {
                "report_specifier_id": _STATUS_SPECIFIER,
                "report_name": "METADATA_TELEMETRY_STATUS",
                "report_request_id": None,
                "created_date_time": now,
                "duration": duration,
                "report_descriptions": [
                    description(f"status:{g}", res, "x-resourceStatus", "x-notApplicable", None)
                    for g, res in groups
                ],
            },
        ]
        message_type, payload = await self._exchange(
            "EiReport",
            "oadrRegisterReport",
            {
                "request_id": self._new_id(),
                "ven_id": xml_text(registration.ven_id),
                "reports": reports,
            },
        )
        if message_type == "oadrRegisteredReport" and payload.get("report_requests"):
            await self._on_report_requests(payload, created_reply=True)

    async def _on_report_requests(self, payload: dict[str, Any], *, created_reply: bool) -> None:
        now = self._clock()
        known = {f"usage:{g}" for g, _ in self._report_groups()} | {
            f"status:{g}" for g, _ in self._report_groups()
        }
        accepted: list[str] = []
        refused: list[str] = []
        for request in as_list(payload.get("report_requests")):
            if not isinstance(request, Mapping):
                continue
            specifier = request.get("report_specifier") or {}
            if not isinstance(specifier, Mapping):
                specifier = {}
            request_id = request.get("report_request_id")
            specifier_id = str(specifier.get("report_specifier_id", ""))
            r_ids = tuple(
                str(p.get("r_id"))
                for p in as_list(specifier.get("specifier_payloads"))
                if isinstance(p, Mapping) and str(p.get("r_id")) in known
            )
            if (
                request_id is None
                or specifier_id not in (_USAGE_SPECIFIER, _STATUS_SPECIFIER)
                or not r_ids
            ):
                # Only the two telemetry reports are offered (no HISTORY_USAGE: the gateway's
                # history is not kept per OpenADR resource): refuse the rest by name.
                what = f"{str(request_id)[:64]} ({specifier_id[:64] or 'no specifier'})"
                refused.append(what)
                log.warning("OpenADR VTN requested a report we do not offer: %s", what)
                continue
            granularity = _seconds(specifier.get("granularity"))
            back = _seconds(specifier.get("report_back_duration"))
            if granularity > 0:
                granularity = min(
                    max(granularity, self.config.report_min_period_s),
                    self.config.report_max_period_s,
                )
            back = max(back, granularity) if back > 0 else granularity
            # A report back duration of millions of days is "never", not a date past 9999.
            back = min(back, _NEVER_S)
            report = _ReportRequest(
                request_id=str(request_id),
                specifier_id=specifier_id,
                r_ids=r_ids,
                granularity_s=granularity,
                back_s=back,
                next_sample=now,
                next_send=now + timedelta(seconds=back),
            )
            self._reports[report.request_id] = report
            accepted.append(report.request_id)
            log.info(
                "OpenADR report %s: %d value(s) every %gs, sent every %gs",
                report.request_id,
                len(r_ids),
                granularity,
                back,
            )
        if created_reply:
            request_id = payload.get("request_id")
            if request_id is None and isinstance(payload.get("response"), Mapping):
                request_id = payload["response"].get("request_id")
            response = self._ok(request_id)
            if refused:
                response |= {
                    "response_code": _REPORT_NOT_SUPPORTED,
                    "response_description": xml_text(
                        "not offered (only TELEMETRY_USAGE and TELEMETRY_STATUS): "
                        + ", ".join(refused[:10])
                    ),
                }
            await self._exchange(
                "EiReport",
                "oadrCreatedReport",
                {
                    "response": response,
                    "pending_reports": [{"report_request_id": xml_text(r)} for r in accepted],
                    "ven_id": xml_text(self._registered().ven_id),
                },
                check=False,
            )
        self._report_wake.set()

    async def _on_cancel_report(self, payload: dict[str, Any]) -> None:
        request_id = str(payload.get("report_request_id"))
        report = self._reports.pop(request_id, None)
        if report is not None and report.samples:
            with contextlib.suppress(OpenAdrVenError):
                await self._send_report(report)
        await self._exchange(
            "EiReport",
            "oadrCanceledReport",
            {
                "response": self._ok(payload.get("request_id")),
                "pending_reports": [],
                "ven_id": xml_text(self._registered().ven_id),
            },
            check=False,
        )

    async def _report_loop(self) -> None:
        while True:
            try:
                await self._report_cycle()
            except Exception:  # a bad report must not stop event handling
                log.exception("OpenADR report cycle failed")
                await asyncio.sleep(1.0)

    async def _report_cycle(self) -> None:
        """Sample and send what is due, then sleep until the next thing is due."""
        now = self._clock()
        for report in list(self._reports.values()):
            if report.next_sample <= now:
                self._sample(report, now)
                # A one-shot report (granularity 0) samples once.
                step = report.granularity_s or _NEVER_S
                report.next_sample = now + timedelta(seconds=step)
            if report.one_shot or report.next_send <= now:
                try:
                    await self._send_report(report)
                except OpenAdrVenError as exc:
                    log.debug("report %s not sent: %s", report.request_id, exc)
                    continue  # the poll loop reports the VTN's state; keep the samples
                if report.one_shot:
                    self._reports.pop(report.request_id, None)
                else:
                    report.next_send = now + timedelta(seconds=report.back_s)
        wake = min(
            (min(r.next_sample, r.next_send) for r in self._reports.values()),
            default=None,
        )
        delay = 60.0 if wake is None else (wake - self._clock()).total_seconds()
        self._report_wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(max(delay, 0.05), 60.0)):
                await self._report_wake.wait()

    def _sample(self, report: _ReportRequest, now: datetime) -> None:
        if self._telemetry is None:
            return
        try:
            groups = {t.group_id: t for t in self._telemetry(now)}
        except Exception:
            log.exception("group telemetry failed; report %s skips a sample", report.request_id)
            return
        for r_id in report.r_ids:
            kind, _, group = r_id.partition(":")
            telemetry = groups.get(group)
            if telemetry is None:
                continue
            if kind == "usage":
                payload: dict[str, Any] = {
                    "r_id": xml_text(r_id),
                    "value": round(telemetry.power_kw, 6),
                }
            else:
                # oadrPayloadResourceStatus (protocols.openadr.resource_status): the group is
                # online while any of its devices reports; no override, no state of charge.
                online = telemetry.devices_reporting > 0
                payload = status_payload(xml_text(r_id), ResourceStatus(online=online))
            payload["data_quality"] = _DATA_QUALITY[telemetry.quality]
            report.samples.append({"dtstart": telemetry.timestamp, "report_payload": payload})
        # Bound the buffer if the VTN is away for long: the oldest samples go first.
        del report.samples[: max(0, len(report.samples) - 10_000)]

    async def _send_report(self, report: _ReportRequest) -> None:
        if not report.samples:
            return
        samples, report.samples = report.samples, []
        name = "TELEMETRY_USAGE" if report.specifier_id == _USAGE_SPECIFIER else "TELEMETRY_STATUS"
        try:
            await self._exchange(
                "EiReport",
                "oadrUpdateReport",
                {
                    "request_id": self._new_id(),
                    "ven_id": xml_text(self._registered().ven_id),
                    "reports": [
                        {
                            "report_id": self._new_id(),
                            "report_request_id": xml_text(report.request_id),
                            "report_specifier_id": xml_text(report.specifier_id),
                            "report_name": name,
                            "created_date_time": self._clock(),
                            "dtstart": min(s["dtstart"] for s in samples),
                            "intervals": samples,
                        }
                    ],
                },
            )
        except OpenAdrVenError:
            report.samples[:0] = samples
            raise

    # ------------------------------------------------------------------ transport
    def _ok(self, request_id: object) -> dict[str, Any]:
        return {
            "response_code": 200,
            "response_description": "OK",
            "request_id": None if request_id is None else xml_text(request_id),
        }

    async def _send_response(self, service: str, request_id: object) -> None:
        await self._exchange(
            service,
            "oadrResponse",
            {
                "response": self._ok(request_id),
                "ven_id": xml_text(self._registered().ven_id),
            },
            check=False,
        )

    @staticmethod
    def _new_id() -> str:
        return uuid.uuid4().hex

    async def _exchange(
        self, service: str, message_type: str, payload: Mapping[str, Any], *, check: bool = True
    ) -> tuple[str, dict[str, Any]]:
        """POST one message; return the VTN's answer as ``(message_type, payload)``.

        An empty body (openleadr answers some acknowledgements that way) is ``("", {})``. With
        ``check``, an OpenADR error code in the answer raises :class:`VtnProtocolError`.
        """
        session = self._session
        if session is None:
            raise VtnUnavailable(self.config.vtn_url, "the VEN is not running")
        try:
            body = encode(message_type, payload)
        except OadrMessageError as exc:
            raise VtnProtocolError(message_type, f"could not build the message: {exc}") from exc
        url = f"{self.config.vtn_url.rstrip('/')}/{service}"
        limit = self.config.max_message_bytes
        try:
            async with (
                asyncio.timeout(self.config.io_timeout_s),
                session.post(url, data=body) as response,
            ):
                status = response.status
                content = await response.content.read(limit + 1)
        except TimeoutError:
            raise_if_cancelling()
            raise VtnUnavailable(url, f"no answer in {self.config.io_timeout_s:g}s") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            # Not a network fault: say so, since retrying will not help until someone acts.
            raise VtnUnavailable(
                url, f"the VTN's TLS certificate is not trusted: {exc.certificate_error}"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise VtnUnavailable(url, f"{type(exc).__name__}: {exc}") from exc
        if status != 200:
            text = content[:200].decode("utf-8", errors="replace")
            raise VtnUnavailable(url, f"HTTP {status}: {text}", status)
        if not content.strip():
            return "", {}
        try:
            answer_type, answer = decode(content, max_bytes=limit)
        except OadrMessageError as exc:
            raise VtnProtocolError(None, str(exc)) from exc
        response_part = answer.get("response")
        if check and isinstance(response_part, Mapping):
            code = response_part.get("response_code")
            if code not in (None, 200):
                raise VtnProtocolError(
                    answer_type,
                    str(response_part.get("response_description", "")),
                    code if isinstance(code, int) else None,
                )
        return answer_type, answer
