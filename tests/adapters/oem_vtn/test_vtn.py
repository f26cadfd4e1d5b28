"""The gateway's OpenADR VTN against the OEM cloud simulator (a real openleadr VEN) on loopback.

Most tests use a minimal registrar (``add_device`` / ``report_refusal``) standing in for the
gateway core; one test at the end drives a real ``Gateway`` with a SunSpec battery beside the
OEM cloud's resources.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.oem_vtn.resource import OadrResource
from adapters.oem_vtn.vtn import (
    AllowedVen,
    OpenAdrVtn,
    OpenAdrVtnConfig,
    ResourceDefault,
    VtnTlsConfig,
)
from gateway.devices import (
    AdapterError,
    DeviceAdapter,
    DeviceUnavailable,
    DispatchNotice,
    UnsafeCommand,
)
from protocols.openadr import encode
from protocols.openadr.resource_status import ResourceStatus, status_payload
from protocols.openadr.resource_status import install as install_resource_status
from protocols.openadr.vtn_events import VtnProgram
from simulators.oem_cloud import OemCloud, SimBattery, SimThermostat
from unified.model import (
    DerClass,
    Device,
    DeviceCommand,
    LimitSource,
    TopologyLocation,
    utcnow,
)

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning")

OEM = "oem-a"
LOC = TopologyLocation(substation="s1", feeder="f1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(predicate: Callable[[], object], within_s: float = 5.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within_s}s {what}")
        await asyncio.sleep(0.02)


@dataclass
class Registrar:
    devices: dict[str, Device] = field(default_factory=dict)
    adapters: dict[str, DeviceAdapter] = field(default_factory=dict)
    refusals: list[tuple[DeviceCommand, AdapterError]] = field(default_factory=list)

    def add_device(self, device: Device, adapter: DeviceAdapter) -> None:
        if device.device_id in self.devices:
            raise ValueError("already registered")
        self.devices[device.device_id] = device
        self.adapters[device.device_id] = adapter

    def report_refusal(self, command: DeviceCommand, error: AdapterError) -> None:
        self.refusals.append((command, error))

    def resource(self, name: str) -> OadrResource:
        adapter = self.adapters[f"{OEM}.{name}"]
        assert isinstance(adapter, OadrResource)
        return adapter


def vtn_config(tmp_path: Path, port: int, **extra: Any) -> OpenAdrVtnConfig:
    base: dict[str, Any] = {
        "port": port,
        "allow_plain_http": True,
        "vens": [
            AllowedVen(
                ven_name=OEM,
                location=LOC,
                programs={DerClass.BATTERY: VtnProgram(signal="setpoint")},
            )
        ],
        "store_path": tmp_path / "vtn.sqlite",
        "poll_interval_s": 1,
        "report_interval_s": 1,
        "stale_after_s": 5.0,
        "offline_after_s": 5.0,
    }
    return OpenAdrVtnConfig.model_validate(base | extra)


def fleet() -> list[SimThermostat | SimBattery]:
    return [
        SimThermostat(
            "t1", location=TopologyLocation(substation="s1", feeder="f1", transformer="x1")
        ),
        SimThermostat("t2", location=LOC, indoor_c=22.4),
        SimBattery("b1", location=TopologyLocation(substation="s1", feeder="f2")),
    ]


@asynccontextmanager
async def running_vtn(config: OpenAdrVtnConfig, registrar: Registrar) -> AsyncIterator[OpenAdrVtn]:
    vtn = OpenAdrVtn(config, registrar=registrar)
    task = asyncio.create_task(vtn.run(), name="test:vtn")
    try:
        await asyncio.wait_for(vtn.ready.wait(), 5)
        yield vtn
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


@asynccontextmanager
async def running_oem(
    port: int, devices: list[SimThermostat | SimBattery], *, name: str = OEM, **kw: Any
) -> AsyncIterator[OemCloud]:
    scheme = "https" if kw.get("cert_path") else "http"
    oem = OemCloud(
        name,
        f"{scheme}://127.0.0.1:{port}/OpenADR2/Simple/2.0b",
        devices,
        poll_interval_s=0.05,
        time_scale=kw.pop("time_scale", 1.0),
        retry_s=0.1,
        seed=3,
        **kw,
    )
    task = asyncio.create_task(oem.run(), name=f"test:oem:{name}")
    try:
        yield oem
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


@pytest.fixture
def registrar() -> Registrar:
    logging.getLogger("openleadr").setLevel(logging.WARNING)
    return Registrar()


def cmd(device: str, kw: float | None, command_id: str = "d1") -> DeviceCommand:
    return DeviceCommand(
        device_id=f"{OEM}.{device}",
        power_kw=kw,
        provenance=(LimitSource(command_id=command_id, kind="dispatch"),),
    )


def soc_of(vtn: OpenAdrVtn, device_id: str) -> float | None:
    seen = vtn.telemetry(device_id)
    return None if seen is None else seen.soc_pct


def power_of(vtn: OpenAdrVtn, device_id: str) -> float | None:
    seen = vtn.telemetry(device_id)
    return None if seen is None else seen.power_kw


async def enrolled(oem: OemCloud, registrar: Registrar, vtn: OpenAdrVtn) -> None:
    await wait_for(oem.registered.is_set, 5, "registration")
    await wait_for(lambda: len(registrar.devices) == len(oem.devices), 5, "enrolment")
    # Telemetry flows once the report requests went out through polls.
    await wait_for(
        lambda: all(
            soc_of(vtn, d) is not None and power_of(vtn, d) is not None for d in registrar.devices
        ),
        8,
        "telemetry",
    )


# --------------------------------------------------------------------------- tests


async def test_resources_become_devices_with_telemetry(
    tmp_path: Path, registrar: Registrar
) -> None:
    port = free_port()
    async with (
        running_vtn(vtn_config(tmp_path, port), registrar) as vtn,
        running_oem(port, fleet()) as oem,
    ):
        await enrolled(oem, registrar, vtn)
        t1 = registrar.devices[f"{OEM}.t1"]
        assert t1.der_class is DerClass.THERMOSTAT
        assert t1.location == TopologyLocation(substation="s1", feeder="f1", transformer="x1")
        assert (t1.ratings.max_discharge_kw, t1.ratings.capacity_kwh) == (3.0, 3.0)
        b1 = registrar.devices[f"{OEM}.b1"]
        assert (b1.der_class, b1.ratings.capacity_kwh) == (DerClass.BATTERY, 13.5)

        adapter = registrar.resource("b1")
        await adapter.connect()
        state = await adapter.read()
        assert state.soc_pct == pytest.approx(60.0, abs=0.5)
        assert state.power_kw == 0.0
        assert state.capacity_kwh == 13.5
        thermostat = await registrar.resource("t2").read()
        assert thermostat.power_kw in (0.0, 3.0)
        assert thermostat.soc_pct is not None


async def test_report_period_follows_the_vens_sampling_rate(
    tmp_path: Path, registrar: Registrar
) -> None:
    """A VEN that samples only every 2 s (the VTN would like 1 s) is asked for 2 s: openleadr's
    VEN, like the spec, refuses a granularity outside its oadrSamplingRate and would send
    nothing, and its resources would never be dispatched."""
    every_2s = (timedelta(seconds=2), timedelta(seconds=2))
    port = free_port()
    async with (
        running_vtn(vtn_config(tmp_path, port, stale_after_s=3.0), registrar) as vtn,
        running_oem(port, fleet(), sampling_rate=every_2s) as oem,
    ):
        await enrolled(oem, registrar, vtn)
        requests = oem.client.report_requests
        assert {r["granularity"] for r in requests} == {timedelta(seconds=2)}
        assert all(r["r_ids"] for r in requests)  # no rID refused
        record = vtn.resources[f"{OEM}.b1"]
        assert (record.usage_period_s, record.status_period_s) == (2.0, 2.0)
        b1 = registrar.resource("b1")
        assert b1.stale_after_s == 6.0  # three of its periods, not the VTN's 3 s
        await b1.connect()
        await b1.apply(cmd("b1", -2.0))
        await wait_for(lambda: oem.devices["b1"].power_kw == -2.0, 5, "dispatched")
        await asyncio.sleep(4.5)  # still fresh across periods longer than stale_after_s / 2
        assert (await b1.read()).soc_pct is not None


async def test_setpoint_event_modification_and_cancel_reach_the_battery(
    tmp_path: Path, registrar: Registrar
) -> None:
    port = free_port()
    async with (
        running_vtn(vtn_config(tmp_path, port), registrar) as vtn,
        running_oem(port, fleet()) as oem,
    ):
        await enrolled(oem, registrar, vtn)
        b1 = registrar.resource("b1")
        battery = oem.devices["b1"]
        await b1.apply(cmd("b1", -2.0))
        await wait_for(lambda: battery.power_kw == -2.0, 5, "battery discharging")
        event = vtn.current_event(f"{OEM}.b1")
        assert event is not None
        assert (event.signal_type, event.value, event.modification_number) == ("setpoint", -2.0, 0)
        await wait_for(lambda: vtn.current_event(f"{OEM}.b1").opt == "optIn")  # type: ignore[union-attr]

        # The supervisor re-applies an unchanged setpoint: no modification.
        await b1.apply(cmd("b1", -2.0))
        assert vtn.current_event(f"{OEM}.b1").modification_number == 0  # type: ignore[union-attr]

        await b1.apply(cmd("b1", -3.5))
        modified = vtn.current_event(f"{OEM}.b1")
        assert modified is not None
        assert (modified.event_id, modified.modification_number) == (event.event_id, 1)
        await wait_for(lambda: battery.power_kw == -3.5, 5, "modified setpoint")
        await wait_for(lambda: power_of(vtn, f"{OEM}.b1") == -3.5, 5)
        state = await b1.read()
        assert state.power_kw == -3.5

        await b1.apply(cmd("b1", None))
        cancelled = vtn.current_event(f"{OEM}.b1")
        assert cancelled is not None
        assert (cancelled.cancelled, cancelled.modification_number) == (True, 2)
        await wait_for(lambda: battery.power_kw == 0.0, 5, "battery idle after cancel")
        await wait_for(lambda: vtn.current_event(f"{OEM}.b1").acknowledged_cancel)  # type: ignore[union-attr]
        assert registrar.refusals == []
        mods = [(e.event_id, e.modification_number, e.opt) for e in oem.stats.log]
        assert mods == [
            (event.event_id, 0, "optIn"),
            (event.event_id, 1, "optIn"),
            (event.event_id, 2, "optIn"),
        ]


async def test_a_dispatch_ahead_is_announced_far_near_then_active_for_its_window(
    tmp_path: Path, registrar: Registrar
) -> None:
    """Told of a dispatch 3 s ahead, the VTN issues the event at once with the dispatch's window
    and x-eiNotification; the VEN sees it far, near (1 s before) and active. The setpoint at the
    start confirms it (a modification, same event); a notified resource the planner does not
    call at the start has its event cancelled after the grace period."""
    program = VtnProgram(signal="setpoint", near_s=1, notification_s=3600, unconfirmed_grace_s=1)
    allowed = AllowedVen(ven_name=OEM, location=LOC, program=program)
    port = free_port()
    async with (
        running_vtn(vtn_config(tmp_path, port, vens=[allowed]), registrar) as vtn,
        running_oem(port, fleet()) as oem,
    ):
        await enrolled(oem, registrar, vtn)
        start = utcnow() + timedelta(seconds=3)
        end = start + timedelta(seconds=600)
        b1, t1 = registrar.resource("b1"), registrar.resource("t1")
        b1.notice(DispatchNotice("d-ahead", start, end, -2.0))
        t1.notice(DispatchNotice("d-ahead", start, end, -1.0))
        await wait_for(lambda: statuses(oem, vtn, "b1") == ["far"], 2, "far before the start")
        event = vtn.current_event(f"{OEM}.b1")
        assert event is not None
        assert (event.start, event.end, event.value) == (start, end, -2.0)  # not a fixed PT1H
        assert oem.devices["b1"].power_kw == 0.0  # told, not yet asked
        await wait_for(lambda: "near" in statuses(oem, vtn, "b1"), 3, "near")
        assert utcnow() < start
        await wait_for(lambda: utcnow() >= start, 3)
        await b1.apply(cmd("b1", -2.5, "d-ahead"))  # the planner's setpoint at the start
        confirmed = vtn.current_event(f"{OEM}.b1")
        assert confirmed is not None
        assert (confirmed.event_id, confirmed.modification_number) == (event.event_id, 1)
        assert (confirmed.confirmed, confirmed.end) == (True, end)
        await wait_for(lambda: oem.devices["b1"].power_kw == -2.5, 5, "battery follows")
        assert "active" in statuses(oem, vtn, "b1")
        # t1 was never called at the start: its notice is withdrawn.
        await wait_for(lambda: not is_live_event(vtn, f"{OEM}.t1"), 4, "t1 withdrawn")
        assert registrar.refusals == []


async def test_an_event_lasts_its_dispatch_window(tmp_path: Path, registrar: Registrar) -> None:
    """An OEM saw PT1H for a 600 s dispatch: the event now ends with the dispatch."""
    port = free_port()
    async with (
        running_vtn(vtn_config(tmp_path, port), registrar) as vtn,
        running_oem(port, fleet()) as oem,
    ):
        await enrolled(oem, registrar, vtn)
        b1 = registrar.resource("b1")
        start = utcnow()
        b1.notice(DispatchNotice("d-now", start, start + timedelta(seconds=600), -2.0))
        await b1.apply(cmd("b1", -2.0, "d-now"))
        event = vtn.current_event(f"{OEM}.b1")
        assert event is not None
        assert event.end == start + timedelta(seconds=600)
        assert event.duration_s <= 600
        await wait_for(lambda: oem.devices["b1"].power_kw == -2.0, 5, "battery follows")
        b1.notice(DispatchNotice("d-now", start, start + timedelta(seconds=600), 0, withdrawn=True))
        await wait_for(lambda: oem.devices["b1"].power_kw == 0.0, 5, "withdrawn: cancelled")


def statuses(oem: OemCloud, vtn: OpenAdrVtn, name: str) -> list[str]:
    event = vtn.current_event(f"{OEM}.{name}")
    if event is None:
        return []
    return oem.stats.statuses.get(event.event_id, [])


async def test_thermostat_load_drops_during_event_and_rebounds_after(
    tmp_path: Path, registrar: Registrar
) -> None:
    port = free_port()
    house = SimThermostat("t9", location=LOC, indoor_c=22.6, on=True)
    async with (
        running_vtn(vtn_config(tmp_path, port), registrar) as vtn,
        running_oem(port, [house], time_scale=600.0) as oem,
    ):
        await enrolled(oem, registrar, vtn)
        await registrar.resource("t9").apply(cmd("t9", -3.0))
        event = vtn.current_event(f"{OEM}.t9")
        assert event is not None
        assert (event.signal_name, event.signal_type, event.value) == (
            "LOAD_DISPATCH",
            "delta",
            -3.0,
        )
        await wait_for(lambda: house.offset_c == 2.0, 5, "setpoint raised")
        # Compressor off while the house warms towards the raised setpoint (about 45 sim min).
        await wait_for(lambda: not house.on, 3, "compressor off")
        samples = []
        for _ in range(10):
            samples.append(house.power_kw)
            await asyncio.sleep(0.1)
        assert samples == [0.0] * 10
        await wait_for(lambda: house.indoor_c > 23.0, 5, "house warming")
        await registrar.resource("t9").apply(cmd("t9", None))
        # Rebound: the house is above the normal band, the compressor runs at rated power.
        await wait_for(lambda: house.offset_c == 0.0 and house.on, 5, "rebound")
        assert house.power_kw == 3.0
        await wait_for(lambda: vtn.telemetry(f"{OEM}.t9").power_kw == 3.0, 5, "rebound reported")  # type: ignore[union-attr]


async def test_opt_out_reports_a_refusal_once(tmp_path: Path, registrar: Registrar) -> None:
    port = free_port()
    devices = fleet()
    stubborn = devices[1]
    assert isinstance(stubborn, SimThermostat)
    stubborn.override = True
    async with (
        running_vtn(vtn_config(tmp_path, port), registrar) as vtn,
        running_oem(port, devices) as oem,
    ):
        await enrolled(oem, registrar, vtn)
        command = cmd("t2", -1.5, "dispatch-7")
        await registrar.resource("t2").apply(command)
        await wait_for(lambda: registrar.refusals, 5, "refusal")
        ((refused, error),) = registrar.refusals
        assert refused == command
        assert error.device_id == f"{OEM}.t2"
        assert "opted out" in str(error)
        # Further distributions (another event changes) repeat the old answer: no new refusal.
        await registrar.resource("t1").apply(cmd("t1", -1.0))
        await wait_for(lambda: vtn.current_event(f"{OEM}.t1").opt == "optIn")  # type: ignore[union-attr]
        await asyncio.sleep(0.3)
        assert len(registrar.refusals) == 1
        assert stubborn.offset_c == 0.0


async def test_duplicate_delivery_is_idempotent(tmp_path: Path, registrar: Registrar) -> None:
    port = free_port()
    async with (
        running_vtn(vtn_config(tmp_path, port), registrar) as vtn,
        running_oem(port, fleet()) as oem,
    ):
        await enrolled(oem, registrar, vtn)
        await registrar.resource("b1").apply(cmd("b1", 1.0))
        await wait_for(lambda: oem.devices["b1"].power_kw == 1.0)
        distributions = oem.stats.distributions
        # Make the VTN send the very same distribution again, three times.
        for _ in range(3):
            vtn._session(OEM).events_dirty = True
            await wait_for(lambda: not vtn._session(OEM).events_dirty)
        await wait_for(lambda: oem.stats.distributions >= distributions + 3)
        await asyncio.sleep(0.2)
        event = vtn.current_event(f"{OEM}.b1")
        assert event is not None
        assert (event.modification_number, event.opt) == (0, "optIn")
        # The VEN acted on the event once: one log entry, one instruction.
        assert [e.modification_number for e in oem.stats.log] == [0]
        assert oem.devices["b1"].power_kw == 1.0


async def test_unknown_ven_is_refused_and_logged(
    tmp_path: Path, registrar: Registrar, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    caplog.set_level(logging.WARNING, logger="adapters.oem_vtn.vtn")
    async with (
        running_vtn(vtn_config(tmp_path, port), registrar) as vtn,
        running_oem(port, fleet(), name="intruder") as oem,
    ):
        await wait_for(lambda: oem.refused is not None, 5)
        await asyncio.sleep(0.3)  # it keeps retrying
        assert not oem.registered.is_set()
        assert registrar.devices == {}
        assert vtn.registrations == {}
    refusals = [r for r in caplog.records if "refused registration" in r.getMessage()]
    assert len(refusals) == 1
    assert "intruder" in refusals[0].getMessage()


async def test_telemetry_status_is_read_as_a_resource_status(
    tmp_path: Path, registrar: Registrar
) -> None:
    """oadrPayloadResourceStatus, as our VEN sends it: offline or overridden means no state of
    charge (nothing is committed to the resource); oadrCapacity's current value is the SoC."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/OpenADR2/Simple/2.0b"
    async with (
        running_vtn(vtn_config(tmp_path, port), registrar) as vtn,
        running_oem(port, fleet()) as oem,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
    ):
        await enrolled(oem, registrar, vtn)
        b1 = registrar.resource("b1")
        install_resource_status()
        # Dated ahead of the simulator's own reports (which then count as older).
        at = utcnow() + timedelta(seconds=30)

        async def send(status: ResourceStatus, at: datetime) -> None:
            update = encode(
                "oadrUpdateReport",
                {
                    "request_id": "r1",
                    "ven_id": oem.client.ven_id,
                    "reports": [
                        {
                            "report_id": "x",
                            "report_request_id": "y",
                            "report_specifier_id": "oem-telemetry-status",
                            "report_name": "TELEMETRY_STATUS",
                            "created_date_time": utcnow(),
                            "intervals": [
                                {
                                    "dtstart": at,
                                    "report_payload": status_payload("status:b1", status),
                                }
                            ],
                        }
                    ],
                },
            )
            headers = {"Content-Type": "application/xml"}
            async with http.post(f"{base}/EiReport", data=update, headers=headers) as r:
                assert r.status == 200

        await send(ResourceStatus(online=True, capacity_pct=42.0), at)
        assert soc_of(vtn, f"{OEM}.b1") == 42.0
        await send(ResourceStatus(online=False, capacity_pct=42.0), at + timedelta(seconds=1))
        assert soc_of(vtn, f"{OEM}.b1") is None
        await send(ResourceStatus(online=True, manual_override=True), at + timedelta(seconds=2))
        assert soc_of(vtn, f"{OEM}.b1") is None
        assert (await b1.read()).soc_pct is None  # the planner commits nothing to it


