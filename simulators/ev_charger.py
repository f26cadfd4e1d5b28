"""A simulated EV charger: an ``ocpp`` charge point (1.6J or 2.0.1) with EVs that come and go.

Physics, per tick: an EV plugged in draws ``min(charger rating, EV maximum, charging-profile
limit)`` until it has the energy it came for, then nothing; it leaves at its departure time. The
profile limit follows OCPP's composition: the highest-stack valid ChargePointMaxProfile /
ChargingStationMaxProfile caps everything, and under it the TxProfile of the running
transaction, or else the TxDefaultProfile (connector-specific before connector 0). Limits in A
become W over ``numberPhases`` (default: the charger's phases) at ``voltage_v``.

The charger boots, reports status, heartbeats, starts and stops transactions, announces each EV's
charging needs (2.0.1 NotifyEVChargingNeeds; 1.6 a DataTransfer the gateway understands) and
sends meter values (power, energy register, SoC when the EV has one) every ``meter_interval_s``.

Security profiles: ``password`` makes it send HTTP Basic credentials with its upgrade (profiles 1
and 2; a 1.6 AuthorizationKey of 32-40 hex digits goes out as the bytes it encodes, as the 1.6
Security Whitepaper says), a ``wss://`` URL makes it verify the central's certificate against
``ca_file`` (profile 2), and ``cert_file`` / ``key_file`` make it present a client certificate
(profile 3).

``time_scale`` compresses simulated time so tests run fast: arrivals, dwell times and energy
accumulate ``time_scale`` times faster than the wall clock. On the wire everything is in wall
time — departure times are "now + remaining simulated time / time_scale", and energies (needs and
the meter register) are divided by ``time_scale`` — so a central system that computes
kW = kWh / hours from wall-clock timestamps sees the physical power.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import ssl
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

from ocpp.exceptions import OCPPError  # type: ignore[import-untyped]
from ocpp.v16 import ChargePoint as ChargePoint16  # type: ignore[import-untyped]
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v201 import ChargePoint as ChargePoint201  # type: ignore[import-untyped]
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from pydantic import BaseModel, ConfigDict, Field
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus
from websockets.typing import Subprotocol

from adapters.ocpp.wire import WireLog, on_action
from protocols.ocpp import authorization_header, wire_password
from protocols.tls import ocpp_client_ssl_context

__all__ = [
    "ChargerRefused",
    "EvChargerSim",
    "EvChargerSimConfig",
    "EvVisit",
    "SessionResult",
]

log = logging.getLogger(__name__)

_WIRE_LOG: Final = WireLog(logging.getLogger("simulators.ev_charger.wire"))
_CONNECTOR: Final = 1
_NEEDS_VENDOR_ID: Final = "org.derms-gateway"  # adapters.ocpp.central.NEEDS_VENDOR_ID
_NEEDS_MESSAGE_ID: Final = "EVChargingNeeds"


def _raise_if_cancelling() -> None:
    """Re-raise a cancellation that ``asyncio.wait_for`` (inside the ocpp package) swallowed.

    On Python 3.11 ``wait_for`` loses a cancellation that arrives as the awaited response does;
    the task still counts it, so without this check a stopped simulator's loop would run on.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _now() -> datetime:
    return datetime.now(UTC)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EvVisit(_Frozen):
    """One EV: when it arrives, what it needs, how long it stays (simulated seconds)."""

    arrive_after_s: float = Field(
        default=0.0, ge=0, description="After the previous EV left (or the charger booted)"
    )
    energy_needed_kwh: float = Field(gt=0, le=500)
    dwell_s: float | None = Field(default=None, gt=0, description="None: stays until stopped")
    ev_max_kw: float = Field(default=11.0, gt=0, le=1000)
    capacity_kwh: float = Field(default=60.0, gt=0, le=500)
    soc_start_pct: float | None = Field(
        default=None, ge=0, le=100, description="Reported as MeterValues SoC when given"
    )
    announce_needs: bool = Field(default=True, description="Send the need and departure time")
    id_tag: str = Field(default="DRIVER-1", max_length=20)


