"""Event performance and envelope compliance as small SVG pictures and CSV tables.

Pure functions over the settlement report (:class:`gateway.flex.settlement.PerformanceReport`)
and a :class:`ComplianceSeries`: no I/O, no clock, no dependency beyond the standard library,
so the same input gives the same bytes (the tests compare them byte for byte) whether the
operator downloads them from the live view or from ``derms-gateway report``.

Power is in kW with the load convention throughout (+ import, − export), as on the wire. CSV is
RFC 4180 (``\\r\\n`` line ends, a header row); times are UTC ``YYYY-MM-DDTHH:MM:SSZ``; numbers
have three decimals and an empty cell means no data.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final
from xml.sax.saxutils import escape, quoteattr

from gateway.flex.settlement import PerformanceReport
from unified.model import EnvelopeCompliance

__all__ = [
    "CompliancePoint",
    "ComplianceSeries",
    "compliance_csv",
    "compliance_svg",
    "performance_csv",
    "performance_svg",
]

WIDTH: Final = 720
HEIGHT: Final = 340
_LEFT, _RIGHT, _TOP, _BOTTOM = 64.0, 696.0, 62.0, 268.0
_FONT: Final = "DejaVu Sans, Arial, sans-serif"

# One colour per meaning, the same in the live view's stylesheet.
COLOURS: Final = {
    "baseline": "#7f7f7f",
    "metered": "#1f77b4",
    "expected": "#ff7f0e",
    "delivered": "#aec7e8",
    "import": "#d62728",
    "export": "#9467bd",
    "allowed": "#dff0d8",
    "outside": "#f2b8b8",
}


# --------------------------------------------------------------------------- input


@dataclass(frozen=True, slots=True)
class CompliancePoint:
    """One interval of an envelope's group at the meter, against the limits then in force."""

    start: datetime
    end: datetime
    measured_kw: float | None
    """The members' summed interval-mean power; None when none of them reported."""
    devices_reporting: int
    import_limit_kw: float | None
    export_limit_kw: float | None
    outside: bool
    """Past a limit by more than the envelope's tolerance."""

    @property
    def import_headroom_kw(self) -> float | None:
        if self.measured_kw is None or self.import_limit_kw is None:
            return None
        return self.import_limit_kw - self.measured_kw

    @property
    def export_headroom_kw(self) -> float | None:
        if self.measured_kw is None or self.export_limit_kw is None:
            return None
        return self.export_limit_kw + self.measured_kw

    @property
    def excess_kw(self) -> float | None:
        """How far past its nearest limit the group was (0 inside)."""
        rooms = [r for r in (self.import_headroom_kw, self.export_headroom_kw) if r is not None]
        if not rooms:
            return None
        return max(0.0, -min(rooms))


@dataclass(frozen=True, slots=True)
class ComplianceSeries:
    """An envelope over its window: one point per history interval, and the ack's summary."""

    command_id: str
    target: str
    """The group id, or how many devices a device-list envelope names."""
    state: str
    interval_s: int
    devices_total: int
    points: tuple[CompliancePoint, ...]
    summary: EnvelopeCompliance | None = None
    """The latest ack's compliance (time in force and outside, worst excursion), if any."""


# --------------------------------------------------------------------------- formatting


