"""The gateway as an OCPP central system (1.6J and 2.0.1) that EV chargers connect to.

Chargers open a websocket to ``ws[s]://host:port/<path_prefix>/<charge point id>`` and offer the
OCPP versions they speak as subprotocols; the first of ``versions`` the charger also offers wins
(``ocpp2.0.1`` before ``ocpp1.6`` by default). One ``ocpp`` ChargePoint object serves each
connection; its handlers only update the charger's record here (status, transaction, latest meter
sample, the driver's charging needs), so the central is a transport with a registry, and the
policy (what limit to send) lives in :class:`adapters.ocpp.charger.OcppCharger`.

Admission and protocol hygiene:

* who may connect as which charger is decided during the HTTP handshake, before any websocket
  exists, by the OCPP security profile (``security_profile``; see
  :mod:`adapters.ocpp.admission`): HTTP Basic with a password per charger (1, 2), a client
  certificate whose CN is the charge point id (3), TLS (2, 3); refusals are 401 / 403 / 429,
  counted by reason and logged at most once per charger per five minutes. With profile 0 (no
  authentication, the default, for development on loopback) an unknown charge point id is
  refused with 404, as OCPP-J asks;
* ``auto_register`` (profiles 0 and 3) accepts chargers that are not configured, and enrols
  them at their first BootNotification;
* an unparseable frame gets a CALLERROR (``FormationViolation`` in 1.6, ``RpcFrameworkError`` in
  2.0.1) with the frame's message id when it can be read, ``-1`` otherwise; schema violations and
  unknown actions get the ``ocpp`` package's errors; the connection stays up;
* a request before the charger's BootNotification was accepted gets ``SecurityError`` (OCPP
  2.0.1 B02.FR.09 / B03.FR.08), and the central asks for a boot with TriggerMessage, because a
  charger that only lost its websocket (or outlived a restart of the gateway) does not boot again
  by itself;
* a 1.6 StopTransaction for a transaction this central never started gets
  ``PropertyConstraintViolation`` (transactions are not persisted: see the module's limits).

Energies and powers cross this module in kW / kWh. OCPP's W, Wh, A, multipliers and Decimal
stay in the pure codec :mod:`protocols.ocpp`, which renders our charging profiles and reads
meter values and charging needs; this module moves its payloads to and from the ``ocpp``
package's messages.

The central does not build its charger adapters: the composition root hands it a factory
(:class:`adapters.ocpp.charger.OcppCharger`), so the adapter depends on the central and not
the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import logging
import math
import re
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, Protocol
from urllib.parse import unquote

from ocpp.exceptions import (  # type: ignore[import-untyped]
    FormatViolationError,
    OCPPError,
    PropertyConstraintViolationError,
    SecurityError,
    UnknownCallErrorCodeError,
)
from ocpp.messages import Call, unpack  # type: ignore[import-untyped]
from ocpp.v16 import ChargePoint as ChargePoint16  # type: ignore[import-untyped]
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v201 import ChargePoint as ChargePoint201  # type: ignore[import-untyped]
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from pydantic import Field, model_validator
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from adapters.ocpp.admission import (
    ChargerSecret,
    PeerCertificate,
    Refusal,
    RefusalLog,
    SecurityGate,
    SecurityProfile,
    load_secret,
)
from adapters.ocpp.wire import WireLog, on_action
from gateway.aio import raise_if_cancelling
from gateway.devices import DeviceAdapter
from gateway.ports import RefusalHook
from gateway.quota import TokenBucket
from protocols.ocpp import (
    NEEDS_MESSAGE_ID,
    NEEDS_VENDOR_ID,
    ChargingProfileLimit,
    EvChargingNeeds,
    InvalidChargingNeeds,
    MeterReading,
    OcppVersion,
    ProfilePurpose,
    clear_charging_profile,
    decode_data_transfer_needs,
    decode_ev_charging_needs,
    decode_meter_values,
    format_time,
    register_kwh,
    set_charging_profile,
)
from protocols.tls import ocpp_server_ssl_context
from unified.config import ConfigError, Section
from unified.model import (
    BatteryConstraints,
    BatteryRatings,
    DerClass,
    Device,
    Identifier,
    TopologyLocation,
    utcnow,
)

__all__ = [
    "NEEDS_MESSAGE_ID",
    "NEEDS_VENDOR_ID",
    "SUBPROTOCOLS",
    "ChargerCallFailed",
    "ChargerFactory",
    "ChargerNotConnected",
    "ChargerRejected",
    "ChargerSnapshot",
    "ChargingNeed",
    "ChargingProfileLimit",
    "MeterSample",
    "OcppCentral",
    "OcppCentralConfig",
    "OcppCentralError",
    "OcppChargerConfig",
    "OcppChargerDefaults",
    "OcppVersion",
    "ProfilePurpose",
    "Registrar",
    "SecurityProfile",
    "Transaction",
    "is_loopback",
]

log = logging.getLogger(__name__)
_WIRE_LOG: Final = WireLog(logging.getLogger("adapters.ocpp.central.wire"))


SUBPROTOCOLS: Final[tuple[OcppVersion, ...]] = ("ocpp2.0.1", "ocpp1.6")

_CP_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,47}$"
_CP_ID_RE = re.compile(_CP_ID)
_MESSAGE_ID_RE = re.compile(r'^\s*\[\s*\d+\s*,\s*"([^"\\]{1,36})"')
_PLUGGED_16: Final = frozenset(
    {"Preparing", "Charging", "SuspendedEV", "SuspendedEVSE", "Finishing"}
)
# What a refused client reads: nothing about which check failed (a wrong password and an
# unknown id answer alike).
_REFUSAL_TEXT: Final = {
    HTTPStatus.BAD_REQUEST: "No common OCPP version\n",
    HTTPStatus.UNAUTHORIZED: "Unauthorized\n",
    HTTPStatus.FORBIDDEN: "Forbidden\n",
    HTTPStatus.NOT_FOUND: "Unknown charge point\n",
    HTTPStatus.TOO_MANY_REQUESTS: "Too many failed attempts; try again later\n",
}
_BASIC_CHALLENGE: Final = 'Basic realm="OCPP", charset="UTF-8"'
_MAX_COUNTED_IDS: Final = 1024
_RESPONSES_PER_S: Final = 5.0
"""Answers a charger may send per second on average (one per call of ours; calls are serial)."""
_RESPONSES_BURST: Final = 10


# --------------------------------------------------------------------------- configuration


class OcppChargerDefaults(Section):
    """How a charger joins the registry (and the defaults for auto-registered ones)."""

    location: TopologyLocation
    max_kw: float = Field(default=11.0, gt=0, le=1000, description="Charger (EVSE) rating, kW")
    ev_capacity_kwh: float = Field(
        default=60.0,
        gt=0,
        le=1000,
        description="Nominal EV battery, for the SoC mapping when the EV does not report one",
    )
    site_cap_kw: float | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Standing site cap (the connection's limit); overrides default_site_cap_kw",
    )
    rate_unit: Literal["W", "A"] = Field(default="W", description="Unit of the limits we send")
    voltage_v: float = Field(default=230.0, gt=0, le=1000, description="Phase voltage, for A")
    phases: int = Field(default=3, ge=1, le=3)
    programs: tuple[Identifier, ...] = ()


class OcppChargerConfig(OcppChargerDefaults):
    """One charger allowed to connect (``[[ocpp_central.chargers]]``)."""

    charge_point_id: str = Field(pattern=_CP_ID, description="Identity in the websocket URL")
    device_id: Identifier | None = Field(default=None, description="Default: charge_point_id")
    password_file: Path | None = Field(
        default=None,
        description="Security profiles 1-2: a file holding this charger's password (its 1.6 "
        "AuthorizationKey / 2.0.1 BasicAuthPassword), relative to the config file's folder",
    )
    password_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description="Security profiles 1-2: the environment variable holding the password",
    )

    @property
    def resolved_device_id(self) -> str:
        return self.device_id or self.charge_point_id


class OcppCentralConfig(Section):
    """``[ocpp_central]``: the OCPP central system the gateway runs for EV chargers."""

    host: str = "127.0.0.1"
    port: int = Field(default=9000, ge=0, le=65535, description="0: any free port (tests)")
    path_prefix: str = Field(default="/ocpp", pattern=r"^(/[A-Za-z0-9_.-]+)*$")
    versions: tuple[OcppVersion, ...] = Field(
        default=SUBPROTOCOLS, min_length=1, description="Subprotocols, preferred first"
    )
    chargers: tuple[OcppChargerConfig, ...] = ()
    auto_register: bool = Field(
        default=False, description="Accept (and enrol) chargers that are not configured"
    )
    auto_register_defaults: OcppChargerDefaults | None = Field(
        default=None, description="Location and ratings of auto-registered chargers"
    )
    default_site_cap_kw: float | None = Field(
        default=None, ge=0, le=1000, description="Standing site cap for every charger"
    )
    heartbeat_interval_s: int = Field(default=60, ge=1, le=86_400)
    stale_after_s: float = Field(
        default=120.0, gt=0, le=86_400, description="A charger silent this long is unavailable"
    )
    response_timeout_s: float = Field(default=10.0, gt=0, le=120)
    max_message_bytes: int = Field(default=65_536, ge=1024, le=16 * 1024 * 1024)
    stack_level: int = Field(default=1, ge=0, le=100, description="Of our charging profiles")
    security_profile: SecurityProfile = Field(
        default=0,
        description="0: no authentication (development, loopback); 1: HTTP Basic over ws "
        "(trusted networks only); 2: TLS + HTTP Basic; 3: TLS with client certificates",
    )
    cert_file: Path | None = Field(
        default=None, description="Profiles 2-3: the central's TLS certificate (PEM)"
    )
    key_file: Path | None = Field(default=None, description="Profiles 2-3: its private key")
    ca_file: Path | None = Field(
        default=None, description="Profile 3: the CA(s) charger certificates must chain to"
    )
    cpo_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="Profile 3: the O (organizationName) charger certificates must carry",
    )
    trusted_network: bool = Field(
        default=False,
        description="Profile 1 beyond loopback: the chargers reach host only through a "
        "network that is already secured (VPN, private APN); passwords cross it in clear",
    )

    @model_validator(mode="after")
    def _consistent(self) -> OcppCentralConfig:
        problems = self._security_problems()
        ids = [c.charge_point_id for c in self.chargers]
        if len(set(ids)) != len(ids):
            problems.append("charge_point_id values are not unique")
        devices = [c.resolved_device_id for c in self.chargers]
        if len(set(devices)) != len(devices):
            problems.append("device ids are not unique")
        if len(set(self.versions)) != len(self.versions):
            problems.append("versions repeat")
        if self.auto_register and self.auto_register_defaults is None:
            problems.append("auto_register needs auto_register_defaults (location, ratings)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _security_problems(self) -> list[str]:
        problems: list[str] = []
        profile = self.security_profile
        tls = profile in (2, 3)
        if tls and (self.cert_file is None or self.key_file is None):
            problems.append(f"security_profile {profile} needs cert_file and key_file")
        if not tls and (self.cert_file is not None or self.key_file is not None):
            problems.append("cert_file and key_file are for security_profile 2 or 3 (TLS)")
        if profile == 3 and self.ca_file is None:
            problems.append("security_profile 3 needs ca_file (the CA of charger certificates)")
        if profile != 3 and (self.ca_file is not None or self.cpo_name is not None):
            problems.append("ca_file and cpo_name are for security_profile 3 (client certificates)")
        if profile == 1 and not self.trusted_network and not is_loopback(self.host):
            problems.append(
                f"security_profile 1 sends passwords in clear: on host {self.host!r} (not "
                "loopback) it needs trusted_network = true (a VPN or private APN), or use "
                "security_profile 2"
            )
        basic = profile in (1, 2)
        for charger in self.chargers:
            has_file, has_env = charger.password_file is not None, charger.password_env is not None
            where = f"charger {charger.charge_point_id!r}"
            if basic and has_file == has_env:
                problems.append(
                    f"{where}: security_profile {profile} needs exactly one of "
                    "password_file and password_env"
                )
            if not basic and (has_file or has_env):
                problems.append(
                    f"{where}: password_file / password_env are for security_profile 1 or 2"
                )
            if basic and ":" in charger.charge_point_id:
                problems.append(f"{where}: a Basic username cannot contain ':' (RFC 7617)")
        if basic and self.auto_register:
            problems.append(
                "auto_register cannot work with security_profile 1 or 2 (an unknown charger "
                "has no password); use security_profile 3, where the CA vouches for new chargers"
            )
        return problems

    @property
    def tls(self) -> bool:
        return self.security_profile in (2, 3)

    def charger(self, charge_point_id: str) -> OcppChargerConfig | None:
        return next((c for c in self.chargers if c.charge_point_id == charge_point_id), None)


class Registrar(Protocol):
    """What the central needs from the gateway core (``gateway.core.Gateway`` provides it; the
    composition root hands it over)."""

    def add_device(self, device: Device, adapter: DeviceAdapter) -> None: ...


ChargerFactory = Callable[[str, str, "OcppCentral"], DeviceAdapter]
"""Builds the one adapter of a charger from (device id, charge point id, the central)."""


# --------------------------------------------------------------------------- errors


class OcppCentralError(Exception):
    """Base class of what the central raises to its callers (the charger adapters)."""

    def __init__(self, charge_point_id: str, message: str) -> None:
        super().__init__(f"{charge_point_id}: {message}")
        self.charge_point_id = charge_point_id


class ChargerNotConnected(OcppCentralError):
    """No accepted session with this charger right now."""


class ChargerCallFailed(OcppCentralError):
    """A request got a CALLERROR or no answer in time (``error_code`` None: timeout)."""

    def __init__(self, charge_point_id: str, action: str, error_code: str | None) -> None:
        what = "no answer in time" if error_code is None else f"CALLERROR {error_code}"
        super().__init__(charge_point_id, f"{action}: {what}")
        self.action = action
        self.error_code = error_code


class ChargerRejected(OcppCentralError):
    """The charger answered, with a status other than Accepted."""

    def __init__(self, charge_point_id: str, action: str, status: str) -> None:
        super().__init__(charge_point_id, f"{action}: {status}")
        self.action = action
        self.status = status


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class MeterSample:
    """The latest meter reading of a charger (one connector / EVSE), in kW / kWh / %."""

    received_at: datetime
    measured_at: datetime | None
    power_kw: float | None
    energy_kwh: float | None
    soc_pct: float | None

    @classmethod
    def received(cls, reading: MeterReading, received_at: datetime) -> MeterSample:
        return cls(
            received_at, reading.measured_at, reading.power_kw, reading.energy_kwh, reading.soc_pct
        )


@dataclass(frozen=True, slots=True)
class ChargingNeed:
    """What the driver (or the EV) asked for: energy by a departure time."""

    energy_kwh: float
    departure: datetime | None
    received_at: datetime
    register_kwh: float | None
    """The charger's energy register when the need was announced (what is delivered since
    counts against it)."""
    ev_capacity_kwh: float | None = None
    ev_max_kw: float | None = None

    def remaining_kwh(self, register_kwh: float | None) -> float:
        if register_kwh is None or self.register_kwh is None:
            return self.energy_kwh
        return max(0.0, self.energy_kwh - max(0.0, register_kwh - self.register_kwh))


@dataclass(frozen=True, slots=True)
class Transaction:
    transaction_id: str
    connector_id: int
    started_at: datetime
    meter_start_kwh: float | None


@dataclass(frozen=True, slots=True)
class ChargerSnapshot:
    """A consistent copy of what the central knows about one charger."""

    charge_point_id: str
    device_id: str
    version: OcppVersion | None
    connected: bool
    booted: bool
    generation: int
    """Incremented at every accepted boot and every new connection: a reader that sees it change
    knows the charger may have lost the profiles it was sent."""
    vendor: str | None
    model: str | None
    status: str | None
    plugged: bool
    transaction: Transaction | None
    sample: MeterSample | None
    need: ChargingNeed | None
    last_seen: datetime | None
    settings: OcppChargerDefaults


@dataclass(slots=True)
class _Record:
    charge_point_id: str
    settings: OcppChargerDefaults
    device_id: str
    version: OcppVersion | None = None
    session: _Session | None = None
    booted: bool = False
    generation: int = 0
    vendor: str | None = None
    model: str | None = None
    status: str | None = None
    plugged: bool = False
    transaction: Transaction | None = None
    sample: MeterSample | None = None
    need: ChargingNeed | None = None
    last_seen: datetime | None = None
    ended: dict[str, None] = field(default_factory=dict)
    """Recently ended transactions, oldest first (a repeated StopTransaction is not an error)."""

    def snapshot(self) -> ChargerSnapshot:
        return ChargerSnapshot(
            charge_point_id=self.charge_point_id,
            device_id=self.device_id,
            version=self.version,
            connected=self.session is not None,
            booted=self.booted and self.session is not None,
            generation=self.generation,
            vendor=self.vendor,
            model=self.model,
            status=self.status,
            plugged=self.plugged or self.transaction is not None,
            transaction=self.transaction,
            sample=self.sample,
            need=self.need,
            last_seen=self.last_seen,
            settings=self.settings,
        )


# --------------------------------------------------------------------------- frames


def _call_error_frame(raw: str | bytes, exc: OCPPError, version: OcppVersion) -> str:
    """A CALLERROR for a frame the ``ocpp`` package could not even unpack."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    match = _MESSAGE_ID_RE.match(text)
    message_id = match.group(1) if match else "-1"
    if version == "ocpp1.6":
        code = (
            "FormationViolation"
            if exc.code in ("FormatViolation", "FormationViolation")
            else exc.code
        )
    else:
        code = "RpcFrameworkError" if message_id == "-1" else exc.code
    details = {"cause": str(exc.details.get("cause", exc.description))[:200]}
    return json.dumps([4, message_id, code, exc.description, details], separators=(",", ":"))