async def test_bad_input_gets_a_clear_error_and_reaches_nothing(
    tmp_path: Path, registrar: Registrar
) -> None:
    port = free_port()
    config = vtn_config(tmp_path, port, max_message_bytes=20_000)
    base = f"http://127.0.0.1:{port}/OpenADR2/Simple/2.0b"
    headers = {"Content-Type": "application/xml"}
    async with (
        running_vtn(config, registrar) as vtn,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
    ):
        async with http.post(
            f"{base}/OadrPoll", data=b"<oadrPoll><unclosed>", headers=headers
        ) as r:
            assert r.status == 400
            assert "XML" in await r.text()
        big = b"<x>" + b"a" * 30_000 + b"</x>"
        async with http.post(f"{base}/EiReport", data=big, headers=headers) as r:
            assert r.status == 413
        dtd = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e "boom">]><x>&e;</x>'
        async with http.post(f"{base}/EiEvent", data=dtd, headers=headers) as r:
            assert r.status == 400
        # A well-formed report from a VEN that never registered is not taken.
        update = encode(
            "oadrUpdateReport",
            {
                "request_id": "r1",
                "ven_id": "ghost",
                "reports": [
                    {
                        "report_id": "x",
                        "report_request_id": "y",
                        "report_specifier_id": "z",
                        "report_name": "TELEMETRY_USAGE",
                        "created_date_time": utcnow(),
                        "intervals": [
                            {
                                "dtstart": utcnow(),
                                "report_payload": {"r_id": "usage:t1", "value": 1.0},
                            }
                        ],
                    }
                ],
            },
        )
        async with http.post(f"{base}/EiReport", data=update, headers=headers) as r:
            assert r.status == 200
            assert b"oadrRequestReregistration" in await r.read()
        assert vtn.resources == {}
        assert registrar.devices == {}


