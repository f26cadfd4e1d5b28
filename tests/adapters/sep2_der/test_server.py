"""The 2030.5 server over real HTTP (and real mutual TLS), driven the way DER clients drive it.

Request bodies are envoy's captured client requests where they fit (``req-*.xml``): device A of
the captures has LFDI ``F0F83B2B…``, so it is enrolled here under that LFDI and its captured
MirrorUsagePoint, DERStatus, DERCapability and Response bodies are accepted unchanged.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest

from adapters.sep2_der.der import Sep2Der, Sep2DerEndpoint
from adapters.sep2_der.server import (
    Sep2DefaultEnvelope,
    Sep2ProgramConfig,
    Sep2ResponseRecord,
    Sep2Server,
    Sep2ServerConfig,
    Sep2TlsConfig,
)
from composition.certs import describe, describe_text, make_ca, make_cert
from gateway.devices import DeviceUnavailable, DispatchNotice
from protocols.sep2 import (
    DER,
    MEDIA_TYPE,
    ConnectionPoint,
    DefaultDERControl,
    DERControl,
    DERControlList,
    DERList,
    DERProgram,
    DERProgramList,
    DERStatus,
    DeviceCapability,
    EndDevice,
    EndDeviceList,
    Error,
    FunctionSetAssignments,
    FunctionSetAssignmentsList,
    MirrorUsagePoint,
    MirrorUsagePointList,
    Registration,
    ResponseList,
    Sep2Model,
    Time,
    decode,
    decode_as,
    to_watts,
)
from protocols.tls import client_ssl_context
from tests.protocols.sep2.envoy_fixtures import load
from unified.model import DeviceCommand, LimitSource

LFDI_A = "F0F83B2BC825E617DEBD7192F9305B4B6ABC00F5"  # envoy capture's device A
LFDI_B = "86441F107B66EBFE65B39FB3D5D7BAAEDA3EA6BF"  # envoy capture's device B
LFDI_STRANGER = "0123456789ABCDEF0123456789ABCDEF01234567"
HEADER = "X-LFDI"
SEP = {"Content-Type": MEDIA_TYPE}
M = TypeVar("M", bound=Sep2Model)


def _config(**overrides: object) -> Sep2ServerConfig:
    base: dict[str, object] = {
        "port": 0,
        "dev_lfdi_header": HEADER,
        "programs": (
            Sep2ProgramConfig(
                group_id="feeder:f1",
                primacy=10,
                description="Feeder F1",
                default=Sep2DefaultEnvelope(
                    export_limit_kw=1.5, import_limit_kw=7.0, ramp_rate_pct_per_s=0.27
                ),
            ),
            Sep2ProgramConfig(group_id="substation:s1", primacy=20),
        ),
    }
    base.update(overrides)
    return Sep2ServerConfig.model_validate(base)


@dataclass
class Fleet:
    server: Sep2Server
    a: Sep2Der
    b: Sep2Der
    recorded: list[Sep2ResponseRecord]


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    recorded: list[Sep2ResponseRecord] = []
    server = Sep2Server(_config(), on_response=recorded.append)
    a = Sep2Der(
        "bat-a",
        Sep2DerEndpoint(lfdi=LFDI_A, pin=11111, supports_target_w=True),
        server=server,
        groups=("substation:s1", "feeder:f1"),
    )
    b = Sep2Der(
        "bat-b",
        Sep2DerEndpoint(lfdi=LFDI_B.lower()),
        server=server,
        groups=("substation:s1", "feeder:f2"),
    )
    await a.connect()
    await b.connect()
    try:
        yield Fleet(server, a, b, recorded)
    finally:
        await server.stop()


class Client:
    """A plain-HTTP development client that names itself with the LFDI header."""

    def __init__(self, session: aiohttp.ClientSession, base: str, lfdi: str | None) -> None:
        self.session = session
        self.base = base
        self.headers = {} if lfdi is None else {HEADER: lfdi}

    async def request(
        self,
        method: str,
        href: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        merged = {**self.headers, **(SEP if body is not None else {}), **(headers or {})}
        async with self.session.request(
            method, self.base + href, data=body, headers=merged
        ) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    async def get(self, href: str) -> Sep2Model:
        status, headers, body = await self.request("GET", href)
        assert status == 200, (href, status, body)
        assert headers["Content-Type"] == MEDIA_TYPE  # exactly: no charset parameter
        return decode(body)

    async def get_as(self, cls: type[M], href: str) -> M:
        model = await self.get(href)
        assert isinstance(model, cls), (href, model)
        return model

    async def error(
        self,
        method: str,
        href: str,
        status: int,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        got, hdrs, data = await self.request(method, href, body, headers)
        assert got == status, (method, href, got, data)
        assert hdrs["Content-Type"] == MEDIA_TYPE
        error = decode_as(Error, data)
        assert error.message
        return error.message


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


def client(fleet: Fleet, session: aiohttp.ClientSession, lfdi: str | None = LFDI_A) -> Client:
    return Client(session, fleet.server.url, lfdi)


# --------------------------------------------------------------------------- discovery


async def test_discovery_walk_follows_hrefs(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    c = client(fleet, session)
    dcap = await c.get_as(DeviceCapability, "/dcap")
    assert dcap.poll_rate == 300
    assert dcap.time_link is not None
    assert dcap.end_device_list_link is not None
    tm = await c.get_as(Time, dcap.time_link.href)
    assert tm.current_time > 1_700_000_000
    edevs = await c.get_as(EndDeviceList, dcap.end_device_list_link.href + "?s=0&l=10")
    assert (edevs.all, edevs.results) == (1, 1)
    edev = edevs.items[0]
    assert edev.lfdi == LFDI_A
    assert edev.sfdi == 646847986525
    assert await c.get_as(EndDevice, edev.href or "") == edev
    assert edev.registration_link is not None
    rg = await c.get_as(Registration, edev.registration_link.href)
    assert rg.pin == 111115  # 11111 plus its check digit

    assert edev.function_set_assignments_list_link is not None
    fsas = await c.get_as(
        FunctionSetAssignmentsList, edev.function_set_assignments_list_link.href + "?l=10"
    )
    # One FunctionSetAssignments per program (feeder F1's, substation S1's), strongest first.
    assert (fsas.all, edev.function_set_assignments_list_link.all) == (2, 2)
    walked: list[DERProgram] = []
    for item in fsas.items:
        fsa = await c.get_as(FunctionSetAssignments, item.href or "")
        assert fsa == item
        assert fsa.der_program_list_link is not None
        listed = await c.get_as(DERProgramList, fsa.der_program_list_link.href + "?s=0&l=255")
        assert listed.all == 1
        walked += listed.items
    by_primacy = [p.primacy for p in walked]
    assert by_primacy == sorted(by_primacy) == [10, 20]
    programs = await c.get_as(DERProgramList, f"{edev.href}/derp?s=0&l=255")
    assert [p.href for p in programs.items] == [p.href for p in walked]
    for listed in programs.items:
        program = await c.get_as(DERProgram, listed.href or "")
        assert program == listed
        assert program.der_control_list_link is not None
        assert program.default_der_control_link is not None
        controls = await c.get_as(DERControlList, program.der_control_list_link.href)
        assert (controls.all, controls.results) == (0, 0)
        dderc = await c.get_as(DefaultDERControl, program.default_der_control_link.href)
        base = dderc.der_control_base
        if program.primacy == 10:  # feeder F1's default envelope from the config
            assert base.op_mod_exp_lim_w is not None
            assert base.op_mod_imp_lim_w is not None
            assert to_watts(base.op_mod_exp_lim_w) == 1500
            assert to_watts(base.op_mod_imp_lim_w) == 7000
            assert dderc.set_grad_w == 27  # 0.27 %/s of rated W
        else:  # no default configured: 200 with an empty DERControlBase, as envoy
            assert base.model_dump(exclude_none=True) == {}
            assert dderc.set_grad_w is None

    assert edev.der_list_link is not None
    ders = await c.get_as(DERList, edev.der_list_link.href)
    der = await c.get_as(DER, ders.items[0].href or "")
    assert der.associated_der_program_list_link is not None
    associated = await c.get_as(DERProgramList, der.associated_der_program_list_link.href + "?l=9")
    assert [p.href for p in associated.items] == [p.href for p in programs.items]


async def test_unknown_client_sees_nothing(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    c = client(fleet, session, LFDI_STRANGER)
    dcap = await c.get_as(DeviceCapability, "/dcap")
    assert dcap.poll_rate is None
    assert dcap.end_device_list_link is not None
    assert dcap.end_device_list_link.all == 0
    edevs = await c.get_as(EndDeviceList, "/edev?l=10")
    assert (edevs.all, edevs.results, edevs.items) == (0, 0, ())
    await c.error("GET", fleet.server.edev_href("bat-a"), 403)
    await c.error("POST", "/mup", 403, load("req-mup-der.xml"))


async def test_client_sees_only_its_own_device_and_groups(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    a, b = client(fleet, session, LFDI_A), client(fleet, session, LFDI_B.lower())
    href_a, href_b = fleet.server.edev_href("bat-a"), fleet.server.edev_href("bat-b")
    listed = await b.get_as(EndDeviceList, "/edev?s=0&l=10")
    assert [e.href for e in listed.items] == [href_b]
    assert listed.items[0].registration_link is None  # no PIN configured for B
    message = await b.error("GET", href_a, 403)
    assert LFDI_B.lower() in message
    await b.error("GET", f"{href_a}/derp?l=10", 403)
    await b.error("GET", f"{href_a}/der/1/ders", 403)
    await b.error("PUT", f"{href_a}/der/1/ders", 403, load("req-der-status.xml"))
    await b.error("GET", "/edev/999", 403)  # envoy answers 403 for unknown ids too

    programs_a = await a.get_as(DERProgramList, f"{href_a}/derp?l=10")
    programs_b = await b.get_as(DERProgramList, f"{href_b}/derp?l=10")
    descriptions_b = {p.description for p in programs_b.items}
    assert descriptions_b == {"substation:s1", "feeder:f2"}
    assert {p.description for p in programs_a.items} == {"substation:s1", "Feeder F1"}
    # A's feeder program is not reachable through B's EndDevice: not B's program.
    feeder_a = next(p for p in programs_a.items if p.primacy == 10)
    assert feeder_a.href is not None
    program_id = feeder_a.href.rsplit("/", 1)[1]
    await b.error("GET", f"{href_b}/derp/{program_id}/derc", 404)

    # A's MirrorUsagePoint is A's alone.
    status, headers, _ = await a.request("POST", "/mup", load("req-mup-der.xml"))
    assert status == 201
    await b.error("GET", headers["Location"], 404)  # indistinguishable from an unknown id
    await b.error("POST", headers["Location"], 404, load("req-mmr.xml"))
    await a.error("GET", "/mup/999", 404)
    assert (await b.get_as(MirrorUsagePointList, "/mup?l=10")).all == 0


# --------------------------------------------------------------------------- controls


async def _controls(c: Client, edev: str, query: str = "?s=0&l=255") -> DERControlList:
    programs = await c.get_as(DERProgramList, f"{edev}/derp?l=10")
    first = programs.items[0]  # lowest primacy: where the device's setpoint goes
    assert first.der_control_list_link is not None
    return await c.get_as(DERControlList, first.der_control_list_link.href + query)


async def test_apply_publishes_target_and_cancel_marks_cancelled(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    c = client(fleet, session)
    edev = fleet.server.edev_href("bat-a")
    provenance = (LimitSource(command_id="dispatch-7", kind="dispatch"),)
    await fleet.a.apply(DeviceCommand(device_id="bat-a", power_kw=-3, provenance=provenance))
    listed = await _controls(c, edev)
    assert (listed.all, listed.results) == (1, 1)
    control = listed.items[0]
    assert control.event_status is not None
    assert control.event_status.current_status == 1
    base = control.der_control_base
    assert base.op_mod_target_w is not None
    assert to_watts(base.op_mod_target_w) == 3000
    assert base.op_mod_gen_lim_w is not None
    assert to_watts(base.op_mod_gen_lim_w) == 3000
    assert base.op_mod_load_lim_w is not None
    assert to_watts(base.op_mod_load_lim_w) == 0
    assert control.reply_to == f"{edev}/rsps/1/rsp"
    assert control.response_required == "03"
    assert await c.get_as(DERControl, control.href or "") == control
    programs = await c.get_as(DERProgramList, f"{edev}/derp?l=10")
    assert programs.items[0].active_der_control_list_link is not None
    act = await c.get_as(
        DERControlList, programs.items[0].active_der_control_list_link.href + "?l=10"
    )
    assert [x.mrid for x in act.items] == [control.mrid]
    # the other program carries no control of A's
    assert programs.items[1].der_control_list_link is not None
    assert programs.items[1].der_control_list_link.all == 0

    # The same setpoint again (the supervisor refreshes) changes nothing on the wire.
    await fleet.a.apply(DeviceCommand(device_id="bat-a", power_kw=-3, provenance=provenance))
    assert (await _controls(c, edev)).items == listed.items

    await fleet.a.apply(DeviceCommand(device_id="bat-a", power_kw=None))
    after = await _controls(c, edev)
    assert after.all == 1  # cancelled, not deleted
    cancelled = after.items[0]
    assert cancelled.mrid == control.mrid
    assert cancelled.event_status is not None
    assert cancelled.event_status.current_status == 2
    act = await c.get_as(
        DERControlList, programs.items[0].active_der_control_list_link.href + "?l=10"
    )
    assert act.all == 0


async def test_a_dispatch_ahead_is_a_scheduled_control_with_randomization_and_ramp(
    session: aiohttp.ClientSession,
) -> None:
    """Told of a dispatch an hour ahead, the server lists a scheduled DERControl for its window
    (randomizeStart / randomizeDuration from the program, rampTms from the dispatch) while the
    control in force stays; a release of that control leaves it; at the start the planner's
    setpoint replaces it for the rest of the window; a withdrawn dispatch's control is
    cancelled."""
    now = [1_800_000_000.0]
    programs = (
        Sep2ProgramConfig(
            group_id="feeder:f1", primacy=10, randomize_start_s=120, randomize_duration_s=30
        ),
    )
    server = Sep2Server(_config(programs=programs), clock=lambda: now[0])
    der = Sep2Der(
        "bat-a",
        Sep2DerEndpoint(lfdi=LFDI_A, supports_target_w=True),
        server=server,
        groups=("feeder:f1",),
    )
    await der.connect()
    try:
        c = Client(session, server.url, LFDI_A)
        edev = server.edev_href("bat-a")
        earlier = (LimitSource(command_id="d-now", kind="dispatch"),)
        await der.apply(DeviceCommand(device_id="bat-a", power_kw=-1, provenance=earlier))
        start = datetime.fromtimestamp(now[0] + 3600, UTC)
        end = start + timedelta(seconds=600)
        der.notice(DispatchNotice("d-ahead", start, end, -2.0, ramp_s=60))
        listed = await _controls(c, edev)
        assert listed.all == 2
        ahead = next(x for x in listed.items if x.interval.start == int(start.timestamp()))
        assert ahead.interval.duration == 600  # the dispatch's window
        assert ahead.event_status is not None
        assert ahead.event_status.current_status == 0  # scheduled
        assert (ahead.randomize_start, ahead.randomize_duration) == (120, 30)
        assert ahead.der_control_base.ramp_tms == 6000
        assert ahead.der_control_base.op_mod_target_w is not None
        assert to_watts(ahead.der_control_base.op_mod_target_w) == 2000
        der.notice(DispatchNotice("d-ahead", start, end, -2.0, ramp_s=60))  # a repeat
        assert (await _controls(c, edev)).all == 2

        await der.apply(DeviceCommand(device_id="bat-a", power_kw=None))  # d-now ends
        left = {x.mrid: x.event_status for x in (await _controls(c, edev)).items}[ahead.mrid]
        assert left is not None
        assert left.current_status == 0  # the release left it scheduled

        now[0] = start.timestamp()
        ahead_id = (LimitSource(command_id="d-ahead", kind="dispatch"),)
        await der.apply(DeviceCommand(device_id="bat-a", power_kw=-3, provenance=ahead_id))
        listed = await _controls(c, edev)
        current = [x for x in listed.items if x.event_status and x.event_status.current_status == 1]
        (confirmed,) = current
        assert confirmed.mrid != ahead.mrid  # a different setpoint supersedes it
        assert confirmed.interval.start + confirmed.interval.duration == int(end.timestamp())

        der.notice(DispatchNotice("d-ahead", start, end, 0.0, withdrawn=True))
        listed = await _controls(c, edev)
        assert all(
            x.event_status is not None and x.event_status.current_status != 1 for x in listed.items
        )
    finally:
        await server.stop()


async def test_a_groups_dispatch_goes_into_that_groups_program(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    """A dispatch (or an envelope) for substation S1 (primacy 20) is a control in S1's program,
    not in the device's primary program (feeder F1, primacy 10): the client weighs it at S1's
    primacy."""
    c = client(fleet, session)
    edev = fleet.server.edev_href("bat-a")
    now = datetime.now(UTC)
    window = (now, now + timedelta(seconds=600))
    fleet.a.notice(DispatchNotice("d-s1", *window, -2.0, group_id="substation:s1"))
    provenance = (LimitSource(command_id="d-s1", kind="dispatch"),)
    await fleet.a.apply(DeviceCommand(device_id="bat-a", power_kw=-2, provenance=provenance))
    programs = await c.get_as(DERProgramList, f"{edev}/derp?l=10")
    by_primacy = {p.primacy: p for p in programs.items}
    for primacy, expected in ((10, 0), (20, 1)):
        link = by_primacy[primacy].der_control_list_link
        assert link is not None
        listed = await c.get_as(DERControlList, link.href + "?l=10")
        assert listed.all == expected, primacy
    # A command without a known group still goes into the primary program.
    await fleet.a.apply(DeviceCommand(device_id="bat-a", power_kw=-1))
    assert (await _controls(c, edev)).all == 1
    # An envelope's limits go into the program of the group it addresses, too.
    fleet.a.notice(
        DispatchNotice("env-s1", *window, 0.0, group_id="substation:s1", kind="envelope")
    )
    limits = (LimitSource(command_id="env-s1", kind="envelope"),)
    await fleet.a.apply(
        DeviceCommand(device_id="bat-a", power_kw=None, export_limit_kw=2.0, provenance=limits)
    )
    link = by_primacy[20].der_control_list_link
    assert link is not None
    listed = await c.get_as(DERControlList, link.href + "?l=10")
    assert listed.all == 2
    newest = listed.items[0]
    assert newest.der_control_base.op_mod_gen_lim_w is not None
    assert to_watts(newest.der_control_base.op_mod_gen_lim_w) == 2000


async def test_fixed_w_from_capability_and_superseding(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    c = client(fleet, session, LFDI_B)
    edev = fleet.server.edev_href("bat-b")
    # B's capability is envoy's captured device: rtgMaxW 5000 W, no opModTargetW in modes.
    status, _, _ = await c.request("PUT", f"{edev}/der/1/dercap", load("req-der-capability.xml"))
    assert status == 204
    await fleet.b.apply(DeviceCommand(device_id="bat-b", power_kw=-3))
    await fleet.b.apply(DeviceCommand(device_id="bat-b", power_kw=2))
    listed = await _controls(c, edev)
    assert listed.all == 2
    newest, older = listed.items  # same start second: the newer one is listed first
    assert newest.der_control_base.op_mod_fixed_w == -4000  # charge 2 kW = -40.00 % of 5 kW
    assert newest.der_control_base.op_mod_load_lim_w is not None
    assert to_watts(newest.der_control_base.op_mod_load_lim_w) == 2000
    assert older.der_control_base.op_mod_fixed_w == 6000  # export 3 kW = 60.00 %
    assert newest.event_status is not None
    assert newest.event_status.current_status == 1
    assert older.event_status is not None
    assert older.event_status.current_status == 4


async def test_paging_of_control_list(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    c = client(fleet, session)
    edev = fleet.server.edev_href("bat-a")
    for kw in (1, 2, 3, 4, 5):
        await fleet.a.apply(DeviceCommand(device_id="bat-a", power_kw=kw))
    everything = await _controls(c, edev)
    assert (everything.all, everything.results) == (5, 5)
    default = await _controls(c, edev, "")
    assert (default.all, default.results) == (5, 1)  # 2030.5's default limit is 1
    assert default.items[0] == everything.items[0]
    page2 = await _controls(c, edev, "?s=2&l=2")
    assert (page2.all, page2.results) == (5, 2)
    assert page2.items == everything.items[2:4]
    last = await _controls(c, edev, "?s=4&l=3")
    assert last.results == 1
    past = await _controls(c, edev, "?s=50&l=3")
    assert (past.all, past.results, past.items) == (5, 0, ())
    assert past.href is not None
    assert past.href.endswith("/derc")
    after = await _controls(c, edev, f"?a={everything.items[0].interval.start + 3600}&l=9")
    assert after.all == 0
    programs = await c.get_as(DERProgramList, f"{edev}/derp?l=10")
    link = programs.items[0].der_control_list_link
    assert link is not None
    await c.error("GET", link.href + "?s=abc", 400)
    await c.error("GET", link.href + "?l=-1", 400)
    await c.error("GET", link.href + "/99999", 404)


# --------------------------------------------------------------------------- telemetry & DER state


async def test_mirror_usage_points_and_der_resources(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    c = client(fleet, session)
    edev = fleet.server.edev_href("bat-a")
    await c.error("GET", f"{edev}/der/1/ders", 404)  # before any PUT, as envoy
    for kind, name in (
        ("ders", "req-der-status.xml"),
        ("dercap", "req-der-capability.xml"),
        ("derg", "req-der-settings.xml"),
        ("dera", "req-der-availability.xml"),
    ):
        status, _, _ = await c.request("PUT", f"{edev}/der/1/{kind}", load(name))
        assert status == 204, kind
    der_status = await c.get_as(DERStatus, f"{edev}/der/1/ders")
    assert der_status.state_of_charge_status is not None
    assert der_status.state_of_charge_status.value == 6550

    status, headers, _ = await c.request("POST", "/mup", load("req-mup-der.xml"))
    assert status == 201
    der_mup = headers["Location"]
    status, headers, _ = await c.request("POST", "/mup", load("req-mup-der.xml"))
    assert (status, headers["Location"]) == (204, der_mup)  # a re-POST finds the same MUP
    status, headers, _ = await c.request("POST", "/mup", load("req-mup-site.xml"))
    assert status == 201
    site_mup = headers["Location"]
    mup = await c.get_as(MirrorUsagePoint, der_mup)
    assert mup.post_rate == 60
    assert len(mup.mirror_meter_readings) == 2
    assert all(m.reading is None for m in mup.mirror_meter_readings)  # readings aren't served
    assert (await c.get_as(MirrorUsagePointList, "/mup?l=10")).all == 2

    status, _, _ = await c.request("POST", site_mup, load("req-mmr.xml"))
    assert status == 201
    status, _, _ = await c.request("POST", site_mup, load("req-mmr-list.xml"))
    assert status == 201
    # Without all/results (required by the schema; envoy and we accept it): an upload pages
    # through nothing.
    bare = load("req-mmr-list.xml").replace(b' all="4" results="4"', b"", 1)
    assert b"results=" not in bare.split(b">", 1)[0]
    status, _, _ = await c.request("POST", site_mup, bare)
    assert status == 201
    message = await c.error("POST", site_mup, 400, load("req-rejected-mmr-unknown-mrid.xml"))
    assert "never declared" in message

    snap = fleet.server.snapshot("bat-a")
    assert snap.der_power is not None
    assert snap.der_power.watts == 4210
    assert snap.site_power is not None
    assert snap.status is not None
    assert snap.capability is not None
    assert snap.settings is not None
    assert snap.availability is not None
    state = await fleet.a.read()
    assert state.power_kw == pytest.approx(4.21)  # flowDirection 1: + is import (charging)
    assert state.soc_pct == pytest.approx(65.5)
    assert state.max_charge_kw == 5
    assert state.max_discharge_kw == 5
    assert state.capacity_kwh == pytest.approx(13.5)


async def test_responses_are_recorded(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    c = client(fleet, session)
    edev = fleet.server.edev_href("bat-a")
    provenance = (LimitSource(command_id="env-1", kind="envelope"),)
    await fleet.a.apply(DeviceCommand(device_id="bat-a", power_kw=-1.5, provenance=provenance))
    control = (await _controls(c, edev)).items[0]
    assert control.reply_to is not None
    body = load("req-derc-response-started.xml").replace(
        b"30000000000000000000000600000000", control.mrid.encode()
    )
    status, headers, _ = await c.request("POST", control.reply_to, body)
    assert status == 201
    assert headers["Location"].startswith(control.reply_to + "/")
    [record] = fleet.recorded
    assert record == fleet.server.responses("bat-a")[0] == fleet.a.responses()[0]
    assert (record.status, record.status_name) == (2, "started")
    assert record.control_mrid == control.mrid
    assert record.power_kw == -1.5
    assert record.provenance == provenance
    listed = await c.get_as(ResponseList, control.reply_to + "?l=10")
    assert listed.all == 1
    assert listed.items[0].subject == control.mrid

    # Rejected: another device's LFDI, or a subject that is no control of this device.
    await c.error(
        "POST", control.reply_to, 400, load("req-rejected-derc-response-foreign-lfdi.xml")
    )
    await c.error(
        "POST", control.reply_to, 400, load("req-rejected-derc-response-unknown-subject.xml")
    )
    # B cannot answer for A's controls.
    await client(fleet, session, LFDI_B).error("POST", control.reply_to, 403, body)
    assert len(fleet.recorded) == 1


async def test_connection_point_as_envoy_serves_it(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    """CSIP-AUS: the EndDevice links its ConnectionPoint; before any PUT it is served with an
    empty id; a PUT (the current or the CSIP-AUS 1.1 element) answers 201 with its Location."""
    c = client(fleet, session)
    edev = await c.get_as(EndDevice, fleet.server.edev_href("bat-a"))
    assert edev.connection_point_link is not None
    cp = edev.connection_point_link.href
    assert (await c.get_as(ConnectionPoint, cp)).connection_point_id == ""
    for fixture, nmi in (
        ("req-connection-point-legacy-id.xml", "2001234560"),
        ("req-connection-point.xml", "2001234567"),
    ):
        status, headers, _ = await c.request("PUT", cp, load(fixture))
        assert (status, headers["Location"]) == (201, cp)
        assert (await c.get_as(ConnectionPoint, cp)).connection_point_id == nmi
    assert fleet.server.snapshot("bat-a").connection_point_id == "2001234567"
    # B cannot read or set A's.
    await client(fleet, session, LFDI_B).error("GET", cp, 403)


async def test_registration_post(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    c = client(fleet, session)
    status, headers, _ = await c.request("POST", "/edev", load("req-edev-registration.xml"))
    assert (status, headers["Location"]) == (201, fleet.server.edev_href("bat-a"))
    # A repeat (envoy: 409) gets the EndDevice it already has.
    again = load("req-rejected-edev-registration-again.xml")
    status, headers, _ = await c.request("POST", "/edev", again)
    assert (status, headers["Location"]) == (201, fleet.server.edev_href("bat-a"))
    await c.error("POST", "/edev", 403, load("req-rejected-edev-foreign-identity.xml"))
    await c.error("POST", "/edev", 400, load("req-rejected-edev-malformed.xml"))


# --------------------------------------------------------------------------- bad input

XXE = (
    b'<?xml version="1.0"?><!DOCTYPE DERStatus [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b'<DERStatus xmlns="urn:ieee:std:2030.5:ns"><readingTime>&x;</readingTime></DERStatus>'
)
LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'.encode()
        for i in range(1, 10)
    )
    + b']><DERStatus xmlns="urn:ieee:std:2030.5:ns"><readingTime>&lol9;</readingTime></DERStatus>'
)


async def test_bad_input_is_refused_and_changes_nothing(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    c = client(fleet, session)
    edev = fleet.server.edev_href("bat-a")
    ders = f"{edev}/der/1/ders"
    good = load("req-der-status.xml")
    assert "forbidden XML construct" in await c.error("PUT", ders, 400, XXE)
    assert "forbidden XML construct" in await c.error("PUT", ders, 400, LAUGHS)
    await c.error("PUT", ders, 413, good + b" " * (fleet.server.config.max_body_bytes + 1))
    await c.error("PUT", ders, 415, good, {"Content-Type": "application/xml"})
    await c.error("PUT", ders, 415, good, {"Content-Type": "text/plain; charset=utf-8"})
    wrong_ns = good.replace(b"urn:ieee:std:2030.5:ns", b"urn:example:not-sep")
    assert "namespace" in await c.error("PUT", ders, 400, wrong_ns)
    assert "unexpected element" in await c.error("PUT", ders, 400, load("req-der-settings.xml"))
    await c.error("PUT", ders, 400, b"")
    await c.error("PUT", ders, 400, b"\xff\xfe<not utf-8")
    await c.error("PUT", ders, 400, load("req-rejected-edev-malformed.xml"))
    await c.error("GET", ders, 404)  # nothing was stored by any of those
    assert fleet.server.snapshot("bat-a").status is None

    # a media type with parameters is still the media type
    status, _, _ = await c.request(
        "PUT", ders, good, {"Content-Type": "application/sep+xml; level=-S1"}
    )
    assert status == 204

    await c.error("GET", "/nonexistent", 404)
    await c.error("GET", f"{edev}/derp/abc", 404)
    await c.error("GET", f"{edev}/der/2", 404)
    status, headers, body = await c.request("DELETE", "/dcap")
    assert status == 405
    assert "GET" in headers["Allow"]
    assert headers["Content-Type"] == MEDIA_TYPE
    assert decode_as(Error, body).reason_code == 0
    await c.error("PUT", "/edev", 405, good)

    # no identity at all, or a malformed one
    await client(fleet, session, None).error("GET", edev, 403)
    await client(fleet, session, "not-an-lfdi").error("GET", "/dcap", 400)


async def test_oversize_body_without_content_length(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    """A chunked body has no Content-Length: aiohttp's client_max_size still stops it."""
    c = client(fleet, session)
    ders = f"{fleet.server.edev_href('bat-a')}/der/1/ders"
    size = fleet.server.config.max_body_bytes * 2

    async def chunks() -> AsyncIterator[bytes]:
        yield load("req-der-status.xml")
        for _ in range(size // 4096):
            yield b" " * 4096

    async with session.put(
        fleet.server.url + ders, data=chunks(), headers={**c.headers, **SEP}
    ) as resp:
        assert resp.status == 413
        assert resp.headers["Content-Type"] == MEDIA_TYPE
    assert fleet.server.snapshot("bat-a").status is None


# --------------------------------------------------------------------------- mutual TLS


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    device_cert: Path
    device_key: Path
    rogue_cert: Path
    rogue_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder)
    server = make_cert(ca, folder, "gateway", server=True)
    device = make_cert(ca, folder, "device-1")
    rogue_ca = make_ca(folder / "rogue", "rogue-ca")
    rogue = make_cert(rogue_ca, folder / "rogue", "device-1")
    return Pki(
        ca.cert_path,
        server.cert_path,
        server.key_path,
        device.cert_path,
        device.key_path,
        rogue.cert_path,
        rogue.key_path,
    )