def _unpack(raw: str | bytes) -> Any:
    """The ``ocpp`` package's ``unpack``, raising :class:`OCPPError` for every frame that
    cannot be routed: also JSON nested past the parser's limit (a ``RecursionError``) and a
    CALL whose id or action is not a string (the package would look a list up as an action: a
    ``TypeError``). Either would otherwise end the connection."""
    try:
        msg = unpack(raw)
    except RecursionError:
        raise FormatViolationError(details={"cause": "JSON nested too deeply"}) from None
    if isinstance(msg, Call) and not (
        isinstance(msg.unique_id, str) and isinstance(msg.action, str)
    ):
        raise FormatViolationError(details={"cause": "message id or action is not a string"})
    return msg


# --------------------------------------------------------------------------- sessions


class _Session:
    """What both versions' ChargePoint objects share: admission checks, frame errors, and the
    handlers whose logic is the same in both versions (only the message classes differ)."""

    version: ClassVar[OcppVersion]
    _requests: ClassVar[Any]
    """The ``ocpp`` package's ``call`` module of this version."""
    _results: ClassVar[Any]
    """Its ``call_result`` module."""

    id: str
    central: OcppCentral
    record: _Record
    tasks: asyncio.TaskGroup | None
    _boot_requested: bool

    # Provided by the ocpp package's ChargePoint (declared only: defining them here would
    # shadow the real ones, which come later in the method resolution order).
    _send: Callable[[str], Awaitable[None]]
    call: Callable[..., Awaitable[Any]]
    start: Callable[[], Awaitable[None]]
    _connection: ServerConnection
    _call_lock: asyncio.Lock
    _response_queue: asyncio.Queue[Any]

    def __init__(self, central: OcppCentral, record: _Record, connection: ServerConnection) -> None:
        super().__init__(  # type: ignore[call-arg]  # the ocpp package's ChargePoint
            record.charge_point_id,
            connection,
            response_timeout=central.config.response_timeout_s,
            logger=_WIRE_LOG,
        )
        self.central, self.record = central, record
        self.tasks, self._boot_requested = None, False
        self._responses = TokenBucket(_RESPONSES_PER_S, _RESPONSES_BURST)
        self.unsolicited = 0
        """CALLRESULT / CALLERROR frames dropped: no call of ours waiting, or too many."""

    async def route_message(self, raw_msg: str | bytes) -> None:
        try:
            msg = _unpack(raw_msg)
        except OCPPError as exc:
            log.warning("OCPP %s sent an unparseable frame: %s", self.id, exc)
            await self._send(_call_error_frame(raw_msg, exc, self.version))
            return
        self.record.last_seen = utcnow()
        if not isinstance(msg, Call) and not self._response_awaited():
            # The ocpp package queues every answer for the next call() to sift through (one
            # level of recursion per stranger): answers nobody asked for would grow the queue
            # without bound, and a flood during a call would recurse past Python's limit.
            self.unsolicited += 1
            if self.unsolicited == 1:
                log.warning(
                    "OCPP %s sent a response nobody was waiting for (dropped; further ones are "
                    "dropped and counted silently)",
                    self.id,
                )
            return
        if isinstance(msg, Call) and msg.action != "BootNotification" and not self.record.booted:
            error = SecurityError(description="BootNotification not accepted yet")
            await self._send(msg.create_call_error(error).to_json())
            self._request_boot()
            return
        await super().route_message(raw_msg)  # type: ignore[misc]

    def _response_awaited(self) -> bool:
        """A call of ours waits for its answer, none is queued yet, and the charger is within
        its answers' rate."""
        return (
            self._call_lock.locked()
            and self._response_queue.empty()
            and self._responses.take(time.monotonic())
        )

    def _request_boot(self) -> None:
        if self._boot_requested or self.tasks is None:
            return
        self._boot_requested = True
        self.tasks.create_task(self._trigger_boot(), name=f"ocpp:{self.id}:trigger-boot")

    async def _trigger_boot(self) -> None:
        request = self._requests.TriggerMessage(requested_message="BootNotification")
        try:
            async with asyncio.timeout(self.central.config.response_timeout_s):
                await self.call(request)
        except (TimeoutError, OCPPError, ConnectionClosed) as exc:
            log.info("OCPP %s: TriggerMessage(BootNotification) failed: %s", self.id, exc)
        raise_if_cancelling()

    def _boot_accepted(self, vendor: str, model: str) -> Any:
        """Record the boot; the BootNotification response."""
        record = self.record
        record.vendor, record.model = vendor, model
        record.booted = True
        record.generation += 1
        log.info("OCPP %s booted (%s %s, %s)", self.id, vendor, model, self.version)
        self.central.boot_accepted(record)
        return self._results.BootNotification(
            current_time=format_time(utcnow()),
            interval=self.central.config.heartbeat_interval_s,
            status="Accepted",
        )

    def _sample(self, meter_value: object) -> MeterSample | None:
        reading = decode_meter_values(meter_value, self.version)
        return None if reading is None else MeterSample.received(reading, utcnow())

    @on_action("Heartbeat")
    def on_heartbeat(self, **_: Any) -> Any:
        return self._results.Heartbeat(current_time=format_time(utcnow()))

    @on_action("MeterValues")
    def on_meter_values(self, meter_value: list[Any], **_: Any) -> Any:
        self.central.meter_sample(self.record, self._sample(meter_value))
        return self._results.MeterValues()


