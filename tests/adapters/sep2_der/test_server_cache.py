"""The 2030.5 server's cache of encoded GET responses, over real HTTP on loopback.

Every test first shows the cache is in use (a repeated GET is a hit) and then that a change of
state, or of the clock, shows on the very next GET: a cache that served the earlier bytes fails.
The server's clock is a settable integer so time moves only when a test moves it.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from adapters.sep2_der.der import Sep2Der, Sep2DerEndpoint
from adapters.sep2_der.server import Sep2ProgramConfig, Sep2Server, Sep2ServerConfig
from protocols.sep2 import (
    MEDIA_TYPE,
    DERControl,
    DERControlList,
    DERProgram,
    DERProgramList,
    DERStatus,
    DeviceCapability,
    EndDevice,
    EndDeviceList,
    MirrorUsagePoint,
    MirrorUsagePointList,
    ResponseList,
    Sep2Model,
    SubscriptionList,
    Time,
    decode_as,
)
from tests.protocols.sep2.envoy_fixtures import load
from unified.model import DeviceCommand

LFDI_A = "F0F83B2BC825E617DEBD7192F9305B4B6ABC00F5"  # envoy capture's device A
LFDI_B = "86441F107B66EBFE65B39FB3D5D7BAAEDA3EA6BF"
LFDI_STRANGER = "0123456789ABCDEF0123456789ABCDEF01234567"
HEADER = "X-LFDI"
SEP = {"Content-Type": MEDIA_TYPE}
M = TypeVar("M", bound=Sep2Model)
T0 = 1_800_000_000
DURATION = 60


@dataclass
class Env:
    server: Sep2Server
    a: Sep2Der
    b: Sep2Der
    session: aiohttp.ClientSession
    now: list[int]

    def edev(self, device: str = "bat-a") -> str:
        return self.server.edev_href(device)

    async def request(
        self,
        method: str,
        href: str,
        body: bytes | None = None,
        *,
        lfdi: str = LFDI_A,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        merged = {HEADER: lfdi, **(SEP if body is not None else {}), **(headers or {})}
        async with self.session.request(
            method, self.server.url + href, data=body, headers=merged
        ) as resp:
            return resp.status, resp.headers, await resp.read()

    async def body(self, href: str, *, lfdi: str = LFDI_A) -> bytes:
        status, headers, body = await self.request("GET", href, lfdi=lfdi)
        assert status == 200, (href, status, body)
        assert headers["Content-Type"] == MEDIA_TYPE
        return body

    async def get(self, cls: type[M], href: str, *, lfdi: str = LFDI_A) -> M:
        return decode_as(cls, await self.body(href, lfdi=lfdi))

    async def derc(self, device: str = "bat-a", *, lfdi: str = LFDI_A) -> str:
        """The control list of the device's first program (where its setpoint goes)."""
        programs = await self.get(DERProgramList, self.edev(device) + "/derp?l=10", lfdi=lfdi)
        link = programs.items[0].der_control_list_link
        assert link is not None
        return link.href

    def hits(self) -> int:
        return self.server.cache_info().hits


async def _env(session: aiohttp.ClientSession, **overrides: object) -> Env:
    now = [T0]
    config = Sep2ServerConfig.model_validate(
        {
            "port": 0,
            "dev_lfdi_header": HEADER,
            "programs": (Sep2ProgramConfig(group_id="feeder:f1", primacy=10),),
            **overrides,
        }
    )
    server = Sep2Server(config, clock=lambda: float(now[0]))
    a = Sep2Der(
        "bat-a",
        Sep2DerEndpoint(lfdi=LFDI_A, supports_target_w=True, control_duration_s=DURATION),
        server=server,
        groups=("feeder:f1",),
    )
    b = Sep2Der(
        "bat-b",
        Sep2DerEndpoint(lfdi=LFDI_B, supports_target_w=True, control_duration_s=DURATION),
        server=server,
        groups=("feeder:f1",),  # the same program: only the client tells their documents apart
    )
    await a.connect()
    return Env(server, a, b, session, now)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