async def test_adapter_refuses_beyond_rating_and_goes_unavailable_when_stale(
    tmp_path: Path, registrar: Registrar
) -> None:
    port = free_port()
    config = vtn_config(tmp_path, port, stale_after_s=1.5, report_interval_s=1)
    async with running_vtn(config, registrar) as vtn:
        async with running_oem(port, fleet()) as oem:
            await enrolled(oem, registrar, vtn)
            b1 = registrar.resource("b1")
            with pytest.raises(UnsafeCommand):
                await b1.apply(cmd("b1", -50.0))
            assert vtn.current_event(f"{OEM}.b1") is None
        # The OEM cloud is gone: its telemetry goes stale.
        await asyncio.sleep(1.8)
        with pytest.raises(DeviceUnavailable):
            await b1.read()


async def test_registrations_and_events_survive_a_restart(
    tmp_path: Path, registrar: Registrar
) -> None:
    port = free_port()
    config = vtn_config(tmp_path, port)
    async with running_oem(port, fleet()) as oem:
        async with running_vtn(config, registrar) as vtn:
            await enrolled(oem, registrar, vtn)
            await registrar.resource("b1").apply(cmd("b1", -1.0))
            await wait_for(lambda: oem.devices["b1"].power_kw == -1.0)
            event = vtn.current_event(f"{OEM}.b1")
            ven_id = vtn.registrations[OEM].ven_id
        # Gateway restart: a fresh registrar (registry) and a fresh VTN on the same store.
        again = Registrar()
        async with running_vtn(config, again) as vtn2:
            # Devices are back before the VEN even polls.
            assert set(again.devices) == {f"{OEM}.t1", f"{OEM}.t2", f"{OEM}.b1"}
            assert vtn2.registrations[OEM].ven_id == ven_id
            restored = vtn2.current_event(f"{OEM}.b1")
            assert restored is not None
            assert event is not None
            assert restored == event.model_copy(
                update={"opt": "optIn", "opt_modification": 0, "updated_at": restored.updated_at}
            )
            distributions = oem.stats.distributions
            await wait_for(lambda: oem.stats.distributions > distributions, 5, "re-sent events")
            await wait_for(lambda: power_of(vtn2, f"{OEM}.b1") == -1.0, 5, "fresh usage")
            state = await again.resource("b1").read()
            assert state.power_kw == -1.0
            # The same setpoint after the restart changes nothing; a release cancels.
            await again.resource("b1").apply(cmd("b1", -1.0))
            assert vtn2.current_event(f"{OEM}.b1").modification_number == 0  # type: ignore[union-attr]
            await again.resource("b1").apply(cmd("b1", None))
            await wait_for(lambda: oem.devices["b1"].power_kw == 0.0)


