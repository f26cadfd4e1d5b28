"""IEEE 2030.5 DRLC (§10.4): a water heater that polls our server as a 2030.5 client gets the
gateway's setpoints as EndDeviceControls capping its duty cycle.

The client walks FSA → DemandResponseProgramList → DemandResponseProgram →
(Active)EndDeviceControlList and reads what share of the time it may run; a lower cap supersedes
the one in force, a release cancels it; a DER client sees no DemandResponseProgram.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from adapters.sep2_der.der import Sep2Der, Sep2DerEndpoint
from adapters.sep2_der.server import Sep2Server
from gateway.devices import DeviceRejected
from protocols.sep2 import (
    DemandResponseProgram,
    DemandResponseProgramList,
    EndDeviceControlList,
    FunctionSetAssignmentsList,
)
from tests.adapters.sep2_der import test_server_subscriptions as subscriptions
from tests.adapters.sep2_der.test_server import LFDI_A, LFDI_B, Client, Fleet, _config
from tests.adapters.sep2_der.test_server_subscriptions import Receiver, _subscription
from unified.model import DeviceCommand, LimitSource

SOURCE = (LimitSource(command_id="shed-1", kind="dispatch"),)
receiver = subscriptions.receiver  # the notification receiver fixture


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    """wh-a: a 4.5 kW water heater in feeder:f1; bat-b: a battery (a DER client)."""
    server = Sep2Server(_config())
    heater = Sep2Der(
        "wh-a",
        Sep2DerEndpoint(lfdi=LFDI_A, load="water_heater", rated_kw=4.5),
        server=server,
        groups=("feeder:f1",),
    )
    battery = Sep2Der("bat-b", Sep2DerEndpoint(lfdi=LFDI_B), server=server, groups=("feeder:f1",))
    await heater.connect()
    await battery.connect()
    try:
        yield Fleet(server, heater, battery, [])
    finally:
        await server.stop()


async def _controls(c: Client, edev: str, *, active: bool) -> list[tuple[int, int, str]]:
    """From the FSA: (currentStatus, DutyCycle %, deviceCategory) of each EndDeviceControl."""
    fsas = await c.get_as(FunctionSetAssignmentsList, f"{edev}/fsa")
    link = fsas.items[0].demand_response_program_list_link
    assert link is not None
    programs = await c.get_as(DemandResponseProgramList, link.href)
    assert programs.all == 1
    program = await c.get_as(DemandResponseProgram, programs.items[0].href or "")
    lists = (program.active_end_device_control_list_link, program.end_device_control_list_link)
    chosen = lists[0] if active else lists[1]
    assert chosen is not None
    controls = await c.get_as(EndDeviceControlList, chosen.href + "?l=10")
    rows = []
    for control in controls.items:
        assert control.event_status is not None
        assert control.duty_cycle is not None
        rows.append(
            (
                control.event_status.current_status,
                control.duty_cycle.normal_value,
                control.device_category,
            )
        )
    return rows


async def test_a_water_heaters_setpoints_are_duty_cycle_caps(fleet: Fleet) -> None:
    server, heater = fleet.server, fleet.a
    edev = server.edev_href("wh-a")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        c = Client(session, server.url, LFDI_A)
        assert await _controls(c, edev, active=False) == []  # the program, nothing in force

        # The gateway's setpoint for a thermal load is a change from its baseline: shedding
        # 2.0 kW of 4.5 kW cycles it off 44.4 % of the time, so it may run 55 % (55.6 %, never
        # rounded up: the cap is a ceiling); deviceCategory bit 3: a water heater.
        await heater.apply(DeviceCommand(device_id="wh-a", power_kw=-2.0, provenance=SOURCE))
        assert await _controls(c, edev, active=True) == [(1, 55, "00000008")]
        # The same cap again (the supervisor's refresh) keeps the control.
        await heater.apply(DeviceCommand(device_id="wh-a", power_kw=-2.0, provenance=SOURCE))
        assert await _controls(c, edev, active=False) == [(1, 55, "00000008")]

        # A deeper shed (2.7 kW: 40 %) supersedes it.
        await heater.apply(DeviceCommand(device_id="wh-a", power_kw=-2.7, provenance=SOURCE))
        assert await _controls(c, edev, active=True) == [(1, 40, "00000008")]
        assert sorted(await _controls(c, edev, active=False)) == [
            (1, 40, "00000008"),
            (4, 55, "00000008"),  # superseded, still listed
        ]

        # Autonomous within an import limit (absolute): 1.8 kW of 4.5 kW is 40 %, the same cap.
        await heater.apply(DeviceCommand(device_id="wh-a", power_kw=None, import_limit_kw=1.8))
        assert await _controls(c, edev, active=True) == [(1, 40, "00000008")]
        # A disconnect holds it off.
        await heater.apply(DeviceCommand(device_id="wh-a", power_kw=None, connect=False))
        assert await _controls(c, edev, active=True) == [(1, 0, "00000008")]

        # Released: cancelled, nothing active; the load runs freely again.
        await heater.apply(DeviceCommand(device_id="wh-a", power_kw=None))
        assert await _controls(c, edev, active=True) == []
        assert server.load_control("wh-a") is None
        assert (2, 0, "00000008") in await _controls(c, edev, active=False)

        # A load-up cannot be asked by duty cycle: refused (the dispatch is re-allocated), and
        # nothing changes.
        with pytest.raises(DeviceRejected):
            await heater.apply(DeviceCommand(device_id="wh-a", power_kw=2.0))
        assert await _controls(c, edev, active=True) == []


async def test_only_loads_have_a_demand_response_program(fleet: Fleet) -> None:
    server = fleet.server
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        b = Client(session, server.url, LFDI_B)
        edev_b, edev_a = server.edev_href("bat-b"), server.edev_href("wh-a")
        fsas = await b.get_as(FunctionSetAssignmentsList, f"{edev_b}/fsa")
        assert fsas.items[0].demand_response_program_list_link is None
        programs = await b.get_as(DemandResponseProgramList, f"{edev_b}/drp")
        assert programs.all == 0
        status, _, _ = await b.request("GET", f"{edev_b}/drp/1/edc")
        assert status == 404
        status, _, _ = await b.request("GET", f"{edev_a}/drp/1/edc")  # not its EndDevice
        assert status == 403


def test_a_load_needs_its_rating() -> None:
    server = Sep2Server(_config())
    with pytest.raises(ValueError, match="rated_kw"):
        Sep2Der("wh", Sep2DerEndpoint(lfdi=LFDI_A, load="water_heater"), server=server)


async def test_a_subscriber_is_told_of_each_new_cap_and_the_release(receiver: Receiver) -> None:
    server = Sep2Server(_config(notification_hosts=("127.0.0.1",)))
    heater = Sep2Der(
        "wh-a",
        Sep2DerEndpoint(lfdi=LFDI_A, load="thermostat", rated_kw=3.0),
        server=server,
        groups=("feeder:f1",),
    )
    await heater.connect()
    edev = server.edev_href("wh-a")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            c = Client(session, server.url, LFDI_A)
            body = _subscription(f"{edev}/drp/1/actedc", receiver.url + "/edc")
            status, _, _ = await c.request("POST", f"{edev}/sub", body)
            assert status == 201
            status, _, _ = await c.request(
                "POST", f"{edev}/sub", _subscription(f"{edev}/drp/2/edc", receiver.url + "/x")
            )
            assert status == 400  # no such program: not subscribable
            await heater.apply(DeviceCommand(device_id="wh-a", power_kw=-1.5, provenance=SOURCE))
            note = await receiver.next()
            assert isinstance(note.resource, EndDeviceControlList)
            (control,) = note.resource.items
            assert control.duty_cycle is not None
            assert (control.duty_cycle.normal_value, control.device_category) == (50, "00000001")
            await heater.apply(DeviceCommand(device_id="wh-a", power_kw=None))
            note = await receiver.next()
            assert isinstance(note.resource, EndDeviceControlList)
            assert note.resource.items == ()  # nothing active any more
    finally:
        await server.stop()