@pytest.fixture
async def env(session: aiohttp.ClientSession) -> AsyncIterator[Env]:
    setup = await _env(session)
    try:
        yield setup
    finally:
        await setup.server.stop()


async def _apply(env: Env, kw: float | None, device: str = "bat-a") -> None:
    adapter = env.a if device == "bat-a" else env.b
    await adapter.apply(DeviceCommand(device_id=device, power_kw=kw))


def _status(control: DERControl) -> int:
    assert control.event_status is not None
    return control.event_status.current_status


# --------------------------------------------------------------------------- served from cache


async def test_repeated_get_is_a_hit_with_an_etag(env: Env) -> None:
    await _apply(env, -2)
    href = await env.derc()
    status, first_headers, first = await env.request("GET", href)
    assert status == 200
    hits = env.hits()
    status, headers, again = await env.request("GET", href)
    assert (status, again) == (200, first)
    assert env.hits() == hits + 1
    etag = headers["ETag"]
    assert etag == first_headers["ETag"]
    assert etag.startswith('"')

    for condition in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        status, headers, body = await env.request("GET", href, headers={"If-None-Match": condition})
        assert (status, body, headers["ETag"]) == (304, b"", etag), condition
    status, _, body = await env.request("GET", href, headers={"If-None-Match": '"other"'})
    assert (status, body) == (200, first)


async def test_time_is_never_cached(env: Env) -> None:
    assert (await env.get(Time, "/tm")).current_time == T0
    assert (await env.get(Time, "/tm")).current_time == T0
    env.now[0] += 1
    assert (await env.get(Time, "/tm")).current_time == T0 + 1


# --------------------------------------------------------------------------- state changes


async def test_new_superseding_and_cancelled_controls_show_on_the_next_get(env: Env) -> None:
    await _apply(env, -2)
    href = await env.derc()
    program_href = href.rsplit("/", 1)[0]
    listed = await env.get(DERControlList, href + "?l=10")
    [first] = listed.items
    assert _status(first) == 1
    _, headers, _ = await env.request("GET", href + "?l=10")
    old_etag = headers["ETag"]
    program = await env.get(DERProgram, program_href)
    assert program.active_der_control_list_link is not None
    assert program.active_der_control_list_link.all == 1
    hits = env.hits()
    assert await env.get(DERControlList, href + "?l=10") == listed
    assert env.hits() == hits + 1

    await _apply(env, -3)  # a new control supersedes the first one
    listed = await env.get(DERControlList, href + "?l=10")
    assert [(c.mrid, _status(c)) for c in listed.items][1] == (first.mrid, 4)
    second = listed.items[0]
    assert _status(second) == 1
    status, _, _ = await env.request("GET", href + "?l=10", headers={"If-None-Match": old_etag})
    assert status == 200  # the old tag no longer matches

    assert second.href is not None
    assert _status(await env.get(DERControl, second.href)) == 1
    await _apply(env, None)  # cancelled: marked, not deleted
    assert _status(await env.get(DERControl, second.href)) == 2
    listed = await env.get(DERControlList, href + "?l=10")
    assert [_status(c) for c in listed.items] == [2, 4]
    assert (await env.get(DERControlList, program_href + "/actderc?l=10")).all == 0
    program = await env.get(DERProgram, program_href)
    assert program.active_der_control_list_link is not None
    assert program.active_der_control_list_link.all == 0
    programs = await env.get(DERProgramList, env.edev() + "/derp?l=10")
    assert programs.items[0] == program