def _utc(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return ""
    return f"{round(value, 3) or 0.0:.3f}"  # 'or 0.0': never '-0.000'


def _short(value: float) -> str:
    """A compact label: up to three significant decimals, no trailing zeros."""
    text = f"{round(value, 3) or 0.0:.3f}".rstrip("0").rstrip(".")
    return text.replace("-", "\u2212")


def _px(value: float) -> str:
    return f"{round(value, 1) or 0.0:.1f}"


def _csv(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


# --------------------------------------------------------------------------- CSV


def performance_csv(report: PerformanceReport) -> str:
    """The report's group and device rows, one line per settlement interval."""
    header = (
        "command_id",
        "scope",
        "id",
        "interval_start",
        "interval_end",
        "baseline_kw",
        "metered_kw",
        "delivered_kw",
        "requested_kw",
        "quality",
    )
    step = timedelta(seconds=report.interval_s)
    rows: list[list[str]] = []
    group = report.group
    if group is not None:
        for i, (base, metered, delivered) in enumerate(
            zip(group.baseline_kw, group.metered_kw, group.delivered_kw, strict=True)
        ):
            start = report.start + i * step
            rows.append(
                [
                    report.command_id,
                    "group",
                    group.group_id,
                    _utc(start),
                    _utc(start + step),
                    _num(base),
                    _num(metered),
                    _num(delivered),
                    _num(group.requested_kw),
                    group.quality.value,
                ]
            )
    for device in report.devices:
        perf = device.performance
        if perf is None:
            continue
        width = timedelta(seconds=perf.interval_s)
        for i, (base, metered_or_none, delivered) in enumerate(
            zip(perf.baseline_kw, perf.metered_kw, perf.delivered_kw, strict=True)
        ):
            start = perf.start + i * width
            rows.append(
                [
                    report.command_id,
                    "device",
                    device.device_id,
                    _utc(start),
                    _utc(start + width),
                    _num(base),
                    _num(metered_or_none),
                    _num(delivered),
                    _num(perf.requested_kw),
                    perf.quality.value,
                ]
            )
    return _csv(header, rows)


def compliance_csv(series: ComplianceSeries) -> str:
    """One line per interval: measured power, the limits in force, headroom and excess."""
    header = (
        "command_id",
        "target",
        "interval_start",
        "interval_end",
        "measured_kw",
        "devices_reporting",
        "import_limit_kw",
        "export_limit_kw",
        "import_headroom_kw",
        "export_headroom_kw",
        "excess_kw",
        "outside",
    )
    rows = [
        [
            series.command_id,
            series.target,
            _utc(p.start),
            _utc(p.end),
            _num(p.measured_kw),
            str(p.devices_reporting),
            _num(p.import_limit_kw),
            _num(p.export_limit_kw),
            _num(p.import_headroom_kw),
            _num(p.export_headroom_kw),
            _num(p.excess_kw),
            "true" if p.outside else "false",
        ]
        for p in series.points
    ]
    return _csv(header, rows)


# --------------------------------------------------------------------------- SVG


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 × 10^k apart) covering ``[lo, hi]``."""
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    raw = (hi - lo) / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    value = first
    while value < hi + step * 0.999:
        ticks.append(round(value, 9))
        value += step
    return ticks


@dataclass(frozen=True, slots=True)
class _Axes:
    ticks: list[float]
    count: int
    """Intervals along x."""

    @property
    def lo(self) -> float:
        return self.ticks[0]

    @property
    def hi(self) -> float:
        return self.ticks[-1]

    def y(self, kw: float) -> float:
        return _BOTTOM - (kw - self.lo) / (self.hi - self.lo) * (_BOTTOM - _TOP)

    def x(self, boundary: float) -> float:
        return _LEFT + boundary / max(1, self.count) * (_RIGHT - _LEFT)


def _axes(values: Iterable[float | None], count: int) -> _Axes:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    finite.append(0.0)  # zero always shows: the sign of power is the point of the picture
    return _Axes(_nice_ticks(min(finite), max(finite)), count)


def _text(
    x: float, y: float, text: str, *, size: int = 11, anchor: str = "start", **attrs: str
) -> str:
    extra = "".join(f" {k.replace('_', '-')}={quoteattr(v)}" for k, v in attrs.items())
    return (
        f'<text x="{_px(x)}" y="{_px(y)}" font-size="{size}" text-anchor="{anchor}"{extra}>'
        f"{escape(text)}</text>"
    )


def _frame(axes: _Axes, starts: Sequence[datetime], step: timedelta) -> list[str]:
    """Grid lines, the kW axis, the zero line and the time labels (HH:MM UTC)."""
    out = ['<g stroke="#e0e0e0" stroke-width="1">']
    out += [
        f'<line x1="{_px(_LEFT)}" y1="{_px(axes.y(t))}" x2="{_px(_RIGHT)}" y2="{_px(axes.y(t))}"/>'
        for t in axes.ticks
    ]
    out.append("</g>")
    out.append('<g fill="#444">')
    out += [_text(_LEFT - 6, axes.y(t) + 4, _short(t), anchor="end") for t in axes.ticks]
    every = max(1, math.ceil(len(starts) / 8))
    times = [*starts, starts[-1] + step] if starts else []
    for i, when in enumerate(times):
        if i % every == 0 or i == len(times) - 1:
            label = when.astimezone(UTC).strftime("%H:%M")
            out.append(_text(axes.x(i), _BOTTOM + 16, label, anchor="middle"))
    out.append("</g>")
    out.append(
        f'<line x1="{_px(_LEFT)}" y1="{_px(axes.y(0.0))}" x2="{_px(_RIGHT)}" '
        f'y2="{_px(axes.y(0.0))}" stroke="#444" stroke-width="1"/>'
    )
    out.append(
        f'<rect x="{_px(_LEFT)}" y="{_px(_TOP)}" width="{_px(_RIGHT - _LEFT)}" '
        f'height="{_px(_BOTTOM - _TOP)}" fill="none" stroke="#999"/>'
    )
    out.append(_text(14, _TOP - 8, "kW", fill="#444"))
    return out


def _steps(axes: _Axes, values: Sequence[float | None]) -> str:
    """A step line's path: a flat segment per interval, broken where there is no value."""
    parts: list[str] = []
    pen_down = False
    for i, value in enumerate(values):
        if value is None or not math.isfinite(value):
            pen_down = False
            continue
        y = _px(axes.y(value))
        parts.append(f"{'L' if pen_down else 'M'}{_px(axes.x(i))} {y}L{_px(axes.x(i + 1))} {y}")
        pen_down = True
    return "".join(parts)


def _line(axes: _Axes, values: Sequence[float | None], colour: str, **attrs: str) -> str:
    path = _steps(axes, values)
    if not path:
        return ""
    extra = "".join(f" {k.replace('_', '-')}={quoteattr(v)}" for k, v in attrs.items())
    return f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"{extra}/>'


def _legend(entries: Sequence[tuple[str, str, str]]) -> list[str]:
    """``(label, colour, dash)`` swatches in a row under the plot."""
    out = []
    x = _LEFT
    for label, colour, dash in entries:
        dashing = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<line x1="{_px(x)}" y1="300.0" x2="{_px(x + 22)}" y2="300.0" stroke="{colour}" '
            f'stroke-width="3"{dashing}/>'
        )
        out.append(_text(x + 28, 304, label, fill="#222"))
        x += 36 + 7 * len(label)
    return out


