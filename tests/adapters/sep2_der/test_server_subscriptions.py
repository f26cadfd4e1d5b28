"""2030.5 Subscriptions and Notifications: a real server, a real client, a real receiver.

The receiver is an aiohttp app on 127.0.0.1 standing in for a DER client's notification
listener; each test scripts its answers (200, 500, hanging) and reads what arrived.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from adapters.sep2_der.der import Sep2Der, Sep2DerEndpoint
from adapters.sep2_der.server import (
    Sep2DefaultEnvelope,
    Sep2ProgramConfig,
    Sep2Server,
    Sep2ServerConfig,
    Sep2TlsConfig,
)
from composition.certs import describe, make_ca, make_cert
from protocols.sep2 import (
    MEDIA_TYPE,
    DefaultDERControl,
    DERControlList,
    DERProgram,
    DERProgramList,
    DeviceCapability,
    EndDevice,
    EndDeviceList,
    Error,
    FunctionSetAssignmentsList,
    Notification,
    Subscription,
    SubscriptionList,
    decode_as,
    to_watts,
)
from protocols.tls import client_ssl_context, server_ssl_context
from unified.model import DeviceCommand

LFDI_A = "F0F83B2BC825E617DEBD7192F9305B4B6ABC00F5"
LFDI_B = "86441F107B66EBFE65B39FB3D5D7BAAEDA3EA6BF"
HEADER = "X-LFDI"
SEP = {"Content-Type": MEDIA_TYPE}


# --------------------------------------------------------------------------- receiver


@dataclass
class Receiver:
    """Records every POST; ``script`` gives the status of each successive answer (then 200)."""

    url: str = ""
    received: asyncio.Queue[tuple[dict[str, str], bytes]] = field(default_factory=asyncio.Queue)
    attempts: int = 0
    script: list[int] = field(default_factory=list)
    hang: asyncio.Event | None = None  # set: answers wait until released

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        if self.hang is not None:
            await self.hang.wait()
        status = self.script.pop(0) if self.script else 200
        if status < 300:
            await self.received.put((dict(request.headers), body))
        return web.Response(status=status)

    async def next(self, within: float = 5.0) -> Notification:
        headers, body = await asyncio.wait_for(self.received.get(), within)
        assert headers["Content-Type"] == MEDIA_TYPE
        return decode_as(Notification, body)

    async def nothing(self, seconds: float = 0.5) -> None:
        await asyncio.sleep(seconds)
        assert self.received.empty()


async def _serve(receiver: Receiver, ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    app = web.Application()
    app.router.add_post("/ntfy/{name}", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    receiver.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}/ntfy"
    return runner


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    runner = await _serve(rec)
    try:
        yield rec
    finally:
        if rec.hang is not None:
            rec.hang.set()
        await runner.cleanup()


# --------------------------------------------------------------------------- server and client


@dataclass
class Setup:
    server: Sep2Server
    a: Sep2Der
    b: Sep2Der
    session: aiohttp.ClientSession
    offset: list[float]  # seconds added to the server's clock

    def edev(self, device: str = "bat-a") -> str:
        return self.server.edev_href(device)

    async def request(
        self, method: str, href: str, body: bytes | None = None, lfdi: str = LFDI_A
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {HEADER: lfdi, **(SEP if body is not None else {})}
        async with self.session.request(
            method, self.server.url + href, data=body, headers=headers
        ) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    async def subscribe(
        self, resource: str, uri: str, *, lfdi: str = LFDI_A, limit: int = 10, encoding: int = 0
    ) -> tuple[int, dict[str, str], bytes]:
        return await self.request(
            "POST",
            self.edev("bat-a" if lfdi == LFDI_A else "bat-b") + "/sub",
            _subscription(resource, uri, limit=limit, encoding=encoding),
            lfdi,
        )

    async def derc(self, device: str = "bat-a", lfdi: str = LFDI_A) -> str:
        """The control list of the device's first program (where its setpoint goes)."""
        status, _, body = await self.request("GET", self.edev(device) + "/derp?l=10", lfdi=lfdi)
        assert status == 200
        link = decode_as(DERProgramList, body).items[0].der_control_list_link
        assert link is not None
        return link.href