class _Session16(_Session, ChargePoint16):  # type: ignore[misc]
    version = "ocpp1.6"
    _requests, _results = call16, result16

    @on_action("BootNotification")
    def on_boot_notification(
        self, charge_point_vendor: str, charge_point_model: str, **_: Any
    ) -> Any:
        return self._boot_accepted(charge_point_vendor, charge_point_model)

    @on_action("StatusNotification")
    def on_status_notification(self, connector_id: int, status: str, **_: Any) -> Any:
        if connector_id != 0:
            self.record.status = status
            self.record.plugged = status in _PLUGGED_16
        return result16.StatusNotification()

    @on_action("Authorize")
    def on_authorize(self, id_tag: str, **_: Any) -> Any:
        return result16.Authorize(id_tag_info={"status": "Accepted"})

    @on_action("StartTransaction")
    def on_start_transaction(self, connector_id: int, meter_start: int, **_: Any) -> Any:
        transaction_id = self.central.next_transaction_id()
        self.central.transaction_started(
            self.record,
            Transaction(str(transaction_id), connector_id, utcnow(), register_kwh(meter_start)),
        )
        return result16.StartTransaction(
            transaction_id=transaction_id, id_tag_info={"status": "Accepted"}
        )

    @on_action("StopTransaction")
    def on_stop_transaction(self, transaction_id: int, meter_stop: int, **_: Any) -> Any:
        record = self.record
        known = record.transaction is not None and record.transaction.transaction_id == str(
            transaction_id
        )
        if not known and str(transaction_id) not in record.ended:
            raise PropertyConstraintViolationError(
                details={"cause": f"transaction {transaction_id} is not known here"}
            )
        if known:
            self.central.transaction_ended(record, register_kwh(meter_stop))
        return result16.StopTransaction(id_tag_info={"status": "Accepted"})

    @on_action("DataTransfer")
    def on_data_transfer(
        self, vendor_id: str, message_id: str | None = None, data: str | None = None, **_: Any
    ) -> Any:
        if vendor_id != NEEDS_VENDOR_ID:
            return result16.DataTransfer(status="UnknownVendorId")
        if message_id != NEEDS_MESSAGE_ID:
            return result16.DataTransfer(status="UnknownMessageId")
        try:
            needs = decode_data_transfer_needs(data)
        except InvalidChargingNeeds as exc:
            return result16.DataTransfer(status="Rejected", data=str(exc))
        self.central.charging_need(self.record, needs)
        return result16.DataTransfer(status="Accepted")


