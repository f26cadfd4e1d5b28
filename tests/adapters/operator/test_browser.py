"""The live view in a real headless Chromium, against a real gateway: what the page renders,
that it follows a dispatch over the event stream without a reload, and what it looks like.

Chromium takes the operator's credentials in the URL (``http://user:password@host/view``),
and the page's own requests (snapshot, event stream, reports) reuse them from its login."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from tests.adapters.operator.browser import Chromium, read_png, require_chromium
from tests.adapters.operator.conftest import ViewServer
from tests.adapters.operator.samples import performance_report
from tests.e2e.fleet import iso
from unified.model import utcnow

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("chromium")]

BRAND = (0x0B, 0x3D, 0x91)  # the header bar (view.css --brand)
LIVE = (0x2E, 0x7D, 0x32)  # the "live" badge, once the event stream has delivered (--ok)
ESTIMATE = (0x1F, 0x77, 0xB4)  # each group's estimate marker in its band (--metered)
NUMBER = r"-?\d+\.\d"


@pytest.fixture
def chromium() -> None:
    require_chromium()


def node_of(group: str) -> str:
    return f"document.querySelector('#tree .node[data-group=\"{group}\"]')"


async def test_the_page_shows_the_topology_and_each_groups_power(view: ViewServer) -> None:
    async with Chromium() as browser:
        await browser.navigate(view.url())
        await browser.wait_for(
            "document.querySelector('#groups tr[data-group=\"feeder:f1\"] .interval')"
            " && document.querySelector('#groups tr[data-group=\"feeder:f1\"] .interval')"
            ".textContent !== '—'",
            what="the feeder's estimate band",
        )
        dom = await browser.dom()
        # A settled dispatch's picture, asked for by id in the page's report form.
        assert view.core.history is not None
        await view.core.history.save_report(
            "shed-1", utcnow(), performance_report().model_dump_json()
        )
        await browser.evaluate(
            "document.getElementById('report-id').value = 'shed-1';"
            " document.getElementById('report-id').dispatchEvent(new Event('input'));"
            " document.getElementById('report-form').requestSubmit()"
        )
        size = await browser.wait_for(
            "(() => { const i = document.querySelector('#chart img');"
            " return i && i.complete && i.naturalWidth ? [i.naturalWidth, i.naturalHeight] : null;"
            " })()",
            what="the report's picture in the page",
        )
        csv_link = await browser.evaluate("document.getElementById('report-csv').href")
        parents = await browser.evaluate(
            "Object.fromEntries([...document.querySelectorAll('#tree .node')].map(n => {"
            " const up = n.closest('li').parentElement.closest('li');"
            " return [n.dataset.group, up ? up.querySelector('.node').dataset.group : null]; }))"
        )
    assert size == [720, 340]
    assert csv_link == view.origin + "/view/reports/shed-1.csv"
    # The whole tree, nested substation > feeder > feeder section > transformer.
    assert parents == {
        "substation:s1": None,
        "feeder:f1": "substation:s1",
        "feeder_section:f1-a": "feeder:f1",
        "transformer:t1": "feeder_section:f1-a",
        "transformer:t3": "feeder_section:f1-a",
        "feeder:f2": "substation:s1",
        "transformer:t2": "feeder:f2",
        "transformer:t4": "feeder:f2",
    }
    # Each group's power, band and baseline in the table; availability by class and group.
    row = re.search(r'<tr data-group="feeder:f1"[^>]*>(.*?)</tr>', dom)
    assert row is not None
    cells = dict(re.findall(r'<td class="([a-z-]+)">([^<]*)</td>', row.group(1)))
    assert re.fullmatch(NUMBER, cells["power"])
    assert re.fullmatch(rf"{NUMBER} … {NUMBER}", cells["interval"])
    assert re.fullmatch(NUMBER, cells["baseline"])
    assert cells["devices"] == "2 / 2"
    assert (
        '<tr data-class="battery"><td class="text">battery</td><td class="available">4 / 4</td>'
        in dom
    )
    assert '<span class="range"' in row.group(1)
    assert '<span class="est"' in row.group(1)
    assert 'id="no-commands"' in dom
    assert "No dispatch or setpoint in force." in dom


async def test_a_dispatch_appears_live_with_requested_committed_and_delivered(
    view: ViewServer,
) -> None:
    async with Chromium() as browser:
        await browser.navigate(view.url())
        await browser.wait_for("document.getElementById('conn').textContent === 'live'")
        assert await browser.evaluate("document.querySelectorAll('#commands tbody tr').length") == 0
        await browser.evaluate("window.sameDocument = 'yes'")  # gone if the page reloads

        await view.fleet.grid.send(
            {
                "type": "dispatch",
                "command_id": "d1",
                "target": {"group_id": "feeder:f1"},
                "kw": -6.0,
                "start": iso(0.3),
                "duration_s": 60,
            }
        )
        row = await browser.wait_for(
            """(() => {
                const r = document.querySelector('#commands tr[data-command="d1"]');
                if (!r || r.querySelector('.state').textContent !== 'active') return null;
                const cell = (c) => r.querySelector('.' + c).textContent;
                if (cell('delivered') === '—') return null;
                return {target: cell('target'), requested: cell('requested'),
                        committed: cell('committed'), delivered: cell('delivered'),
                        devices: cell('devices')};
            })()""",
            timeout_s=20,
            what="d1 active with its delivery",
        )
        assert await browser.evaluate("window.sameDocument") == "yes"
    assert row["target"] == "feeder:f1"
    assert row["requested"] == "-6.0"
    assert re.fullmatch(NUMBER, row["committed"])
    assert re.fullmatch(rf"{NUMBER} \[{NUMBER} … {NUMBER}\]", row["delivered"])
    assert row["devices"] == "2"


async def test_the_screenshot_is_the_page_not_a_blank(view: ViewServer) -> None:
    async with Chromium(width=1280, height=900) as browser:
        await browser.navigate(view.url())
        await browser.wait_for(
            "document.getElementById('conn').textContent === 'live'"
            " && document.querySelectorAll('#groups .band .est').length === 8",
            what="the stream live and every group's band drawn",
        )
        data = await browser.screenshot()
        png = read_png(data)
        if keep := os.environ.get("DERMS_KEEP_SCREENSHOT"):
            await asyncio.to_thread(Path(keep).write_bytes, data)
    assert (png.width, png.height) == (1280, 900)
    assert png.distinct_colours() > 50, "one flat colour is no page"
    # The header bar across the top, the live badge on it, and a 3 × 14 px estimate marker
    # in each of the 8 groups' bands, each in its own colour.
    assert png.pixel(2, 2) == BRAND
    assert png.pixel(1200, 45) == BRAND
    assert png.count(BRAND) > 1280 * 30
    assert png.count(LIVE) > 200
    assert png.count(ESTIMATE) >= 8 * 2 * 14  # (edges may blend into the band)
    assert png.count((255, 255, 255)) < 0.9 * 1280 * 900