def _subscription(resource: str, uri: str, *, limit: int = 10, encoding: int = 0) -> bytes:
    return (
        '<Subscription xmlns="urn:ieee:std:2030.5:ns">'
        f"<subscribedResource>{resource}</subscribedResource><encoding>{encoding}</encoding>"
        f"<level>+S1</level><limit>{limit}</limit>"
        f"<notificationURI>{uri}</notificationURI></Subscription>"
    ).encode()


def _config(**overrides: object) -> Sep2ServerConfig:
    base: dict[str, object] = {
        "port": 0,
        "dev_lfdi_header": HEADER,
        "programs": (Sep2ProgramConfig(group_id="feeder:f1", primacy=10),),
        "notification_backoff_s": 0.05,
        "notification_backoff_max_s": 0.2,
        "notification_timeout_s": 2.0,
    }
    base.update(overrides)
    return Sep2ServerConfig.model_validate(base)


async def _make_setup(session: aiohttp.ClientSession, **overrides: object) -> Setup:
    """A started server with two DERs, A and B, in separate feeders (the caller stops it)."""
    offset = [0.0]
    server = Sep2Server(_config(**overrides), clock=lambda: time.time() + offset[0])
    a = Sep2Der(
        "bat-a",
        Sep2DerEndpoint(lfdi=LFDI_A, supports_target_w=True, control_duration_s=60),
        server=server,
        groups=("feeder:f1",),
    )
    b = Sep2Der(
        "bat-b",
        Sep2DerEndpoint(lfdi=LFDI_B, supports_target_w=True),
        server=server,
        groups=("feeder:f2",),
    )
    await a.connect()
    return Setup(server, a, b, session, offset)


@pytest.fixture
async def env() -> AsyncIterator[Setup]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        setup = await _make_setup(session)
        try:
            yield setup
        finally:
            await setup.server.stop()


async def _setpoint(setup: Setup, kw: float | None) -> None:
    await setup.a.apply(DeviceCommand(device_id="bat-a", power_kw=kw))


# --------------------------------------------------------------------------- tests


async def test_subscribe_notify_release_unsubscribe(env: Setup, receiver: Receiver) -> None:
    status, _, body = await env.request("GET", env.edev())
    edev = decode_as(EndDevice, body)
    assert edev.subscription_list_link is not None
    assert edev.subscription_list_link.href == f"{env.edev()}/sub"
    assert edev.subscription_list_link.all == 0
    derc = await env.derc()
    status, _, body = await env.request("GET", derc + "?l=5")
    assert decode_as(DERControlList, body).subscribable == 1
    status, _, body = await env.request("GET", derc.replace("/derc", "/dderc"))
    assert decode_as(DefaultDERControl, body).subscribable == 1

    status, headers, _ = await env.subscribe(derc, receiver.url + "/derc", limit=5)
    assert status == 201
    location = headers["Location"]
    assert location.startswith(f"{env.edev()}/sub/")
    status, headers, body = await env.request("GET", location)
    assert status == 200
    assert headers["Content-Type"] == MEDIA_TYPE
    sub = decode_as(Subscription, body)
    assert (sub.href, sub.subscribed_resource, sub.limit) == (location, derc, 5)
    assert sub.notification_uri == receiver.url + "/derc"
    status, _, body = await env.request("GET", f"{env.edev()}/sub?l=10")
    listed = decode_as(SubscriptionList, body)
    assert (listed.all, [s.href for s in listed.items]) == (1, [location])

    await _setpoint(env, -3)  # export 3 kW
    note = await receiver.next()
    assert (note.subscribed_resource, note.subscription_uri, note.status) == (derc, location, 0)
    assert isinstance(note.resource, DERControlList)
    assert note.resource.href == derc
    assert (note.resource.all, note.resource.results) == (1, 1)
    control = note.resource.items[0]
    assert control.der_control_base.op_mod_target_w is not None
    assert to_watts(control.der_control_base.op_mod_target_w) == 3000
    assert control.event_status is not None
    assert control.event_status.current_status == 1
    # the same setpoint re-applied changes nothing, so nothing is sent
    await _setpoint(env, -3)
    await receiver.nothing(0.3)

    await _setpoint(env, None)  # release: the control is marked cancelled
    note = await receiver.next()
    assert isinstance(note.resource, DERControlList)
    assert [c.mrid for c in note.resource.items] == [control.mrid]
    cancelled = note.resource.items[0].event_status
    assert cancelled is not None
    assert cancelled.current_status == 2

    await _setpoint(env, 2)  # a new control supersedes nothing (the old one is cancelled)
    note = await receiver.next()
    assert isinstance(note.resource, DERControlList)
    assert note.resource.all == 2

    status, _, _ = await env.request("DELETE", location)
    assert status == 204
    status, _, _ = await env.request("GET", location)
    assert status == 404
    await _setpoint(env, -1)
    await receiver.nothing()


