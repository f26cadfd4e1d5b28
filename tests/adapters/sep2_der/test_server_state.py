"""What the 2030.5 server serves survives a restart (``[sep2_server] state_file``, real SQLite).

A client that polled before the restart walks the same hrefs after it and finds the same
documents: the same EndDevice and DERProgram ids (whatever order the devices are enrolled in
this time), the same DERControls with the same mRIDs, the active one still active, the one
scheduled ahead still scheduled, the cancelled one still cancelled, and a default changed at
run time still changed. The supervisor's re-apply of the same setpoint keeps the same control.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from adapters.sep2_der.der import Sep2Der, Sep2DerEndpoint
from adapters.sep2_der.server import Sep2DefaultEnvelope, Sep2Server
from protocols.sep2 import (
    DefaultDERControl,
    DERControlBase,
    DERControlList,
    DERProgramList,
    EndDeviceList,
    from_watts,
    to_watts,
)
from tests.adapters.sep2_der.test_server import LFDI_A, LFDI_B, Client, _config
from unified.model import DeviceCommand, LimitSource


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


def _a(server: Sep2Server) -> Sep2Der:
    return Sep2Der(
        "bat-a",
        Sep2DerEndpoint(lfdi=LFDI_A, pin=11111, supports_target_w=True),
        server=server,
        groups=("substation:s1", "feeder:f1"),
    )


def _b(server: Sep2Server) -> Sep2Der:
    return Sep2Der(
        "bat-b",
        Sep2DerEndpoint(lfdi=LFDI_B, supports_target_w=True),
        server=server,
        groups=("substation:s1", "feeder:f2"),
    )


async def _served(c: Client) -> dict[str, object]:
    """Every document of the client's tree that carries controls, by href."""
    edevs = await c.get_as(EndDeviceList, "/edev?l=10")
    assert edevs.results == 1
    edev = edevs.items[0].href or ""
    seen: dict[str, object] = {"edev": edev}
    programs = await c.get_as(DERProgramList, f"{edev}/derp?l=10")
    seen["programs"] = programs
    for program in programs.items:
        assert program.der_control_list_link is not None
        assert program.default_der_control_link is not None
        href = program.der_control_list_link.href + "?l=255"
        seen[href] = await c.get_as(DERControlList, href)
        href = program.default_der_control_link.href
        seen[href] = await c.get_as(DefaultDERControl, href)
    return seen