class _Session201(_Session, ChargePoint201):  # type: ignore[misc]
    version = "ocpp2.0.1"
    _requests, _results = call201, result201

    @on_action("BootNotification")
    def on_boot_notification(self, charging_station: dict[str, Any], **_: Any) -> Any:
        return self._boot_accepted(
            str(charging_station.get("vendor_name", "")), str(charging_station.get("model", ""))
        )

    @on_action("StatusNotification")
    def on_status_notification(self, connector_status: str, evse_id: int, **_: Any) -> Any:
        if evse_id != 0:
            self.record.status = connector_status
            self.record.plugged = connector_status == "Occupied"
        return result201.StatusNotification()

    @on_action("Authorize")
    def on_authorize(self, **_: Any) -> Any:
        return result201.Authorize(id_token_info={"status": "Accepted"})

    @on_action("TransactionEvent")
    def on_transaction_event(
        self,
        event_type: str,
        transaction_info: dict[str, Any],
        meter_value: list[Any] | None = None,
        evse: dict[str, Any] | None = None,
        **_: Any,
    ) -> Any:
        record = self.record
        transaction_id = str(transaction_info["transaction_id"])
        sample = self._sample(meter_value) if meter_value else None
        current = record.transaction
        is_current = current is not None and current.transaction_id == transaction_id
        # A Started, or an Updated whose Started we missed (the station queued it offline or
        # this central restarted): adopt it, since a 2.0.1 station issues transaction ids itself.
        if event_type != "Ended" and not is_current and transaction_id not in record.ended:
            connector = int((evse or {}).get("id", 1))
            energy = sample.energy_kwh if sample else None
            self.central.transaction_started(
                record, Transaction(transaction_id, connector, utcnow(), energy)
            )
        self.central.meter_sample(record, sample)
        if event_type == "Ended" and is_current:
            self.central.transaction_ended(record, sample.energy_kwh if sample else None)
        return result201.TransactionEvent()

    @on_action("NotifyEVChargingNeeds")
    def on_notify_ev_charging_needs(self, charging_needs: dict[str, Any], **_: Any) -> Any:
        try:
            needs = decode_ev_charging_needs(charging_needs, phases=self.record.settings.phases)
        except InvalidChargingNeeds:
            return result201.NotifyEVChargingNeeds(status="Rejected")
        self.central.charging_need(self.record, needs)
        return result201.NotifyEVChargingNeeds(status="Accepted")


