"""The 2030.5 client's Notification receiver, against the gateway's own 2030.5 server.

Over mutual TLS: the client polls rarely (300 s); a setpoint published on the server reaches
the client's ``on_envelope`` within a second or two because the server notifies the client's
listener, which wakes the client's control loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from adapters.sep2_client.client import EffectiveControls, Sep2Client, Sep2ClientConfig
from adapters.sep2_der.der import Sep2Der, Sep2DerEndpoint
from adapters.sep2_der.server import Sep2Server, Sep2ServerConfig, Sep2TlsConfig
from composition.certs import make_ca, make_cert
from protocols.sep2 import MEDIA_TYPE, DERProgramList, decode_as
from protocols.tls import client_ssl_context
from tests.protocols.sep2.envoy_fixtures import load
from unified.model import DeviceCommand, utc_from_timestamp
from unified.prices import PricePoint, PriceSchedule

SEP = {"Content-Type": MEDIA_TYPE}


async def _listen(routes: list[web.RouteDef]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_notification_wakes_the_client(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    server_cert = make_cert(ca, tmp_path, "gateway", server=True)
    device = make_cert(ca, tmp_path, "site-1")
    tls = Sep2TlsConfig(
        cert_file=server_cert.cert_path, key_file=server_cert.key_path, ca_file=ca.cert_path
    )
    server = Sep2Server(Sep2ServerConfig(port=0, tls=tls, der_poll_rate_s=300))
    adapter = Sep2Der(
        "site-1", Sep2DerEndpoint(lfdi=device.lfdi, supports_target_w=True), server=server
    )
    await adapter.connect()
    envelopes: list[EffectiveControls] = []

    async def on_envelope(controls: EffectiveControls) -> None:
        envelopes.append(controls)

    ctx = client_ssl_context(device.cert_path, device.key_path, ca.cert_path)
    client = Sep2Client(
        Sep2ClientConfig(
            server_url=server.url,
            lfdi=device.lfdi,
            state_path=tmp_path / "state.json",
            poll_interval_s=300,
            min_poll_interval_s=0.1,
        ),
        on_envelope=on_envelope,
        ssl_context=ctx,
    )
    runner, listener = await _listen([client.notification_route("/ntfy/derc")])
    try:
        await client.start()
        for _ in range(100):  # the first poll, at start
            if client.end_device_href is not None:
                break
            await asyncio.sleep(0.05)
        edev = client.end_device_href
        assert edev is not None
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            async with s.get(f"{server.url}{edev}/derp?l=5") as resp:
                link = decode_as(DERProgramList, await resp.read()).items[0].der_control_list_link
            assert link is not None
            body = (
                '<Subscription xmlns="urn:ieee:std:2030.5:ns">'
                f"<subscribedResource>{link.href}</subscribedResource><encoding>0</encoding>"
                "<level>+S1</level><limit>10</limit>"
                f"<notificationURI>{listener}/ntfy/derc</notificationURI></Subscription>"
            ).encode()
            async with s.post(f"{server.url}{edev}/sub", data=body, headers=SEP) as resp:
                assert resp.status == 201

        await adapter.apply(DeviceCommand(device_id="site-1", power_kw=-3))
        for _ in range(100):
            if envelopes and envelopes[-1].target_kw is not None:
                break
            await asyncio.sleep(0.05)
        # load convention, as published; well before the next 300 s poll
        assert envelopes[-1].target_kw == pytest.approx(-3.0)

        await adapter.apply(DeviceCommand(device_id="site-1", power_kw=None))
        for _ in range(100):
            if envelopes[-1].target_kw is None:
                break
            await asyncio.sleep(0.05)
        assert envelopes[-1].target_kw is None
    finally:
        await client.stop()
        await server.stop()
        await runner.cleanup()


@pytest.fixture
async def bare(tmp_path: Path) -> AsyncIterator[tuple[Sep2Client, str, list[int]]]:
    """A client that is not started, with its receiver; records ``poll_soon`` calls."""

    async def on_envelope(_controls: EffectiveControls) -> None:
        return None

    client = Sep2Client(
        Sep2ClientConfig(
            server_url="https://127.0.0.1:9",
            lfdi="F0F83B2BC825E617DEBD7192F9305B4B6ABC00F5",
            state_path=tmp_path / "state.json",
            min_poll_interval_s=0.3,
        ),
        on_envelope=on_envelope,
    )
    woken: list[int] = []
    client.poll_soon = lambda: woken.append(1)  # type: ignore[method-assign]
    runner, url = await _listen([client.notification_route()])
    try:
        yield client, url + "/ntfy", woken
    finally:
        await client.stop()
        await runner.cleanup()


async def test_receiver_checks_and_spaces_wakeups(
    bare: tuple[Sep2Client, str, list[int]],
) -> None:
    _client, url, woken = bare
    note = load("notification-derc-list.xml")
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=note, headers={"Content-Type": "text/xml"}) as resp:
            assert resp.status == 415
        async with s.post(url, data=b"<Notification/>", headers=SEP) as resp:
            assert resp.status == 400
        async with s.post(url, data=load("derc.xml"), headers=SEP) as resp:
            assert resp.status == 400  # not a Notification
        assert woken == []
        for _ in range(3):  # envoy's captured Notification; a burst wakes once, then once more
            async with s.post(url, data=note, headers=SEP) as resp:
                assert resp.status == 204
        assert woken == [1]
        await asyncio.sleep(0.5)
        assert woken == [1, 1]
        await asyncio.sleep(0.35)
        v13 = load("v1.3/notification-dderc.xml")
        async with s.post(
            url, data=v13, headers={"Content-Type": f"{MEDIA_TYPE}; csipaus=1.3-beta_storage"}
        ) as resp:
            assert resp.status == 204
        assert woken == [1, 1, 1]


async def test_the_client_reads_every_der_of_its_end_device_and_their_controls(
    tmp_path: Path,
) -> None:
    """A site client whose EndDevice has two DERs (PV and a battery, CSIP-AUS MUL-01..03): it
    reads both, and the controls of both DERs' programs are in force at the site."""
    ca = make_ca(tmp_path)
    server_cert = make_cert(ca, tmp_path, "gateway", server=True)
    device = make_cert(ca, tmp_path, "site-1")
    tls = Sep2TlsConfig(
        cert_file=server_cert.cert_path, key_file=server_cert.key_path, ca_file=ca.cert_path
    )
    server = Sep2Server(Sep2ServerConfig(port=0, tls=tls))
    pv = Sep2Der(
        "site-pv", Sep2DerEndpoint(lfdi=device.lfdi, supports_target_w=True), server=server
    )
    battery = Sep2Der(
        "site-bat",
        Sep2DerEndpoint(lfdi=device.lfdi, supports_target_w=True, shares_end_device=True),
        server=server,
    )
    await pv.connect()
    await battery.apply(DeviceCommand(device_id="site-bat", power_kw=-3))
    await pv.apply(DeviceCommand(device_id="site-pv", power_kw=None, export_limit_kw=2.0))
    envelopes: list[EffectiveControls] = []

    async def on_envelope(controls: EffectiveControls) -> None:
        envelopes.append(controls)

    client = Sep2Client(
        Sep2ClientConfig(server_url=server.url, lfdi=device.lfdi, state_path=tmp_path / "s.json"),
        on_envelope=on_envelope,
        ssl_context=client_ssl_context(device.cert_path, device.key_path, ca.cert_path),
    )
    try:
        async with client:
            await client.poll_once()
            edev = client.end_device_href
            assert client.der_hrefs == (f"{edev}/der/1", f"{edev}/der/2")
    finally:
        await server.stop()
    controls = envelopes[-1]
    assert controls.target_kw == pytest.approx(-3.0)  # the battery's program
    assert controls.generation_limit_kw == pytest.approx(2.0)  # the PV inverter's program