class EvChargerSimConfig(_Frozen):
    charge_point_id: str
    url: str = Field(description="The central system's base URL; the id is appended")
    version: Literal["ocpp1.6", "ocpp2.0.1"] = "ocpp1.6"
    max_kw: float = Field(default=11.0, gt=0, le=1000)
    voltage_v: float = Field(default=230.0, gt=0)
    phases: int = Field(default=3, ge=1, le=3)
    time_scale: float = Field(default=1.0, gt=0, le=100_000)
    tick_s: float = Field(default=0.05, gt=0, le=10, description="Real seconds per physics step")
    meter_interval_s: float = Field(default=1.0, gt=0, le=3600, description="Real seconds")
    heartbeat_s: float | None = Field(default=None, gt=0, description="None: as the central says")
    response_timeout_s: float = Field(default=5.0, gt=0, le=120)
    visits: tuple[EvVisit, ...] = ()
    vendor: str = "DERMS-Sim"
    model: str = "EVSE-Sim"
    password: str | None = Field(
        default=None,
        repr=False,
        description="Profiles 1-2: the AuthorizationKey (1.6) / BasicAuthPassword (2.0.1)",
    )
    basic_auth_username: str | None = Field(
        default=None, description="Default: charge_point_id (another one tests the central)"
    )
    ca_file: Path | None = Field(
        default=None, description="wss: the CA of the central's certificate (None: the system's)"
    )
    cert_file: Path | None = Field(default=None, description="Profile 3: client certificate")
    key_file: Path | None = Field(default=None, description="Profile 3: its private key")


class ChargerRefused(Exception):
    """The central system refused this charger (handshake status or BootNotification)."""

    def __init__(self, charge_point_id: str, reason: str, *, http_status: int | None = None):
        super().__init__(f"{charge_point_id}: {reason}")
        self.charge_point_id = charge_point_id
        self.reason = reason
        self.http_status = http_status


@dataclass(frozen=True, slots=True)
class SessionResult:
    """How one EV's visit went (energies in simulated kWh)."""

    energy_needed_kwh: float
    delivered_kwh: float
    met: bool
    transaction_id: str | None


@dataclass(slots=True)
class _Profile:
    profile_id: int
    purpose: str  # "max" | "tx_default" | "tx"
    stack_level: int
    connector: int
    transaction_id: str | None
    unit: str
    periods: list[tuple[float, float, int | None]]  # (start s, limit, phases)
    start: datetime | None
    duration_s: float | None
    valid_to: datetime | None


