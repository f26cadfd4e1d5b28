"""IEEE 2030.5 Pricing (§10.5): the price schedules Grid DERMS publishes, served to each client
as TariffProfiles under its FunctionSetAssignments.

A client walks FSA → TariffProfileList → TariffProfile → RateComponentList → RateComponent
(ReadingType kWh) → TimeTariffIntervalList → ConsumptionTariffIntervalList and reads the price
of its own group (else the gateway-wide one) per interval; a newer schedule replaces the prices
it reads; another client's tariff tree is not its to read.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import pytest

from adapters.sep2_der.der import Sep2Der, Sep2DerEndpoint
from adapters.sep2_der.server import Sep2Server
from protocols.sep2 import (
    ConsumptionTariffIntervalList,
    FunctionSetAssignmentsList,
    RateComponent,
    RateComponentList,
    ReadingType,
    TariffProfile,
    TariffProfileList,
    TimeTariffIntervalList,
)
from tests.adapters.sep2_der import test_server_subscriptions as subscriptions
from tests.adapters.sep2_der.test_server import LFDI_A, LFDI_B, Client, Fleet, _config
from tests.adapters.sep2_der.test_server_subscriptions import Receiver, _subscription
from unified.prices import PriceKind, PricePoint, PriceSchedule

ISSUED = datetime(2026, 1, 1, tzinfo=UTC)
receiver = subscriptions.receiver  # the notification receiver fixture


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    """bat-a in feeder:f1 (and substation:s1), bat-b in feeder:f2 (and substation:s1)."""
    server = Sep2Server(_config())
    a_groups, b_groups = ("substation:s1", "feeder:f1"), ("substation:s1", "feeder:f2")
    a = Sep2Der("bat-a", Sep2DerEndpoint(lfdi=LFDI_A), server=server, groups=a_groups)
    b = Sep2Der("bat-b", Sep2DerEndpoint(lfdi=LFDI_B), server=server, groups=b_groups)
    await a.connect()
    await b.connect()
    try:
        yield Fleet(server, a, b, [])
    finally:
        await server.stop()


def _schedule(
    prices: list[tuple[float, float | None]],
    *,
    scope: str | None = None,
    kind: PriceKind = PriceKind.DAY_AHEAD,
    issued: datetime = ISSUED,
    currency: str = "USD",
) -> PriceSchedule:
    hour = int(time.time()) // 3600 * 3600
    points = tuple(
        PricePoint(start=datetime.fromtimestamp(hour + k * 3600, UTC), price=p, export_price=e)
        for k, (p, e) in enumerate(prices)
    )
    return PriceSchedule(
        issued_at=issued, scope=scope, kind=kind, currency=currency, step_s=3600, points=points
    )


class _EdevClient(Client):
    edev: str


async def _interval_states(c: _EdevClient, href: str) -> dict[str, tuple[int, int]]:
    """mRID → (start, currentStatus) of each TimeTariffInterval listed at ``href``."""
    listed = await c.get_as(TimeTariffIntervalList, href + "?l=100")
    return {
        i.mrid: (i.interval.start, i.event_status.current_status if i.event_status else -1)
        for i in listed.items
    }


async def _prices(c: _EdevClient) -> tuple[TariffProfile, dict[int, list[tuple[int, int, int]]]]:
    """Walk from the FSA: the first profile and, per RateComponent, (start, duration, price)."""
    fsas = await c.get_as(FunctionSetAssignmentsList, f"{c.edev}/fsa")
    link = fsas.items[0].tariff_profile_list_link
    assert link is not None
    profiles = await c.get_as(TariffProfileList, link.href + "?l=10")
    assert profiles.all == link.all == 1
    profile = profiles.items[0]
    assert profile.rate_component_list_link is not None
    components = await c.get_as(
        RateComponentList, profile.rate_component_list_link.href + "?l=10"
    )
    found: dict[int, list[tuple[int, int, int]]] = {}
    for listed in components.items:
        component = await c.get_as(RateComponent, listed.href or "")
        assert component.reading_type_link is not None
        assert component.time_tariff_interval_list_link is not None
        rt = await c.get_as(ReadingType, component.reading_type_link.href)
        assert (rt.uom, rt.power_of_ten_multiplier, rt.kind) == (72, 3, 12)  # kWh of energy
        tti = await c.get_as(
            TimeTariffIntervalList, component.time_tariff_interval_list_link.href + "?l=100"
        )
        rows = []
        for interval in tti.items:
            assert interval.event_status is not None
            if interval.event_status.current_status not in (0, 1):
                continue  # cancelled or superseded: no longer a price
            assert interval.consumption_tariff_interval_list_link is not None
            ctis = await c.get_as(
                ConsumptionTariffIntervalList, interval.consumption_tariff_interval_list_link.href
            )
            assert ctis.all == 1
            assert ctis.items[0].start_value == 0
            price = ctis.items[0].price
            assert price is not None
            rows.append((interval.interval.start, interval.interval.duration, price))
        found[rt.flow_direction or 0] = rows
    return profile, found


async def _client(
    session: aiohttp.ClientSession, server: Sep2Server, lfdi: str, device: str
) -> _EdevClient:
    c = _EdevClient(session, server.url, lfdi)
    c.edev = server.edev_href(device)
    return c


async def test_each_client_reads_its_groups_prices_per_kwh(fleet: Fleet) -> None:
    server = fleet.server
    gateway_wide = _schedule([(0.10, None), (0.12, None)])
    feeder = _schedule(
        [(0.25, 0.05), (0.30, 0.05), (-0.01, -0.02)], scope="feeder:f1", kind=PriceKind.REAL_TIME
    )
    assert server.set_price(gateway_wide)
    assert server.set_price(feeder)
    assert not server.set_price(feeder)  # a redelivery changes nothing
    hour = int(feeder.points[0].start.timestamp())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        a = await _client(session, server, LFDI_A, "bat-a")  # feeder:f1
        profile, prices = await _prices(a)
        assert (profile.currency, profile.price_power_of_ten_multiplier) == (840, -5)
        assert profile.primacy == 1  # real-time
        # price x 10^-5 USD per kWh: import (flowDirection 1) and export (19) per hour
        assert prices == {
            1: [(hour, 3600, 25000), (hour + 3600, 3600, 30000), (hour + 7200, 3600, -1000)],
            19: [(hour, 3600, 5000), (hour + 3600, 3600, 5000), (hour + 7200, 3600, -2000)],
        }
        b = await _client(session, server, LFDI_B, "bat-b")  # not in feeder:f1
        profile, prices = await _prices(b)
        assert profile.primacy == 2  # the gateway-wide day-ahead schedule
        assert prices[1] == [(hour, 3600, 10000), (hour + 3600, 3600, 12000)]
        assert prices[19] == prices[1]  # no export price: the import price

        # A newer feeder schedule replaces what A reads; B's prices stay. The intervals A knew
        # stay listed under their mRIDs: superseded where the new one prices the hour, else
        # cancelled (IEEE 2030.5: an event is never silently dropped before it ends).
        known = await _interval_states(a, f"{a.edev}/tp/2/rc/1/tti")
        assert sorted(known.values()) == [(hour, 1), (hour + 3600, 0), (hour + 7200, 0)]
        newer = _schedule(
            [(0.40, None)],
            scope="feeder:f1",
            kind=PriceKind.REAL_TIME,
            issued=datetime(2026, 1, 2, tzinfo=UTC),
        )
        assert server.set_price(newer)
        _, prices = await _prices(a)
        assert prices == {1: [(hour, 3600, 40000)], 19: [(hour, 3600, 40000)]}
        now_listed = await _interval_states(a, f"{a.edev}/tp/2/rc/1/tti")
        assert {m: now_listed[m] for m in known} == {
            m: (start, 4 if start == hour else 2) for m, (start, _) in known.items()
        }
        assert len(now_listed) == 4  # and the new one
        active = await a.get_as(TimeTariffIntervalList, f"{a.edev}/tp/2/rc/1/acttti")
        assert [i.mrid not in known for i in active.items] == [True]
        _, prices = await _prices(b)
        assert prices[1] == [(hour, 3600, 10000), (hour + 3600, 3600, 12000)]

        # B cannot read A's tariff tree; an unknown profile is 404.
        status, _, _ = await b.request("GET", f"{a.edev}/tp/2/rc/1/tti")
        assert status == 403
        status, _, _ = await a.request("GET", f"{a.edev}/tp/9")
        assert status == 404


async def test_no_schedule_no_profiles(fleet: Fleet) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        a = await _client(session, fleet.server, LFDI_A, "bat-a")
        profiles = await a.get_as(TariffProfileList, f"{a.edev}/tp")
        assert (profiles.all, profiles.items) == (0, ())


async def test_a_new_schedule_or_poll_rate_notifies_the_tariff_profile_list_subscribers(
    receiver: Receiver,
) -> None:
    """A client subscribed to its TariffProfileList is told of a new schedule for it (with the
    new profile), not of one for another group, and of a new pollRate."""
    server = Sep2Server(_config(notification_hosts=("127.0.0.1",)))
    a_groups, b_groups = ("substation:s1", "feeder:f1"), ("substation:s1", "feeder:f2")
    await Sep2Der("bat-a", Sep2DerEndpoint(lfdi=LFDI_A), server=server, groups=a_groups).connect()
    await Sep2Der("bat-b", Sep2DerEndpoint(lfdi=LFDI_B), server=server, groups=b_groups).connect()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            a = await _client(session, server, LFDI_A, "bat-a")
            body = _subscription(f"{a.edev}/tp", receiver.url + "/tp")
            status, _, _ = await a.request("POST", f"{a.edev}/sub", body)
            assert status == 201
            assert server.set_price(_schedule([(0.2, None)], scope="feeder:f2"))
            assert server.set_price(_schedule([(0.3, None)], scope="feeder:f1"))
            note = await receiver.next()
            assert note.subscribed_resource == f"{a.edev}/tp"
            assert isinstance(note.resource, TariffProfileList)
            (profile,) = note.resource.items
            _, prices = await _prices(a)
            assert prices[1][0][2] == 30000  # the feeder:f1 schedule, not feeder:f2's
            assert profile.href == f"{a.edev}/tp/1"
            await receiver.nothing(0.3)  # one Notification: feeder:f2's is not A's
            # The pollRate it carries changes at run time, and the subscriber is told.
            server.set_rates(poll_rate_s=120)
            note = await receiver.next()
            assert isinstance(note.resource, TariffProfileList)
            assert note.resource.poll_rate == 120
            served = await a.get_as(TariffProfileList, f"{a.edev}/tp")
            assert served.poll_rate == 120
    finally:
        await server.stop()