async def test_mutual_tls(pki: Pki) -> None:
    tls = Sep2TlsConfig(cert_file=pki.server_cert, key_file=pki.server_key, ca_file=pki.ca)
    server = Sep2Server(_config(dev_lfdi_header=None, tls=tls))
    lfdi, sfdi = describe(pki.device_cert)
    adapter = Sep2Der(
        "tls-dev", Sep2DerEndpoint(lfdi=lfdi.lower(), supports_target_w=True), server=server
    )
    await adapter.connect()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        ctx = client_ssl_context(pki.device_cert, pki.device_key, pki.ca)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            async with s.get(server.url + "/edev?l=10") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == MEDIA_TYPE
                edevs = decode_as(EndDeviceList, await resp.read())
            assert edevs.items[0].lfdi == lfdi
            assert edevs.items[0].sfdi == sfdi
            # The header that plain-HTTP development uses means nothing over TLS.
            async with s.get(server.url + "/edev?l=10", headers={HEADER: LFDI_A}) as resp:
                assert decode_as(EndDeviceList, await resp.read()).items[0].lfdi == lfdi
            await adapter.apply(DeviceCommand(device_id="tls-dev", power_kw=-3))
            href = server.edev_href("tls-dev")
            async with s.get(f"{server.url}{href}/derp?l=5") as resp:
                program = decode_as(DERProgramList, await resp.read()).items[0]
            assert program.der_control_list_link is not None
            async with s.get(server.url + program.der_control_list_link.href) as resp:
                control = decode_as(DERControlList, await resp.read()).items[0]
            target = control.der_control_base.op_mod_target_w
            assert target is not None
            assert to_watts(target) == 3000

        # What was negotiated: 2030.5's one suite, on TLS 1.2.
        _, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx)
        cipher = writer.get_extra_info("cipher")
        assert cipher[:2] == ("ECDHE-ECDSA-AES128-CCM8", "TLSv1.2")
        writer.close()

        # A certificate from another CA is refused in the handshake; so is no certificate.
        rogue = client_ssl_context(pki.rogue_cert, pki.rogue_key, pki.ca)
        anonymous = ssl.create_default_context(cafile=str(pki.ca))
        for ctx in (rogue, anonymous):
            with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                async with (
                    aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
                    s.get(server.url + "/dcap") as resp,
                ):
                    await resp.read()

        # A plain-HTTP request to the TLS port gets nowhere either.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /dcap HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(1024), 5)
        assert b"DeviceCapability" not in data
        writer.close()
    finally:
        await server.stop()