async def test_defaults_and_rates_change_at_run_time(env: Setup, receiver: Receiver) -> None:
    """A new DefaultDERControl for a group: its version goes up, its subscribers are told, the
    next GET shows it; new poll and post rates show on the next GETs too."""
    dderc = (await env.derc()).replace("/derc", "/dderc")
    status, _, body = await env.request("GET", dderc)
    before = decode_as(DefaultDERControl, body)
    status, _, _ = await env.subscribe(dderc, receiver.url + "/dderc")
    assert status == 201

    changed = Sep2DefaultEnvelope(export_limit_kw=2.5, ramp_rate_pct_per_s=0.5)
    assert env.server.set_default("feeder:f1", changed)
    note = await receiver.next()
    assert isinstance(note.resource, DefaultDERControl)
    assert note.resource.version == (before.version or 0) + 1
    assert note.resource.der_control_base.op_mod_exp_lim_w is not None
    assert to_watts(note.resource.der_control_base.op_mod_exp_lim_w) == 2500
    assert note.resource.set_grad_w == 50
    status, _, body = await env.request("GET", dderc)
    assert decode_as(DefaultDERControl, body) == note.resource
    assert env.server.set_default("feeder:f1", changed)  # the same again: nothing new
    await receiver.nothing(0.3)
    assert not env.server.set_default("feeder:nowhere", changed)

    env.server.set_rates(poll_rate_s=120, der_poll_rate_s=30, post_rate_s=15)
    status, _, body = await env.request("GET", "/dcap")
    assert decode_as(DeviceCapability, body).poll_rate == 120
    status, _, body = await env.request("GET", env.edev() + "/derp?l=10")
    assert decode_as(DERProgramList, body).poll_rate == 30
    with pytest.raises(ValueError, match="outside"):
        env.server.set_rates(post_rate_s=0)


async def test_program_lists_and_programs_are_subscribable(env: Setup, receiver: Receiver) -> None:
    """A DERProgramList (under the EndDevice, its FunctionSetAssignments or its DER) and a
    DERProgram change with the controls they count: their subscribers are told."""
    derc = await env.derc()
    program = derc.rsplit("/", 1)[0]
    lists = [f"{env.edev()}/derp", f"{env.edev()}/fsa/1/derp", f"{env.edev()}/der/1/derp"]
    for i, resource in enumerate([*lists, program]):
        status, _, _ = await env.subscribe(resource, f"{receiver.url}/{i}")
        assert status == 201
    await _setpoint(env, -3)
    notes = [await receiver.next() for _ in range(4)]
    by_resource = {n.subscribed_resource: n.resource for n in notes}
    assert set(by_resource) == {*lists, program}
    for resource in lists:
        listed = by_resource[resource]
        assert isinstance(listed, DERProgramList)
        assert listed.href == resource
        assert listed.items[0].active_der_control_list_link is not None
        assert listed.items[0].active_der_control_list_link.all == 1
    single = by_resource[program]
    assert isinstance(single, DERProgram)
    assert single.href == program