async def test_the_clients_own_changes_show_on_the_next_get(env: Env) -> None:
    edev = env.edev()
    for _ in range(2):  # the second round is served from the cache
        assert (await env.get(DeviceCapability, "/dcap")).mirror_usage_point_list_link
        device = await env.get(EndDevice, edev)
        assert device.subscription_list_link is not None
        assert device.subscription_list_link.all == 0
        assert (await env.get(SubscriptionList, edev + "/sub?l=5")).all == 0
        assert (await env.get(MirrorUsagePointList, "/mup?l=5")).all == 0
    hits = env.hits()

    # Subscriptions: the EndDevice counts them, the list holds them.
    program_href = (await env.derc()).rsplit("/", 1)[0]
    subscription = (
        '<Subscription xmlns="urn:ieee:std:2030.5:ns">'
        f"<subscribedResource>{program_href}/dderc</subscribedResource><encoding>0</encoding>"
        "<level>+S1</level><limit>1</limit>"
        "<notificationURI>http://127.0.0.1:9/ntfy</notificationURI></Subscription>"
    ).encode()
    status, headers, _ = await env.request("POST", edev + "/sub", subscription)
    assert status == 201
    device = await env.get(EndDevice, edev)
    assert device.subscription_list_link is not None
    assert device.subscription_list_link.all == 1
    assert (await env.get(SubscriptionList, edev + "/sub?l=5")).all == 1
    status, _, _ = await env.request("DELETE", headers["Location"])
    assert status == 204
    assert (await env.get(SubscriptionList, edev + "/sub?l=5")).all == 0

    # MirrorUsagePoints: DeviceCapability counts them, /mup lists them, a new reading type shows.
    status, headers, _ = await env.request("POST", "/mup", load("req-mup-der.xml"))
    assert status == 201
    dcap = await env.get(DeviceCapability, "/dcap")
    assert dcap.mirror_usage_point_list_link is not None
    assert dcap.mirror_usage_point_list_link.all == 1
    assert (await env.get(MirrorUsagePointList, "/mup?l=5")).all == 1
    mup = headers["Location"]
    before = await env.get(MirrorUsagePoint, mup)
    assert env.hits() == hits  # nothing above could be answered from the cache
    reading = load("req-mmr.xml").replace(b"719210000001", b"719220000001")  # a declared mRID
    status, _, _ = await env.request("POST", mup, reading)
    assert status == 201
    assert await env.get(MirrorUsagePoint, mup) == before
    assert env.hits() == hits + 1  # a reading alone changes no document
    new_type = (
        b'<MirrorMeterReading xmlns="urn:ieee:std:2030.5:ns">'
        b"<mRID>F0F83B2BC825E617DEBD719220000009</mRID>"
        b"<ReadingType><kind>37</kind><uom>29</uom></ReadingType></MirrorMeterReading>"
    )
    status, _, _ = await env.request("POST", mup, new_type)
    assert status == 201
    after = await env.get(MirrorUsagePoint, mup)
    assert len(after.mirror_meter_readings) == len(before.mirror_meter_readings) + 1

    # DER status, PUT again with new content.
    ders = edev + "/der/1/ders"
    status, _, _ = await env.request("PUT", ders, load("req-der-status.xml"))
    assert status == 204
    assert (await env.get(DERStatus, ders)).reading_time == 1795822068
    changed = load("req-der-status.xml").replace(b"1795822068", b"1795822999")
    status, _, _ = await env.request("PUT", ders, changed)
    assert status == 204
    assert (await env.get(DERStatus, ders)).reading_time == 1795822999

    # Responses to a control.
    await _apply(env, -2)
    [control] = (await env.get(DERControlList, await env.derc() + "?l=5")).items
    assert control.reply_to is not None
    assert (await env.get(ResponseList, control.reply_to + "?l=5")).all == 0
    response = load("req-derc-response-started.xml").replace(
        b"30000000000000000000000600000000", control.mrid.encode()
    )
    status, _, _ = await env.request("POST", control.reply_to, response)
    assert status == 201
    assert (await env.get(ResponseList, control.reply_to + "?l=5")).all == 1


# --------------------------------------------------------------------------- time


