"""Prometheus metrics, read from the live gateway at scrape time.

One custom :class:`GatewayCollector` reads what the core and the links already keep (the
command book, the device supervisors, the last group telemetry, the loops' cycle timings, the
audit log's and the links' counters) when Prometheus scrapes, so nothing on a hot path
increments a metric and the core imports no metrics library. Every name starts with
``derms_``, carries its unit (``_seconds``, ``_watts``, ``_ratio``) and ends in ``_total`` for
counters. Labels are bounded: protocols, reasons, HTTP statuses, DER classes, ack states, and
groups only at the topology levels ``[operator] group_levels`` names (never device ids).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from adapters.operator.health import Verdict
from adapters.operator.peers import Peers
from gateway.cycles import CycleStats
from unified.model import (
    TERMINAL_STATES,
    AckState,
    DerClass,
    GroupTelemetry,
    TopologyLevel,
    utcnow,
)

if TYPE_CHECKING:
    from gateway.core import Gateway

__all__ = ["GatewayCollector", "metrics_registry"]

_OPEN_STATES = tuple(s for s in AckState if s not in TERMINAL_STATES)
_GRID_KINDS = ("command", "flex_request", "performance_request", "weather", "prices", "registry")


def _counter(
    name: str, doc: str, labels: tuple[str, ...], values: Iterable[tuple[tuple[str, ...], float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        family.add_metric(list(label_values), value)
    return family


def _gauge(
    name: str, doc: str, labels: tuple[str, ...], values: Iterable[tuple[tuple[str, ...], float]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        family.add_metric(list(label_values), value)
    return family


def _histogram(name: str, doc: str, stats: CycleStats) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound, count in zip(stats.buckets, stats.counts, strict=False):
        cumulative += count
        buckets.append((repr(float(bound)), float(cumulative)))
    buckets.append(("+Inf", float(stats.count)))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=stats.sum_s)


def _by_code(responses: Mapping[int, int]) -> list[tuple[tuple[str, ...], float]]:
    return [((str(code),), float(n)) for code, n in sorted(responses.items())]


class GatewayCollector(Collector):
    """Everything the gateway knows about itself, as metric families, at each scrape."""

    def __init__(
        self,
        core: Gateway,
        peers: Peers,
        *,
        group_levels: Iterable[TopologyLevel],
        readiness: Callable[[], Verdict],
        started_at: float,
    ) -> None:
        self.core = core
        self.peers = peers
        self.group_levels = frozenset(group_levels)
        self.readiness = readiness
        self.started_at = started_at

    def describe(self) -> Iterable[Metric]:
        return ()  # names are checked at collect time; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        yield from self._gateway()
        yield from self._grid_derms()
        yield from self._device_links()
        yield from self._endpoints()
        yield from self._devices()
        yield from self._groups()
        yield from self._commands()
        yield from self._loops()
        yield from self._stores()

    # ------------------------------------------------------------------ the process
    def _gateway(self) -> Iterator[Metric]:
        core = self.core
        info = GaugeMetricFamily(
            "derms_gateway_info", "The gateway's id and version", labels=("gateway_id", "version")
        )
        info.add_metric([core.config.gateway_id, core.version], 1.0)
        yield info
        yield GaugeMetricFamily(
            "derms_gateway_start_time_seconds",
            "When the gateway started (Unix time)",
            value=self.started_at,
        )
        verdict = self.readiness()
        yield GaugeMetricFamily(
            "derms_gateway_ready", "1 when /health/ready answers 200", value=float(verdict.ok)
        )
        yield _gauge(
            "derms_gateway_health_check",
            "Each readiness check: 1 passing, 0 failing",
            ("check",),
            (((name,), float(check.ok)) for name, check in verdict.checks.items()),
        )
        yield CounterMetricFamily(
            "derms_clock_steps_total",
            "Steps of the wall clock seen between control cycles (NTP steps, manual changes)",
            value=float(core.clock.steps),
        )

    # ------------------------------------------------------------------ uplinks and links
    def _grid_derms(self) -> Iterator[Metric]:
        grid = self.peers.grid
        links: list[tuple[tuple[str, ...], float]] = [
            (("grid_derms",), float(grid.link.connected.is_set()))
        ]
        if self.peers.device_mqtt is not None:
            links.append((("device_mqtt",), float(self.peers.device_mqtt.connected.is_set())))
        if self.peers.openadr_ven is not None:
            links.append((("openadr_ven",), float(bool(self.peers.openadr_ven.reachable))))
        yield _gauge("derms_link_up", "1 while the link to a peer is up", ("link",), links)
        stats = grid.stats
        kinds = sorted(set(_GRID_KINDS) | set(stats.received))
        yield _counter(
            "derms_grid_derms_messages_received_total",
            "Messages received from Grid DERMS, by kind",
            ("kind",),
            (((kind,), float(stats.received.get(kind, 0))) for kind in kinds),
        )
        yield _counter(
            "derms_grid_derms_messages_refused_total",
            "Messages from Grid DERMS refused or rejected, by kind and reason",
            ("kind", "reason"),
            ((key, float(n)) for key, n in sorted(stats.refused.items())),
        )
        yield _gauge(
            "derms_grid_derms_outbox_messages",
            "Messages queued for Grid DERMS: acks (kept while the link is down), telemetry",
            ("queue",),
            [
                (("acks",), float(grid.link.pending_acks)),
                (("telemetry",), float(grid.link.pending_telemetry)),
            ],
        )

    def _device_links(self) -> Iterator[Metric]:
        link = self.peers.device_mqtt
        if link is None:
            return
        stats = link.stats
        yield CounterMetricFamily(
            "derms_device_mqtt_messages_received_total",
            "Messages received from devices on the device broker",
            value=float(stats.received),
        )
        yield _counter(
            "derms_device_mqtt_messages_dropped_total",
            "Device messages dropped, by reason",
            ("reason",),
            [
                (("unknown_device",), float(stats.dropped_unknown)),
                (("invalid",), float(stats.dropped_invalid)),
                (("over_quota",), float(stats.dropped_over_quota)),
            ],
        )
        yield CounterMetricFamily(
            "derms_device_mqtt_messages_published_total",
            "Commands published to devices",
            value=float(stats.published),
        )

    def _endpoints(self) -> Iterator[Metric]:
        sep2 = self.peers.sep2_server
        if sep2 is not None:
            yield _counter(
                "derms_sep2_requests_total",
                "IEEE 2030.5 requests answered, by HTTP status",
                ("code",),
                _by_code(sep2.answered),
            )
            yield _counter(
                "derms_sep2_requests_refused_total",
                "IEEE 2030.5 requests refused for who sent them, by reason",
                ("reason",),
                [
                    (("rate_limited",), float(sum(sep2.quotas.refused.values()))),
                    (("forbidden",), float(sep2.answered.get(403, 0))),
                ],
            )
        ocpp = self.peers.ocpp_central
        if ocpp is not None:
            yield _counter(
                "derms_ocpp_handshakes_refused_total",
                "OCPP charger connections refused, by reason",
                ("reason",),
                (((reason,), float(n)) for reason, n in sorted(ocpp.refusals.items())),
            )
            connected = 0
            ids = ocpp.charge_point_ids()
            for charge_point_id in ids:
                snapshot = ocpp.snapshot(charge_point_id)
                connected += snapshot is not None and snapshot.connected
            yield _gauge(
                "derms_ocpp_chargers",
                "Known OCPP chargers, by connection state",
                ("state",),
                [
                    (("connected",), float(connected)),
                    (("disconnected",), float(len(ids) - connected)),
                ],
            )
        vtn = self.peers.openadr_vtn
        if vtn is not None:
            yield _counter(
                "derms_openadr_vtn_requests_total",
                "OpenADR requests from VENs (OEM clouds) answered, by HTTP status",
                ("code",),
                _by_code(vtn.answered),
            )
            yield _counter(
                "derms_openadr_vtn_requests_refused_total",
                "OpenADR requests refused before they reached the VTN, by reason",
                ("reason",),
                (((reason,), float(n)) for reason, n in sorted(vtn.refusals.items())),
            )
            yield GaugeMetricFamily(
                "derms_openadr_vtn_vens_registered",
                "VENs registered with our VTN",
                value=float(len(vtn.registrations)),
            )
        ven = self.peers.openadr_ven
        if ven is not None:
            yield _counter(
                "derms_openadr_ven_polls_total",
                "Poll cycles of our VEN with the utility's VTN, by outcome",
                ("outcome",),
                (((outcome,), float(n)) for outcome, n in sorted(ven.polls.items())),
            )

    # ------------------------------------------------------------------ devices and groups
    def _devices(self) -> Iterator[Metric]:
        core = self.core
        states = core.device_states(utcnow())
        online: Counter[str] = Counter()
        total: Counter[str] = Counter()
        for device in core.registry.devices():
            total[device.der_class.value] += 1
            online[device.der_class.value] += states.get(device.device_id) is not None
        family = GaugeMetricFamily(
            "derms_devices",
            "Devices by DER class and availability (online: a fresh reading)",
            labels=("der_class", "state"),
        )
        for der_class in DerClass:
            if total[der_class.value]:
                family.add_metric([der_class.value, "online"], float(online[der_class.value]))
                family.add_metric(
                    [der_class.value, "offline"],
                    float(total[der_class.value] - online[der_class.value]),
                )
        yield family
        enrolment = core.enrolment
        yield _gauge(
            "derms_registry_version",
            "The durable registry's version (raised by every applied change)",
            (),
            [((), float(enrolment.version))],
        )
        yield _gauge(
            "derms_registry_pending",
            "Devices that announced themselves and wait for approval",
            (),
            [((), float(len(enrolment.pending)))],
        )

    def _groups(self) -> Iterator[Metric]:
        if not self.group_levels:
            return
        groups = self.core.registry.groups()
        shown = [
            t
            for t in self.core.last_group_telemetry
            if (g := groups.get(t.group_id)) is not None and g.level in self.group_levels
        ]
        counts: dict[str, tuple[str, Callable[[GroupTelemetry], int]]] = {
            "derms_group_devices": ("Devices in the group", lambda t: t.devices_total),
            "derms_group_devices_reporting": (
                "Devices with a fresh, accepted reading at the last telemetry cycle",
                lambda t: t.devices_reporting,
            ),
            "derms_group_devices_missing": (
                "Devices without a fresh reading at the last telemetry cycle",
                lambda t: t.devices_missing,
            ),
            "derms_group_devices_excluded": (
                "Devices whose reading was rejected (stuck, out of bounds, outlier, skewed)",
                lambda t: t.devices_excluded,
            ),
            "derms_group_devices_estimated": (
                "Devices the estimator filled in at the last telemetry cycle",
                lambda t: t.devices_estimated,
            ),
        }
        for name, (doc, read) in counts.items():
            yield _gauge(name, doc, ("group",), (((t.group_id,), float(read(t))) for t in shown))
        yield _gauge(
            "derms_group_estimated_power_watts",
            "Best estimate of the group's net power (load convention: + import)",
            ("group",),
            (((t.group_id,), 1000.0 * t.power_kw) for t in shown),
        )
        yield _gauge(
            "derms_group_measured_power_watts",
            "Sum of the fresh, accepted readings only",
            ("group",),
            (((t.group_id,), 1000.0 * t.measured_kw) for t in shown),
        )
        yield _gauge(
            "derms_group_estimate_interval_width_watts",
            "Width of the estimate's prediction interval (90 %)",
            ("group",),
            (
                ((t.group_id,), 1000.0 * (t.power_upper_kw - t.power_lower_kw))
                for t in shown
                if t.power_upper_kw is not None and t.power_lower_kw is not None
            ),
        )
        yield _gauge(
            "derms_group_estimated_share_ratio",
            "Share of the group's devices filled in by the estimator",
            ("group",),
            (
                ((t.group_id,), t.devices_estimated / t.devices_total)
                for t in shown
                if t.devices_total
            ),
        )

        stats = self.core.flex_coverage.stats()
        yield _gauge(
            "derms_flex_forecast_checks",
            "Dispatches whose delivered flexibility was checked against the group's forecast",
            ("group",),
            (((s.group_id,), float(s.checked)) for s in stats),
        )
        yield _gauge(
            "derms_flex_forecast_coverage_ratio",
            "Running share of deliveries within the flex forecast's p10..p90 (nominal 0.8)",
            ("group",),
            (((s.group_id,), s.coverage) for s in stats if s.coverage is not None),
        )
        yield _gauge(
            "derms_flex_forecast_width_factor",
            "Scale the coverage check applies to the flex forecast's p10/p90 spread",
            ("group",),
            (((s.group_id,), s.width_factor) for s in stats),
        )

    # ------------------------------------------------------------------ commands, loops, stores
    def _commands(self) -> Iterator[Metric]:
        by_state: Counter[AckState] = Counter(e.state for e in self.core.book.open_entries())
        yield _gauge(
            "derms_commands_open",
            "Open commands (not yet in a terminal state), by ack state",
            ("state",),
            (((state.value,), float(by_state[state])) for state in _OPEN_STATES),
        )

    def _loops(self) -> Iterator[Metric]:
        core = self.core
        yield _histogram(
            "derms_control_cycle_duration_seconds",
            "Duration of one control cycle (plan, lifecycle, setpoints)",
            core.control_cycles,
        )
        yield _histogram(
            "derms_telemetry_cycle_duration_seconds",
            "Duration of one telemetry cycle (estimation, forecasts, publishing)",
            core.telemetry_cycles,
        )
        yield _counter(
            "derms_loop_cycles_failed_total",
            "Cycles that raised (logged; the loop carries on), by loop",
            ("loop",),
            [
                (("control",), float(core.control_cycles.failed)),
                (("telemetry",), float(core.telemetry_cycles.failed)),
            ],
        )
        ages = [
            ((loop,), age)
            for loop, stats in (
                ("control", core.control_cycles),
                ("telemetry", core.telemetry_cycles),
            )
            if (age := stats.age_s()) is not None
        ]
        yield _gauge(
            "derms_loop_last_cycle_age_seconds",
            "Seconds since the loop last finished a cycle",
            ("loop",),
            ages,
        )

    def _stores(self) -> Iterator[Metric]:
        core = self.core
        history = core.history
        if history is not None:
            yield GaugeMetricFamily(
                "derms_history_pending_buckets",
                "Reading buckets waiting to be written to the history file",
                value=float(history.pending),
            )
            yield CounterMetricFamily(
                "derms_history_dropped_buckets_total",
                "Reading buckets dropped because writing fell behind",
                value=float(history.dropped),
            )
        audit = core.audit_log
        if audit is not None:
            yield _counter(
                "derms_audit_records_total",
                "Audit records: recorded (queued), written to disk, dropped (queue full), lost "
                "(could not be written before the writer stopped)",
                ("outcome",),
                [
                    (("recorded",), float(audit.recorded)),
                    (("written",), float(audit.written)),
                    (("dropped",), float(audit.dropped)),
                    (("lost",), float(audit.lost)),
                ],
            )
            yield GaugeMetricFamily(
                "derms_audit_failing",
                "1 while the audit log's disk refuses writes (records kept in memory)",
                value=float(audit.failing),
            )


def metrics_registry(collector: GatewayCollector, *, process: bool = True) -> CollectorRegistry:
    """A registry of its own (not the library's global one: two gateways in one process, as in
    the tests, must not collide), with the process' CPU, memory, file and GC metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
    return registry