def test_config_requires_tls_or_explicit_plain_http(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allow_plain_http"):
        OpenAdrVtnConfig(vens=(AllowedVen(ven_name=OEM),))
    tls = VtnTlsConfig(cert_path=tmp_path / "c", key_path=tmp_path / "k", ca_path=tmp_path / "a")
    with pytest.raises(ValueError, match="fingerprint"):
        OpenAdrVtnConfig(tls=tls, vens=(AllowedVen(ven_name=OEM),))


# --------------------------------------------------------------------------- with the real gateway


@pytest.mark.broker
async def test_real_gateway_dispatches_over_oem_resources_and_reallocates_an_opt_out(
    broker_endpoint: Any, tmp_path: Path
) -> None:
    """A feeder dispatch over one SunSpec battery and an OEM cloud's battery and thermostat;
    the thermostat's customer overrides, so its share moves to the batteries."""
    from simulators.sunspec_battery import SunSpecBatterySimulator
    from tests.e2e.fleet import Fleet, eventually, iso

    logging.getLogger("openleadr").setLevel(logging.WARNING)
    sim = SunSpecBatterySimulator(
        port=0, capacity_kwh=10, max_charge_kw=5, max_discharge_kw=5, initial_soc_pct=70
    )
    devices: list[SimThermostat | SimBattery] = [
        SimBattery("b1", location=LOC, rated_kw=5, capacity_kwh=10, soc_pct=70),
        SimThermostat("t1", location=LOC, override=True),
    ]
    port = free_port()
    # Wired the way an operator would: an [openadr_vtn] section in the gateway's config.
    vtn_section = vtn_config(tmp_path, port, stale_after_s=3.0).model_dump(mode="json")
    async with Fleet(
        broker_endpoint,
        tmp_path / "gw.sqlite",
        [sim],
        feeders=("f1",),
        extra_config={"openadr_vtn": vtn_section},
    ) as fleet:
        gateway = fleet.gateway
        assert gateway is not None
        assert fleet.app is not None
        vtn = fleet.app.openadr_vtn
        assert vtn is not None
        # The cloud samples every 2 s only (the VTN would like 1 s): it must be asked for 2 s.
        every_2s = (timedelta(seconds=2), timedelta(seconds=2))
        async with running_oem(port, devices, sampling_rate=every_2s) as oem:
            await eventually(
                lambda: all(
                    gateway.supervisors.get(f"{OEM}.{n}") is not None
                    and gateway.supervisors[f"{OEM}.{n}"].available
                    for n in ("b1", "t1")
                ),
                10,
                "OEM resources online in the gateway",
            )
            assert {d.device_id for d in gateway.registry.members("feeder:f1")} == {
                "bat-1",
                f"{OEM}.b1",
                f"{OEM}.t1",
            }
            await fleet.grid.send(
                {
                    "type": "dispatch",
                    "command_id": "d-oem",
                    "target": {"group_id": "feeder:f1"},
                    "kw": -7.0,
                    "start": iso(3.0),
                    "duration_s": 30,
                }
            )
            # Told when the dispatch is accepted, 3 s ahead: the OEM cloud sees the events
            # before the start, with the dispatch's window. The thermostat's customer opts out
            # at once, so the planner leaves it out and the batteries carry the 7 kW.
            await eventually(lambda: vtn.current_event(f"{OEM}.b1") is not None, 2, "b1 notice")
            notice = vtn.current_event(f"{OEM}.b1")
            assert notice is not None
            assert notice.duration_s == 30
            assert notice.start > utcnow()
            # (near: the default program calls "near" the last 300 s before the start)
            await eventually(lambda: statuses(oem, vtn, "b1")[:1] == ["near"], 2, "b1 near")
            await eventually(lambda: vtn.current_event(f"{OEM}.t1") is not None, 5, "t1 event")
            await eventually(
                lambda: sim.power_kw + oem.devices["b1"].power_kw == pytest.approx(-7.0, abs=0.1),
                10,
                "7 kW from the SunSpec and the OEM battery",
            )
            await eventually(lambda: not is_live_event(vtn, f"{OEM}.t1"), 5, "t1 event cancelled")
            thermostat = oem.devices["t1"]
            assert isinstance(thermostat, SimThermostat)
            assert thermostat.offset_c == 0.0
            await fleet.grid.send({"type": "cancel", "command_id": "c-oem", "cancels": "d-oem"})
            await eventually(
                lambda: abs(sim.power_kw) < 0.05 and oem.devices["b1"].power_kw == 0.0,
                10,
                "released",
            )


def is_live_event(vtn: OpenAdrVtn, device_id: str) -> bool:
    event = vtn.current_event(device_id)
    return event is not None and not event.cancelled


async def test_tls_registration_checks_the_certificate_fingerprint(
    tmp_path: Path, registrar: Registrar, caplog: pytest.LogCaptureFixture
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from adapters.oem_vtn.vtn import fingerprint_of_der
    from composition.certs import make_ca, make_cert

    ca = make_ca(tmp_path / "pki")
    server = make_cert(ca, tmp_path / "pki", "vtn", server=True)
    good = make_cert(ca, tmp_path / "pki", "oem-a")
    other = make_cert(ca, tmp_path / "pki", "oem-a-stolen-name")
    cert = x509.load_pem_x509_certificate(good.cert_path.read_bytes())
    fingerprint = fingerprint_of_der(cert.public_bytes(serialization.Encoding.DER))
    assert len(fingerprint.split(":")) == 10
    port = free_port()
    config = vtn_config(
        tmp_path,
        port,
        allow_plain_http=False,
        tls=VtnTlsConfig(
            cert_path=server.cert_path, key_path=server.key_path, ca_path=ca.cert_path
        ),
        vens=[AllowedVen(ven_name=OEM, location=LOC, fingerprint=fingerprint)],
    )
    caplog.set_level(logging.WARNING, logger="adapters.oem_vtn.vtn")
    tls = {"ca_path": str(ca.cert_path)}
    async with running_vtn(config, registrar) as vtn:
        async with running_oem(
            port, fleet(), cert_path=str(other.cert_path), key_path=str(other.key_path), **tls
        ) as impostor:
            await wait_for(lambda: impostor.refused is not None, 5)
            assert registrar.devices == {}
        assert any("fingerprint" in r.getMessage() for r in caplog.records)
        async with running_oem(
            port, fleet(), cert_path=str(good.cert_path), key_path=str(good.key_path), **tls
        ) as oem:
            await enrolled(oem, registrar, vtn)
            await registrar.resource("b1").apply(cmd("b1", -1.0))
            await wait_for(lambda: oem.devices["b1"].power_kw == -1.0, 5)


async def test_events_issued_together_are_stored_in_one_transaction(
    tmp_path: Path, registrar: Registrar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dispatch over many OEM resources issues many events at once: one fsync for all of
    them, each stored before any VEN can see it; a failed write issues none of them."""
    port = free_port()
    devices: list[SimThermostat | SimBattery] = [
        SimBattery(f"b{i}", location=TopologyLocation(substation="s1", feeder="f2"))
        for i in range(12)
    ]
    async with (
        running_vtn(vtn_config(tmp_path, port), registrar) as vtn,
        running_oem(port, devices) as oem,
    ):
        await enrolled(oem, registrar, vtn)
        store = vtn._store
        batches: list[int] = []
        real_save = store.save_events

        async def counting(events: list[Any]) -> None:
            batches.append(len(events))
            await real_save(events)

        monkeypatch.setattr(store, "save_events", counting)
        adapters = [registrar.resource(f"b{i}") for i in range(12)]
        await asyncio.gather(*(a.apply(cmd(f"b{i}", -1.0)) for i, a in enumerate(adapters)))
        assert sum(batches) == 12
        assert len(batches) <= 2, batches  # the first issuer may be written alone
        assert all(vtn.current_event(f"{OEM}.b{i}") is not None for i in range(12))
        await wait_for(lambda: all(d.power_kw == -1.0 for d in devices), 8, "all discharging")

        async def failing(events: list[Any]) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(store, "save_events", failing)
        before = {e.event_id: e.modification_number for e in vtn.events.values()}
        results = await asyncio.gather(
            *(a.apply(cmd(f"b{i}", -2.0)) for i, a in enumerate(adapters[:4])),
            return_exceptions=True,
        )
        # The supervisor sees the device unavailable for now (it backs off and retries).
        assert all(isinstance(r, DeviceUnavailable) for r in results), results
        assert "disk full" in str(results[0])
        # Nothing was exposed: the VENs keep the stored events, unmodified.
        assert {e.event_id: e.modification_number for e in vtn.events.values()} == before
        await asyncio.sleep(1.0)
        assert all(d.power_kw == -1.0 for d in devices)

        monkeypatch.setattr(store, "save_events", real_save)
        await adapters[0].apply(cmd("b0", -2.0))  # the supervisor's retry goes through
        event = vtn.current_event(f"{OEM}.b0")
        assert event is not None
        assert (event.value, event.modification_number) == (-2.0, 1)


async def test_the_listen_backlog_is_configurable(tmp_path: Path, registrar: Registrar) -> None:
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to read a listening socket's backlog")
    async with running_vtn(vtn_config(tmp_path, 0, listen_backlog=555), registrar) as vtn:
        ss = await asyncio.create_subprocess_exec(
            "ss", "-Hltn", f"sport = :{vtn.port}", stdout=asyncio.subprocess.PIPE
        )
        stdout, _ = await asyncio.wait_for(ss.communicate(), 10)
        out = stdout.decode().split()
        assert out[0] == "LISTEN"
        assert int(out[2]) == 555  # Send-Q of a listening socket: its backlog


async def test_a_standard_ven_with_plain_resource_ids_enrols_by_the_default_mapping(
    tmp_path: Path, registrar: Registrar
) -> None:
    port = free_port()
    config = vtn_config(tmp_path, port)
    ven = config.vens[0].model_copy(
        update={
            "default_resource": ResourceDefault(
                der_class=DerClass.BATTERY, rated_kw=5.0, capacity_kwh=13.5
            )
        }
    )
    config = config.model_copy(update={"vens": (ven,)})
    batteries = [SimBattery("b1", location=LOC), SimBattery("b2", location=LOC)]
    async with (
        running_vtn(config, registrar) as vtn,
        running_oem(port, list(batteries), plain_resource_ids=True) as oem,
    ):
        await enrolled(oem, registrar, vtn)
        assert vtn.resources[f"{OEM}.b1"].resource_id == "b1"  # no private grammar
        b1 = registrar.devices[f"{OEM}.b1"]
        assert (b1.der_class, b1.ratings.max_discharge_kw, b1.ratings.capacity_kwh) == (
            DerClass.BATTERY,
            5.0,
            13.5,
        )
        assert b1.location == LOC  # the VEN's default location
        await registrar.resource("b1").apply(cmd("b1", -2.0))
        await wait_for(lambda: oem.devices["b1"].power_kw == -2.0, 5, "battery discharging")


async def test_plain_resource_ids_without_a_default_mapping_enrol_nothing(
    tmp_path: Path, registrar: Registrar, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    async with (
        running_vtn(vtn_config(tmp_path, port), registrar),
        running_oem(port, [SimBattery("b1", location=LOC)], plain_resource_ids=True) as oem,
    ):
        await wait_for(oem.registered.is_set, 5, "registration")
        await asyncio.sleep(0.5)
        assert registrar.devices == {}
    assert any("default_resource" in r.getMessage() for r in caplog.records)
