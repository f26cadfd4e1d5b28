"""Small fixed inputs for the charts: one settled dispatch, one envelope's compliance."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from adapters.operator.charts import CompliancePoint, ComplianceSeries
from gateway.flex.performance import DevicePerformance
from gateway.flex.settlement import (
    DeviceSettlement,
    FlagCode,
    GroupSettlement,
    PerformanceReport,
    SettlementFlag,
)
from unified.model import AckState, DispatchMode, EnvelopeCompliance, Quality

START = datetime(2026, 7, 1, 16, 0, tzinfo=UTC)


def performance_report(command_id: str = "shed-1", start: datetime = START) -> PerformanceReport:
    """Two devices over three hours; bat-2 has no meter data in the last hour."""
    end = start + timedelta(hours=3)

    def device(
        device_id: str, baseline: tuple[float, ...], metered: tuple[float | None, ...]
    ) -> DeviceSettlement:
        delivered = tuple(
            0.0 if m is None else m - b for b, m in zip(baseline, metered, strict=True)
        )
        missing = sum(m is None for m in metered)
        return DeviceSettlement(
            device_id=device_id,
            allocated=True,
            requested_kw=-5.0,
            performance=DevicePerformance(
                device_id=device_id,
                start=start,
                end=end,
                interval_s=3600,
                baseline_kw=baseline,
                weights=(1.0, 1.0, 1.0),
                event_hours=3.0,
                metered_kw=metered,
                delivered_kw=delivered,
                baseline_kwh=sum(baseline),
                metered_kwh=sum(
                    b if m is None else m for b, m in zip(baseline, metered, strict=True)
                ),
                delivered_kwh=sum(delivered),
                mean_delivered_kw=sum(delivered) / 3,
                requested_kw=-5.0,
                percent_of_request=100 * sum(delivered) / 3 / -5.0,
                intervals_total=3,
                intervals_measured=3 - missing,
                intervals_estimated=0,
                intervals_missing=missing,
                quality=Quality.SUBSTITUTED if missing else Quality.GOOD,
            ),
        )

    devices = (
        device("bat-1", (0.5, 0.5, 0.25), (-4.5, -4.75, -4.5)),
        device("bat-2", (1.0, 1.25, 1.0), (-3.5, -4.0, None)),
    )
    group = GroupSettlement(
        group_id="feeder:f1",
        interval_s=3600,
        baseline_kw=(1.5, 1.75, 1.25),
        weights=(1.0, 1.0, 1.0),
        event_hours=3.0,
        metered_kw=(-8.0, -8.75, -3.5),
        delivered_kw=(-9.5, -10.5, -4.75),
        baseline_kwh=4.5,
        metered_kwh=-20.25,
        delivered_kwh=-24.75,
        mean_delivered_kw=-8.25,
        requested_kw=-10.0,
        percent_of_request=82.5,
        devices_settled=2,
        devices_by_quality={Quality.GOOD: 1, Quality.SUBSTITUTED: 1},
        quality=Quality.SUBSTITUTED,
    )
    return PerformanceReport(
        command_id=command_id,
        program="peak-shave",
        group_id="feeder:f1",
        final_state=AckState.COMPLETED,
        mode=DispatchMode.DELTA,
        dispatch_kw=-10.0,
        requested_kw=-10.0,
        event_start=start,
        event_end=end,
        start=start,
        end=end,
        interval_s=3600,
        generated_at=end + timedelta(minutes=2),
        baseline_method="10-in-10",
        adjustment_cap=0.2,
        delivered_kwh=-24.75,
        mean_delivered_kw=-8.25,
        performance_ratio=0.825,
        group=group,
        devices=devices,
        flags=(
            SettlementFlag(
                code=FlagCode.MISSING_INTERVALS, device_id="bat-2", detail="1 interval(s)"
            ),
        ),
        quality=Quality.SUBSTITUTED,
    )


def compliance_series(start: datetime = START) -> ComplianceSeries:
    """Five 5-minute intervals: inside, just over (within the 2 % tolerance), outside, no data,
    then a tighter limit, passed on the export side."""
    step = timedelta(minutes=5)
    rows = [
        (12.0, 2, 20.0, 5.0, False),
        (20.05, 2, 20.0, 5.0, False),
        (23.5, 2, 20.0, 5.0, True),
        (None, 0, 20.0, 5.0, False),
        (-4.0, 1, 15.0, 2.5, True),
    ]
    return ComplianceSeries(
        command_id="doe-1",
        target="feeder:f1",
        state="active",
        interval_s=300,
        devices_total=2,
        points=tuple(
            CompliancePoint(
                start=start + i * step,
                end=start + (i + 1) * step,
                measured_kw=measured,
                devices_reporting=reporting,
                import_limit_kw=imp,
                export_limit_kw=exp,
                outside=outside,
            )
            for i, (measured, reporting, imp, exp, outside) in enumerate(rows)
        ),
        summary=EnvelopeCompliance(
            import_limit_kw=15.0,
            export_limit_kw=2.5,
            measured_kw=-4.0,
            devices_reporting=1,
            devices_acting=1,
            seconds_in_force=1500.0,
            seconds_outside=420.0,
            worst_excursion_kw=3.5,
            outside=True,
        ),
    )