def test_config_requires_an_identity_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be identified"):
        Sep2ServerConfig()
    tls = Sep2TlsConfig(cert_file=tmp_path, key_file=tmp_path, ca_file=tmp_path)
    with pytest.raises(ValueError, match="plain HTTP only"):
        Sep2ServerConfig(tls=tls, dev_lfdi_header=HEADER)
    with pytest.raises(ValueError, match="appears twice"):
        _config(
            programs=(
                Sep2ProgramConfig(group_id="g", primacy=1),
                Sep2ProgramConfig(group_id="g", primacy=2),
            )
        )


def test_certificate_identity(tmp_path: Path, pki: Pki) -> None:
    # envoy computed these for its capture's device A from the same certificate
    fixture = tmp_path / "client-cert.pem"
    fixture.write_bytes(load("client-cert.pem"))
    assert describe(fixture) == (LFDI_A, 646847986525)
    ca = make_ca(tmp_path / "ca")
    issued = make_cert(ca, tmp_path / "ca", "dev-7")
    assert describe(issued.cert_path) == (issued.lfdi, issued.sfdi)
    assert describe_text(issued.cert_path) == f"LFDI: {issued.lfdi}\nSFDI: {issued.sfdi}"
    assert issued.key_path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="certificate name"):
        make_cert(ca, tmp_path, "../escape")