_SESSIONS: Final[dict[OcppVersion, type[_Session]]] = {
    "ocpp1.6": _Session16,
    "ocpp2.0.1": _Session201,
}


# --------------------------------------------------------------------------- the server


class OcppCentral:
    """The central system: one websocket server, one record per known charger.

    ``charger_factory`` builds the adapter of each charger (the composition root passes
    :class:`adapters.ocpp.charger.OcppCharger`); with a ``registrar``, every charger is enrolled
    with its adapter (configured ones when the server starts, auto-registered ones at their
    first accepted boot).
    """

    def __init__(
        self,
        config: OcppCentralConfig,
        *,
        charger_factory: ChargerFactory,
        registrar: Registrar | None = None,
    ) -> None:
        self.config = config
        self._charger_factory = charger_factory
        self._registrar = registrar
        self._records: dict[str, _Record] = {}
        self._adapters: dict[str, DeviceAdapter] = {}
        for charger in config.chargers:
            self._records[charger.charge_point_id] = _Record(
                charger.charge_point_id, _defaults_of(charger), charger.resolved_device_id
            )
        self._tx_ids = itertools.count(int(time.time()) % 1_000_000_000)
        self.ready = asyncio.Event()
        self._port: int | None = None
        self.on_refused: RefusalHook | None = None
        """Told of every refused handshake: ``(source, reason, detail)`` (the audit trail)."""
        self.refused: dict[str, int] = {}
        """Handshakes refused, by charge point id (diagnostics; ids beyond 1024 count as
        ``*``)."""
        self.refusals: Counter[str] = Counter()
        """Handshakes refused, by reason (:data:`adapters.ocpp.admission.RefusalReason`)."""
        self._gate, self._ssl = _security(config)
        self._refusal_log = RefusalLog(log)
        self.listeners: list[Callable[[ChargerSnapshot], None]] = []
        """Called after every change to a charger's record (meter values, status, sessions)."""

    # ------------------------------------------------------------------ registry side
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the central system is not listening yet")
        return self._port

    def url(self) -> str:
        scheme = "wss" if self.config.tls else "ws"
        return f"{scheme}://{self.config.host}:{self.port}{self.config.path_prefix}"

    def charge_point_ids(self) -> tuple[str, ...]:
        return tuple(self._records)

    def snapshot(self, charge_point_id: str) -> ChargerSnapshot | None:
        record = self._records.get(charge_point_id)
        return None if record is None else record.snapshot()

    def site_cap_kw(self, charge_point_id: str) -> float | None:
        """The standing cap of a charger with no envelope on it (None: no cap)."""
        record = self._records.get(charge_point_id)
        if record is None or record.settings.site_cap_kw is None:
            return self.config.default_site_cap_kw
        return record.settings.site_cap_kw

    def device(self, charge_point_id: str) -> Device:
        """The charger as the registry sees it (an EVSE that cannot export)."""
        record = self._records[charge_point_id]
        settings = record.settings
        return Device(
            device_id=record.device_id,
            der_class=DerClass.EVSE,
            location=settings.location,
            adapter="ocpp_central",
            # BatteryRatings needs a positive discharge rating: 1 W stands for "no V2G", and
            # the adapter reports max_discharge_kw=0 so the planner never asks for export.
            ratings=BatteryRatings(
                max_charge_kw=settings.max_kw,
                max_discharge_kw=0.001,
                capacity_kwh=settings.ev_capacity_kwh,
            ),
            constraints=BatteryConstraints(reserve_soc_pct=0.0, max_soc_pct=100.0),
            programs=settings.programs,
        )

    def adapter(self, charge_point_id: str) -> DeviceAdapter:
        """The one adapter of a known charger (built by the factory on first use)."""
        if charge_point_id not in self._records:
            raise KeyError(charge_point_id)
        existing = self._adapters.get(charge_point_id)
        if existing is None:
            device_id = self._records[charge_point_id].device_id
            existing = self._charger_factory(device_id, charge_point_id, self)
            self._adapters[charge_point_id] = existing
        return existing

    def set_charging_need(
        self, charge_point_id: str, energy_kwh: float, departure: datetime | None
    ) -> None:
        """A need learned out of band (the driver's app): same effect as NotifyEVChargingNeeds."""
        self.charging_need(
            self._records[charge_point_id],
            EvChargingNeeds(energy_kwh, departure, ev_capacity_kwh=None, ev_max_kw=None),
        )

    def _enrol(self, record: _Record) -> None:
        if self._registrar is None:
            return
        try:
            self._registrar.add_device(
                self.device(record.charge_point_id), self.adapter(record.charge_point_id)
            )
        except ValueError as exc:
            log.warning("OCPP charger %s not enrolled: %s", record.charge_point_id, exc)
            return
        log.info("OCPP charger %s enrolled as %s", record.charge_point_id, record.device_id)

    # ------------------------------------------------------------------ session callbacks
    def _changed(self, record: _Record) -> None:
        snapshot = record.snapshot()
        for listener in self.listeners:
            listener(snapshot)

    def boot_accepted(self, record: _Record) -> None:
        if record.charge_point_id not in self._adapters and self._registrar is not None:
            self._enrol(record)  # auto-registered (configured ones are enrolled at start)
        self._changed(record)

    def next_transaction_id(self) -> int:
        return next(self._tx_ids) % 2_147_483_647 + 1

    def transaction_started(self, record: _Record, transaction: Transaction) -> None:
        record.transaction = transaction
        record.plugged = True
        log.info(
            "OCPP %s: transaction %s started", record.charge_point_id, transaction.transaction_id
        )
        self._changed(record)

    def transaction_ended(self, record: _Record, meter_stop_kwh: float | None) -> None:
        if record.transaction is None:
            return
        record.ended[record.transaction.transaction_id] = None
        if len(record.ended) > 64:
            del record.ended[next(iter(record.ended))]
        log.info(
            "OCPP %s: transaction %s ended (meter %s kWh)",
            record.charge_point_id,
            record.transaction.transaction_id,
            meter_stop_kwh,
        )
        record.transaction = None
        record.need = None  # the driver's need belonged to that session
        self._changed(record)

    def meter_sample(self, record: _Record, sample: MeterSample | None) -> None:
        if sample is None:
            return
        previous = record.sample
        if previous is not None:
            # Keep measurands this message did not carry (e.g. a SoC sent less often).
            sample = replace(
                sample,
                power_kw=sample.power_kw if sample.power_kw is not None else previous.power_kw,
                energy_kwh=sample.energy_kwh
                if sample.energy_kwh is not None
                else previous.energy_kwh,
                soc_pct=sample.soc_pct if sample.soc_pct is not None else previous.soc_pct,
            )
        record.sample = sample
        self._changed(record)

    def charging_need(self, record: _Record, needs: EvChargingNeeds) -> None:
        register = record.sample.energy_kwh if record.sample else None
        record.need = ChargingNeed(
            needs.energy_kwh,
            needs.departure,
            utcnow(),
            register,
            needs.ev_capacity_kwh,
            needs.ev_max_kw,
        )
        log.info(
            "OCPP %s: EV needs %.2f kWh by %s",
            record.charge_point_id,
            needs.energy_kwh,
            "?" if needs.departure is None else format_time(needs.departure),
        )
        self._changed(record)

    # ------------------------------------------------------------------ requests to chargers
    async def _request(self, charge_point_id: str, request: Any) -> Any:
        record = self._records.get(charge_point_id)
        session = None if record is None else record.session
        if record is None or session is None or not record.booted:
            raise ChargerNotConnected(charge_point_id, "no accepted session")
        action = type(request).__name__
        try:
            async with asyncio.timeout(self.config.response_timeout_s):
                response = await session.call(request, suppress=False)
            # The ocpp package waits with asyncio.wait_for, which on 3.11 can swallow a
            # cancellation (see gateway.aio): a stopping gateway must not carry on.
            raise_if_cancelling()
            return response
        except TimeoutError:
            raise ChargerCallFailed(charge_point_id, action, None) from None
        except OCPPError as exc:
            raise ChargerCallFailed(charge_point_id, action, str(exc.code)) from exc
        except UnknownCallErrorCodeError as exc:
            raise ChargerCallFailed(charge_point_id, action, "unknown") from exc
        except ConnectionClosed as exc:
            raise ChargerNotConnected(charge_point_id, f"connection lost: {exc}") from exc

    async def set_charging_profile(self, charge_point_id: str, limit: ChargingProfileLimit) -> None:
        """Send one of our profiles; raises :class:`OcppCentralError` unless it is Accepted."""
        record = self._records.get(charge_point_id)
        if record is None or record.version is None:
            raise ChargerNotConnected(charge_point_id, "never connected")
        settings = record.settings
        payload = set_charging_profile(
            record.version,
            limit,
            rate_unit=settings.rate_unit,
            voltage_v=settings.voltage_v,
            phases=settings.phases,
            stack_level=self.config.stack_level,
            now=utcnow(),
        )
        request = _SESSIONS[record.version]._requests.SetChargingProfile(**payload)
        response = await self._request(charge_point_id, request)
        if str(response.status) != "Accepted":
            raise ChargerRejected(charge_point_id, "SetChargingProfile", str(response.status))

    async def clear_charging_profile(self, charge_point_id: str, purpose: ProfilePurpose) -> None:
        """Remove one of our profiles (by its id); a charger that has none answers Unknown."""
        record = self._records.get(charge_point_id)
        if record is None or record.version is None:
            raise ChargerNotConnected(charge_point_id, "never connected")
        payload = clear_charging_profile(record.version, purpose)
        request = _SESSIONS[record.version]._requests.ClearChargingProfile(**payload)
        response = await self._request(charge_point_id, request)
        if str(response.status) not in ("Accepted", "Unknown"):
            raise ChargerRejected(charge_point_id, "ClearChargingProfile", str(response.status))

    # ------------------------------------------------------------------ websocket side
    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """The upgrade request's checks, before any websocket exists: the id, the security
        profile's credentials (:mod:`adapters.ocpp.admission`), then the OCPP version."""
        charge_point_id = self._charge_point_id(request.path)
        if charge_point_id is None:
            return connection.respond(HTTPStatus.NOT_FOUND, _REFUSAL_TEXT[HTTPStatus.NOT_FOUND])
        source = _source(connection)
        known = charge_point_id in self._records or self.config.auto_register
        refusal = self._gate.check(
            charge_point_id,
            source,
            request.headers.get_all("Authorization"),
            _peer_certificate(connection),
            known=known,
        )
        if refusal is None and not known:  # profile 0: OCPP-J's answer to an unknown id
            refusal = Refusal(HTTPStatus.NOT_FOUND, "unknown_charger", "not configured")
        if refusal is None:
            offered = {
                token.strip()
                for value in request.headers.get_all("Sec-WebSocket-Protocol")
                for token in value.split(",")
            }
            if not offered.intersection(self.config.versions):
                # Refused here rather than by websockets' negotiation, which logs a traceback.
                refusal = Refusal(
                    HTTPStatus.BAD_REQUEST,
                    "no_common_version",
                    f"offers {', '.join(sorted(offered)) or 'no subprotocol'}, "
                    f"we speak {', '.join(self.config.versions)}",
                )
        if refusal is not None:
            return self._refuse(connection, charge_point_id, source, refusal)
        return None

    def _refuse(
        self, connection: ServerConnection, charge_point_id: str, source: str, refusal: Refusal
    ) -> Response:
        counted = charge_point_id
        if counted not in self.refused and len(self.refused) >= _MAX_COUNTED_IDS:
            counted = "*"
        self.refused[counted] = self.refused.get(counted, 0) + 1
        self.refusals[refusal.reason] += 1
        self._refusal_log.refused(charge_point_id, source, refusal)
        if self.on_refused is not None:
            self.on_refused(f"ocpp:{charge_point_id}@{source}", refusal.reason, refusal.detail)
        response = connection.respond(refusal.status, _REFUSAL_TEXT[refusal.status])
        if refusal.status == HTTPStatus.UNAUTHORIZED:
            response.headers["WWW-Authenticate"] = _BASIC_CHALLENGE
        if refusal.retry_after_s is not None:
            response.headers["Retry-After"] = str(math.ceil(refusal.retry_after_s))
        return response

    def _charge_point_id(self, path: str) -> str | None:
        path = path.split("?", 1)[0]
        prefix = self.config.path_prefix + "/"
        if not path.startswith(prefix):
            return None
        candidate = unquote(path[len(prefix) :])
        return candidate if _CP_ID_RE.match(candidate) else None

    async def _serve(self, connection: ServerConnection) -> None:
        assert connection.request is not None  # after the handshake
        charge_point_id = self._charge_point_id(connection.request.path)
        offered = connection.subprotocol
        version: OcppVersion = "ocpp1.6" if offered == "ocpp1.6" else "ocpp2.0.1"
        if charge_point_id is None or offered not in SUBPROTOCOLS:
            await connection.close(1002, "no OCPP subprotocol agreed")
            return
        record = self._records.get(charge_point_id)
        if record is None:
            defaults = self.config.auto_register_defaults
            if not self.config.auto_register or defaults is None:
                await connection.close(1008, "unknown charge point")
                return
            record = _Record(charge_point_id, defaults, charge_point_id)
            self._records[charge_point_id] = record
            log.info("OCPP charger %s auto-registered", charge_point_id)
        session = _SESSIONS[version](self, record, connection)
        previous = record.session
        if previous is not None:
            # A charger has one connection: the newer one wins (the old one is half-open).
            with contextlib.suppress(Exception):
                await previous._connection.close(1000, "superseded")
        record.session, record.version = session, version
        record.generation += 1
        log.info(
            "OCPP %s connected from %s (%s, security profile %d)",
            charge_point_id,
            _source(connection),
            version,
            self.config.security_profile,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                session.tasks = tg
                await session.start()
        except* ConnectionClosed:
            pass
        finally:
            session.tasks = None
            if record.session is session:
                record.session = None
                log.info("OCPP %s disconnected", charge_point_id)
                self._changed(record)

    async def run(self) -> None:
        """Serve until cancelled; configured chargers are enrolled first."""
        for record in list(self._records.values()):
            if record.charge_point_id not in self._adapters:
                self._enrol(record)
        async with serve(
            self._serve,
            self.config.host,
            self.config.port,
            subprotocols=list(self.config.versions),  # type: ignore[arg-type]
            process_request=self._admit,
            max_size=self.config.max_message_bytes,
            ping_interval=20,
            ping_timeout=20,
            ssl=self._ssl,
        ) as server:
            sockets = list(server.sockets)
            self._port = sockets[0].getsockname()[1] if sockets else self.config.port
            log.info(
                "OCPP central system listening on %s (security profile %d)",
                self.url(),
                self.config.security_profile,
            )
            if self.config.security_profile == 0 and not is_loopback(self.config.host):
                log.warning(
                    "OCPP central on %s with security_profile 0: anyone who knows a charger's "
                    "id can connect as that charger; use security_profile 2 or 3",
                    self.config.host,
                )
            self.ready.set()
            try:
                await asyncio.get_running_loop().create_future()
            finally:
                self.ready.clear()
                server.close(close_connections=True)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2):
                        await server.wait_closed()