async def test_end_device_and_fsa_lists_are_subscribable(env: Setup, receiver: Receiver) -> None:
    """As CSIP-AUS ALL-14 asks: the EndDeviceList (``/edev``) and the FunctionSetAssignmentsList
    are subscribable; the EndDeviceList changes with the EndDevice's subscriptions, both with
    the poll rate they carry."""
    status, _, _ = await env.subscribe("/edev", receiver.url + "/edev")
    assert status == 201
    note = await receiver.next()
    assert isinstance(note.resource, EndDeviceList)
    (listed,) = note.resource.items
    assert listed.subscription_list_link is not None
    assert listed.subscription_list_link.all == 1
    status, _, _ = await env.subscribe(f"{env.edev()}/fsa", receiver.url + "/fsa")
    assert status == 201
    note = await receiver.next()
    assert isinstance(note.resource, EndDeviceList)
    assert note.resource.items[0].subscription_list_link is not None
    assert note.resource.items[0].subscription_list_link.all == 2

    env.server.set_rates(poll_rate_s=99)
    notes = {n.subscribed_resource: n.resource for n in [await receiver.next() for _ in range(2)]}
    edev_list, fsa_list = notes["/edev"], notes[f"{env.edev()}/fsa"]
    assert isinstance(edev_list, EndDeviceList)
    assert isinstance(fsa_list, FunctionSetAssignmentsList)
    assert (edev_list.poll_rate, fsa_list.poll_rate) == (99, 99)
    assert fsa_list.items[0].der_program_list_link is not None

    programs = fsa_list.items[0].der_program_list_link.href
    status, _, _ = await env.subscribe(programs, receiver.url + "/derp")
    assert status == 201
    await receiver.next()  # the EndDeviceList: one more Subscription
    with pytest.raises(ValueError, match="outside"):
        env.server.set_rates(der_poll_rate_s=45, post_rate_s=0)  # all or nothing
    await receiver.nothing(0.2)
    env.server.set_rates(der_poll_rate_s=45)
    note = await receiver.next()
    assert isinstance(note.resource, DERProgramList)
    assert (note.subscribed_resource, note.resource.poll_rate) == (programs, 45)


async def test_limit_and_lapse(env: Setup, receiver: Receiver) -> None:
    derc = await env.derc()
    status, _, _ = await env.subscribe(derc, receiver.url + "/one", limit=1)
    assert status == 201
    await _setpoint(env, -3)
    await receiver.next()
    await _setpoint(env, -2)  # supersedes: two controls in the list, one sent (limit 1)
    note = await receiver.next()
    assert isinstance(note.resource, DERControlList)
    assert (note.resource.all, note.resource.results) == (2, 1)
    newest = note.resource.items[0]
    assert newest.der_control_base.op_mod_target_w is not None
    assert to_watts(newest.der_control_base.op_mod_target_w) == 2000

    # Both controls end 60 s after they start; move the server's clock to just before that:
    # the notifier notices the lapse by itself and tells the subscriber the list is empty.
    env.offset[0] = 59.2
    env.server._notify_wake.set()  # as any other event would: recompute its next deadline
    note = await receiver.next(within=4)
    assert isinstance(note.resource, DERControlList)
    assert (note.resource.all, note.resource.results) == (0, 0)


