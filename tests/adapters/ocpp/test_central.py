"""The OCPP central system and the charger adapter against simulated chargers on loopback.

Every test runs a real websockets server on 127.0.0.1 (port 0) and real ``ocpp`` charge points;
everything is stopped (cancelled and awaited under a deadline) when the test ends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from adapters.ocpp.central import (
    ChargerNotConnected,
    ChargingProfileLimit,
    OcppCentral,
    OcppCentralConfig,
    OcppChargerConfig,
    OcppChargerDefaults,
    OcppVersion,
    ProfilePurpose,
)
from adapters.ocpp.charger import DEPARTURE_FLOOR, OcppCharger
from gateway.devices import AdapterError, DeviceAdapter, DeviceUnavailable, UnsafeCommand
from gateway.supervisor import DeviceSupervisor
from simulators.ev_charger import ChargerRefused, EvChargerSim, EvChargerSimConfig, EvVisit
from unified.model import (
    DerClass,
    Device,
    DeviceCommand,
    LimitSource,
    TopologyLocation,
    utcnow,
)

LOCATION = TopologyLocation(substation="sub-1", feeder="f-1")
VERSIONS: list[OcppVersion] = ["ocpp1.6", "ocpp2.0.1"]
pytestmark = pytest.mark.timeout(30)


class FakeRegistrar:
    def __init__(self) -> None:
        self.devices: dict[str, tuple[Device, DeviceAdapter]] = {}
        self.refusals: list[tuple[DeviceCommand, AdapterError]] = []

    def add_device(self, device: Device, adapter: DeviceAdapter) -> None:
        if device.device_id in self.devices:
            raise ValueError("already registered")
        self.devices[device.device_id] = (device, adapter)

    def report_refusal(self, command: DeviceCommand, error: AdapterError) -> None:
        self.refusals.append((command, error))


def central_config(**overrides: Any) -> OcppCentralConfig:
    values: dict[str, Any] = {
        "port": 0,
        "heartbeat_interval_s": 30,
        "stale_after_s": 5.0,
        "response_timeout_s": 3.0,
        "chargers": (
            OcppChargerConfig(charge_point_id="CP-1", location=LOCATION, max_kw=11.0),
            OcppChargerConfig(charge_point_id="CP-2", location=LOCATION, max_kw=7.4),
        ),
    }
    values.update(overrides)
    return OcppCentralConfig(**values)


async def until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.02)


class Harness:
    def __init__(self, central: OcppCentral) -> None:
        self.central = central
        self.tasks: list[asyncio.Task[None]] = []

    def sim(self, charge_point_id: str = "CP-1", **overrides: Any) -> EvChargerSim:
        values: dict[str, Any] = {
            "charge_point_id": charge_point_id,
            "url": self.central.url(),
            "meter_interval_s": 0.1,
            "tick_s": 0.02,
        }
        values.update(overrides)
        return EvChargerSim(EvChargerSimConfig(**values))

    async def start(self, sim: EvChargerSim) -> EvChargerSim:
        self.tasks.append(asyncio.create_task(sim.run(), name=sim.config.charge_point_id))
        await asyncio.wait_for(sim.booted.wait(), 5)
        return sim

    async def adapter(self, charge_point_id: str = "CP-1") -> OcppCharger:
        adapter = self.central.adapter(charge_point_id)
        assert isinstance(adapter, OcppCharger)
        await until(lambda: (s := self.central.snapshot(charge_point_id)) is not None and s.booted)
        await adapter.connect()
        return adapter


@asynccontextmanager
async def running(
    config: OcppCentralConfig, registrar: FakeRegistrar | None = None
) -> AsyncIterator[Harness]:
    central = OcppCentral(config, charger_factory=OcppCharger, registrar=registrar)
    server = asyncio.create_task(central.run(), name="central")
    harness = Harness(central)
    try:
        await asyncio.wait_for(central.ready.wait(), 5)
        yield harness
    finally:
        for task in [*harness.tasks, server]:
            task.cancel()
        async with asyncio.timeout(5):
            await asyncio.gather(*harness.tasks, server, return_exceptions=True)


def setpoint(kw: float | None, *, envelope: str | None = None, **limits: float) -> DeviceCommand:
    provenance = [LimitSource(command_id="cmd-1", kind="dispatch")]
    if envelope is not None:
        provenance.append(LimitSource(command_id=envelope, kind="envelope"))
    return DeviceCommand(device_id="CP-1", power_kw=kw, provenance=tuple(provenance), **limits)


# --------------------------------------------------------------------------- registration


@pytest.mark.parametrize("version", VERSIONS)
async def test_configured_charger_boots_and_is_enrolled(version: OcppVersion) -> None:
    registrar = FakeRegistrar()
    async with running(central_config(), registrar) as h:
        # Configured chargers join the registry before they connect (unavailable until then).
        assert set(registrar.devices) == {"CP-1", "CP-2"}
        device, adapter = registrar.devices["CP-1"]
        assert device.der_class is DerClass.EVSE
        assert device.ratings.max_charge_kw == 11.0
        assert adapter is h.central.adapter("CP-1")
        with pytest.raises(DeviceUnavailable):
            await adapter.connect()

        await h.start(h.sim(version=version))
        snap = h.central.snapshot("CP-1")
        assert snap is not None
        assert snap.booted
        assert snap.version == version
        assert snap.vendor == "DERMS-Sim"
        await until(lambda: h.central.snapshot("CP-1").status is not None)  # type: ignore[union-attr]
        await adapter.connect()
        state = await adapter.read()
        assert state.power_kw == 0.0
        assert state.max_charge_kw == 0.0


async def test_unknown_charger_is_refused_at_the_handshake() -> None:
    async with running(central_config()) as h:
        sim = h.sim("STRANGER")
        with pytest.raises(ChargerRefused) as refused:
            await asyncio.wait_for(sim.run(), 5)
        assert refused.value.http_status == 404
        assert h.central.refused == {"STRANGER": 1}
        assert h.central.snapshot("STRANGER") is None


@pytest.mark.parametrize("version", VERSIONS)
async def test_auto_registration_enrols_unknown_chargers(version: OcppVersion) -> None:
    registrar = FakeRegistrar()
    config = central_config(
        chargers=(),
        auto_register=True,
        auto_register_defaults=OcppChargerDefaults(location=LOCATION, max_kw=22.0),
    )
    async with running(config, registrar) as h:
        assert registrar.devices == {}
        await h.start(h.sim("NEW-7", version=version, max_kw=22.0))
        device, adapter = registrar.devices["NEW-7"]
        assert device.ratings.max_charge_kw == 22.0
        assert isinstance(adapter, OcppCharger)


def test_auto_registration_needs_defaults() -> None:
    with pytest.raises(ValueError, match="auto_register_defaults"):
        OcppCentralConfig(auto_register=True)


# --------------------------------------------------------------------------- readings


@pytest.mark.parametrize("version", VERSIONS)
async def test_session_meter_values_become_device_states(version: OcppVersion) -> None:
    async with running(central_config()) as h:
        sim = await h.start(h.sim(version=version))
        adapter = await h.adapter()
        sim.plug_in(EvVisit(energy_needed_kwh=20, ev_max_kw=7.0, soc_start_pct=40.0))
        await until(
            lambda: (s := h.central.snapshot("CP-1")) is not None and s.transaction is not None
        )
        await until(
            lambda: (
                (s := h.central.snapshot("CP-1")) is not None
                and s.sample is not None
                and (s.sample.power_kw or 0) > 6.9
            )
        )
        state = await adapter.read()
        assert state.power_kw == pytest.approx(7.0)
        assert state.soc_pct is not None  # the EV's own SoC, as telemetry
        assert 40.0 <= state.soc_pct < 41.0
        # The planner sees the EV's need (20 kWh announced, a little already delivered).
        assert state.ev is not None
        assert state.ev.energy_needed_kwh is not None
        assert 19.0 < state.ev.energy_needed_kwh <= 20.0
        assert state.max_discharge_kw == 0.0  # no V2G
        assert state.max_charge_kw == pytest.approx(7.0, abs=0.15)  # the EV maximum, from its needs
        assert state.source == "ocpp:CP-1"


async def test_stale_meter_values_make_the_charger_unavailable() -> None:
    async with running(central_config(stale_after_s=0.3)) as h:
        sim = await h.start(h.sim(meter_interval_s=30.0))
        adapter = await h.adapter()
        sim.plug_in(EvVisit(energy_needed_kwh=20))
        await until(lambda: (s := h.central.snapshot("CP-1")) is not None and s.plugged)
        await asyncio.sleep(0.4)
        with pytest.raises(DeviceUnavailable, match="no meter values"):
            await adapter.read()


# --------------------------------------------------------------------------- control


@pytest.mark.parametrize("version", VERSIONS)
async def test_setpoint_becomes_a_tx_profile_the_charger_obeys(version: OcppVersion) -> None:
    async with running(central_config()) as h:
        sim = await h.start(h.sim(version=version))
        adapter = await h.adapter()
        sim.plug_in(EvVisit(energy_needed_kwh=30, ev_max_kw=11.0))
        await until(lambda: sim.power_kw > 10.9)
        await until(
            lambda: (s := h.central.snapshot("CP-1")) is not None and s.transaction is not None
        )

        await adapter.apply(setpoint(3.0))
        assert [p.purpose for p in sim.profiles.values()] == ["tx"]
        assert sim.limit_kw == pytest.approx(3.0)
        await until(lambda: abs(sim.power_kw - 3.0) < 0.01)
        await until(lambda: abs((h.central.snapshot("CP-1").sample.power_kw or 0) - 3.0) < 0.01)  # type: ignore[union-attr]
        state = await adapter.read()
        assert state.power_kw == pytest.approx(3.0)
        assert state.setpoint_kw == pytest.approx(3.0)

        # Back to autonomous: our profile is cleared and the EV charges at its own rate again.
        await adapter.apply(setpoint(None))
        assert sim.profiles == {}
        await until(lambda: sim.power_kw > 10.9)


@pytest.mark.parametrize("version", VERSIONS)
async def test_setpoint_without_a_session_becomes_tx_default(version: OcppVersion) -> None:
    async with running(central_config()) as h:
        sim = await h.start(h.sim(version=version))
        adapter = await h.adapter()
        await adapter.apply(setpoint(2.0))
        assert [p.purpose for p in sim.profiles.values()] == ["tx_default"]
        # The next EV is held by it from its first tick.
        sim.plug_in(EvVisit(energy_needed_kwh=30))
        await until(lambda: sim.ev is not None and sim.ev.delivered_kwh > 0)
        assert sim.power_kw == pytest.approx(2.0)


async def test_limits_in_amperes() -> None:
    config = central_config(
        chargers=(
            OcppChargerConfig(
                charge_point_id="CP-1", location=LOCATION, rate_unit="A", phases=3, voltage_v=230
            ),
        )
    )
    async with running(config) as h:
        sim = await h.start(h.sim())
        adapter = await h.adapter()
        sim.plug_in(EvVisit(energy_needed_kwh=30))
        await until(
            lambda: (s := h.central.snapshot("CP-1")) is not None and s.transaction is not None
        )
        await adapter.apply(setpoint(6.9))  # 10 A per phase
        (profile,) = sim.profiles.values()
        assert profile.unit == "A"
        assert profile.periods[0][1] == pytest.approx(10.0)
        await until(lambda: abs(sim.power_kw - 6.9) < 0.01)


async def test_adapter_refuses_export_and_overload() -> None:
    async with running(central_config()) as h:
        await h.start(h.sim())
        adapter = await h.adapter()
        with pytest.raises(UnsafeCommand, match="cannot export"):
            await adapter.apply(setpoint(-3.0))
        with pytest.raises(UnsafeCommand, match="rating"):
            await adapter.apply(setpoint(15.0))


@pytest.mark.parametrize(
    ("version", "purpose"),
    [("ocpp1.6", "ChargePointMaxProfile"), ("ocpp2.0.1", "ChargingStationMaxProfile")],
)
async def test_an_envelope_caps_an_ev_site(version: OcppVersion, purpose: str) -> None:
    sent: list[dict[str, Any]] = []
    async with running(central_config()) as h:
        sim = await h.start(h.sim(version=version))
        original = sim.store_profile

        def spy(connector: int, profile: dict[str, Any], v: str) -> Any:
            sent.append({"connector": connector, **profile})
            return original(connector, profile, v)

        sim.store_profile = spy  # type: ignore[method-assign,assignment]
        adapter = await h.adapter()
        sim.plug_in(EvVisit(energy_needed_kwh=30, ev_max_kw=11.0))
        await until(lambda: sim.power_kw > 10.9)

        await adapter.apply(setpoint(None, import_limit_kw=4.0, export_limit_kw=2.0))
        assert sent[-1]["charging_profile_purpose"] == purpose
        assert sent[-1]["connector"] == 0  # the whole charger
        await until(lambda: sim.power_kw <= 4.0)
        # It stays under the cap while the EV wants more.
        for _ in range(10):
            await asyncio.sleep(0.03)
            assert sim.power_kw <= 4.0 + 1e-9
        state = await adapter.read()
        assert state.power_kw <= 4.0 + 1e-9
        assert adapter.decision is not None
        assert adapter.decision.limit_kw == 4.0

        # The envelope ends: the cap goes and the EV charges at its own rate again.
        await adapter.apply(setpoint(None))
        await until(lambda: sim.power_kw > 10.9)
        assert sim.profiles == {}


async def test_standing_site_cap_is_restored_after_an_envelope() -> None:
    async with running(central_config(default_site_cap_kw=9.0)) as h:
        sim = await h.start(h.sim())
        adapter = await h.adapter()
        sim.plug_in(EvVisit(energy_needed_kwh=30, ev_max_kw=11.0))
        await adapter.apply(setpoint(None))  # what the supervisor sends at connect
        await until(lambda: abs(sim.power_kw - 9.0) < 1e-6)
        await adapter.apply(setpoint(None, import_limit_kw=12.0))  # looser than the site: 9 holds
        assert sim.limit_kw == pytest.approx(9.0)
        await adapter.apply(setpoint(None, import_limit_kw=5.0))
        await until(lambda: abs(sim.power_kw - 5.0) < 1e-6)
        await adapter.apply(setpoint(None))
        await until(lambda: abs(sim.power_kw - 9.0) < 1e-6)


# --------------------------------------------------------------------------- departure energy


@pytest.mark.parametrize("version", VERSIONS)
async def test_departure_energy_is_respected(version: OcppVersion) -> None:
    """A dispatch may slow an EV, never below what still meets its need by departure."""
    async with running(central_config()) as h:
        # 0.3 kWh in 180 simulated s (3 s of wall time): 6 kW is the least that meets it.
        sim = await h.start(h.sim(version=version, time_scale=60.0))
        adapter = await h.adapter()
        sim.plug_in(EvVisit(energy_needed_kwh=0.3, dwell_s=180, ev_max_kw=11.0))
        await until(
            lambda: (
                (s := h.central.snapshot("CP-1")) is not None
                and s.need is not None
                and s.transaction is not None
            )
        )

        async with asyncio.timeout(10):
            while not sim.results:
                await adapter.apply(setpoint(0.0))  # the control loop asks for 0 kW throughout
                assert adapter.decision is not None
                if adapter.decision.departure_floor_kw:
                    assert DEPARTURE_FLOOR in adapter.decision.limited_by
                    assert adapter.decision.limit_kw == pytest.approx(
                        adapter.decision.departure_floor_kw
                    )
                await asyncio.sleep(0.2)
        (result,) = sim.results
        assert result.met, result
        assert result.delivered_kwh == pytest.approx(0.3, abs=1e-6)


async def test_an_envelope_may_hold_an_ev_below_its_departure_need() -> None:
    async with running(central_config()) as h:
        sim = await h.start(h.sim(time_scale=60.0))
        adapter = await h.adapter()
        sim.plug_in(EvVisit(energy_needed_kwh=0.5, dwell_s=600, ev_max_kw=11.0))
        await until(
            lambda: (
                (s := h.central.snapshot("CP-1")) is not None
                and s.need is not None
                and s.transaction is not None
            )
        )
        await adapter.apply(setpoint(1.0, envelope="doe-7"))
        decision = adapter.decision
        assert decision is not None
        assert decision.limit_kw == 1.0
        assert decision.departure_at_risk
        assert decision.departure_floor_kw is not None
        assert decision.departure_floor_kw > 1.0
        await until(lambda: abs(sim.power_kw - 1.0) < 1e-6)


async def test_need_from_an_app_sets_the_floor() -> None:
    async with running(central_config()) as h:
        sim = await h.start(h.sim())
        adapter = await h.adapter()
        sim.plug_in(EvVisit(energy_needed_kwh=30, announce_needs=False))
        await until(
            lambda: (s := h.central.snapshot("CP-1")) is not None and s.transaction is not None
        )
        assert adapter.departure_floor_kw() is None
        h.central.set_charging_need("CP-1", 1.0, utcnow() + timedelta(hours=0.25))
        floor = adapter.departure_floor_kw()
        assert floor is not None
        assert floor == pytest.approx(4.0, rel=0.05)
        state = await _fresh_read(adapter)
        # The EV's nature carries the remaining need and the departure; no SoC is made up.
        assert state.soc_pct is None
        assert state.ev is not None
        assert state.ev.energy_needed_kwh is not None
        assert state.ev.energy_needed_kwh == pytest.approx(1.0, abs=0.05)
        assert state.ev.departure is not None


async def _fresh_read(adapter: OcppCharger) -> Any:
    async with asyncio.timeout(5):
        while True:
            try:
                return await adapter.read()
            except DeviceUnavailable:
                await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- protocol errors


async def raw_client(h: Harness, charge_point_id: str, version: str) -> ClientConnection:
    return await connect(
        f"{h.central.url()}/{charge_point_id}", subprotocols=[Subprotocol(version)]
    )


async def exchange(ws: ClientConnection, frame: str) -> list[Any]:
    """Send a frame and return the next CALLRESULT/CALLERROR (answering calls from the central)."""
    await ws.send(frame)
    async with asyncio.timeout(3):
        while True:
            reply: list[Any] = json.loads(await ws.recv())
            if reply[0] == 2:  # the central asks something (TriggerMessage): accept it
                await ws.send(json.dumps([3, reply[1], {"status": "Accepted"}]))
                continue
            return reply


async def test_malformed_and_out_of_order_messages_get_call_errors_16() -> None:
    async with running(central_config()) as h:
        ws = await raw_client(h, "CP-1", "ocpp1.6")
        try:
            reply = await exchange(ws, "this is not json")
            assert reply[:3] == [4, "-1", "FormationViolation"]

            # Before BootNotification: SecurityError, and the central asks for a boot.
            reply = await exchange(ws, '[2,"hb-1","Heartbeat",{}]')
            assert reply[:3] == [4, "hb-1", "SecurityError"]

            boot = {"chargePointVendor": "raw", "chargePointModel": "raw"}
            reply = await exchange(ws, json.dumps([2, "boot-1", "BootNotification", boot]))
            assert reply[0] == 3
            assert reply[2]["status"] == "Accepted"

            reply = await exchange(ws, '[2,"x-1","NoSuchAction",{}]')
            assert reply[:3] == [4, "x-1", "NotSupported"]
            reply = await exchange(ws, '[2,"x-2","MeterValues",{"connectorId":"one"}]')
            assert reply[0] == 4
            assert reply[1] == "x-2"
            reply = await exchange(ws, '[2,"x-3","StatusNotification",{}]')
            assert reply[:3] == [4, "x-3", "ProtocolError"]
            stop = {"meterStop": 10, "timestamp": "2024-01-01T00:00:00Z", "transactionId": 4242}
            reply = await exchange(ws, json.dumps([2, "x-4", "StopTransaction", stop]))
            assert reply[:3] == [4, "x-4", "PropertyConstraintViolation"]
            reply = await exchange(ws, '[2,"x-5"')  # truncated: the id is still readable
            assert reply[:3] == [4, "x-5", "FormationViolation"]

            # The connection survived all of it.
            reply = await exchange(ws, '[2,"hb-2","Heartbeat",{}]')
            assert reply[0] == 3
            assert reply[1] == "hb-2"
            assert "currentTime" in reply[2]
        finally:
            await ws.close()


async def test_malformed_and_out_of_order_messages_get_call_errors_201() -> None:
    async with running(central_config()) as h:
        ws = await raw_client(h, "CP-2", "ocpp2.0.1")
        try:
            reply = await exchange(ws, "{{{")
            assert reply[:3] == [4, "-1", "RpcFrameworkError"]
            reply = await exchange(ws, '[2,"hb-1","Heartbeat",{}]')
            assert reply[:3] == [4, "hb-1", "SecurityError"]
            boot = {"chargingStation": {"model": "raw", "vendorName": "raw"}, "reason": "PowerUp"}
            reply = await exchange(ws, json.dumps([2, "boot-1", "BootNotification", boot]))
            assert reply[0] == 3
            assert reply[2]["status"] == "Accepted"
            reply = await exchange(ws, '[2,"x-1","FooBar",{}]')
            assert reply[:3] == [4, "x-1", "NotSupported"]
            reply = await exchange(ws, '[2,"x-2","TransactionEvent",{"eventType":"Started"}]')
            assert reply[0] == 4
            assert reply[1] == "x-2"
            reply = await exchange(ws, '[2,"hb-2","Heartbeat",{}]')
            assert reply[0] == 3
            assert reply[1] == "hb-2"
        finally:
            await ws.close()


async def test_a_charger_that_skips_boot_is_asked_to_boot() -> None:
    """After a gateway restart a charger keeps its websocket logic but does not reboot."""
    async with running(central_config()) as h:
        ws = await raw_client(h, "CP-1", "ocpp1.6")
        try:
            await ws.send('[2,"mv-1","Heartbeat",{}]')
            frames = [json.loads(await asyncio.wait_for(ws.recv(), 3)) for _ in range(2)]
            calls = [f for f in frames if f[0] == 2]
            assert calls
            assert calls[0][2] == "TriggerMessage"
            assert calls[0][3] == {"requestedMessage": "BootNotification"}
        finally:
            await ws.close()


async def test_no_common_subprotocol_is_refused() -> None:
    async with running(central_config()) as h:
        with pytest.raises(Exception, match="400"):
            await raw_client(h, "CP-1", "ocpp0.9")


async def test_requests_to_a_disconnected_charger_fail_cleanly() -> None:
    async with running(central_config()) as h:
        with pytest.raises(ChargerNotConnected):
            await h.central.set_charging_profile(
                "CP-1", ChargingProfileLimit(ProfilePurpose.SITE_CAP, 3.0)
            )
        sim = await h.start(h.sim())
        adapter = await h.adapter()
        h.tasks[0].cancel()
        await until(lambda: not h.central.snapshot("CP-1").connected)  # type: ignore[union-attr]
        with pytest.raises(DeviceUnavailable):
            await adapter.apply(setpoint(1.0))
        del sim


async def test_reconnect_makes_the_adapter_resend() -> None:
    async with running(central_config()) as h:
        first = await h.start(h.sim())
        adapter = await h.adapter()
        await adapter.apply(setpoint(2.0))
        assert first.profiles
        h.tasks[0].cancel()
        second = await h.start(h.sim())  # a fresh charger process: no profiles
        with pytest.raises(DeviceUnavailable, match="reconnected"):
            await adapter.read()
        await adapter.connect()  # what the supervisor does next
        await adapter.apply(setpoint(2.0))
        assert [p.purpose for p in second.profiles.values()] == ["tx_default"]


# --------------------------------------------------------------------------- with the supervisor


async def test_enrolled_charger_under_the_device_supervisor() -> None:
    """The path the gateway core uses: enrol via add_device, then a DeviceSupervisor polls the
    adapter and writes the planner's commands."""
    registrar = FakeRegistrar()
    async with running(central_config(default_site_cap_kw=10.0), registrar) as h:
        _, adapter = registrar.devices["CP-1"]
        states: list[Any] = []
        supervisor = DeviceSupervisor(
            adapter,
            poll_interval_s=0.1,
            io_timeout_s=2.0,
            refresh_s=60.0,
            backoff_initial_s=0.05,
            backoff_max_s=0.2,
            on_state=states.append,
        )
        task = asyncio.create_task(supervisor.run())
        try:
            sim = await h.start(h.sim(version="ocpp2.0.1"))
            sim.plug_in(EvVisit(energy_needed_kwh=30, ev_max_kw=11.0))
            await until(lambda: supervisor.available)
            # Released at connect: the standing site cap holds the 11 kW EV at 10 kW.
            await until(lambda: abs(sim.power_kw - 10.0) < 1e-6)
            supervisor.command(setpoint(4.0))
            await until(lambda: abs(sim.power_kw - 4.0) < 1e-6)
            await until(lambda: bool(states) and abs(states[-1].power_kw - 4.0) < 1e-6)
            assert states[-1].setpoint_kw == pytest.approx(4.0)
        finally:
            task.cancel()
            async with asyncio.timeout(5):
                await asyncio.gather(task, return_exceptions=True)


async def test_answers_nobody_asked_for_are_dropped_not_queued() -> None:
    async with running(central_config()) as h:
        ws = await raw_client(h, "CP-1", "ocpp1.6")
        try:
            boot = {"chargePointVendor": "raw", "chargePointModel": "raw"}
            reply = await exchange(ws, json.dumps([2, "boot-1", "BootNotification", boot]))
            assert reply[2]["status"] == "Accepted"
            for k in range(2_000):  # the ocpp package would queue each for a call to sift
                await ws.send(json.dumps([3, f"nobody-{k}", {"status": "Accepted"}]))
                await ws.send(json.dumps([4, f"nobody-e{k}", "GenericError", "", {}]))
            reply = await exchange(ws, '[2,"hb-1","Heartbeat",{}]')
            assert reply[:2] == [3, "hb-1"]  # the connection lives and answers in order
            session = h.central._records["CP-1"].session
            assert session is not None
            assert session.unsolicited == 4_000
            assert session._response_queue.empty()
        finally:
            await ws.close()
