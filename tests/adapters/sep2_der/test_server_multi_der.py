"""Several DERs behind one EndDevice (CSIP-AUS MUL-01..03): one 2030.5 client for a site with a
PV inverter and a battery, each a gateway device with the same LFDI.

The client finds one EndDevice whose DERList lists both DERs, each with its own DERCapability /
DERStatus and its own program for its controls, so a control for the battery never reads as
one for the PV inverter; a Response is tied to the device whose control it answers. The tree
parses with envoy's models and survives a restart.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from adapters.sep2_der.der import Sep2Der, Sep2DerEndpoint
from adapters.sep2_der.server import Sep2ResponseRecord, Sep2Server
from composition.config import parse_config
from protocols.sep2 import (
    DER,
    DERControlList,
    DERList,
    DERProgramList,
    EndDeviceList,
    FunctionSetAssignmentsList,
    to_watts,
)
from tests.adapters.sep2_der.test_server import LFDI_A, Client, _config
from tests.protocols.sep2.envoy_fixtures import load
from unified.config import ConfigError
from unified.model import DeviceCommand, LimitSource


def _site(server: Sep2Server) -> tuple[Sep2Der, Sep2Der]:
    pv = Sep2Der(
        "site-pv",
        Sep2DerEndpoint(lfdi=LFDI_A, pin=11111, supports_target_w=True),
        server=server,
        groups=("feeder:f1",),
    )
    battery = Sep2Der(
        "site-bat",
        Sep2DerEndpoint(lfdi=LFDI_A, supports_target_w=True, shares_end_device=True),
        server=server,
        groups=("feeder:f1",),
    )
    return pv, battery


async def _controls_by_program(c: Client, edev: str) -> dict[str, DERControlList]:
    programs = await c.get_as(DERProgramList, f"{edev}/derp?l=10")
    found = {}
    for program in programs.items:
        assert program.der_control_list_link is not None
        found[program.description or ""] = await c.get_as(
            DERControlList, program.der_control_list_link.href + "?l=10"
        )
    return found


async def test_one_end_device_lists_both_ders_with_their_own_controls(tmp_path: Path) -> None:
    recorded: list[Sep2ResponseRecord] = []
    config = _config(state_file=tmp_path / "sep2-server.sqlite")
    server = Sep2Server(config, on_response=recorded.append)
    pv, battery = _site(server)
    await pv.connect()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            c = Client(session, server.url, LFDI_A)
            edevs = await c.get_as(EndDeviceList, "/edev?l=10")
            assert edevs.all == 1  # one client, one EndDevice
            edev = edevs.items[0].href or ""
            assert server.edev_href("site-bat") == server.edev_href("site-pv") == edev
            ders = await c.get_as(DERList, f"{edev}/der?l=10")
            assert (ders.all, [d.href for d in ders.items]) == (
                2,
                [f"{edev}/der/1", f"{edev}/der/2"],
            )

            # Each DER's state is its own.
            status, _, _ = await c.request("PUT", f"{edev}/der/2/ders", load("req-der-status.xml"))
            assert status == 204
            assert server.snapshot("site-bat").status is not None
            assert server.snapshot("site-pv").status is None
            await c.error("GET", f"{edev}/der/3", 404)

            # A setpoint for the battery, a generation limit for the PV inverter: two controls,
            # each in its DER's own program (and in that DER's associated programs).
            dispatch = (LimitSource(command_id="d-1", kind="dispatch"),)
            await battery.apply(
                DeviceCommand(device_id="site-bat", power_kw=-3, provenance=dispatch)
            )
            envelope = (LimitSource(command_id="e-1", kind="envelope"),)
            await pv.apply(
                DeviceCommand(
                    device_id="site-pv", power_kw=None, export_limit_kw=2.0, provenance=envelope
                )
            )
            by_program = await _controls_by_program(c, edev)
            assert set(by_program) == {"device:site-pv", "device:site-bat", "Feeder F1"}
            (bat_control,) = by_program["device:site-bat"].items
            (pv_control,) = by_program["device:site-pv"].items
            assert by_program["Feeder F1"].all == 0
            assert bat_control.der_control_base.op_mod_target_w is not None
            assert to_watts(bat_control.der_control_base.op_mod_target_w) == 3000
            assert pv_control.der_control_base.op_mod_gen_lim_w is not None
            assert to_watts(pv_control.der_control_base.op_mod_gen_lim_w) == 2000
            for number, wanted in ((1, "device:site-pv"), (2, "device:site-bat")):
                der = await c.get_as(DER, f"{edev}/der/{number}")
                assert der.associated_der_program_list_link is not None
                associated = await c.get_as(
                    DERProgramList, der.associated_der_program_list_link.href + "?l=10"
                )
                assert wanted in {p.description for p in associated.items}
            # One FSA per program of the EndDevice (each DER's own, their group's), each
            # program in exactly one of them.
            fsas = await c.get_as(FunctionSetAssignmentsList, f"{edev}/fsa?l=10")
            every = await c.get_as(DERProgramList, f"{edev}/derp?l=10")
            assert len(fsas.items) == every.all == 3
            walked: list[str | None] = []
            for fsa in fsas.items:
                assert fsa.der_program_list_link is not None
                listed = await c.get_as(DERProgramList, fsa.der_program_list_link.href)
                walked += [p.href for p in listed.items]
            assert walked == [p.href for p in every.items]
            # Each DER's control in force is its own; releasing one leaves the other.
            pv_in_force = server.snapshot("site-pv").active_control
            bat_in_force = server.snapshot("site-bat").active_control
            assert pv_in_force is not None
            assert bat_in_force is not None
            assert (pv_in_force.mrid, bat_in_force.mrid) == (pv_control.mrid, bat_control.mrid)

            # A Response to the battery's control is the battery's.
            assert bat_control.reply_to is not None
            body = load("req-derc-response-started.xml").replace(
                b"30000000000000000000000600000000", bat_control.mrid.encode()
            )
            status, _, _ = await c.request("POST", bat_control.reply_to, body)
            assert status == 201
            assert [r.device_id for r in recorded] == ["site-bat"]
            assert battery.responses() == tuple(recorded)
            assert pv.responses() == ()

            await pv.apply(DeviceCommand(device_id="site-pv", power_kw=None))
            assert server.snapshot("site-pv").active_control is None
            assert server.snapshot("site-bat").active_control is not None
    finally:
        await server.stop()

    # The restart: the same EndDevice, both DERs, the battery's control still in force.
    again = Sep2Server(config)
    pv2, battery2 = _site(again)
    await again.start()
    try:
        assert again.edev_href("site-bat") == edev
        control = again.snapshot("site-bat").active_control
        assert control is not None
        assert control.mrid == bat_control.mrid
        assert again.snapshot("site-pv").active_control is None
    finally:
        await again.stop()
    assert (pv2.device_id, battery2.device_id) == ("site-pv", "site-bat")


def test_a_shared_lfdi_must_be_declared() -> None:
    base = {
        "adapter": "sep2_der",
        "der_class": "battery",
        "location": {"substation": "s1"},
        "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 10},
    }
    devices = [
        {**base, "device_id": "a", "sep2": {"lfdi": LFDI_A}},
        {**base, "device_id": "b", "sep2": {"lfdi": LFDI_A}},
    ]
    config = {
        "gateway_id": "g",
        "sep2_server": {"port": 0, "dev_lfdi_header": "X-LFDI"},
        "settlement": {"timezone": "UTC"},
    }
    with pytest.raises(ConfigError, match="share LFDI"):
        parse_config({**config, "devices": devices})
    devices[1]["sep2"] = {"lfdi": LFDI_A, "shares_end_device": True}
    parse_config({**config, "devices": devices})