async def test_enrollment_rejects_duplicates(tmp_path: Path) -> None:
    server = Sep2Server(_config())
    Sep2Der("one", Sep2DerEndpoint(lfdi=LFDI_A), server=server)
    with pytest.raises(ValueError, match="already"):
        Sep2Der("two", Sep2DerEndpoint(lfdi=LFDI_A.lower()), server=server)
    with pytest.raises(ValueError, match="already enrolled"):
        Sep2Der("one", Sep2DerEndpoint(lfdi=LFDI_B), server=server)


async def test_port_in_use_is_an_adapter_error(fleet: Fleet) -> None:
    other = Sep2Server(_config(port=fleet.server.port))
    adapter = Sep2Der("late", Sep2DerEndpoint(lfdi=LFDI_STRANGER), server=other)
    with pytest.raises(DeviceUnavailable, match="cannot start"):
        await adapter.connect()


async def test_internal_errors_answer_in_2030_5_form(
    fleet: Fleet, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_request: object) -> object:
        raise RuntimeError("bug")

    monkeypatch.setattr(fleet.server, "_paging", broken)
    c = client(fleet, session)
    assert await c.error("GET", "/edev", 500) == "internal server error"
    assert isinstance(await c.get("/dcap"), DeviceCapability)  # still serving


async def test_a_client_polling_far_too_fast_gets_429_and_others_are_still_served(
    session: aiohttp.ClientSession,
) -> None:
    server = Sep2Server(_config(requests_per_client_per_s=0.5, requests_per_client_burst=5))
    told: list[tuple[str, str, str]] = []
    server.on_refused = lambda *refusal: told.append(refusal)
    der = Sep2Der("bat-a", Sep2DerEndpoint(lfdi=LFDI_A), server=server, groups=("feeder:f1",))
    await der.connect()
    try:
        fast = Client(session, server.url, LFDI_A)
        other = Client(session, server.url, LFDI_B)
        statuses = [(await fast.request("GET", "/dcap"))[0] for _ in range(8)]
        assert statuses == [200] * 5 + [429] * 3
        message = await fast.error("GET", "/dcap", 429)
        assert "too many requests" in message
        _, headers, _ = await fast.request("GET", "/tm")
        assert headers["Retry-After"] == "2"
        # Another client has its own quota: served while the first is held back.
        assert (await other.request("GET", "/dcap"))[0] == 200
        assert server.quotas.refused == {LFDI_A: 5}
        assert told[0] == (f"sep2:{LFDI_A}", "rate_limited", "GET /dcap")
        assert len(told) == 5
        # Out of scope is told too: B asking for A's EndDevice.
        told.clear()
        await other.error("GET", "/edev/1", 403)
        assert [(s, r) for s, r, _ in told] == [(f"sep2:{LFDI_B}", "forbidden")]
    finally:
        await server.stop()
