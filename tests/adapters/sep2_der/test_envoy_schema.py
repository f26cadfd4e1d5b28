"""Every document our 2030.5 server serves, read by an independent implementation.

A client was populated (DER resources PUT, telemetry mirrored, a connection point, a
subscription, a control in force and one scheduled ahead, a Response); then every document
reachable by href from ``/dcap`` is fetched and parsed with envoy's own pydantic-xml models
(``envoy-schema``, bsgip's CSIP-AUS server), under the CSIP-AUS v1.3 namespace they use.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.sep2_der.der import Sep2Der, Sep2DerEndpoint
from adapters.sep2_der.server import Sep2ProgramConfig, Sep2Server, Sep2ServerConfig
from gateway.devices import DispatchNotice
from protocols.sep2 import MEDIA_TYPE, CsipAusVersion
from tests.protocols.sep2.envoy_fixtures import load
from unified.model import DeviceCommand, EnvelopeInterval, LimitSource
from unified.prices import PricePoint, PriceSchedule

envoy = pytest.importorskip("envoy_schema.server.schema.sep2")
csip_aus = pytest.importorskip("envoy_schema.server.schema.csip_aus.connection_point")

LFDI = "F0F83B2BC825E617DEBD7192F9305B4B6ABC00F5"  # envoy capture's device A
HEADER = "X-LFDI"
HREF = re.compile(rb'href="([^"]+)"')


def _models() -> dict[str, Any]:
    from envoy_schema.server.schema.sep2 import (
        der,
        device_capability,
        end_device,
        error,
        function_set_assignments,
        metering,
        metering_mirror,
        pricing,
        pub_sub,
        response,
        time,
    )

    return {
        "DeviceCapability": device_capability.DeviceCapabilityResponse,
        "Time": time.TimeResponse,
        "EndDeviceList": end_device.EndDeviceListResponse,
        "EndDevice": end_device.EndDeviceResponse,
        "Registration": end_device.RegistrationResponse,
        "FunctionSetAssignmentsList": function_set_assignments.FunctionSetAssignmentsListResponse,
        "FunctionSetAssignments": function_set_assignments.FunctionSetAssignmentsResponse,
        "DERProgramList": der.DERProgramListResponse,
        "DERProgram": der.DERProgramResponse,
        "DERControlList": der.DERControlListResponse,
        "DERControl": der.DERControlResponse,
        "DefaultDERControl": der.DefaultDERControl,
        "DERList": der.DERListResponse,
        "DER": der.DER,
        "DERCapability": der.DERCapability,
        "DERSettings": der.DERSettings,
        "DERStatus": der.DERStatus,
        "DERAvailability": der.DERAvailability,
        "MirrorUsagePointList": metering_mirror.MirrorUsagePointListResponse,
        "MirrorUsagePoint": metering_mirror.MirrorUsagePointRequest,
        "SubscriptionList": pub_sub.SubscriptionListResponse,
        "Subscription": pub_sub.Subscription,
        "ResponseSetList": response.ResponseSetList,
        "ResponseSet": response.ResponseSet,
        "ResponseList": response.ResponseListResponse,
        "Response": response.Response,
        "ConnectionPoint": csip_aus.ConnectionPointResponse,
        "Error": error.ErrorResponse,
        "TariffProfileList": pricing.TariffProfileListResponse,
        "TariffProfile": pricing.TariffProfileResponse,
        "RateComponentList": pricing.RateComponentListResponse,
        "RateComponent": pricing.RateComponentResponse,
        "TimeTariffIntervalList": pricing.TimeTariffIntervalListResponse,
        "TimeTariffInterval": pricing.TimeTariffIntervalResponse,
        "ConsumptionTariffIntervalList": pricing.ConsumptionTariffIntervalListResponse,
        "ConsumptionTariffInterval": pricing.ConsumptionTariffIntervalResponse,
        "ReadingType": metering.ReadingType,
    }


@pytest.fixture
async def populated() -> AsyncIterator[tuple[Sep2Server, aiohttp.ClientSession]]:
    config = Sep2ServerConfig(
        port=0,
        dev_lfdi_header=HEADER,
        csipaus=CsipAusVersion.V1_3,
        notification_hosts=("127.0.0.1",),
        programs=(
            Sep2ProgramConfig(group_id="feeder:f1", primacy=10, randomize_start_s=60),
            Sep2ProgramConfig(group_id="substation:s1", primacy=20),
        ),
    )
    server = Sep2Server(config)
    der = Sep2Der(
        "bat-a",
        Sep2DerEndpoint(lfdi=LFDI, pin=11111, supports_target_w=True),
        server=server,
        groups=("substation:s1", "feeder:f1"),
    )
    await der.connect()
    headers = {HEADER: LFDI, "Content-Type": MEDIA_TYPE}
    async with aiohttp.ClientSession(
        base_url=server.url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        try:
            edev = server.edev_href("bat-a")
            requests = [
                ("POST", "/edev", load("req-edev-registration.xml")),
                ("PUT", f"{edev}/der/1/dercap", load("req-der-capability.xml")),
                ("PUT", f"{edev}/der/1/derg", load("req-der-settings.xml")),
                ("PUT", f"{edev}/der/1/ders", load("req-der-status.xml")),
                ("PUT", f"{edev}/der/1/dera", load("req-der-availability.xml")),
                ("PUT", f"{edev}/cp", load("req-connection-point.xml")),
                ("POST", "/mup", load("req-mup-der.xml")),
            ]
            for method, href, body in requests:
                async with session.request(method, href, data=body) as resp:
                    assert resp.status in (201, 204), (href, await resp.text())
            provenance = (LimitSource(command_id="d-1", kind="dispatch"),)
            await der.apply(DeviceCommand(device_id="bat-a", power_kw=-3, provenance=provenance))
            # (from the next hour: no interval ends while the tree is walked)
            hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
            hour += timedelta(hours=1)
            server.set_price(
                PriceSchedule(
                    issued_at=hour,
                    currency="AUD",
                    points=(
                        PricePoint(start=hour, price=0.3125, export_price=-0.02),
                        PricePoint(start=hour + timedelta(hours=1), price=0.28),
                    ),
                )
            )
            start = datetime.now(UTC) + timedelta(hours=1)
            der.notice(DispatchNotice("d-2", start, start + timedelta(hours=1), -2.0, ramp_s=30))
            sub = (
                '<Subscription xmlns="urn:ieee:std:2030.5:ns">'
                f"<subscribedResource>{edev}/derp</subscribedResource><encoding>0</encoding>"
                "<level>+S1</level><limit>5</limit>"
                "<notificationURI>http://127.0.0.1:9/n</notificationURI></Subscription>"
            ).encode()
            async with session.post(f"{edev}/sub", data=sub) as resp:
                assert resp.status == 201
            yield server, session
        finally:
            await server.stop()


async def test_every_served_document_parses_with_envoys_models(
    populated: tuple[Sep2Server, aiohttp.ClientSession],
) -> None:
    _, session = populated
    models = _models()
    seen, parsed_by_tag = await _walk(session, models)
    expected = {
        "DeviceCapability",
        "Time",
        "EndDeviceList",
        "EndDevice",
        "Registration",
        "FunctionSetAssignments",
        "DERProgramList",
        "DERProgram",
        "DERControlList",
        "DERControl",
        "DefaultDERControl",
        "DERList",
        "DER",
        "DERCapability",
        "DERSettings",
        "DERStatus",
        "DERAvailability",
        "MirrorUsagePointList",
        "MirrorUsagePoint",
        "SubscriptionList",
        "Subscription",
        "ConnectionPoint",
        "TariffProfileList",
        "TariffProfile",
        "RateComponentList",
        "RateComponent",
        "ReadingType",
        "TimeTariffIntervalList",
        "TimeTariffInterval",
        "ConsumptionTariffIntervalList",
        "ConsumptionTariffInterval",
    }
    assert expected <= set(seen.values()), expected - set(seen.values())
    # One FunctionSetAssignments per program (feeder F1's, substation S1's), each parsed.
    fsas = sorted(h for h, t in seen.items() if t == "FunctionSetAssignments")
    assert len(fsas) == 2
    assert parsed_by_tag["FunctionSetAssignmentsList"].all_ == 2
    assert all(seen.get(f"{fsa}/derp") == "DERProgramList" for fsa in fsas)
    # What envoy read is what we meant (not just "it parsed").
    assert parsed_by_tag["Registration"].pIN == 111115
    connection_point = parsed_by_tag["ConnectionPoint"]
    assert "2001234567" in (
        connection_point.id,
        getattr(connection_point, "connectionPointId", None),
    )
    profile = parsed_by_tag["TariffProfile"]
    assert (profile.currency, profile.pricePowerOfTenMultiplier) == (36, -5)  # AUD, 10^-5
    prices = []
    for href, tag in seen.items():
        if tag == "ConsumptionTariffInterval":
            prices.append(models[tag].from_xml(await _get(session, href)).price)
    prices.sort()
    assert prices == [-2000, 28000, 28000, 31250]  # export -0.02, import 0.3125, 0.28 x2
    controls = [
        models["DERControl"].from_xml(await _get(session, h))
        for h, t in seen.items()
        if t == "DERControl"
    ]
    ahead = [c for c in controls if c.randomizeStart is not None]
    assert len(ahead) == 1  # the dispatch told ahead, in the primary program (randomized)
    assert ahead[0].randomizeStart == 60
    assert ahead[0].DERControlBase_.rampTms == 3000
    target = ahead[0].DERControlBase_.opModTargetW
    assert target.value * 10**target.multiplier == 2000
    assert ahead[0].interval.duration == 3600


async def _walk(
    session: aiohttp.ClientSession, models: dict[str, Any]
) -> tuple[dict[str, str], dict[str, Any]]:
    """Every document reachable by href from /dcap, each parsed with envoy's model for its
    root element: (href → tag, tag → the first parsed)."""
    seen: dict[str, str] = {}
    parsed_by_tag: dict[str, Any] = {}
    queue = ["/dcap"]
    while queue:
        href = queue.pop()
        if href in seen:
            continue
        async with session.get(href + ("?l=255" if href.rsplit("/", 1)[-1] in _LISTS else "")) as r:
            assert r.status == 200, (href, r.status)
            assert r.headers["Content-Type"].startswith(MEDIA_TYPE)
            body = await r.read()
        root = re.search(rb"<(?:\w+:)?(\w+)[\s>]", body)
        assert root is not None, href
        tag = root.group(1).decode()
        assert tag in models, (href, tag)
        parsed = models[tag].from_xml(body)
        parsed_by_tag.setdefault(tag, parsed)
        seen[href] = tag
        queue.extend(h.decode() for h in HREF.findall(body) if h.decode() not in seen)
    return seen, parsed_by_tag


async def test_a_sites_storage_target_export_limit_and_disconnect_parse_with_envoys_models(
    tmp_path: Path,
) -> None:
    """The controls of a site client (CSIP-AUS v1.3): a storage target with the site's export
    limit in one DERControl, then a disconnect (opModConnect false), each read by envoy's
    models as we meant them; served from a server restarted on its state file."""
    config = Sep2ServerConfig(
        port=0,
        dev_lfdi_header=HEADER,
        csipaus=CsipAusVersion.V1_3,
        state_file=tmp_path / "sep2-server.sqlite",
    )
    server = Sep2Server(config)
    site = Sep2Der(
        "site-1",
        Sep2DerEndpoint(lfdi=LFDI, storage_target=True, power_from="site"),
        server=server,
        groups=("feeder:f1",),
    )
    await site.connect()
    now = datetime.now(UTC)
    interval = EnvelopeInterval(
        start=now - timedelta(minutes=1), end=now + timedelta(hours=1), export_limit_kw=1.5
    )
    site.notice(
        DispatchNotice(
            "env-1",
            interval.start,
            interval.end,
            0.0,
            kind="envelope",
            intervals=(interval,),
            devices=1,
        )
    )
    dispatch = (LimitSource(command_id="d-1", kind="dispatch"),)
    await site.apply(DeviceCommand(device_id="site-1", power_kw=-3, provenance=dispatch))
    trip = (LimitSource(command_id="trip-1", kind="envelope"),)
    await site.apply(
        DeviceCommand(device_id="site-1", power_kw=None, connect=False, provenance=trip)
    )
    await server.stop()

    restarted = Sep2Server(config)
    Sep2Der(
        "site-1",
        Sep2DerEndpoint(lfdi=LFDI, storage_target=True, power_from="site"),
        server=restarted,
        groups=("feeder:f1",),
    )
    await restarted.start()
    headers = {HEADER: LFDI, "Content-Type": MEDIA_TYPE}
    try:
        async with aiohttp.ClientSession(
            base_url=restarted.url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
        ) as session:
            edev = restarted.edev_href("site-1")
            for kind, fixture in (
                ("dercap", "req-der-capability.xml"),
                ("derg", "req-der-settings.xml"),
                ("ders", "req-der-status.xml"),
                ("dera", "req-der-availability.xml"),
            ):  # DER resources are in memory: the client PUTs them again after a restart
                async with session.put(f"{edev}/der/1/{kind}", data=load(fixture)) as resp:
                    assert resp.status == 204
            models = _models()
            seen, _ = await _walk(session, models)
            controls = [
                models["DERControl"].from_xml(await _get(session, h))
                for h, t in seen.items()
                if t == "DERControl"
            ]
    finally:
        await restarted.stop()
    assert len(controls) == 2
    by_status = {c.EventStatus_.currentStatus: c.DERControlBase_ for c in controls}
    superseded, active = by_status[4], by_status[1]
    storage, export = superseded.opModStorageTargetW, superseded.opModExpLimW
    assert storage.value * 10**storage.multiplier == -3000
    assert export.value * 10**export.multiplier == 1500
    assert active.opModConnect is False
    assert active.opModStorageTargetW is None


async def _get(session: aiohttp.ClientSession, href: str) -> bytes:
    async with session.get(href) as response:
        return await response.read()


_LISTS = {"edev", "fsa", "derp", "derc", "actderc", "der", "mup", "sub", "rsps", "rsp"}
_LISTS |= {"tp", "rc", "tti", "acttti", "ctti", "cti"}


async def test_an_end_device_with_two_ders_parses_with_envoys_models() -> None:
    """CSIP-AUS MUL-01..03: the DERList with two DERs, each DER's resources and programs."""
    from tests.adapters.sep2_der.test_server_multi_der import _site

    server = Sep2Server(
        Sep2ServerConfig(port=0, dev_lfdi_header=HEADER, csipaus=CsipAusVersion.V1_3)
    )
    pv, battery = _site(server)
    await pv.connect()
    headers = {HEADER: LFDI, "Content-Type": MEDIA_TYPE}
    try:
        async with aiohttp.ClientSession(
            base_url=server.url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
        ) as session:
            edev = server.edev_href("site-pv")
            for number in (1, 2):
                for kind, fixture in (
                    ("dercap", "req-der-capability.xml"),
                    ("derg", "req-der-settings.xml"),
                    ("ders", "req-der-status.xml"),
                    ("dera", "req-der-availability.xml"),
                ):
                    async with session.put(
                        f"{edev}/der/{number}/{kind}", data=load(fixture)
                    ) as resp:
                        assert resp.status == 204
            await battery.apply(DeviceCommand(device_id="site-bat", power_kw=-2))
            await pv.apply(DeviceCommand(device_id="site-pv", power_kw=None, export_limit_kw=1))
            models = _models()
            seen, parsed = await _walk(session, models)
    finally:
        await server.stop()
    assert parsed["DERList"].all_ == 2
    # Three FSAs (each DER's own program, the feeder's), each parsed.
    assert sum(1 for t in seen.values() if t == "FunctionSetAssignments") == 3
    assert {h for h, t in seen.items() if t == "DER"} == {f"{edev}/der/1", f"{edev}/der/2"}
    assert sum(1 for t in seen.values() if t == "DERStatus") == 2
    assert sum(1 for t in seen.values() if t == "DERControl") == 2


