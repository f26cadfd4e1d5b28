"""A command's report, found by its id: a dispatch's settled performance, an envelope's
compliance at the meter. One path for the live view's downloads and ``derms-gateway report``,
so both give the same bytes for the same data.

* **Dispatch** → the performance report settlement stored in the history file
  (:meth:`gateway.history.ReadingHistory.report`): there once the event is settled.
* **Envelope** → its target's measured net power per history interval (the members' summed
  interval means, :meth:`gateway.history.ReadingHistory.group_series`) over the envelope's
  window up to now, against the limits then in force (the tightest, where an interval spans a
  change of limits), and the latest ack's compliance summary.
  The same 2 % tolerance as the control loop's :class:`gateway.delivery.EnvelopeWatch` marks
  an interval outside. History lags the meter by up to ``[history] flush_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

from pydantic import ValidationError

from adapters.operator.charts import (
    CompliancePoint,
    ComplianceSeries,
    compliance_csv,
    compliance_svg,
    performance_csv,
    performance_svg,
)
from gateway.delivery import EnvelopeWatch
from gateway.dispatch import target_devices
from gateway.flex.baseline import epoch_s, from_epoch
from gateway.flex.settlement import PerformanceReport
from gateway.history import ReadingHistory
from gateway.registry import Registry
from gateway.store import CommandStore
from unified.model import Ack, Dispatch, OperatingEnvelope

__all__ = [
    "Rendered",
    "Report",
    "ReportFormat",
    "ReportUnavailable",
    "envelope_series",
    "load_report",
    "render",
]

Report = PerformanceReport | ComplianceSeries

MAX_POINTS: Final = 2016
"""Intervals in one compliance picture (a week at 5 min); longer windows use wider ones."""
_TOLERANCE: Final = EnvelopeWatch().tolerance


class ReportFormat(StrEnum):
    CSV = "csv"
    SVG = "svg"


class ReportUnavailable(Exception):
    """No report for this command (yet). ``reason`` is one of ``unknown_command``,
    ``not_settled``, ``no_history``, ``not_reportable``; ``detail`` says what to do."""

    def __init__(self, command_id: str, reason: str, detail: str) -> None:
        super().__init__(f"{command_id}: {detail}")
        self.command_id = command_id
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Rendered:
    body: bytes
    media_type: str
    filename: str


def render(report: Report, fmt: ReportFormat) -> Rendered:
    if isinstance(report, PerformanceReport):
        kind, cid = "performance", report.command_id
        text = performance_svg(report) if fmt is ReportFormat.SVG else performance_csv(report)
    else:
        kind, cid = "compliance", report.command_id
        text = compliance_svg(report) if fmt is ReportFormat.SVG else compliance_csv(report)
    media = "image/svg+xml" if fmt is ReportFormat.SVG else "text/csv"
    return Rendered(text.encode(), f"{media}; charset=utf-8", f"{cid}-{kind}.{fmt.value}")


async def load_report(
    command_id: str,
    *,
    store: CommandStore,
    history: ReadingHistory | None,
    registry: Registry,
    now: datetime,
) -> Report:
    """The report of ``command_id``; :class:`ReportUnavailable` when there is none."""
    stored = await store.get(command_id)
    command = stored.command if stored is not None else None
    if isinstance(command, OperatingEnvelope):
        if history is None:
            raise ReportUnavailable(
                command_id,
                "no_history",
                "envelope compliance is drawn from the reading "
                "history, which is off ([history] enabled = false)",
            )
        assert stored is not None
        return await envelope_series(command, stored.ack, history, registry, now)
    if command is not None and not isinstance(command, Dispatch):
        raise ReportUnavailable(
            command_id,
            "not_reportable",
            f"a {command.type} has no report: dispatches have a performance report, "
            "envelopes a compliance report",
        )
    # A settled report outlives the command store's retention: look for it either way.
    text = await history.report(command_id) if history is not None else None
    if text is not None:
        try:
            return PerformanceReport.model_validate_json(text)
        except ValidationError as exc:
            raise ReportUnavailable(
                command_id, "unknown_command", f"the stored report does not parse: {exc}"
            ) from None
    if command is None:
        raise ReportUnavailable(command_id, "unknown_command", "no command with this id")
    if history is None:
        raise ReportUnavailable(
            command_id, "no_history", "settlement needs the reading history ([history])"
        )
    raise ReportUnavailable(
        command_id,
        "not_settled",
        "not settled yet: a dispatch is settled after it ends, once its last settlement "
        "interval is over plus [settlement] delay_s",
    )


async def envelope_series(
    envelope: OperatingEnvelope,
    ack: Ack | None,
    history: ReadingHistory,
    registry: Registry,
    now: datetime,
) -> ComplianceSeries:
    members = [d.device_id for d in target_devices(registry, envelope.target)]
    target = envelope.target.group_id or f"{len(envelope.target.device_ids or ())} device(s)"
    bucket = history.interval_s
    t0 = math.floor(epoch_s(envelope.start) / bucket) * bucket
    t1 = math.ceil(epoch_s(min(envelope.end, now)) / bucket) * bucket
    width = bucket * max(1, math.ceil((t1 - t0) / bucket / MAX_POINTS))
    points: list[CompliancePoint] = []
    if t1 > t0 and members:
        start = from_epoch(t0)
        series = await history.group_series(members, start, from_epoch(t1), width)
        step = timedelta(seconds=width)
        for i, (kw, reporting) in enumerate(
            zip(series.kw.tolist(), series.devices_reporting.tolist(), strict=True)
        ):
            begin = start + i * step
            imp, exp = _tightest(envelope, begin, begin + step)
            measured = None if math.isnan(kw) else float(kw)
            points.append(
                CompliancePoint(
                    start=begin,
                    end=begin + step,
                    measured_kw=measured,
                    devices_reporting=int(reporting),
                    import_limit_kw=imp,
                    export_limit_kw=exp,
                    outside=_outside(measured, imp, exp),
                )
            )
    return ComplianceSeries(
        command_id=envelope.command_id,
        target=target,
        state=ack.state.value if ack is not None else "unknown",
        interval_s=width,
        devices_total=len(members),
        points=tuple(points),
        summary=ack.compliance if ack is not None else None,
    )


def _tightest(
    envelope: OperatingEnvelope, begin: datetime, end: datetime
) -> tuple[float | None, float | None]:
    """The limits over ``[begin, end)``: the tightest of every envelope interval it overlaps
    (a history interval may span a change of limits, or the envelope's start or end)."""
    imports: list[float] = []
    exports: list[float] = []
    for interval in envelope.intervals:
        if interval.start < end and begin < interval.end:
            if interval.import_limit_kw is not None:
                imports.append(interval.import_limit_kw)
            if interval.export_limit_kw is not None:
                exports.append(interval.export_limit_kw)
    return (min(imports) if imports else None, min(exports) if exports else None)


def _outside(measured: float | None, imp: float | None, exp: float | None) -> bool:
    """The control loop's rule (:meth:`gateway.delivery.EnvelopeWatch.update`)."""
    if measured is None or (imp is None and exp is None):
        return False
    excess = max(
        0.0,
        measured - imp if imp is not None else 0.0,
        -measured - exp if exp is not None else 0.0,
    )
    bound = min(x for x in (imp, exp) if x is not None)
    return excess > max(_TOLERANCE * bound, 1e-9)