@dataclass(slots=True)
class _Ev:
    visit: EvVisit
    arrived_at: float  # simulated seconds
    departs_at: float | None
    delivered_kwh: float = 0.0
    transaction_id: str | None = None
    tx_started: datetime = field(default_factory=_now)
    seq_no: int = 0


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class EvChargerSim:
    """One single-connector charger. ``run()`` until cancelled; ``plug_in`` adds an EV now."""

    def __init__(self, config: EvChargerSimConfig) -> None:
        self.config = config
        self.booted = asyncio.Event()
        self.boot_status: str | None = None
        self.power_kw = 0.0
        self.energy_register_kwh = 0.0  # simulated kWh, all sessions
        self.results: list[SessionResult] = []
        self.profiles: dict[int, _Profile] = {}
        self.ev: _Ev | None = None
        self.sim_time_s = 0.0
        self.errors: list[str] = []
        """CALLERRORs the central answered (for tests)."""
        self._queue: list[EvVisit] = list(config.visits)
        self._next_arrival: float | None = None
        self._cp: Any = None
        self._heartbeat_s = config.heartbeat_s or 60.0
        self._reboot = asyncio.Event()
        self._tx_ids = itertools.count(1)

    # ------------------------------------------------------------------ public
    @property
    def limit_kw(self) -> float:
        """The profile limit in force right now (inf: none)."""
        return self._profile_limit_w(_now()) / 1000

    def plug_in(self, visit: EvVisit) -> None:
        """An EV arrives at the next tick (queued behind the one plugged in, if any)."""
        self._queue.insert(0, visit.model_copy(update={"arrive_after_s": 0.0}))
        self._next_arrival = None

    async def run(self) -> None:
        cfg = self.config
        url = f"{cfg.url.rstrip('/')}/{cfg.charge_point_id}"
        headers: dict[str, str] = {}
        if cfg.password is not None:
            username = cfg.basic_auth_username or cfg.charge_point_id
            headers["Authorization"] = authorization_header(
                username, wire_password(cfg.password, cfg.version)
            )
        tls: ssl.SSLContext | bool | None = None  # None for ws://; True: the system's trust
        if url.startswith("wss:"):
            tls = True
            if cfg.ca_file is not None:
                tls = await asyncio.to_thread(
                    ocpp_client_ssl_context, cfg.ca_file, cfg.cert_file, cfg.key_file
                )
        try:
            websocket = await connect(
                url,
                subprotocols=[Subprotocol(cfg.version)],
                additional_headers=headers or None,
                open_timeout=5,
                ssl=tls,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise ChargerRefused(cfg.charge_point_id, f"HTTP {status}", http_status=status) from exc
        except ssl.SSLError as exc:
            raise ChargerRefused(cfg.charge_point_id, f"TLS: {exc}") from exc
        except (InvalidMessage, ConnectionResetError) as exc:
            # In TLS 1.3 the server checks a client certificate after the client has finished
            # its handshake: a refused one ends the connection before any HTTP answer.
            raise ChargerRefused(cfg.charge_point_id, f"no HTTP answer: {exc}") from exc
        try:
            cls = _Client16 if self.config.version == "ocpp1.6" else _Client201
            self._cp = cls(self, websocket)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._cp.start(), name="ocpp-recv")
                await self._boot()
                tg.create_task(self._physics(), name="physics")
                tg.create_task(self._meter_loop(), name="meter")
                tg.create_task(self._heartbeat_loop(), name="heartbeat")
                tg.create_task(self._reboot_loop(), name="reboot")
        except* ConnectionClosed:
            log.info("%s: connection closed", self.config.charge_point_id)
        finally:
            await websocket.close()

    # ------------------------------------------------------------------ OCPP out
    async def _call(self, payload: Any) -> Any:
        try:
            async with asyncio.timeout(self.config.response_timeout_s):
                response = await self._cp.call(payload, suppress=False)
        except OCPPError as exc:
            self.errors.append(f"{type(payload).__name__}: {exc.code}")
            log.warning("%s: %s refused: %s", self.config.charge_point_id, payload, exc)
            response = None
        _raise_if_cancelling()
        return response

    async def _boot(self) -> None:
        cfg = self.config
        if cfg.version == "ocpp1.6":
            request: Any = call16.BootNotification(
                charge_point_model=cfg.model, charge_point_vendor=cfg.vendor
            )
        else:
            request = call201.BootNotification(
                charging_station={"model": cfg.model, "vendor_name": cfg.vendor},
                reason="PowerUp",
            )
        response = await self._call(request)
        status = None if response is None else str(response.status)
        self.boot_status = status
        if status != "Accepted":
            raise ChargerRefused(cfg.charge_point_id, f"BootNotification {status}")
        if cfg.heartbeat_s is None and response.interval > 0:
            self._heartbeat_s = float(response.interval)
        self.booted.set()
        await self._status("Available")

    async def _status(self, status: str) -> None:
        if self.config.version == "ocpp1.6":
            await self._call(
                call16.StatusNotification(
                    connector_id=_CONNECTOR,
                    error_code="NoError",
                    status=status,
                    timestamp=_iso(_now()),
                )
            )
        else:
            await self._call(
                call201.StatusNotification(
                    timestamp=_iso(_now()),
                    connector_status="Available" if status == "Available" else "Occupied",
                    evse_id=_CONNECTOR,
                    connector_id=_CONNECTOR,
                )
            )

    def _wire_kwh(self, sim_kwh: float) -> float:
        return sim_kwh / self.config.time_scale

    def _samples(self) -> list[dict[str, Any]]:
        register_wh = self._wire_kwh(self.energy_register_kwh) * 1000
        soc = self._soc()
        if self.config.version == "ocpp1.6":
            values: list[dict[str, Any]] = [
                {"value": f"{self.power_kw * 1000:.1f}", "measurand": "Power.Active.Import",
                 "unit": "W", "context": "Sample.Periodic"},
                {"value": f"{register_wh:.1f}", "measurand": "Energy.Active.Import.Register",
                 "unit": "Wh", "context": "Sample.Periodic"},
            ]  # fmt: skip
            if soc is not None:
                values.append({"value": f"{soc:.1f}", "measurand": "SoC", "unit": "Percent"})
        else:
            values = [
                {"value": round(self.power_kw * 1000, 1), "measurand": "Power.Active.Import",
                 "unit_of_measure": {"unit": "W"}, "context": "Sample.Periodic"},
                {"value": round(register_wh, 1), "measurand": "Energy.Active.Import.Register",
                 "unit_of_measure": {"unit": "Wh"}, "context": "Sample.Periodic"},
            ]  # fmt: skip
            if soc is not None:
                values.append(
                    {
                        "value": round(soc, 1),
                        "measurand": "SoC",
                        "unit_of_measure": {"unit": "Percent"},
                    }
                )
        return [{"timestamp": _iso(_now()), "sampled_value": values}]

    def _soc(self) -> float | None:
        ev = self.ev
        if ev is None or ev.visit.soc_start_pct is None:
            return None
        return min(100.0, ev.visit.soc_start_pct + 100 * ev.delivered_kwh / ev.visit.capacity_kwh)

    async def _send_meter_values(self) -> None:
        ev = self.ev
        if self.config.version == "ocpp1.6":
            await self._call(
                call16.MeterValues(
                    connector_id=_CONNECTOR,
                    meter_value=self._samples(),
                    transaction_id=None if ev is None else int(ev.transaction_id or 0) or None,
                )
            )
        elif ev is not None and ev.transaction_id is not None:
            await self._transaction_event(ev, "Updated", "MeterValuePeriodic")
        else:
            await self._call(call201.MeterValues(evse_id=_CONNECTOR, meter_value=self._samples()))

    async def _transaction_event(
        self, ev: _Ev, event_type: str, trigger: str, stopped_reason: str | None = None
    ) -> None:
        state = (
            "Charging"
            if self.power_kw > 0
            else ("EVConnected" if ev.delivered_kwh == 0 else "SuspendedEV")
        )
        info: dict[str, Any] = {"transaction_id": ev.transaction_id, "charging_state": state}
        if stopped_reason is not None:
            info["stopped_reason"] = stopped_reason
        ev.seq_no += 1
        await self._call(
            call201.TransactionEvent(
                event_type=event_type,
                timestamp=_iso(_now()),
                trigger_reason=trigger,
                seq_no=ev.seq_no,
                transaction_info=info,
                meter_value=self._samples(),
                evse={"id": _CONNECTOR, "connector_id": _CONNECTOR},
                id_token=(
                    {"id_token": ev.visit.id_tag, "type": "ISO14443"}
                    if event_type == "Started"
                    else None
                ),
            )
        )

    # ------------------------------------------------------------------ EV sessions
    async def _arrive(self, visit: EvVisit) -> None:
        cfg = self.config
        departs = None if visit.dwell_s is None else self.sim_time_s + visit.dwell_s
        ev = _Ev(visit, self.sim_time_s, departs)
        self.ev = ev
        log.info("%s: EV arrives, needs %.2f kWh", cfg.charge_point_id, visit.energy_needed_kwh)
        if cfg.version == "ocpp1.6":
            await self._status("Preparing")
            response = await self._call(
                call16.StartTransaction(
                    connector_id=_CONNECTOR,
                    id_tag=visit.id_tag,
                    meter_start=int(self._wire_kwh(self.energy_register_kwh) * 1000),
                    timestamp=_iso(_now()),
                )
            )
            if response is not None:
                ev.transaction_id = str(response.transaction_id)
        else:
            await self._status("Occupied")
            ev.transaction_id = uuid.uuid4().hex[:20]
            await self._transaction_event(ev, "Started", "CablePluggedIn")
        ev.tx_started = _now()
        if visit.announce_needs:
            await self._announce(ev)
        if cfg.version == "ocpp1.6":
            await self._status("Charging")

    def _departure_wall(self, ev: _Ev) -> datetime | None:
        if ev.departs_at is None:
            return None
        remaining_s = max(0.0, ev.departs_at - self.sim_time_s) / self.config.time_scale
        return _now() + timedelta(seconds=remaining_s)

    async def _announce(self, ev: _Ev) -> None:
        cfg = self.config
        need_wh = self._wire_kwh(ev.visit.energy_needed_kwh) * 1000
        departure = self._departure_wall(ev)
        if cfg.version == "ocpp1.6":
            data: dict[str, Any] = {
                "energyAmountWh": math.ceil(need_wh * 10) / 10,
                "evEnergyCapacityWh": round(self._wire_kwh(ev.visit.capacity_kwh) * 1000, 1),
                "evMaxPowerW": round(ev.visit.ev_max_kw * 1000, 1),
            }
            if departure is not None:
                data["departureTime"] = _iso(departure)
            await self._call(
                call16.DataTransfer(
                    vendor_id=_NEEDS_VENDOR_ID, message_id=_NEEDS_MESSAGE_ID, data=json.dumps(data)
                )
            )
        else:
            needs: dict[str, Any] = {
                "requested_energy_transfer": "AC_three_phase"
                if cfg.phases == 3
                else "AC_single_phase",
                "ac_charging_parameters": {
                    "energy_amount": max(1, math.ceil(need_wh)),  # never understate it
                    "ev_min_current": 6,
                    "ev_max_current": max(
                        6, math.floor(ev.visit.ev_max_kw * 1000 / (cfg.voltage_v * cfg.phases))
                    ),
                    "ev_max_voltage": round(cfg.voltage_v),
                },
            }
            if departure is not None:
                needs["departure_time"] = _iso(departure)
            await self._call(
                call201.NotifyEVChargingNeeds(charging_needs=needs, evse_id=_CONNECTOR)
            )

    async def _depart(self, ev: _Ev) -> None:
        cfg = self.config
        self.power_kw = 0.0
        met = ev.delivered_kwh >= ev.visit.energy_needed_kwh - 1e-9
        self.results.append(
            SessionResult(ev.visit.energy_needed_kwh, ev.delivered_kwh, met, ev.transaction_id)
        )
        log.info(
            "%s: EV leaves with %.3f kWh (met: %s)", cfg.charge_point_id, ev.delivered_kwh, met
        )
        if cfg.version == "ocpp1.6":
            if ev.transaction_id is not None:
                await self._call(
                    call16.StopTransaction(
                        meter_stop=int(self._wire_kwh(self.energy_register_kwh) * 1000),
                        timestamp=_iso(_now()),
                        transaction_id=int(ev.transaction_id),
                        reason="EVDisconnected",
                    )
                )
            await self._status("Finishing")
        elif ev.transaction_id is not None:
            await self._transaction_event(ev, "Ended", "EVDeparted", "EVDisconnected")
        self.ev = None
        # Tx profiles end with their transaction.
        for pid in [p.profile_id for p in self.profiles.values() if p.purpose == "tx"]:
            del self.profiles[pid]
        await self._status("Available")

    # ------------------------------------------------------------------ loops
    async def _physics(self) -> None:
        cfg = self.config
        last = time.monotonic()
        while True:
            await asyncio.sleep(cfg.tick_s)
            now = time.monotonic()
            dt_sim = (now - last) * cfg.time_scale
            last = now
            self.sim_time_s += dt_sim
            if self.ev is None and self._queue:
                if self._next_arrival is None:
                    self._next_arrival = self.sim_time_s + self._queue[0].arrive_after_s
                if self.sim_time_s >= self._next_arrival:
                    self._next_arrival = None
                    await self._arrive(self._queue.pop(0))
                    continue
            ev = self.ev
            if ev is None:
                self.power_kw = 0.0
                continue
            missing = ev.visit.energy_needed_kwh - ev.delivered_kwh
            if missing <= 1e-9:
                self.power_kw = 0.0
            else:
                limit = self._profile_limit_w(_now()) / 1000
                self.power_kw = max(0.0, min(cfg.max_kw, ev.visit.ev_max_kw, limit))
                energy = min(missing, self.power_kw * dt_sim / 3600)
                ev.delivered_kwh += energy
                self.energy_register_kwh += energy
            if ev.departs_at is not None and self.sim_time_s >= ev.departs_at:
                await self._depart(ev)

    async def _meter_loop(self) -> None:
        while True:
            await self._send_meter_values()
            await asyncio.sleep(self.config.meter_interval_s)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            heartbeat = (
                call16.Heartbeat() if self.config.version == "ocpp1.6" else call201.Heartbeat()
            )
            await self._call(heartbeat)

    async def _reboot_loop(self) -> None:
        while True:
            await self._reboot.wait()
            self._reboot.clear()
            await self._boot()

    # ------------------------------------------------------------------ profiles
    def _profile_limit_w(self, now: datetime) -> float:
        ev = self.ev
        tx_id = None if ev is None else ev.transaction_id

        def best(purpose: str, connectors: tuple[int, ...]) -> float | None:
            candidates = [
                p
                for p in self.profiles.values()
                if p.purpose == purpose
                and p.connector in connectors
                and (purpose != "tx" or p.transaction_id == tx_id)
            ]
            # Connector-specific before connector 0, then the highest stack level.
            candidates.sort(key=lambda p: (p.connector != 0, p.stack_level), reverse=True)
            for profile in candidates:
                watts = self._profile_value_w(profile, now, ev)
                if watts is not None:
                    return watts
            return None

        site = best("max", (0,))
        tx = best("tx", (_CONNECTOR,)) if tx_id is not None else None
        if tx is None:
            tx = best("tx_default", (_CONNECTOR, 0))
        limits = [w for w in (site, tx) if w is not None]
        return min(limits) if limits else math.inf

    def _profile_value_w(self, profile: _Profile, now: datetime, ev: _Ev | None) -> float | None:
        if profile.valid_to is not None and now >= profile.valid_to:
            return None
        start = profile.start or (ev.tx_started if ev is not None else now)
        elapsed = (now - start).total_seconds()
        if elapsed < 0 or (profile.duration_s is not None and elapsed > profile.duration_s):
            return None
        chosen = None
        for begin, limit, phases in profile.periods:
            if begin <= elapsed:
                chosen = (limit, phases)
        if chosen is None:
            return None
        limit, phases = chosen
        if profile.unit == "A":
            return limit * self.config.voltage_v * (phases or self.config.phases)
        return limit

    def store_profile(
        self, connector: int, profile: dict[str, Any], version: str
    ) -> Literal["Accepted", "Rejected"]:
        """Install a SetChargingProfile (snake_case keys as the ocpp package hands them over)."""
        purposes = {
            "ChargePointMaxProfile": "max",
            "ChargingStationMaxProfile": "max",
            "TxDefaultProfile": "tx_default",
            "TxProfile": "tx",
        }
        purpose = purposes.get(str(profile.get("charging_profile_purpose")))
        if purpose is None:
            return "Rejected"
        schedule = profile.get("charging_schedule")
        if version == "ocpp2.0.1":
            schedule = (schedule or [None])[0]
            profile_id = int(profile["id"])
        else:
            profile_id = int(profile["charging_profile_id"])
        if not isinstance(schedule, dict):
            return "Rejected"
        tx_id = profile.get("transaction_id")
        if purpose == "max" and connector != 0:
            return "Rejected"
        if purpose == "tx":
            ev = self.ev
            if connector != _CONNECTOR or ev is None or ev.transaction_id is None:
                return "Rejected"
            if tx_id is not None and str(tx_id) != ev.transaction_id:
                return "Rejected"
            tx_id = ev.transaction_id
        kind = str(profile.get("charging_profile_kind"))
        start = _parse_time(schedule.get("start_schedule")) if kind == "Absolute" else None
        if kind == "Absolute" and start is None:
            start = _now()
        periods = sorted(
            (float(p["start_period"]), float(p["limit"]), p.get("number_phases"))
            for p in schedule.get("charging_schedule_period", ())
        )
        duration = schedule.get("duration")
        stored = _Profile(
            profile_id=profile_id,
            purpose=purpose,
            stack_level=int(profile.get("stack_level", 0)),
            connector=connector,
            transaction_id=None if tx_id is None else str(tx_id),
            unit=str(schedule.get("charging_rate_unit", "W")),
            periods=periods,
            start=start,
            duration_s=None if duration is None else float(duration),
            valid_to=_parse_time(profile.get("valid_to")),
        )
        # A new profile replaces one with the same id, or the same purpose, stack and connector.
        for pid, old in list(self.profiles.items()):
            same_slot = (old.purpose, old.stack_level, old.connector) == (
                stored.purpose,
                stored.stack_level,
                stored.connector,
            )
            if pid == profile_id or same_slot:
                del self.profiles[pid]
        self.profiles[profile_id] = stored
        log.info(
            "%s: %s profile %d: %s %s",
            self.config.charge_point_id,
            purpose,
            profile_id,
            periods[0][1] if periods else "?",
            stored.unit,
        )
        return "Accepted"

    def clear_profiles(
        self,
        profile_id: int | None,
        connector: int | None,
        purpose: str | None,
        stack_level: int | None,
    ) -> Literal["Accepted", "Unknown"]:
        purposes = {
            "ChargePointMaxProfile": "max",
            "ChargingStationMaxProfile": "max",
            "TxDefaultProfile": "tx_default",
            "TxProfile": "tx",
        }
        wanted = None if purpose is None else purposes.get(purpose, "?")
        removed = False
        for pid, profile in list(self.profiles.items()):
            if profile_id is not None and pid != profile_id:
                continue
            if connector is not None and profile.connector != connector:
                continue
            if wanted is not None and profile.purpose != wanted:
                continue
            if stack_level is not None and profile.stack_level != stack_level:
                continue
            del self.profiles[pid]
            removed = True
        return "Accepted" if removed else "Unknown"

    def request_boot(self) -> None:
        self._reboot.set()