async def test_an_aggregators_tree_parses_with_envoys_models() -> None:
    """CSIP-AUS P-01: an aggregator's DeviceCapability and EndDeviceList (two EndDevices) and
    everything under both, each EndDevice with its feeder's and its substation's FSAs."""
    aggregator = "A" * 40
    other = "86441F107B66EBFE65B39FB3D5D7BAAEDA3EA6BF"
    server = Sep2Server(
        Sep2ServerConfig.model_validate(
            {
                "port": 0,
                "dev_lfdi_header": HEADER,
                "csipaus": CsipAusVersion.V1_3,
                "aggregators": ({"lfdi": aggregator, "end_devices": (LFDI, other)},),
            }
        )
    )
    ders = [
        Sep2Der(
            device,
            Sep2DerEndpoint(lfdi=lfdi, supports_target_w=True),
            server=server,
            groups=groups,
        )
        for device, lfdi, groups in (
            ("bat-a", LFDI, ("substation:s1", "feeder:f1")),
            ("bat-b", other, ("substation:s1", "feeder:f2")),
        )
    ]
    await ders[0].connect()
    try:
        for der in ders:
            await der.apply(DeviceCommand(device_id=der.device_id, power_kw=-2))
        async with aiohttp.ClientSession(
            base_url=server.url,
            headers={HEADER: aggregator, "Content-Type": MEDIA_TYPE},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as session:
            for der in ders:  # the aggregator PUTs each EndDevice's DER resources
                edev = server.edev_href(der.device_id)
                for kind, fixture in (
                    ("dercap", "req-der-capability.xml"),
                    ("derg", "req-der-settings.xml"),
                    ("ders", "req-der-status.xml"),
                    ("dera", "req-der-availability.xml"),
                ):
                    async with session.put(f"{edev}/der/1/{kind}", data=load(fixture)) as resp:
                        assert resp.status == 204
            seen, parsed = await _walk(session, _models())
    finally:
        await server.stop()
    assert parsed["EndDeviceList"].all_ == 2
    assert sum(1 for t in seen.values() if t == "EndDevice") == 2
    assert sum(1 for t in seen.values() if t == "FunctionSetAssignments") == 4
    assert sum(1 for t in seen.values() if t == "DERControl") == 2
