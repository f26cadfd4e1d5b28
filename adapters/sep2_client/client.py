"""IEEE 2030.5 (CSIP / CSIP-AUS) client: takes dynamic operating envelopes from a utility server.

The edge agent at a site runs one ``Sep2Client``. It

* discovers everything from the server's DeviceCapability (``/dcap`` is the only configured
  path; every other resource is reached by following hrefs, because servers lay out their URLs
  differently and envoy's hrefs are opaque database ids);
* keeps the offset between our clock and the server's ``/tm``, because event times are the
  server's;
* finds its EndDevice by LFDI (registering with a POST when the server allows it) and checks the
  registration PIN when one is configured (CSIP-AUS: a client must refuse a server whose PIN
  does not match what the installer was told);
* walks FunctionSetAssignments → DERProgramList → DERControlList and DefaultDERControl, paging
  with ``s``/``l`` and coping with servers that hand out one item per page;
* hands the programs to the pure scheduler (``protocols.sep2.scheduler``) and calls
  ``on_envelope`` whenever the effective control changes, posts the Responses it owes, and
  re-evaluates at every boundary between polls so events start and end on time;
* posts telemetry through MirrorUsagePoints and PUTs DERCapability / DERStatus where the server
  offers those links.

Comms loss must not loosen a limit: the last programs, their defaults, the per-event random
draws, the Response ledger and the clock offset are persisted (JSON written atomically), so a
restart with no server still enforces scheduled events and the DefaultDERControl, and never
re-randomizes an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, TypeVar

import aiohttp
from aiohttp import web
from yarl import URL

from protocols.sep2 import (
    DEFAULT_MAX_BYTES,
    MEDIA_TYPE,
    ConsumptionTariffIntervalList,
    DateTimeInterval,
    DefaultDERControl,
    DERCapability,
    DERControl,
    DERControlBase,
    DERControlList,
    DERControlResponse,
    DERList,
    DERProgram,
    DERProgramList,
    DERStatus,
    DeviceCapability,
    EndDevice,
    EndDeviceList,
    Error,
    FunctionSetAssignmentsList,
    MirrorMeterReading,
    MirrorUsagePoint,
    Notification,
    RateComponent,
    RateComponentList,
    Reading,
    ReadingType,
    Registration,
    Sep2Error,
    Sep2List,
    Sep2Model,
    TariffProfile,
    TariffProfileList,
    Time,
    TimeTariffInterval,
    TimeTariffIntervalList,
    UnexpectedElement,
    check_media_type,
    decode_as,
    decode_document,
    encode,
    normalize_lfdi,
    same_lfdi,
    sfdi_from_lfdi,
    to_watts,
    with_check_digit,
)
from protocols.sep2.scheduler import (
    ControlSource,
    ProgramControls,
    RandomDraw,
    RandomSource,
    ResponseDue,
    Schedule,
    ServerClock,
    draw_missing,
    evaluate,
    event_key,
)
from protocols.sep2.schema import CsipAusVersion
from unified.model import EnvelopeInterval, OperatingEnvelope, Target, utc_from_timestamp

__all__ = [
    "BodyTooLarge",
    "EffectiveControls",
    "HttpStatusError",
    "InvalidDocument",
    "RegistrationError",
    "Sep2Client",
    "Sep2ClientConfig",
    "Sep2ClientError",
    "Sep2StateFile",
    "ServerUnreachable",
    "TariffPrice",
    "TelemetrySample",
    "WrongMediaType",
]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Sep2Model)
L = TypeVar("L", bound=Sep2List)

_STATE_VERSION: Final = 1
_MAX_PAGES: Final = 1000  # a list that never ends is a broken server, not a reason to spin
_DEFAULT_POLL_S: Final = 900.0  # 2030.5 default pollRate
_UOM_WH: Final = 72
_FLOW_REVERSE: Final = 19


# --------------------------------------------------------------------------- errors


class Sep2ClientError(Exception):
    """Base of every error the client raises; each names the URL it concerns."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"{message} ({url})")
        self.url = url