class _Client16(ChargePoint16):  # type: ignore[misc]
    def __init__(self, sim: EvChargerSim, connection: ClientConnection) -> None:
        super().__init__(
            sim.config.charge_point_id,
            connection,
            response_timeout=sim.config.response_timeout_s,
            logger=_WIRE_LOG,
        )
        self.sim = sim

    @on_action("SetChargingProfile")
    def on_set_charging_profile(
        self, connector_id: int, cs_charging_profiles: dict[str, Any], **_: Any
    ) -> Any:
        status = self.sim.store_profile(connector_id, cs_charging_profiles, "ocpp1.6")
        return result16.SetChargingProfile(status=status)

    @on_action("ClearChargingProfile")
    def on_clear_charging_profile(
        self,
        id: int | None = None,  # the OCPP field name
        connector_id: int | None = None,
        charging_profile_purpose: str | None = None,
        stack_level: int | None = None,
        **_: Any,
    ) -> Any:
        status = self.sim.clear_profiles(id, connector_id, charging_profile_purpose, stack_level)
        return result16.ClearChargingProfile(status=status)

    @on_action("TriggerMessage")
    def on_trigger_message(self, requested_message: str, **_: Any) -> Any:
        if requested_message != "BootNotification":
            return result16.TriggerMessage(status="NotImplemented")
        self.sim.request_boot()
        return result16.TriggerMessage(status="Accepted")