def _document(title: str, subtitle: str, body: list[str], footer: str) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="{_FONT}" role="img">'
    )
    return "\n".join(
        [
            '<?xml version="1.0" encoding="UTF-8"?>',
            head,
            f"<title>{escape(title)}</title>",
            f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
            _text(14, 22, title, size=14, font_weight="bold", fill="#111"),
            _text(14, 40, subtitle, fill="#555"),
            *body,
            _text(14, 328, footer, fill="#333"),
            "</svg>",
            "",
        ]
    )


def _no_data(title: str, subtitle: str, why: str) -> str:
    body = [
        f'<rect x="{_px(_LEFT)}" y="{_px(_TOP)}" width="{_px(_RIGHT - _LEFT)}" '
        f'height="{_px(_BOTTOM - _TOP)}" fill="#f7f7f7" stroke="#999"/>',
        _text((_LEFT + _RIGHT) / 2, (_TOP + _BOTTOM) / 2, why, size=13, anchor="middle"),
    ]
    return _document(title, subtitle, body, "")


def performance_svg(report: PerformanceReport) -> str:
    """The group's baseline, metered power and what was asked of it, interval by interval;
    the shaded gap between baseline and metered is what the event delivered."""
    title = f"Event performance: {report.command_id}"
    subtitle = (
        f"{report.group_id or 'device list'} \u00b7 {report.mode.value} "
        f"{_short(report.dispatch_kw)} kW \u00b7 {_utc(report.start)} to {_utc(report.end)} "
        f"\u00b7 {report.final_state.value}"
    )
    group = report.group
    if group is None or not group.baseline_kw:
        return _no_data(title, subtitle, "no settled device: nothing to draw")
    count = len(group.baseline_kw)
    step = timedelta(seconds=report.interval_s)
    starts = [report.start + i * step for i in range(count)]
    requested = group.requested_kw
    expected: list[float | None] = [
        None if requested is None else b + requested for b in group.baseline_kw
    ]
    axes = _axes([*group.baseline_kw, *group.metered_kw, *expected], count)
    body = _frame(axes, starts, step)
    shading = ['<g fill="{}" fill-opacity="0.6">'.format(COLOURS["delivered"])]
    for i, (base, metered) in enumerate(zip(group.baseline_kw, group.metered_kw, strict=True)):
        top, bottom = axes.y(max(base, metered)), axes.y(min(base, metered))
        shading.append(
            f'<rect x="{_px(axes.x(i))}" y="{_px(top)}" width="{_px(axes.x(i + 1) - axes.x(i))}" '
            f'height="{_px(bottom - top)}"/>'
        )
    shading.append("</g>")
    body += shading
    body.append(_line(axes, list(group.baseline_kw), COLOURS["baseline"], stroke_dasharray="6 4"))
    body.append(_line(axes, expected, COLOURS["expected"], stroke_dasharray="2 3"))
    body.append(_line(axes, list(group.metered_kw), COLOURS["metered"]))
    body += _legend(
        [
            ("baseline", COLOURS["baseline"], "6 4"),
            ("metered", COLOURS["metered"], ""),
            ("baseline + request", COLOURS["expected"], "2 3"),
            ("delivered", COLOURS["delivered"], ""),
        ]
    )
    ratio = "n/a" if report.performance_ratio is None else f"{report.performance_ratio:.2f}"
    footer = (
        f"performance ratio {ratio} \u00b7 delivered {_short(group.delivered_kwh)} kWh "
        f"(mean {_short(group.mean_delivered_kw)} kW) \u00b7 {group.devices_settled} device(s) "
        f"\u00b7 quality {report.quality.value} \u00b7 {len(report.flags)} flag(s)"
    )
    return _document(title, subtitle, [b for b in body if b], footer)