class ServerUnreachable(Sep2ClientError):
    """No HTTP answer: connection refused or reset, DNS, TLS failure or timeout."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(url, f"server unreachable: {reason}")
        self.reason = reason


class HttpStatusError(Sep2ClientError):
    """The server answered with an unexpected HTTP status (its sep2 ``Error`` if it sent one)."""

    def __init__(
        self, method: str, url: str, status: int, reason_code: int | None, detail: str | None
    ) -> None:
        extra = f", reasonCode {reason_code}" if reason_code is not None else ""
        extra += f": {detail}" if detail else ""
        super().__init__(url, f"{method} answered HTTP {status}{extra}")
        self.method = method
        self.status = status
        self.reason_code = reason_code
        self.detail = detail

    @property
    def server_side(self) -> bool:
        return self.status >= 500


class WrongMediaType(Sep2ClientError):
    """A body that is not ``application/sep+xml``: we do not guess what it is."""

    def __init__(self, url: str, content_type: str | None) -> None:
        super().__init__(url, f"expected {MEDIA_TYPE}, got {content_type!r}")
        self.content_type = content_type


class InvalidDocument(Sep2ClientError):
    """A body that is not a valid 2030.5 document of the expected kind."""

    def __init__(self, url: str, error: Sep2Error) -> None:
        super().__init__(url, f"invalid 2030.5 document: {error}")
        self.error = error


class BodyTooLarge(Sep2ClientError):
    def __init__(self, url: str, limit: int) -> None:
        super().__init__(url, f"body larger than {limit} bytes")
        self.limit = limit


class RegistrationError(Sep2ClientError):
    """We are not (or cannot prove we are) registered with this server.

    ``reason`` is ``"not_registered"`` (no EndDevice with our LFDI and registration is off or
    refused) or ``"pin_mismatch"`` (the server's Registration PIN is not the configured one).
    """

    def __init__(self, url: str, reason: str, detail: str = "") -> None:
        super().__init__(url, f"registration: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- public values


@dataclass(frozen=True, slots=True)
class Sep2ClientConfig:
    """How to reach and behave towards one 2030.5 server."""

    server_url: str
    """Scheme, host and port, e.g. ``https://doe.utility.example:8443``."""
    lfdi: str
    """Our LFDI (40 hex digits, from our certificate: ``protocols.sep2.lfdi_from_cert``)."""
    state_path: Path
    """JSON file holding what must survive a restart during comms loss."""
    dcap_path: str = "/dcap"
    sfdi: int | None = None
    """Defaults to the SFDI derived from the LFDI."""
    registration_pin: int | None = None
    """Expected Registration PIN, with or without its check digit; None = do not check."""
    register: bool = True
    """POST an EndDevice when the server lists none with our LFDI."""
    device_category: str | None = None
    """deviceCategory (hex) for registration, e.g. ``"200000"`` for PV."""
    poll_interval_s: float | None = None
    """Override of the server's pollRate."""
    min_poll_interval_s: float = 1.0
    """Floor under the server's pollRate (a 0 pollRate must not become a busy loop)."""
    poll_jitter: float = 0.1
    """Polls are spread by ±this fraction, so a fleet does not poll in step."""
    telemetry_interval_s: float | None = None
    """Defaults to the MirrorUsagePoint postRate, else 300 s."""
    request_timeout_s: float = 10.0
    max_body_bytes: int = DEFAULT_MAX_BYTES
    page_size: int = 50
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0


@dataclass(frozen=True, slots=True)
class EffectiveControls:
    """The control in force at the site, with the event or default behind every field.

    Power is converted to kW where a unified equivalent exists (load convention: +import).
    Percent controls (opModFixedW, opModMaxLimW) stay percentages of rated power, because only
    the device adapter knows its rating.
    """

    at: datetime
    valid_until: datetime | None
    """Next instant the scheduler knows something may change (None = nothing scheduled)."""
    controls: DERControlBase
    sources: Mapping[str, ControlSource]
    online: bool
    """False when this came from persisted state or a poll failed (comms loss)."""

    def _kw(self, name: str) -> float | None:
        power = getattr(self.controls, name)
        return None if power is None else to_watts(power) / 1000.0

    @property
    def import_limit_kw(self) -> float | None:
        """Site import limit (opModImpLimW), a non-negative magnitude."""
        value = self._kw("op_mod_imp_lim_w")
        return None if value is None else max(0.0, value)

    @property
    def export_limit_kw(self) -> float | None:
        """Site export limit (opModExpLimW). 0 means "no export", not "no limit"."""
        value = self._kw("op_mod_exp_lim_w")
        return None if value is None else max(0.0, value)

    @property
    def generation_limit_kw(self) -> float | None:
        """Per-device generation limit (opModGenLimW)."""
        return self._kw("op_mod_gen_lim_w")

    @property
    def load_limit_kw(self) -> float | None:
        """Per-device load limit (opModLoadLimW)."""
        return self._kw("op_mod_load_lim_w")

    @property
    def target_kw(self) -> float | None:
        """opModTargetW in the load convention (2030.5 counts DER output as positive)."""
        value = self._kw("op_mod_target_w")
        return None if value is None else -value

    @property
    def storage_target_kw(self) -> float | None:
        """CSIP-AUS v1.3 opModStorageTargetW: + charge, - discharge (already load convention)."""
        return self._kw("op_mod_storage_target_w")

    @property
    def connect(self) -> bool | None:
        return self.controls.op_mod_connect

    @property
    def energize(self) -> bool | None:
        return self.controls.op_mod_energize

    @property
    def fixed_w_pct(self) -> float | None:
        value = self.controls.op_mod_fixed_w
        return None if value is None else value / 100.0

    @property
    def max_lim_w_pct(self) -> float | None:
        value = self.controls.op_mod_max_lim_w
        return None if value is None else value / 100.0

    def why(self, name: str) -> str:
        """A human answer to "why is this field what it is?"."""
        source = self.sources.get(name)
        if source is None:
            return f"{name}: no control"
        return (
            f"{name}: {source.kind.value} {source.mrid} of program {source.program_mrid}"
            f" (primacy {source.primacy})"
        )

    def to_operating_envelope(
        self,
        target: Target,
        *,
        program: str = "sep2",
        command_id: str | None = None,
        horizon_s: float = 24 * 3600.0,
    ) -> OperatingEnvelope | None:
        """The site import/export limits as a unified OperatingEnvelope, or None if neither.

        The interval starts now and stands until ``valid_until``, or for ``horizon_s``
        when nothing is scheduled. ``on_envelope`` is called again at every
        scheduled boundary, so the next envelope replaces this one before it lapses (same
        program: newer supersedes), and a call with no limits means "cancel the last one".
        The command id names the content and the instant, so a redelivery is idempotent but a
        return to an earlier value later is a new command.
        """
        imp, exp = self.import_limit_kw, self.export_limit_kw
        if imp is None and exp is None:
            return None
        end = self.valid_until or self.at + timedelta(seconds=horizon_s)
        if end <= self.at:
            end = self.at + timedelta(seconds=1)
        if command_id is None:
            fingerprint = json.dumps(
                [imp, exp, [(k, v.mrid) for k, v in sorted(self.sources.items())]]
            )
            digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
            command_id = f"sep2-{int(self.at.timestamp())}-{digest}"
        return OperatingEnvelope(
            command_id=command_id,
            issued_at=self.at,
            program=program,
            priority=1000,
            target=target,
            intervals=(
                EnvelopeInterval(start=self.at, end=end, import_limit_kw=imp, export_limit_kw=exp),
            ),
        )


@dataclass(frozen=True, slots=True)
class TariffPrice:
    """One price of the server's Pricing function set (IEEE 2030.5 §10.5), per kWh."""

    profile_mrid: str
    primacy: int
    currency: int | None  # ISO 4217 number
    direction: str  # "import" (flowDirection 1) or "export" (19)
    start: int  # epoch s (the server's clock)
    duration_s: int
    price_per_kwh: float  # in the currency
    status: int  # EventStatus.currentStatus (0 scheduled, 1 active, 2 cancelled, ...)


@dataclass(frozen=True, slots=True)
class TelemetrySample:
    """Site and DER active power from the local meters, kW in the load convention."""

    site_kw: float | None = None
    der_kw: float | None = None
    timestamp: datetime | None = None
    """When measured (UTC); None = now."""


EnvelopeCallback = Callable[[EffectiveControls], Awaitable[None]]
TelemetryCallback = Callable[[], Awaitable[TelemetrySample]]
DERStatusCallback = Callable[[], Awaitable[DERStatus]]


# --------------------------------------------------------------------------- persistence


@dataclass(slots=True)
class _State:
    programs: list[ProgramControls] = field(default_factory=list)
    draws: dict[str, RandomDraw] = field(default_factory=dict)
    sent: dict[str, set[int]] = field(default_factory=dict)
    clock_offset_s: float = 0.0
    mups: dict[str, str] = field(default_factory=dict)


class Sep2StateFile:
    """The client's durable state as one JSON file, replaced atomically on every save.

    JSON rather than SQLite because the state is small and always written whole; the write goes
    to a temporary file in the same directory, is fsynced and renamed over the old file, so a
    crash or a cancelled task leaves either the old or the new state, never half of one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> _State:
        try:
            raw = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return _State()
        except (OSError, ValueError) as exc:
            log.error("2030.5 client state %s unreadable, starting empty: %s", self.path, exc)
            return _State()
        try:
            if raw.get("version") != _STATE_VERSION:
                raise ValueError(f"unknown state version {raw.get('version')!r}")
            return _State(
                programs=[
                    ProgramControls(
                        program=DERProgram.model_validate(p["program"]),
                        controls=tuple(DERControl.model_validate(c) for c in p["controls"]),
                        default=(
                            None
                            if p["default"] is None
                            else DefaultDERControl.model_validate(p["default"])
                        ),
                    )
                    for p in raw["programs"]
                ],
                draws={k: RandomDraw(int(v[0]), int(v[1])) for k, v in raw["draws"].items()},
                sent={k: {int(s) for s in v} for k, v in raw["sent"].items()},
                clock_offset_s=float(raw["clock_offset_s"]),
                mups={str(k): str(v) for k, v in raw.get("mups", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.error("2030.5 client state %s invalid, starting empty: %s", self.path, exc)
            return _State()

    @staticmethod
    def _dump(state: _State) -> str:
        return json.dumps(
            {
                "version": _STATE_VERSION,
                "saved_at": datetime.now(UTC).isoformat(),
                "clock_offset_s": state.clock_offset_s,
                "programs": [
                    {
                        "program": p.program.model_dump(mode="json"),
                        "controls": [c.model_dump(mode="json") for c in p.controls],
                        "default": None if p.default is None else p.default.model_dump(mode="json"),
                    }
                    for p in state.programs
                ],
                "draws": {k: [d.start_s, d.duration_s] for k, d in state.draws.items()},
                "sent": {k: sorted(v) for k, v in state.sent.items()},
                "mups": state.mups,
            },
            separators=(",", ":"),
        )

    def _write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def save(self, state: _State) -> bool:
        """Write ``state``; False (and an error logged) if the disk refused. Enforcement
        carries on either way: losing durability must not stop the site obeying limits."""
        text = self._dump(state)  # snapshot on the loop, write off it
        try:
            await asyncio.shield(asyncio.to_thread(self._write, text))
        except OSError as exc:
            log.error("2030.5 client state not saved to %s: %s", self.path, exc)
            return False
        return True


# --------------------------------------------------------------------------- the client


def _reraise_pending_cancel() -> None:
    """Raise CancelledError if our task was cancelled but the cancel got converted into a
    timeout on the way up (aiohttp does that when both happen in one loop iteration)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@dataclass(slots=True)
class _Links:
    """What discovery found; refreshed on every poll."""

    dcap: DeviceCapability | None = None
    end_device: EndDevice | None = None
    der_capability_href: str | None = None
    der_status_href: str | None = None
    mup_post_rate_s: float | None = None
    ders: tuple[str, ...] = ()
    """Every DER of our EndDevice (a site may have several: PV, a battery)."""


class Sep2Client:
    """A 2030.5 client for one site. Use as ``async with Sep2Client(...) as client:``.

    ``on_envelope`` is awaited with the new ``EffectiveControls`` whenever the effective
    control, its sources or its validity (the next scheduled boundary) change, and once at
    start from persisted state, so that a site restarting during a comms loss enforces its
    last known schedule and default before the server answers.
    """

    def __init__(
        self,
        config: Sep2ClientConfig,
        *,
        on_envelope: EnvelopeCallback,
        ssl_context: ssl.SSLContext | None = None,
        read_telemetry: TelemetryCallback | None = None,
        der_capability: DERCapability | None = None,
        read_der_status: DERStatusCallback | None = None,
        rng: RandomSource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._lfdi = normalize_lfdi(config.lfdi)
        self._sfdi = config.sfdi if config.sfdi is not None else sfdi_from_lfdi(self._lfdi)
        self._base = URL(config.server_url)
        self._on_envelope = on_envelope
        self._ssl = ssl_context
        self._read_telemetry = read_telemetry
        self._der_capability = der_capability
        self._read_der_status = read_der_status
        self._random = random.Random()
        self._rng: RandomSource = rng or self._random.randint
        self._clock = clock
        self._store = Sep2StateFile(config.state_path)
        self._state = _State()
        self._links = _Links()
        self._csipaus = CsipAusVersion.V1_2
        self._server_clock = ServerClock()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._poll_rates: list[float] = []
        self._reachable: bool | None = None
        self._last_problem: str | None = None
        self._online = False
        self._capability_sent = False
        self._stopping = False
        self._delivered_next_change: int | None = None
        self._last_notification = float("-inf")  # time.monotonic() of the last woken poll
        self._notification_timer: asyncio.TimerHandle | None = None
        self.schedule: Schedule | None = None
        self.effective: EffectiveControls | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Sep2Client:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def open(self) -> None:
        """Load persisted state, apply it, and open the HTTP session (no background tasks)."""
        if self._session is not None:
            return
        self._state = self._store.load()
        self._server_clock = ServerClock(self._state.clock_offset_s)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True),
            timeout=aiohttp.ClientTimeout(total=self.config.request_timeout_s),
        )
        if self._state.programs:
            log.info(
                "2030.5 client: enforcing persisted schedule of %d program(s) until the server"
                " answers",
                len(self._state.programs),
            )
        await self._apply(post_responses=False)

    async def start(self) -> None:
        """``open`` and start polling, re-evaluating and posting telemetry in the background."""
        await self.open()
        self._stopping = False
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sep2-client")

    async def stop(self) -> None:
        """Stop the background work and close the session. Safe to call twice or if cancelled.

        State is saved after every change, so there is nothing to flush here; a save in
        progress is shielded and completes. The task is cancelled until it is done, because
        aiohttp can turn a cancellation that coincides with its own timeout into a
        TimeoutError, which would otherwise swallow the cancel.
        """
        self._stopping = True
        if self._notification_timer is not None:
            self._notification_timer.cancel()
            self._notification_timer = None
        task, self._task = self._task, None
        if task is not None:
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
            if not task.cancelled() and task.exception() is not None:
                log.error("2030.5 client stopped on an error", exc_info=task.exception())
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def poll_soon(self) -> None:
        """Wake the control loop now (e.g. on a Notification or an operator request)."""
        self._wake.set()

    def notification_route(self, path: str = "/ntfy") -> web.RouteDef:
        """A route for the aiohttp app that receives this client's Notifications (the
        ``notificationURI`` of its Subscriptions).

        A valid Notification only wakes the control loop (``poll_soon``): the client then reads
        the server's resources as on any poll, so a forged or stale Notification cannot change
        what is enforced. Wake-ups are spaced by ``min_poll_interval_s``; one arriving sooner
        is deferred, not lost.
        """
        return web.post(path, self._handle_notification)

    async def _handle_notification(self, request: web.Request) -> web.Response:
        if not check_media_type(request.headers.get("Content-Type")):
            return web.Response(status=415, text=f"Content-Type must be {MEDIA_TYPE}")
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return web.Response(status=413)
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                body = await request.read()
            notification = decode_as(Notification, body, max_bytes=limit)
        except TimeoutError:
            return web.Response(status=408)
        except Sep2Error as exc:
            return web.Response(status=400, text=str(exc))
        log.debug(
            "2030.5 Notification for %s (status %d)",
            notification.subscribed_resource,
            notification.status,
        )
        self._notified()
        return web.Response(status=204)

    def _notified(self) -> None:
        wait = self.config.min_poll_interval_s - (time.monotonic() - self._last_notification)
        if wait <= 0:
            self._last_notification = time.monotonic()
            self.poll_soon()
        elif self._notification_timer is None and not self._stopping:
            self._notification_timer = asyncio.get_running_loop().call_later(
                wait, self._deferred_notification
            )

    def _deferred_notification(self) -> None:
        self._notification_timer = None
        self._notified()

    @property
    def reachable(self) -> bool | None:
        """None until the first attempt."""
        return self._reachable

    @property
    def clock(self) -> ServerClock:
        return self._server_clock

    @property
    def der_hrefs(self) -> tuple[str, ...]:
        """The DERs of our EndDevice, as the last poll found them."""
        return self._links.ders

    @property
    def end_device_href(self) -> str | None:
        device = self._links.end_device
        return None if device is None else device.href

    # ------------------------------------------------------------------ background loops

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._control_loop(), name="sep2-control")
            if self._read_telemetry is not None or self._read_der_status is not None:
                tasks.create_task(self._telemetry_loop(), name="sep2-telemetry")

    def _jittered(self, seconds: float) -> float:
        spread = self.config.poll_jitter
        return seconds * (1 + self._random.uniform(-spread, spread))

    def poll_interval(self) -> float:
        """The configured override, else the shortest pollRate the server gave (≥ the floor)."""
        if self.config.poll_interval_s is not None:
            return self.config.poll_interval_s
        rate = min(self._poll_rates) if self._poll_rates else _DEFAULT_POLL_S
        return max(self.config.min_poll_interval_s, rate)

    async def _control_loop(self) -> None:
        backoff = self.config.backoff_initial_s
        next_poll = self._clock()
        while not self._stopping:
            now = self._clock()
            if now >= next_poll or self._wake.is_set():
                self._wake.clear()
                try:
                    await self.poll_once()
                except Exception as exc:
                    _reraise_pending_cancel()
                    if isinstance(exc, Sep2ClientError):
                        self._note_failure(exc)
                    else:  # a bug or a document our models reject: never stop enforcing
                        log.exception("2030.5 poll failed unexpectedly")
                        self._online = False
                    await self._apply(post_responses=False)
                    next_poll = self._clock() + backoff * self._random.uniform(0.5, 1.0)
                    backoff = min(backoff * 2, self.config.backoff_max_s)
                else:
                    backoff = self.config.backoff_initial_s
                    next_poll = self._clock() + self._jittered(self.poll_interval())
            else:
                await self._apply(post_responses=bool(self._reachable))
            wake_at = next_poll
            if self.schedule is not None and self.schedule.next_change is not None:
                wake_at = min(wake_at, self._server_clock.to_local(self.schedule.next_change))
            delay = max(0.0, wake_at - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def _telemetry_loop(self) -> None:
        while not self._stopping:
            interval = self.config.telemetry_interval_s or self._links.mup_post_rate_s or 300.0
            await asyncio.sleep(self._jittered(interval))
            if not self._reachable:
                continue  # the control loop owns reachability; no point queueing posts
            try:
                await self.post_telemetry_once()
            except Sep2ClientError as exc:
                _reraise_pending_cancel()
                log.warning("2030.5 telemetry not posted: %s", exc)

    def _note_failure(self, exc: Sep2ClientError) -> None:
        unreachable = isinstance(exc, ServerUnreachable) or (
            isinstance(exc, HttpStatusError) and exc.server_side
        )
        self._online = False
        if unreachable:
            if self._reachable is not False:
                log.warning("2030.5 server unreachable, enforcing last known controls: %s", exc)
            self._reachable = False
            return
        # The server answered, but with something we cannot use: keep the last good state.
        problem = f"{type(exc).__name__}: {exc}"
        if problem != self._last_problem:
            log.error("2030.5 poll failed, keeping the last good controls: %s", problem)
            self._last_problem = problem
        if self._reachable is False:
            log.info("2030.5 server reachable again")
        self._reachable = True

    def _note_success(self) -> None:
        if self._reachable is False:
            log.info("2030.5 server reachable again")
        if self._last_problem is not None:
            log.info("2030.5 poll healthy again")
        self._reachable = True
        self._last_problem = None
        self._online = True

    # ------------------------------------------------------------------ HTTP

    def _url(self, href: str) -> URL:
        """Resolve a server-relative href (servers treat them as opaque; so do we)."""
        return self._base.join(URL(href))

    async def _request(
        self, method: str, url: URL, body: bytes | None = None
    ) -> tuple[int, Mapping[str, str], bytes]:
        if self._session is None:
            raise RuntimeError("Sep2Client is not open")
        headers = {"Accept": MEDIA_TYPE}
        if body is not None:
            headers["Content-Type"] = MEDIA_TYPE
        limit = self.config.max_body_bytes
        try:
            async with self._session.request(
                method, url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                length = resp.content_length
                if length is not None and length > limit:
                    raise BodyTooLarge(str(url), limit)
                data = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    data += chunk
                    if len(data) > limit:
                        raise BodyTooLarge(str(url), limit)
                return resp.status, MappingProxyType(dict(resp.headers)), bytes(data)
        except TimeoutError as exc:
            raise ServerUnreachable(str(url), "timeout") from exc
        except aiohttp.ClientError as exc:
            raise ServerUnreachable(str(url), f"{type(exc).__name__}: {exc}") from exc

    def _status_error(self, method: str, url: URL, status: int, body: bytes) -> HttpStatusError:
        reason_code: int | None = None
        detail: str | None = None
        try:
            err = decode_as(Error, body, max_bytes=self.config.max_body_bytes)
        except Sep2Error:
            detail = body[:200].decode("utf-8", "replace") or None
        else:
            reason_code, detail = err.reason_code, err.message
        return HttpStatusError(method, str(url), status, reason_code, detail)

    def _decode(self, cls: type[M], url: URL, headers: Mapping[str, str], body: bytes) -> M:
        content_type = headers.get("Content-Type")
        if not check_media_type(content_type):
            raise WrongMediaType(str(url), content_type)
        try:
            return decode_as(cls, body, max_bytes=self.config.max_body_bytes)
        except Sep2Error as exc:
            raise InvalidDocument(str(url), exc) from exc

    async def _get_url(self, cls: type[M], url: URL) -> M:
        status, headers, body = await self._request("GET", url)
        if status != 200:
            raise self._status_error("GET", url, status, body)
        return self._decode(cls, url, headers, body)

    async def _get(self, cls: type[M], href: str) -> M:
        return await self._get_url(cls, self._url(href))

    async def _get_list(self, cls: type[L], href: str) -> list[Any]:
        """Every item of a paged list. Servers may cap pages below ``l`` (envoy: 1 by default
        without ``l``), so we advance ``s`` by what we actually got until ``all`` is reached."""
        items: list[Any] = []
        start = 0
        for _ in range(_MAX_PAGES):
            url = self._url(href).update_query(s=start, l=self.config.page_size)
            page = await self._get_url(cls, url)
            if page.poll_rate is not None:
                self._poll_rates.append(float(page.poll_rate))
            got: Sequence[Any] = getattr(page, "items", ())
            items.extend(got)
            if not got or len(items) >= page.all:
                break
            start += len(got)
        return items

    async def _send(self, method: str, href: str, model: Sep2Model) -> tuple[int, str | None]:
        """PUT/POST a document; returns the status and the Location header, if any."""
        url = self._url(href)
        status, headers, body = await self._request(
            method, url, encode(model, csipaus=self._csipaus)
        )
        if status not in (200, 201, 204):
            raise self._status_error(method, url, status, body)
        return status, headers.get("Location")

    # ------------------------------------------------------------------ discovery and polling

    async def poll_once(self) -> Schedule:
        """One full walk from ``/dcap``; on success the programs seen replace the old ones.

        Any failure leaves the last good programs in place: a half-read set of programs could
        drop a limit that is still in force.
        """
        self._poll_rates = []
        dcap = await self._get_dcap()
        if dcap.poll_rate is not None:
            self._poll_rates.append(float(dcap.poll_rate))
        if dcap.time_link is not None:
            await self._read_time(dcap.time_link.href)
        device = await self._find_end_device(dcap)
        await self._check_registration(device)
        programs = await self._read_programs(device)
        await self._read_der_links(device)
        self._links.dcap, self._links.end_device = dcap, device
        self._state.programs = programs
        self._prune(programs)
        self._note_success()
        return await self._apply(post_responses=True)

    async def _get_dcap(self) -> DeviceCapability:
        """GET the entry point, noting which CSIP-AUS namespace the server speaks so that our
        request bodies use the same one."""
        url = self._url(self.config.dcap_path)
        status, headers, body = await self._request("GET", url)
        if status != 200:
            raise self._status_error("GET", url, status, body)
        content_type = headers.get("Content-Type")
        if not check_media_type(content_type):
            raise WrongMediaType(str(url), content_type)
        try:
            document = decode_document(body, max_bytes=self.config.max_body_bytes)
        except Sep2Error as exc:
            raise InvalidDocument(str(url), exc) from exc
        if not isinstance(document.model, DeviceCapability):
            raise InvalidDocument(
                str(url),
                UnexpectedElement(document.model.xml_tag, ("DeviceCapability",)),
            )
        if document.csipaus is not None:
            self._csipaus = document.csipaus
        return document.model

    async def _read_time(self, href: str) -> None:
        sent_at = self._clock()
        tm = await self._get(Time, href)
        received_at = self._clock()
        self._server_clock = ServerClock.from_exchange(tm.current_time, sent_at, received_at)
        self._state.clock_offset_s = self._server_clock.offset_s

    async def _find_end_device(self, dcap: DeviceCapability) -> EndDevice:
        link = dcap.end_device_list_link
        if link is None:
            raise RegistrationError(
                str(self._url(self.config.dcap_path)),
                "not_registered",
                "DeviceCapability has no EndDeviceListLink",
            )
        cached = self._links.end_device
        if cached is not None and cached.href is not None:
            try:
                device = await self._get(EndDevice, cached.href)
            except HttpStatusError as exc:
                if exc.status not in (403, 404):
                    raise
            else:
                if device.lfdi is not None and same_lfdi(device.lfdi, self._lfdi):
                    return device
        found = await self._search_end_devices(link.href)
        if found is not None:
            return found
        if not self.config.register:
            raise RegistrationError(
                str(self._url(link.href)), "not_registered", f"no EndDevice with LFDI {self._lfdi}"
            )
        return await self._register(link.href)

    async def _search_end_devices(self, href: str) -> EndDevice | None:
        for device in await self._get_list(EndDeviceList, href):
            assert isinstance(device, EndDevice)
            if device.lfdi is not None and same_lfdi(device.lfdi, self._lfdi):
                return device
        return None

    async def _register(self, list_href: str) -> EndDevice:
        """POST our EndDevice; follow Location, or search again if the server gives none."""
        now = int(self._server_clock.server_now(self._clock()))
        request = EndDevice(
            device_category=self.config.device_category,
            lfdi=self._lfdi,
            sfdi=self._sfdi,
            changed_time=now,
        )
        try:
            _, location = await self._send("POST", list_href, request)
        except HttpStatusError as exc:
            if exc.status != 409:  # 409: already registered (envoy), so search again
                raise RegistrationError(
                    str(self._url(list_href)), "not_registered", str(exc)
                ) from exc
            location = None
        log.info("2030.5 client registered EndDevice LFDI %s at %s", self._lfdi, location)
        if location is not None:
            return await self._get(EndDevice, location)
        found = await self._search_end_devices(list_href)
        if found is None:
            raise RegistrationError(
                str(self._url(list_href)),
                "not_registered",
                "registration accepted but EndDevice not listed",
            )
        return found

    async def _check_registration(self, device: EndDevice) -> None:
        expected = self.config.registration_pin
        if expected is None:
            return
        if device.registration_link is None:
            log.warning("2030.5 EndDevice %s has no RegistrationLink; PIN not checked", device.href)
            return
        registration = await self._get(Registration, device.registration_link.href)
        # Installers are given the PIN with or without its check digit (envoy: 11111 → 111115).
        if registration.pin not in {expected, with_check_digit(expected)}:
            raise RegistrationError(
                str(self._url(device.registration_link.href)),
                "pin_mismatch",
                f"server PIN {registration.pin}, expected {expected}",
            )

    async def _read_programs(self, device: EndDevice) -> list[ProgramControls]:
        programs: list[ProgramControls] = []
        seen: set[str] = set()
        fsa_link = device.function_set_assignments_list_link
        if fsa_link is None:
            return programs
        for fsa in await self._get_list(FunctionSetAssignmentsList, fsa_link.href):
            if fsa.der_program_list_link is None:
                continue
            for program in await self._get_list(DERProgramList, fsa.der_program_list_link.href):
                assert isinstance(program, DERProgram)
                if event_key(program.mrid) in seen:
                    continue
                seen.add(event_key(program.mrid))
                controls: tuple[DERControl, ...] = ()
                if program.der_control_list_link is not None:
                    controls = tuple(
                        await self._get_list(DERControlList, program.der_control_list_link.href)
                    )
                default = None
                if program.default_der_control_link is not None:
                    try:
                        default = await self._get(
                            DefaultDERControl, program.default_der_control_link.href
                        )
                    except HttpStatusError as exc:
                        if exc.status != 404:
                            raise
                programs.append(ProgramControls(program, controls, default))
        return programs

    async def read_prices(self) -> list[TariffPrice]:
        """Every energy price the server's FunctionSetAssignments offer us (TariffProfile →
        RateComponent with a Wh ReadingType → TimeTariffInterval → its first consumption
        block), per kWh in the profile's currency, by start time. Components priced in other
        units are skipped. Reads only: the control schedule and poll rate are not touched."""
        poll_rates = self._poll_rates
        self._poll_rates = []
        try:
            device = self._links.end_device
            if device is None:
                device = await self._find_end_device(await self._get_dcap())
            prices: list[TariffPrice] = []
            fsa_link = device.function_set_assignments_list_link
            if fsa_link is None:
                return prices
            seen: set[str] = set()
            for fsa in await self._get_list(FunctionSetAssignmentsList, fsa_link.href):
                if fsa.tariff_profile_list_link is None:
                    continue
                for profile in await self._get_list(
                    TariffProfileList, fsa.tariff_profile_list_link.href
                ):
                    assert isinstance(profile, TariffProfile)
                    if event_key(profile.mrid) in seen:
                        continue
                    seen.add(event_key(profile.mrid))
                    prices += await self._read_profile(profile)
            prices.sort(key=lambda p: (p.start, p.primacy, p.direction))
            return prices
        finally:
            self._poll_rates = poll_rates

    async def _read_profile(self, profile: TariffProfile) -> list[TariffPrice]:
        if profile.rate_component_list_link is None:
            return []
        multiplier = profile.price_power_of_ten_multiplier or 0
        prices: list[TariffPrice] = []
        for listed in await self._get_list(
            RateComponentList, profile.rate_component_list_link.href
        ):
            assert isinstance(listed, RateComponent)
            component = listed
            if listed.href is not None and listed.reading_type_link is None:
                component = await self._get(RateComponent, listed.href)
            intervals_link = component.time_tariff_interval_list_link
            if component.reading_type_link is None or intervals_link is None:
                continue
            reading = await self._get(ReadingType, component.reading_type_link.href)
            if reading.uom != _UOM_WH:
                continue
            # price is per 10^p Wh: per kWh it is 10^(3 - p) times that
            per_kwh = 10.0 ** (multiplier + 3 - (reading.power_of_ten_multiplier or 0))
            direction = "export" if reading.flow_direction == _FLOW_REVERSE else "import"
            for interval in await self._get_list(TimeTariffIntervalList, intervals_link.href):
                assert isinstance(interval, TimeTariffInterval)
                price = await self._interval_price(interval)
                if price is None:
                    continue
                status = interval.event_status.current_status if interval.event_status else 0
                prices.append(
                    TariffPrice(
                        profile_mrid=profile.mrid,
                        primacy=profile.primacy,
                        currency=profile.currency,
                        direction=direction,
                        start=interval.interval.start,
                        duration_s=interval.interval.duration,
                        price_per_kwh=price * per_kwh,
                        status=status,
                    )
                )
        return prices

    async def _interval_price(self, interval: TimeTariffInterval) -> int | None:
        """The price of the interval's first consumption block (from zero)."""
        link = interval.consumption_tariff_interval_list_link
        if link is None:
            return None
        blocks = await self._get_list(ConsumptionTariffIntervalList, link.href)
        priced = [b for b in blocks if b.price is not None]
        first = min(priced, key=lambda b: b.start_value, default=None)
        return None if first is None else int(first.price)

    async def _read_der_links(self, device: EndDevice) -> None:
        if device.der_list_link is None:
            return
        ders = await self._get_list(DERList, device.der_list_link.href)
        # Every DER is read; the site's capability and status go to the first, the one that
        # stands for the site. Their controls all come through the FunctionSetAssignments.
        self._links.ders = tuple(d.href or "" for d in ders)
        if ders:
            der = ders[0]
            self._links.der_capability_href = (
                der.der_capability_link.href if der.der_capability_link else None
            )
            self._links.der_status_href = der.der_status_link.href if der.der_status_link else None

    def _prune(self, programs: Sequence[ProgramControls]) -> None:
        """Forget draws and responses of events the server no longer lists."""
        live = {event_key(c.mrid) for p in programs for c in p.controls}
        self._state.draws = {k: v for k, v in self._state.draws.items() if k in live}
        self._state.sent = {k: v for k, v in self._state.sent.items() if k in live}

    # ------------------------------------------------------------------ evaluation

    async def _apply(self, *, post_responses: bool) -> Schedule:
        """Evaluate now, persist, tell the site if anything changed, then post Responses.

        The callback runs before any Response is posted so that a slow server never delays
        enforcement.
        """
        state = self._state
        state.draws = draw_missing(state.programs, state.draws, self._rng)
        local_now = self._clock()
        server_now = self._server_clock.server_now(local_now)
        schedule = evaluate(state.programs, server_now, state.draws, state.sent)
        self.schedule = schedule
        await self._store.save(state)
        valid_until = (
            None
            if schedule.next_change is None
            else utc_from_timestamp(self._server_clock.to_local(schedule.next_change))
        )
        effective = EffectiveControls(
            at=datetime.fromtimestamp(local_now, UTC),
            valid_until=valid_until,
            controls=schedule.controls,
            sources=schedule.sources,
            online=self._online,
        )
        previous = self.effective
        previous_change = self._delivered_next_change
        if (
            previous is None
            or previous.controls != effective.controls
            or dict(previous.sources) != dict(effective.sources)
            or previous_change != schedule.next_change
        ):
            try:
                await self._on_envelope(effective)
            except Exception:
                # The site failed to take it: keep the old one as "last delivered" so the next
                # evaluation offers this change again.
                log.exception("2030.5 on_envelope callback failed; will retry")
            else:
                self.effective = effective
                self._delivered_next_change = schedule.next_change
        else:
            self.effective = effective
        if post_responses and schedule.responses:
            await self._post_responses(schedule.responses)
        return schedule

    async def _post_responses(self, responses: Sequence[ResponseDue]) -> None:
        now = int(self._server_clock.server_now(self._clock()))
        for due in responses:
            response = DERControlResponse(
                created_date_time=now,
                end_device_lfdi=self._lfdi,
                status=int(due.status),
                subject=due.subject,
            )
            try:
                await self._send("POST", due.reply_to, response)
            except HttpStatusError as exc:
                if exc.server_side:
                    log.warning("2030.5 Response not posted, will retry: %s", exc)
                    return
                # A 4xx will not get better by retrying: record it as done and say so.
                log.error(
                    "2030.5 server refused Response %s for %s: %s",
                    due.status.name,
                    due.subject,
                    exc,
                )
            except ServerUnreachable as exc:
                log.warning("2030.5 Response not posted, will retry: %s", exc)
                return
            self._state.sent.setdefault(due.key, set()).add(int(due.status))
        await self._store.save(self._state)

    # ------------------------------------------------------------------ telemetry

    def _mrid(self, role: int, index: int) -> str:
        # As envoy's capture client did: LFDI prefix, then a role nibble and an index.
        return f"{self._lfdi[:24]}{role:01X}{index:07X}"

    def _mirror_usage_point(self, role: int, role_flags: str, name: str) -> MirrorUsagePoint:
        interval = int(self.config.telemetry_interval_s or self._links.mup_post_rate_s or 300)
        return MirrorUsagePoint(
            mrid=self._mrid(role, 0),
            description=name,
            role_flags=role_flags,
            service_category_kind=0,
            status=1,
            device_lfdi=self._lfdi,
            mirror_meter_readings=(
                MirrorMeterReading(
                    mrid=self._mrid(role, 1),
                    description=f"{name} active power",
                    reading_type=ReadingType(
                        accumulation_behaviour=12,
                        commodity=1,
                        data_qualifier=2,
                        flow_direction=1,
                        interval_length=interval,
                        kind=37,
                        phase=0,
                        power_of_ten_multiplier=0,
                        uom=38,
                    ),
                ),
            ),
        )

    async def _ensure_mup(self, kind: str, role: int, role_flags: str, name: str) -> str:
        href = self._state.mups.get(kind)
        if href is not None:
            return href
        dcap = self._links.dcap
        if dcap is None or dcap.mirror_usage_point_list_link is None:
            raise Sep2ClientError(str(self._base), "server offers no MirrorUsagePointList")
        list_href = dcap.mirror_usage_point_list_link.href
        _, location = await self._send(
            "POST", list_href, self._mirror_usage_point(role, role_flags, name)
        )
        if location is None:
            raise HttpStatusError(
                "POST",
                str(self._url(list_href)),
                201,
                None,
                "MirrorUsagePoint created without a Location",
            )
        self._state.mups[kind] = location
        await self._store.save(self._state)
        with contextlib.suppress(Sep2ClientError):
            mup = await self._get(MirrorUsagePoint, location)
            if mup.post_rate:
                self._links.mup_post_rate_s = float(mup.post_rate)
        return location

    async def _post_reading(
        self, kind: str, role: int, role_flags: str, name: str, kw: float, at: datetime
    ) -> None:
        href = await self._ensure_mup(kind, role, role_flags, name)
        interval = int(self.config.telemetry_interval_s or self._links.mup_post_rate_s or 300)
        server_at = int(self._server_clock.server_now(at.timestamp()))
        reading = MirrorMeterReading(
            mrid=self._mrid(role, 1),
            reading=Reading(
                quality_flags="01",
                time_period=DateTimeInterval(start=server_at - interval, duration=interval),
                value=round(kw * 1000),
            ),
        )
        try:
            await self._send("POST", href, reading)
        except HttpStatusError as exc:
            if exc.status in (400, 404):  # the server forgot our MUP: recreate it next time
                self._state.mups.pop(kind, None)
            raise

    async def post_telemetry_once(self) -> None:
        """Post one round of readings, DERStatus and (once) DERCapability."""
        if self._links.dcap is None:
            raise Sep2ClientError(str(self._base), "not discovered yet")
        if self._read_telemetry is not None:
            sample = await self._read_telemetry()
            at = sample.timestamp or datetime.fromtimestamp(self._clock(), UTC)
            if sample.site_kw is not None:
                await self._post_reading("site", 1, "03", "Site", sample.site_kw, at)
            if sample.der_kw is not None:
                await self._post_reading("der", 2, "49", "DER", sample.der_kw, at)
        capability_href = self._links.der_capability_href
        if self._der_capability is not None and capability_href and not self._capability_sent:
            await self._send("PUT", capability_href, self._der_capability)
            self._capability_sent = True
        if self._read_der_status is not None and self._links.der_status_href is not None:
            status = await self._read_der_status()
            await self._send("PUT", self._links.der_status_href, status)