async def test_the_client_reads_its_prices_from_our_server(tmp_path: Path) -> None:
    """2030.5 Pricing end to end over mutual TLS: the price schedule our server serves for the
    client's group is what the client reads, per kWh, import and export, interval by interval;
    another group's schedule is not."""
    ca = make_ca(tmp_path)
    server_cert = make_cert(ca, tmp_path, "gateway", server=True)
    device = make_cert(ca, tmp_path, "site-1")
    tls = Sep2TlsConfig(
        cert_file=server_cert.cert_path, key_file=server_cert.key_path, ca_file=ca.cert_path
    )
    server = Sep2Server(Sep2ServerConfig(port=0, tls=tls))
    endpoint = Sep2DerEndpoint(lfdi=device.lfdi)
    site = Sep2Der("site-1", endpoint, server=server, groups=("feeder:f1",))
    await site.connect()
    hour = int(time.time()) // 3600 * 3600 + 3600  # from the next hour: nothing ends meanwhile
    points = (
        PricePoint(start=utc_from_timestamp(hour), price=0.3125, export_price=0.05),
        PricePoint(start=utc_from_timestamp(hour + 1800), price=-0.0125),
    )
    issued = utc_from_timestamp(hour - 7200)
    server.set_price(
        PriceSchedule(
            issued_at=issued, scope="feeder:f1", currency="AUD", step_s=1800, points=points
        )
    )
    other = PricePoint(start=utc_from_timestamp(hour), price=9.0)
    server.set_price(PriceSchedule(issued_at=issued, scope="feeder:f2", points=(other,)))

    async def on_envelope(controls: EffectiveControls) -> None:
        pass

    client = Sep2Client(
        Sep2ClientConfig(
            server_url=server.url, lfdi=device.lfdi, state_path=tmp_path / "s.json", page_size=1
        ),
        on_envelope=on_envelope,
        ssl_context=client_ssl_context(device.cert_path, device.key_path, ca.cert_path),
    )
    try:
        async with client:
            prices = await client.read_prices()
    finally:
        await server.stop()
    got = [(p.direction, p.start, p.duration_s, round(p.price_per_kwh, 6)) for p in prices]
    assert got == [
        ("export", hour, 1800, 0.05),
        ("import", hour, 1800, 0.3125),
        ("export", hour + 1800, 1800, -0.0125),  # no export price: the import price
        ("import", hour + 1800, 1800, -0.0125),
    ]
    assert {p.currency for p in prices} == {36}  # AUD
    assert {p.status for p in prices} == {0}  # scheduled