async def test_controls_programs_and_defaults_survive_a_restart(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    config = _config(state_file=tmp_path / "sep2-server.sqlite")
    first = Sep2Server(config)
    a, b = _a(first), _b(first)
    await a.connect()
    now = int(time.time())
    try:
        dispatch = (LimitSource(command_id="dispatch-7", kind="dispatch"),)
        await a.apply(DeviceCommand(device_id="bat-a", power_kw=-3, provenance=dispatch))
        ahead = first.schedule(
            "bat-a",
            DERControlBase(op_mod_target_w=from_watts(2000)),
            start=now + 3600,
            end=now + 7200,
            power_kw=-2,
            provenance=(LimitSource(command_id="dispatch-8", kind="dispatch"),),
            group_id="substation:s1",
        )
        assert ahead is not None
        await b.apply(DeviceCommand(device_id="bat-b", power_kw=1.5, provenance=dispatch))
        await b.apply(DeviceCommand(device_id="bat-b", power_kw=None))  # cancelled, still listed
        assert first.set_default("substation:s1", Sep2DefaultEnvelope(export_limit_kw=2.5))
        before_a = await _served(Client(session, first.url, LFDI_A))
        before_b = await _served(Client(session, first.url, LFDI_B))
    finally:
        await first.stop()

    # The restart: devices enrolled in the other order, B only once the server is listening.
    second = Sep2Server(config)
    b2 = None
    try:
        a2 = _a(second)
        await a2.connect()
        b2 = _b(second)
        after_a = await _served(Client(session, second.url, LFDI_A))
        after_b = await _served(Client(session, second.url, LFDI_B))
        assert after_a == before_a
        assert after_b == before_b

        programs = after_a["programs"]
        assert isinstance(programs, DERProgramList)
        primary, substation = programs.items  # by primacy: feeder F1, then substation S1
        assert primary.der_control_list_link is not None
        controls = after_a[primary.der_control_list_link.href + "?l=255"]
        assert isinstance(controls, DERControlList)
        (active,) = controls.items
        assert active.event_status is not None
        assert active.event_status.current_status == 1  # still active
        assert active.der_control_base.op_mod_target_w is not None
        assert to_watts(active.der_control_base.op_mod_target_w) == 3000
        assert substation.der_control_list_link is not None
        scheduled = after_a[substation.der_control_list_link.href + "?l=255"]
        assert isinstance(scheduled, DERControlList)
        assert [c.mrid for c in scheduled.items] == [ahead.mrid]
        assert scheduled.items[0].event_status is not None
        assert scheduled.items[0].event_status.current_status == 0
        assert substation.default_der_control_link is not None
        default = after_a[substation.default_der_control_link.href]
        assert isinstance(default, DefaultDERControl)
        assert default.version == 2  # changed at run time, and that change kept
        assert default.der_control_base.op_mod_exp_lim_w is not None
        assert to_watts(default.der_control_base.op_mod_exp_lim_w) == 2500
        b_programs = after_b["programs"]
        assert isinstance(b_programs, DERProgramList)
        b_first = b_programs.items[0].der_control_list_link
        assert b_first is not None
        cancelled = after_b[b_first.href + "?l=255"]
        assert isinstance(cancelled, DERControlList)
        statuses = [c.event_status.current_status for c in cancelled.items if c.event_status]
        assert statuses == [2]

        # The supervisor re-applies the desired setpoint on connect: the same control stays.
        dispatch = (LimitSource(command_id="dispatch-7", kind="dispatch"),)
        await a2.apply(DeviceCommand(device_id="bat-a", power_kw=-3, provenance=dispatch))
        again = await _served(Client(session, second.url, LFDI_A))
        assert again[primary.der_control_list_link.href + "?l=255"] == controls
        # and a late Response to a control issued before the restart is still tied to it
        assert second.snapshot("bat-a").active_control is not None
        assert second.snapshot("bat-a").active_control.mrid == active.mrid  # type: ignore[union-attr]
    finally:
        await second.stop()
    assert b2 is not None
    assert second.unreadable_state_rows == 0


async def test_a_changed_configured_default_wins_over_the_saved_one(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    state = tmp_path / "sep2-server.sqlite"
    first = Sep2Server(_config(state_file=state))
    a = _a(first)
    await a.connect()
    try:
        before = await _served(Client(session, first.url, LFDI_A))
    finally:
        await first.stop()
    config = _config(state_file=state)
    programs = tuple(
        p.model_copy(update={"default": Sep2DefaultEnvelope(export_limit_kw=4.0)})
        if p.group_id == "feeder:f1"
        else p
        for p in config.programs
    )
    second = Sep2Server(config.model_copy(update={"programs": programs}))
    _a(second)
    await second.start()
    try:
        after = await _served(Client(session, second.url, LFDI_A))
    finally:
        await second.stop()
    (href,) = [
        k
        for k, v in before.items()
        if isinstance(v, DefaultDERControl) and v.der_control_base.op_mod_exp_lim_w is not None
    ]  # feeder F1's, 1.5 kW in the first configuration
    old, new = before[href], after[href]
    assert isinstance(old, DefaultDERControl)
    assert isinstance(new, DefaultDERControl)
    assert new.der_control_base.op_mod_exp_lim_w is not None
    assert to_watts(new.der_control_base.op_mod_exp_lim_w) == 4000  # the operator's new value
    assert new.version is not None
    assert old.version is not None
    assert new.version > old.version  # so clients see it changed


async def test_a_damaged_row_is_skipped_and_counted_not_fatal(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    state = tmp_path / "sep2-server.sqlite"
    first = Sep2Server(_config(state_file=state))
    a = _a(first)
    await a.connect()
    try:
        await a.apply(DeviceCommand(device_id="bat-a", power_kw=-3))
    finally:
        await first.stop()
    with sqlite3.connect(state) as db:  # a half-written or hand-edited file
        db.execute("UPDATE end_devices SET body = '{\"controls\": [{\"mrid\": 1}]}'")
        db.execute("UPDATE programs SET body = 'not json' WHERE group_id = 'feeder:f1'")
    db.close()
    second = Sep2Server(_config(state_file=state))
    _a(second)
    await second.start()
    try:
        served = await _served(Client(session, second.url, LFDI_A))
        assert served["edev"]  # it serves, with what it could read
        assert second.snapshot("bat-a").active_control is None  # that control was unreadable
    finally:
        await second.stop()
    assert second.unreadable_state_rows == 2
