"""The live view over HTTP against a real gateway: authentication on every route, the snapshot,
the event stream, report downloads; and the feed's limits (bounded queues, a cap on streams)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from adapters.operator.charts import performance_csv, performance_svg
from adapters.operator.view import FEED, LiveFeed
from gateway.audit import read_lines
from gateway.flex.performance import DevicePerformance
from gateway.flex.settlement import DeviceSettlement, GroupSettlement, PerformanceReport
from tests.adapters.operator.conftest import PASSWORD, USER, ViewServer
from tests.e2e.fleet import eventually, iso
from unified.model import AckState, DispatchMode, Quality, utcnow

pytestmark = pytest.mark.broker

ROUTES = (
    "/view",
    "/view/",
    "/view/api/snapshot",
    "/view/events",
    "/view/reports/d1.csv",
    "/view/reports/d1.svg",
)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


def good() -> dict[str, str]:
    return basic(USER, PASSWORD)


async def test_every_route_refuses_without_the_right_credentials(view: ViewServer) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ROUTES:
            for headers in ({}, basic(USER, "wrong"), basic("root", PASSWORD)):
                async with http.get(
                    view.origin + path, headers=headers, allow_redirects=False
                ) as r:
                    assert r.status == 401, (path, headers)
                    assert r.headers["WWW-Authenticate"] == (
                        'Basic realm="derms-gateway operator", charset="UTF-8"'
                    )
                    assert "no-store" in r.headers["Cache-Control"]
        async with http.get(
            view.origin + "/view", headers={"Authorization": "Bearer " + PASSWORD}
        ) as r:
            assert r.status == 401
        # With them: the page, its data, the stream; an unknown report is a 404, not a 401.
        async with http.get(view.origin + "/view", headers=good()) as r:
            assert r.status == 200
            assert r.content_type == "text/html"
            policy = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in policy
            assert "script-src 'sha256-" in policy
            page = await r.text()
            assert "<script>" in page
            assert "http" not in page.split("<script>")[1].split("location.origin")[0]
        async with http.get(view.origin + "/view/reports/d1.csv", headers=good()) as r:
            assert r.status == 404
            assert "no command with this id" in await r.text()
    # Wrong credentials (not missing ones) are in the audit trail, one record per source.
    audit = view.core.audit_log
    assert audit is not None

    def refusals() -> list[dict[str, Any]]:
        return [
            line.record
            for line in read_lines(audit.directory)
            if line.record is not None and line.record["kind"] == "access.refused"
        ]

    await eventually(lambda: bool(refusals()), 5, "access.refused in the audit log")
    (record,) = refusals()
    assert record["source"] == "http:127.0.0.1"
    assert record["details"]["endpoint"] == "operator-view"
    assert record["details"]["reason"] == "bad_credentials"


async def test_the_snapshot_shows_the_topology_and_each_groups_power(view: ViewServer) -> None:
    async with aiohttp.ClientSession(headers=good()) as http:

        async def snapshot() -> dict[str, object]:
            async with http.get(view.origin + "/view/api/snapshot") as r:
                assert r.status == 200
                return await r.json()  # type: ignore[no-any-return]

        s = await snapshot()
    tree = s["tree"]
    assert [n["group_id"] for n in tree] == ["substation:s1"]
    feeders = tree[0]["children"]
    assert [f["group_id"] for f in feeders] == ["feeder:f1", "feeder:f2"]
    assert [c["group_id"] for c in feeders[0]["children"]] == ["feeder_section:f1-a"]
    assert [t["group_id"] for t in feeders[0]["children"][0]["children"]] == [
        "transformer:t1",
        "transformer:t3",
    ]
    assert [t["group_id"] for t in feeders[1]["children"]] == ["transformer:t2", "transformer:t4"]
    f1 = s["groups"]["feeder:f1"]
    assert f1["devices_total"] == 2
    assert f1["baseline_kw"] == pytest.approx(0.0, abs=0.05)
    assert s["availability_by_class"] == {"battery": {"available": 4, "total": 4}}
    assert s["availability_by_group"]["feeder:f2"] == {"battery": {"available": 2, "total": 2}}
    assert s["commands"] == []
    assert s["envelopes"] == []


async def read_events(response: aiohttp.ClientResponse, count: int) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    kind = None
    while len(events) < count:
        line = (await response.content.readline()).decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            assert kind == "snapshot"
            events.append(json.loads(line.removeprefix("data: ")))
    return events


async def test_the_stream_sends_a_snapshot_at_once_then_each_change(view: ViewServer) -> None:
    async with (
        aiohttp.ClientSession(headers=good()) as http,
        http.get(view.origin + "/view/events") as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        first = await read_events(r, 1)
        assert first[0]["gateway_id"] == view.fleet.gateway_id
        await view.fleet.grid.send(
            {
                "type": "dispatch",
                "command_id": "d1",
                "target": {"group_id": "feeder:f1"},
                "kw": -6.0,
                "start": iso(0.2),
                "duration_s": 30,
            }
        )
        async with asyncio.timeout(10):
            while True:
                (event,) = await read_events(r, 1)
                commands = event["commands"]
                if commands and commands[0]["state"] == "active":  # type: ignore[index]
                    break
        (d1,) = commands  # type: ignore[misc]
        assert d1["command_id"] == "d1"
        assert d1["requested_kw"] == pytest.approx(-6.0)
        assert d1["committed_kw"] == pytest.approx(-6.0, abs=0.5)
        assert d1["devices"] == 2


async def test_a_settled_report_downloads_as_the_charts_draw_it(view: ViewServer) -> None:
    report = sample_report()
    history = view.core.history
    assert history is not None
    await history.save_report("d9", utcnow(), report.model_dump_json())
    async with aiohttp.ClientSession(headers=good()) as http:
        async with http.get(view.origin + "/view/reports/d9.svg") as r:
            assert r.status == 200
            assert r.content_type == "image/svg+xml"
            assert r.headers["Content-Disposition"] == 'attachment; filename="d9-performance.svg"'
            assert await r.read() == performance_svg(report).encode()
        async with http.get(view.origin + "/view/reports/d9.svg?inline=1") as r:
            assert r.headers["Content-Disposition"].startswith("inline;")
        async with http.get(view.origin + "/view/reports/d9.csv") as r:
            assert r.status == 200
            assert r.content_type == "text/csv"
            assert await r.read() == performance_csv(report).encode()


async def test_an_envelopes_compliance_comes_from_the_history(view: ViewServer) -> None:
    await view.fleet.grid.send(
        {
            "type": "envelope",
            "command_id": "env-1",
            "target": {"group_id": "feeder:f1"},
            "intervals": [{"start": iso(-60), "end": iso(600), "import_limit_kw": 3.0}],
        }
    )
    await view.fleet.grid.wait_for_state("env-1", AckState.ACTIVE, 5)
    async with aiohttp.ClientSession(headers=good()) as http:

        async def rows() -> list[list[str]]:
            async with http.get(view.origin + "/view/reports/env-1.csv") as r:
                assert r.status == 200
                lines = (await r.text()).splitlines()
            assert lines[0].startswith("command_id,target,interval_start,interval_end,measured_kw")
            return [line.split(",") for line in lines[1:]]

        found: list[list[str]] = []

        async def measured() -> bool:
            found[:] = [row for row in await rows() if row[4]]
            return bool(found)

        deadline = asyncio.get_running_loop().time() + 10
        while not await measured():
            assert asyncio.get_running_loop().time() < deadline, "no measured interval"
            await asyncio.sleep(0.2)
        row = found[-1]
        assert row[:2] == ["env-1", "feeder:f1"]
        assert row[5] == "2"
        assert row[6] == "3.000"
        assert row[7] == ""
        assert row[11] == "false"
        async with http.get(view.origin + "/view/reports/env-1.svg") as r:
            svg = await r.text()
        assert "Envelope compliance: env-1" in svg
        assert "import limit" in svg
        async with http.get(view.origin + "/view/api/snapshot") as r:
            (envelope,) = (await r.json())["envelopes"]
    assert envelope["import_limit_kw"] == 3.0
    assert envelope["import_headroom_kw"] == pytest.approx(3.0 - envelope["measured_kw"], abs=1e-3)


async def test_streams_are_capped_and_end_on_shutdown(view: ViewServer) -> None:
    feed = view.app[FEED]
    feed.max_streams = 2
    async with aiohttp.ClientSession(headers=good()) as http:
        first = await http.get(view.origin + "/view/events")
        second = await http.get(view.origin + "/view/events")
        await read_events(first, 1)
        await read_events(second, 1)
        async with http.get(view.origin + "/view/events") as third:
            assert third.status == 503
            assert third.headers["Retry-After"] == "10"
        assert feed.refused == 1
        await view.app.shutdown()  # the server stopping: open streams end, none holds it up
        for stream in (first, second):
            await asyncio.wait_for(stream.content.read(), 5)  # to its end: the server closed it
            assert stream.content.at_eof()
        await eventually(lambda: feed.streams == 0, 2, "streams closed")
        first.release()
        second.release()


async def test_a_slow_client_is_dropped_and_never_holds_the_feed() -> None:
    built = 0

    def build() -> bytes:
        nonlocal built
        built += 1
        return b'{"n": %d}' % built

    feed = LiveFeed(build, period_s=60, max_streams=4, min_gap_s=0)
    slow = feed.subscribe("slow")
    quick = feed.subscribe("quick")
    assert slow is not None
    assert quick is not None
    for _ in range(10):
        feed.publish(build())
        quick.queue.get_nowait()  # the quick one keeps up
    assert feed.dropped == 1
    assert feed.streams == 1
    # The dropped one is told to end, with nothing stale left in its queue.
    assert slow.queue.get_nowait() is None
    assert slow.queue.empty()
    # Nobody watching: the feed builds nothing.
    feed.unsubscribe(quick)
    task = asyncio.create_task(feed.run())
    before = built
    feed.changed()
    await asyncio.sleep(0.05)
    task.cancel()
    assert built == before


def sample_report() -> PerformanceReport:
    start = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    end = start + timedelta(hours=2)
    perf = DevicePerformance(
        device_id="bat-1",
        start=start,
        end=end,
        interval_s=3600,
        baseline_kw=(0.5, 0.4),
        weights=(1.0, 1.0),
        event_hours=2.0,
        metered_kw=(-4.5, None),
        delivered_kw=(-5.0, 0.0),
        baseline_kwh=0.9,
        metered_kwh=-4.1,
        delivered_kwh=-5.0,
        mean_delivered_kw=-2.5,
        requested_kw=-5.0,
        percent_of_request=50.0,
        intervals_total=2,
        intervals_measured=1,
        intervals_estimated=0,
        intervals_missing=1,
        quality=Quality.SUBSTITUTED,
    )
    group = GroupSettlement(
        group_id="feeder:f1",
        interval_s=3600,
        weights=(1.0, 1.0),
        event_hours=2.0,
        baseline_kw=(0.5, 0.4),
        metered_kw=(-4.5, 0.4),
        delivered_kw=(-5.0, 0.0),
        baseline_kwh=0.9,
        metered_kwh=-4.1,
        delivered_kwh=-5.0,
        mean_delivered_kw=-2.5,
        requested_kw=-5.0,
        percent_of_request=50.0,
        devices_settled=1,
        devices_by_quality={Quality.SUBSTITUTED: 1},
        quality=Quality.SUBSTITUTED,
    )
    return PerformanceReport(
        command_id="d9",
        program="default",
        group_id="feeder:f1",
        final_state=AckState.COMPLETED,
        mode=DispatchMode.DELTA,
        dispatch_kw=-5.0,
        requested_kw=-5.0,
        event_start=start,
        event_end=end,
        start=start,
        end=end,
        interval_s=3600,
        generated_at=end,
        baseline_method="test",
        adjustment_cap=0.2,
        delivered_kwh=-5.0,
        mean_delivered_kw=-2.5,
        performance_ratio=0.5,
        group=group,
        devices=(
            DeviceSettlement(
                device_id="bat-1", allocated=True, requested_kw=-5.0, performance=perf
            ),
        ),
        quality=Quality.SUBSTITUTED,
    )