class _Client201(ChargePoint201):  # type: ignore[misc]
    def __init__(self, sim: EvChargerSim, connection: ClientConnection) -> None:
        super().__init__(
            sim.config.charge_point_id,
            connection,
            response_timeout=sim.config.response_timeout_s,
            logger=_WIRE_LOG,
        )
        self.sim = sim

    @on_action("SetChargingProfile")
    def on_set_charging_profile(
        self, evse_id: int, charging_profile: dict[str, Any], **_: Any
    ) -> Any:
        status = self.sim.store_profile(evse_id, charging_profile, "ocpp2.0.1")
        return result201.SetChargingProfile(status=status)

    @on_action("ClearChargingProfile")
    def on_clear_charging_profile(
        self,
        charging_profile_id: int | None = None,
        charging_profile_criteria: dict[str, Any] | None = None,
        **_: Any,
    ) -> Any:
        criteria = charging_profile_criteria or {}
        status = self.sim.clear_profiles(
            charging_profile_id,
            criteria.get("evse_id"),
            criteria.get("charging_profile_purpose"),
            criteria.get("stack_level"),
        )
        return result201.ClearChargingProfile(status=status)

    @on_action("TriggerMessage")
    def on_trigger_message(self, requested_message: str, **_: Any) -> Any:
        if requested_message != "BootNotification":
            return result201.TriggerMessage(status="NotImplemented")
        self.sim.request_boot()
        return result201.TriggerMessage(status="Accepted")