async def test_only_own_resources(env: Setup, receiver: Receiver) -> None:
    derc_a = await env.derc()
    # B subscribing to A's list, or posting into A's subscription list: 403, as envoy
    status, _, body = await env.subscribe(derc_a, receiver.url + "/x", lfdi=LFDI_B)
    assert status == 403
    assert LFDI_B.lower() in (decode_as(Error, body).message or "")
    status, _, _ = await env.request(
        "POST", env.edev() + "/sub", _subscription(derc_a, receiver.url + "/x"), LFDI_B
    )
    assert status == 403
    # A program of B's feeder is not A's, even under A's EndDevice
    derc_b = await env.derc("bat-b", LFDI_B)
    program_b = derc_b.split("/")[4]
    status, _, _ = await env.subscribe(f"{env.edev()}/derp/{program_b}/derc", receiver.url)
    assert status == 403
    # envoy's rejected device subscription (another EndDevice's list): 403 here too
    status, _, _ = await env.subscribe("/edev/8/derp/1/derc", receiver.url + "/device")
    assert status == 403
    # A's own resource that cannot be subscribed to
    status, _, _ = await env.subscribe(f"{env.edev()}/der/1", receiver.url)
    assert status == 400
    # A's own subscription is not B's to read or delete
    status, headers, _ = await env.subscribe(derc_a, receiver.url + "/a")
    assert status == 201
    for method in ("GET", "DELETE"):
        status, _, _ = await env.request(method, headers["Location"], lfdi=LFDI_B)
        assert status == 403
    status, _, _ = await env.request("GET", headers["Location"])
    assert status == 200


async def test_notification_uri_must_be_allowed(env: Setup, receiver: Receiver) -> None:
    derc = await env.derc()
    port = receiver.url.split(":")[2].split("/")[0]
    for uri in (
        f"http://10.0.0.1:{port}/ntfy",
        "http://metadata.google.internal/computeMetadata",
        f"http://127.0.0.1.evil.example:{port}/ntfy",
        f"http://user:pw@127.0.0.1:{port}/ntfy",
        f"ftp://127.0.0.1:{port}/ntfy",
        "/ntfy/relative",
        "http://127.0.0.1:99999/ntfy",
    ):
        status, _, body = await env.subscribe(derc, uri)
        assert status == 400, uri
        assert decode_as(Error, body).message
    status, _, _ = await env.subscribe(derc, receiver.url, encoding=1)  # EXI
    assert status == 400
    status, _, body = await env.request("GET", f"{env.edev()}/sub?l=10")
    assert decode_as(SubscriptionList, body).all == 0
    status, _, _ = await env.subscribe(derc, receiver.url.replace("127.0.0.1", "LOCALHOST"))
    assert status == 201


async def test_failed_delivery_is_retried(env: Setup, receiver: Receiver) -> None:
    receiver.script = [500, 503]
    status, _, _ = await env.subscribe(await env.derc(), receiver.url + "/flaky")
    assert status == 201
    await _setpoint(env, -3)
    note = await receiver.next()  # third attempt succeeds
    assert receiver.attempts == 3
    assert isinstance(note.resource, DERControlList)
    assert note.resource.all == 1


