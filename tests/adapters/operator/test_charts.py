"""The pictures and tables, byte for byte on a small fixed input.

The expected files are in ``fixtures/``; after an intended change to a chart, write them again
from ``tests/adapters/operator/samples.py`` and look at the SVGs before committing them."""

from __future__ import annotations

import csv
import io
import xml.etree.ElementTree as ET
from pathlib import Path

from adapters.operator.charts import (
    ComplianceSeries,
    compliance_csv,
    compliance_svg,
    performance_csv,
    performance_svg,
)
from tests.adapters.operator.samples import compliance_series, performance_report

FIXTURES = Path(__file__).parent / "fixtures"
SVG = "{http://www.w3.org/2000/svg}"


def expected(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_performance_csv_and_svg_are_exactly_the_fixtures() -> None:
    report = performance_report()
    assert performance_csv(report).encode() == expected("performance.csv")
    assert performance_svg(report).encode() == expected("performance.svg")


def test_compliance_csv_and_svg_are_exactly_the_fixtures() -> None:
    series = compliance_series()
    assert compliance_csv(series).encode() == expected("compliance.csv")
    assert compliance_svg(series).encode() == expected("compliance.svg")


def test_the_csv_is_rfc_4180_with_empty_cells_for_missing_data() -> None:
    text = performance_csv(performance_report())
    assert text.endswith("\r\n")
    assert "\n" not in text.replace("\r\n", "")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["scope"] for r in rows] == ["group"] * 3 + ["device"] * 6
    last = rows[-1]
    assert (last["id"], last["metered_kw"], last["delivered_kw"]) == ("bat-2", "", "0.000")
    envelope = list(csv.DictReader(io.StringIO(compliance_csv(compliance_series()))))
    assert [r["outside"] for r in envelope] == ["false", "false", "true", "false", "true"]
    # headroom = limit − measured (import), limit + measured (export); excess past the nearest
    assert envelope[2]["import_headroom_kw"] == "-3.500"
    assert envelope[2]["excess_kw"] == "3.500"
    assert envelope[4]["export_headroom_kw"] == "-1.500"
    assert envelope[4]["excess_kw"] == "1.500"
    assert envelope[3]["measured_kw"] == envelope[3]["import_headroom_kw"] == ""


def test_the_svgs_are_well_formed_and_say_what_they_show() -> None:
    perf = ET.fromstring(performance_svg(performance_report()))
    assert perf.tag == f"{SVG}svg"
    assert perf.get("width") == "720"
    texts = [t.text for t in perf.iter(f"{SVG}text")]
    assert "Event performance: shed-1" in texts
    assert any(t and t.startswith("performance ratio 0.82") for t in texts)
    # baseline, baseline + request and metered: three step lines; delivered: one bar an hour
    assert len(list(perf.iter(f"{SVG}path"))) == 3
    envelope = ET.fromstring(compliance_svg(compliance_series()))
    titles = [t.text for t in envelope.iter(f"{SVG}text")]
    assert "Envelope compliance: doe-1" in titles
    assert "16:25" in titles


def test_nothing_to_draw_says_so() -> None:
    empty = ComplianceSeries(
        command_id="doe-2",
        target="feeder:f9",
        state="accepted",
        interval_s=300,
        devices_total=0,
        points=(),
    )
    svg = compliance_svg(empty)
    assert "no meter data in the history for this window" in svg
    ET.fromstring(svg)
    assert compliance_csv(empty).count("\r\n") == 1  # the header alone
    report = performance_report().model_copy(update={"group": None})
    assert "no settled device: nothing to draw" in performance_svg(report)