async def test_a_scheduled_control_turns_active_on_time(env: Env) -> None:
    await _apply(env, -2)  # starts at T0
    href = await env.derc()
    program_href = href.rsplit("/", 1)[0]
    [control] = (await env.get(DERControlList, href + "?l=5")).items
    assert _status(control) == 1
    env.now[0] = T0 - 5  # the clock stepped back: the control is scheduled again
    hits = 0
    for now in (T0 - 5, T0 - 1):  # the second round comes from the cache
        env.now[0] = now
        hits = env.hits()
        [control] = (await env.get(DERControlList, href + "?l=5")).items
        assert _status(control) == 0
        assert (await env.get(DERControlList, program_href + "/actderc?l=5")).all == 0
        program = await env.get(DERProgram, program_href)
        assert program.active_der_control_list_link is not None
        assert program.active_der_control_list_link.all == 0
    assert env.hits() == hits + 3

    env.now[0] = T0
    [control] = (await env.get(DERControlList, href + "?l=5")).items
    assert _status(control) == 1
    assert (await env.get(DERControlList, program_href + "/actderc?l=5")).all == 1
    program = await env.get(DERProgram, program_href)
    assert program.active_der_control_list_link is not None
    assert program.active_der_control_list_link.all == 1
    assert control.href is not None
    assert _status(await env.get(DERControl, control.href)) == 1


async def test_a_control_leaves_the_lists_when_it_ends(env: Env) -> None:
    await _apply(env, -2)
    href = await env.derc()
    env.now[0] = T0 + DURATION - 1
    assert (await env.get(DERControlList, href + "?l=5")).all == 1
    hits = env.hits()
    assert (await env.get(DERControlList, href + "?l=5")).all == 1
    assert env.hits() == hits + 1
    env.now[0] = T0 + DURATION
    assert (await env.get(DERControlList, href + "?l=5")).all == 0
    program = await env.get(DERProgram, href.rsplit("/", 1)[0])
    assert program.der_control_list_link is not None
    assert program.der_control_list_link.all == 0


# --------------------------------------------------------------------------- keys


async def test_clients_never_see_each_others_documents(env: Env) -> None:
    await env.b.connect()
    # Before anything changes: per-client documents on the same path, from a cache A filled.
    for lfdi, expected in ((LFDI_A, [LFDI_A]), (LFDI_B, [LFDI_B]), (LFDI_STRANGER, [])):
        edevs = await env.get(EndDeviceList, "/edev?l=5", lfdi=lfdi)
        assert [e.lfdi for e in edevs.items] == expected
    await _apply(env, -2)
    await _apply(env, -4, "bat-b")
    status, _, _ = await env.request("POST", "/mup", load("req-mup-der.xml"))
    assert status == 201
    href_a = await env.derc()
    edev_a, edev_b = env.edev("bat-a"), env.edev("bat-b")
    for _ in range(2):  # A fills the cache, then reads from it
        dcap = await env.get(DeviceCapability, "/dcap")
        assert dcap.mirror_usage_point_list_link is not None
        assert dcap.mirror_usage_point_list_link.all == 1
        assert [e.href for e in (await env.get(EndDeviceList, "/edev?l=5")).items] == [edev_a]
        assert (await env.get(MirrorUsagePointList, "/mup?l=5")).all == 1
        [control_a] = (await env.get(DERControlList, href_a + "?l=5")).items
    hits = env.hits()

    dcap = await env.get(DeviceCapability, "/dcap", lfdi=LFDI_B)
    assert dcap.mirror_usage_point_list_link is not None
    assert dcap.mirror_usage_point_list_link.all == 0
    edevs = await env.get(EndDeviceList, "/edev?l=5", lfdi=LFDI_B)
    assert [e.lfdi for e in edevs.items] == [LFDI_B]
    assert (await env.get(MirrorUsagePointList, "/mup?l=5", lfdi=LFDI_B)).all == 0
    [control_b] = (
        await env.get(DERControlList, await env.derc("bat-b", lfdi=LFDI_B) + "?l=5", lfdi=LFDI_B)
    ).items
    assert control_b.mrid != control_a.mrid
    assert control_b.href is not None
    assert control_b.href.startswith(edev_b + "/")
    stranger = await env.get(DeviceCapability, "/dcap", lfdi=LFDI_STRANGER)
    assert stranger.end_device_list_link is not None
    assert (stranger.poll_rate, stranger.end_device_list_link.all) == (None, 0)
    assert env.hits() == hits  # none of those came from A's cached bytes

    # A's cached documents stay A's, even to a B that names their ETag.
    _, headers, _ = await env.request("GET", href_a + "?l=5")
    for path in (edev_a, href_a + "?l=5", control_a.href or ""):
        for extra in ({}, {"If-None-Match": headers["ETag"]}):
            status, _, _ = await env.request("GET", path, lfdi=LFDI_B, headers=extra)
            assert status == 403, path