async def test_dropped_after_n_failures_with_one_log_line(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    async with aiohttp.ClientSession() as session:
        setup = await _make_setup(session, notification_attempts=3)
        try:
            receiver.script = [500] * 3
            status, _, _ = await setup.subscribe(await setup.derc(), receiver.url + "/down")
            assert status == 201
            with caplog.at_level(logging.WARNING, logger="adapters.sep2_der.server"):
                await _setpoint(setup, -3)
                for _ in range(50):
                    if any("dropped" in r.getMessage() for r in caplog.records):
                        break
                    await asyncio.sleep(0.05)
                await receiver.nothing(0.3)
            assert receiver.attempts == 3
            dropped = [r for r in caplog.records if "dropped after 3 attempts" in r.getMessage()]
            assert len(dropped) == 1
            # the subscription survives: the next change is delivered
            await _setpoint(setup, -2)
            note = await receiver.next()
            assert isinstance(note.resource, DERControlList)
            assert receiver.attempts == 4
        finally:
            await setup.server.stop()


async def test_slow_receiver_blocks_nothing_and_stop_is_clean(receiver: Receiver) -> None:
    receiver.hang = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        setup = await _make_setup(session, notification_timeout_s=30)
        server = setup.server
        status, _, _ = await setup.subscribe(await setup.derc(), receiver.url + "/slow")
        assert status == 201
        refused = "http://127.0.0.1:9/ntfy"  # discard port: connection refused, then backoff
        status, _, _ = await setup.subscribe(await setup.derc(), refused)
        assert status == 201
        await _setpoint(setup, -3)
        for _ in range(100):
            if receiver.attempts:
                break
            await asyncio.sleep(0.02)
        assert receiver.attempts == 1  # in flight, and the receiver is not answering
        started = time.monotonic()
        for kw in (-2, -1, 1, 2):  # the request path and the control loop do not wait
            await _setpoint(setup, kw)
            status, _, _ = await setup.request("GET", await setup.derc() + "?l=10")
            assert status == 200
        assert time.monotonic() - started < 1.0
        notifier = server._notifier
        assert notifier is not None
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 3.0
        assert notifier.done()
        assert not server.running
        await server.stop()  # twice is fine
    receiver.hang.set()


async def test_run_owns_the_notifier(receiver: Receiver) -> None:
    async with aiohttp.ClientSession() as session:
        setup = await _make_setup(session)
        await setup.server.stop()
        task = asyncio.create_task(setup.server.run())
        for _ in range(100):
            if setup.server.running:
                break
            await asyncio.sleep(0.02)
        status, _, _ = await setup.subscribe(await setup.derc(), receiver.url + "/run")
        assert status == 201
        await _setpoint(setup, -3)
        await receiver.next()
        notifier = setup.server._notifier
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert notifier is not None
        assert notifier.done()
        assert not setup.server.running


# --------------------------------------------------------------------------- TLS


@pytest.mark.parametrize("notify_cert", [True, False])
async def test_https_notification_to_a_receiver_that_verifies_client_certificates(
    tmp_path: Path, notify_cert: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Receivers verify the notifier's client certificate (as a 2030.5 client's listener
    should): a clientAuth certificate (``notify_cert_file``) gets through; the server's own
    serverAuth-only certificate is refused in the handshake, and the server warns at start."""
    ca = make_ca(tmp_path)
    server_cert = make_cert(ca, tmp_path, "gateway", server=True)
    notifier = make_cert(ca, tmp_path, "gateway-notify")  # a client (clientAuth) certificate
    device = make_cert(ca, tmp_path, "device-1")
    listener = make_cert(ca, tmp_path, "listener", server=True, hosts=("127.0.0.1",))
    rogue_ca = make_ca(tmp_path / "rogue", "rogue-ca")
    rogue = make_cert(rogue_ca, tmp_path / "rogue", "listener", server=True)

    tls = Sep2TlsConfig(
        cert_file=server_cert.cert_path,
        key_file=server_cert.key_path,
        ca_file=ca.cert_path,
        notify_cert_file=notifier.cert_path if notify_cert else None,
        notify_key_file=notifier.key_path if notify_cert else None,
    )
    server = Sep2Server(_config(dev_lfdi_header=None, tls=tls))
    lfdi, _ = describe(device.cert_path)
    adapter = Sep2Der("tls-dev", Sep2DerEndpoint(lfdi=lfdi, supports_target_w=True), server=server)
    trusted, untrusted = Receiver(), Receiver()
    listener_ctx = server_ssl_context(listener.cert_path, listener.key_path, ca.cert_path)
    assert listener_ctx.verify_mode is ssl.CERT_REQUIRED
    rogue_ctx = server_ssl_context(rogue.cert_path, rogue.key_path, ca.cert_path)
    runners = [await _serve(trusted, listener_ctx), await _serve(untrusted, rogue_ctx)]
    with caplog.at_level(logging.WARNING, logger="adapters.sep2_der.server"):
        await adapter.connect()
    warned = any("lacks clientAuth" in r.getMessage() for r in caplog.records)
    assert warned is not notify_cert
    try:
        ctx = client_ssl_context(device.cert_path, device.key_path, ca.cert_path)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            edev = server.edev_href("tls-dev")
            async with s.get(f"{server.url}{edev}/derp?l=5") as resp:
                link = decode_as(DERProgramList, await resp.read()).items[0].der_control_list_link
            assert link is not None
            for rec in (trusted, untrusted):
                body = _subscription(link.href, rec.url + "/tls")
                async with s.post(f"{server.url}{edev}/sub", data=body, headers=SEP) as resp:
                    assert resp.status == 201
        await adapter.apply(DeviceCommand(device_id="tls-dev", power_kw=-3))
        if notify_cert:
            note = await trusted.next()
            assert isinstance(note.resource, DERControlList)
            assert note.resource.all == 1
        else:
            await trusted.nothing(1.0)
            assert trusted.attempts == 0  # refused in the handshake: no request at all
        # a listener whose certificate is not from the 2030.5 CA never gets the body
        await untrusted.nothing(0.5)
        assert untrusted.attempts == 0
    finally:
        await server.stop()
        for runner in runners:
            await runner.cleanup()


async def test_disconnect_and_de_energize_reach_a_subscriber(
    env: Setup, receiver: Receiver
) -> None:
    """CSIP-AUS ALL-15/16: the subscription variants of the on/off controls."""
    derc = await env.derc()
    status, _, _ = await env.subscribe(derc, receiver.url + "/derc", limit=5)
    assert status == 201
    await env.a.apply(DeviceCommand(device_id="bat-a", power_kw=None, energize=False))
    note = await receiver.next()
    assert isinstance(note.resource, DERControlList)
    (control,) = note.resource.items
    assert control.der_control_base.op_mod_energize is False
    assert control.event_status is not None
    assert control.event_status.current_status == 1

    await env.a.apply(DeviceCommand(device_id="bat-a", power_kw=None, connect=False))
    note = await receiver.next()
    assert isinstance(note.resource, DERControlList)
    by_status = {
        c.event_status.current_status: c.der_control_base
        for c in note.resource.items
        if c.event_status is not None
    }
    assert by_status[1].op_mod_connect is False  # in force
    assert by_status[4].op_mod_energize is False  # the one before, superseded


async def test_one_ders_program_list_is_subscribable(receiver: Receiver) -> None:
    """On an EndDevice with two DERs, a subscription to one DER's associated DERProgramList is
    notified with that DER's programs only (its own program and its groups')."""
    server = Sep2Server(_config())
    pv = Sep2Der(
        "site-pv", Sep2DerEndpoint(lfdi=LFDI_A, supports_target_w=True), server=server
    )
    battery = Sep2Der(
        "site-bat",
        Sep2DerEndpoint(lfdi=LFDI_A, supports_target_w=True, shares_end_device=True),
        server=server,
        groups=("feeder:f1",),
    )
    await pv.connect()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            setup = Setup(server, pv, battery, session, [0.0])
            resource = f"{setup.edev('site-pv')}/der/2/derp"
            status, _, _ = await setup.request(
                "POST",
                setup.edev("site-pv") + "/sub",
                _subscription(resource, receiver.url + "/derp"),
            )
            assert status == 201
            await battery.apply(DeviceCommand(device_id="site-bat", power_kw=-1))
            note = await receiver.next()
            assert note.subscribed_resource == resource
            assert isinstance(note.resource, DERProgramList)
            assert {p.description for p in note.resource.items} == {"device:site-bat", "feeder:f1"}
    finally:
        await server.stop()