def _security(config: OcppCentralConfig) -> tuple[SecurityGate, ssl.SSLContext | None]:
    """The profile's gate and TLS context, from the chargers' secrets and the TLS files (read
    here, once, when the central is built). Raises ConfigError naming every unusable one."""
    problems: list[str] = []
    secrets: dict[str, ChargerSecret] = {}
    if config.security_profile in (1, 2):
        for index, charger in enumerate(config.chargers):
            try:
                secrets[charger.charge_point_id] = load_secret(
                    charger.charge_point_id, charger.password_file, charger.password_env
                )
            except ValueError as exc:
                problems.append(f"chargers[{index}] ({charger.charge_point_id}): {exc}")
    context: ssl.SSLContext | None = None
    if config.cert_file is not None and config.key_file is not None:
        try:
            context = ocpp_server_ssl_context(
                config.cert_file,
                config.key_file,
                config.ca_file if config.security_profile == 3 else None,
            )
        except OSError as exc:  # ssl.SSLError included: a key that does not fit, not PEM
            problems.append(f"cannot use the TLS files (cert_file, key_file, ca_file): {exc}")
    if problems:
        raise ConfigError("[ocpp_central]", problems)
    gate = SecurityGate(config.security_profile, secrets, cpo_name=config.cpo_name)
    return gate, context


def _source(connection: ServerConnection) -> str:
    address = connection.remote_address
    return str(address[0]) if address else "?"


def _peer_certificate(connection: ServerConnection) -> PeerCertificate | None:
    """The client certificate the TLS handshake verified (None: no TLS, or none asked)."""
    ssl_object = connection.transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    certificate: PeerCertificate | None = ssl_object.getpeercert()
    return certificate or None


def _defaults_of(charger: OcppChargerConfig) -> OcppChargerDefaults:
    return OcppChargerDefaults.model_validate(
        charger.model_dump(
            exclude={"charge_point_id", "device_id", "password_file", "password_env"}
        )
    )


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the port on this machine (``0.0.0.0`` / ``""``: no)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