async def test_paging_parameters_are_part_of_the_key(env: Env) -> None:
    await _apply(env, -2)
    env.now[0] += 10
    await _apply(env, -3)  # supersedes the first: both are listed
    href = await env.derc()
    queries = ("?s=0&l=1", "?s=1&l=1", "?l=10", f"?a={T0 + 5}&l=10", "")
    pages = {q: await env.get(DERControlList, href + q) for q in queries}
    hits = env.hits()
    assert {q: await env.get(DERControlList, href + q) for q in queries} == pages
    assert env.hits() == hits + len(queries)
    everything = pages["?l=10"]
    assert everything.all == 2
    assert len(everything.items) == 2
    assert pages["?s=0&l=1"].items == everything.items[:1]
    assert pages["?s=1&l=1"].items == everything.items[1:]
    assert pages[""].items == everything.items[:1]  # 2030.5 default l=1
    assert [c.interval.start for c in pages[f"?a={T0 + 5}&l=10"].items] == [T0 + 10]
    # The same page named differently is the same document.
    assert await env.body(href + "?l=1&s=0") == await env.body(href + "?s=0&l=1")


async def test_cache_is_bounded(session: aiohttp.ClientSession) -> None:
    env = await _env(session, response_cache_entries=3)
    try:
        await _apply(env, -2)
        href = await env.derc()
        paths = [f"{href}?s=0&l={n}" for n in range(1, 7)]
        bodies = [await env.body(p) for p in paths]
        info = env.server.cache_info()
        assert (info.entries, info.capacity) == (3, 3)
        hits = info.hits
        assert await env.body(paths[-1]) == bodies[-1]  # among the 3 most recent
        assert env.hits() == hits + 1
        assert await env.body(paths[0]) == bodies[0]  # evicted: built again
        assert env.hits() == hits + 1
        assert env.server.cache_info().entries == 3
    finally:
        await env.server.stop()

    env = await _env(session, response_cache_entries=0)
    try:
        await _apply(env, -2)
        href = await env.derc()
        first = await env.body(href + "?l=5")
        assert await env.body(href + "?l=5") == first
        info = env.server.cache_info()
        assert (info.hits, info.entries) == (0, 0)
    finally:
        await env.server.stop()


async def test_the_listen_backlog_is_configurable(session: aiohttp.ClientSession) -> None:
    """A fleet reconnecting at once after a restart must not overflow aiohttp's default 128."""
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to read a listening socket's backlog")
    setup = await _env(session, listen_backlog=777)
    try:
        ss = await asyncio.create_subprocess_exec(
            "ss", "-Hltn", f"sport = :{setup.server.port}", stdout=asyncio.subprocess.PIPE
        )
        stdout, _ = await asyncio.wait_for(ss.communicate(), 10)
        out = stdout.decode().split()
        assert out[0] == "LISTEN"
        assert int(out[2]) == 777  # Send-Q of a listening socket: its backlog
    finally:
        await setup.server.stop()