def compliance_svg(series: ComplianceSeries) -> str:
    """The group's measured net power against the import limit (above zero) and the export
    limit (below zero); the allowed band is shaded green, intervals outside it red."""
    title = f"Envelope compliance: {series.command_id}"
    points = series.points
    span = f"{_utc(points[0].start)} to {_utc(points[-1].end)}" if points else "no interval yet"
    subtitle = f"{series.target} \u00b7 {span} \u00b7 {series.state}"
    summary = series.summary
    footer = (
        f"in force {summary.seconds_in_force:g} s \u00b7 outside {summary.seconds_outside:g} s "
        f"\u00b7 worst excursion {_short(summary.worst_excursion_kw)} kW"
        if summary is not None
        else "no compliance reported on the ack yet"
    )
    if not points or all(p.measured_kw is None for p in points):
        return _no_data(title, subtitle, "no meter data in the history for this window")
    count = len(points)
    step = timedelta(seconds=series.interval_s)
    imports = [p.import_limit_kw for p in points]
    exports = [None if p.export_limit_kw is None else -p.export_limit_kw for p in points]
    measured = [p.measured_kw for p in points]
    axes = _axes([*imports, *exports, *measured], count)
    body = _frame(axes, [p.start for p in points], step)
    band = ['<g fill="{}">'.format(COLOURS["allowed"])]
    alarms = ['<g fill="{}" fill-opacity="0.7">'.format(COLOURS["outside"])]
    for i, (point, high, low) in enumerate(zip(points, imports, exports, strict=True)):
        x0, x1 = axes.x(i), axes.x(i + 1)
        if high is not None or low is not None:
            top = _TOP if high is None else axes.y(high)
            bottom = _BOTTOM if low is None else axes.y(low)
            band.append(
                f'<rect x="{_px(x0)}" y="{_px(top)}" width="{_px(x1 - x0)}" '
                f'height="{_px(bottom - top)}"/>'
            )
        if point.outside:
            alarms.append(
                f'<rect x="{_px(x0)}" y="{_px(_TOP)}" width="{_px(x1 - x0)}" '
                f'height="{_px(_BOTTOM - _TOP)}"/>'
            )
    band.append("</g>")
    alarms.append("</g>")
    # The band first, so the grid and the lines stay visible over it.
    body = [*band, *alarms, *body]
    body.append(_line(axes, imports, COLOURS["import"]))
    body.append(_line(axes, exports, COLOURS["export"]))
    body.append(_line(axes, measured, COLOURS["metered"]))
    body += _legend(
        [
            ("measured net power", COLOURS["metered"], ""),
            ("import limit", COLOURS["import"], ""),
            ("export limit", COLOURS["export"], ""),
            ("outside", COLOURS["outside"], ""),
        ]
    )
    return _document(title, subtitle, [b for b in body if b], footer)
