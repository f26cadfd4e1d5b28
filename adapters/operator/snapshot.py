"""What the live view shows, read from the core's API in one go: the topology tree, each
group's power with its estimate band and baseline, the commands in force with what was asked,
committed and delivered, envelopes with their headroom, and device availability.

A snapshot is built once per telemetry period (or change) and sent to every open page, so its
cost does not grow with the number of operators watching.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from pydantic import Field

from gateway.core import Gateway
from unified.model import (
    TOPOLOGY_LEVELS,
    Dispatch,
    Frozen,
    GridService,
    OperatingEnvelope,
    Quality,
    UtcDatetime,
)

__all__ = [
    "Availability",
    "CommandView",
    "EnvelopeView",
    "GroupView",
    "RecentCommand",
    "TreeNode",
    "ViewSnapshot",
    "build_snapshot",
    "topology_tree",
]


class TreeNode(Frozen):
    group_id: str
    level: str
    name: str
    children: tuple[TreeNode, ...] = ()


class GroupView(Frozen):
    group_id: str
    power_kw: float
    power_lower_kw: float | None = None
    power_upper_kw: float | None = None
    confidence: float | None = None
    measured_kw: float
    baseline_kw: float | None = Field(
        default=None, description="Net power without the gateway's setpoints"
    )
    setpoint_kw: float
    devices_total: int
    devices_reporting: int
    devices_estimated: int
    quality: Quality
    method: str
    active_commands: tuple[str, ...] = ()


class CommandView(Frozen):
    """A dispatch or setpoint in the book: what it asks now, what the devices were asked,
    and what they delivered (changes from baseline, kW, load convention)."""

    command_id: str
    type: str
    program: str
    target: str
    state: str
    start: UtcDatetime
    end: UtcDatetime
    kw: float
    mode: str | None = None
    requested_kw: float | None = None
    committed_kw: float | None = None
    delivered_kw: float | None = None
    delivered_lower_kw: float | None = None
    delivered_upper_kw: float | None = None
    short: bool = False
    shortfall_kw: float | None = None
    devices: int = 0
    detail: str | None = None


class EnvelopeView(Frozen):
    command_id: str
    program: str
    target: str
    state: str
    start: UtcDatetime
    end: UtcDatetime
    import_limit_kw: float | None = None
    export_limit_kw: float | None = None
    measured_kw: float | None = None
    import_headroom_kw: float | None = Field(default=None, description="limit − measured")
    export_headroom_kw: float | None = Field(default=None, description="limit + measured")
    outside: bool = False
    seconds_in_force: float = 0.0
    seconds_outside: float = 0.0
    worst_excursion_kw: float = 0.0
    devices_acting: int = 0


class Availability(Frozen):
    available: int = 0
    total: int = 0


class RecentCommand(Frozen):
    """A command that ended while the view was watching (its reports may be downloaded)."""

    command_id: str
    type: str
    state: str
    at: UtcDatetime


class ViewSnapshot(Frozen):
    gateway_id: str
    version: str
    timestamp: UtcDatetime
    telemetry_period_s: float
    tree: tuple[TreeNode, ...]
    other_groups: tuple[str, ...] = Field(description="Configured groups outside the tree")
    groups: dict[str, GroupView]
    commands: tuple[CommandView, ...]
    envelopes: tuple[EnvelopeView, ...]
    availability_by_class: dict[str, Availability]
    availability_by_group: dict[str, dict[str, Availability]]
    recent: tuple[RecentCommand, ...] = ()


_Children = dict[tuple[str, str], "_Children"]


def topology_tree(locations: Iterable[Sequence[tuple[str, str]]]) -> tuple[TreeNode, ...]:
    """The substation → feeder → feeder section → transformer tree, each node a group.

    ``locations`` gives, per device, its ``(level, name)`` path from the substation down
    (levels it does not have left out); nodes are sorted by name at every level.
    """
    root: _Children = {}
    for path in locations:
        node = root
        for step in path:
            node = node.setdefault(step, {})

    def build(children: _Children) -> tuple[TreeNode, ...]:
        return tuple(
            TreeNode(group_id=f"{level}:{name}", level=level, name=name, children=build(sub))
            for (level, name), sub in sorted(children.items(), key=lambda kv: kv[0][1])
        )

    return build(root)


def _location_paths(core: Gateway) -> list[list[tuple[str, str]]]:
    paths = []
    for device in core.registry.devices():
        path = []
        for level in TOPOLOGY_LEVELS:
            name = device.location.at(level)
            if name is not None:
                path.append((level.value, name))
        paths.append(path)
    return paths


def _target(command: Dispatch | OperatingEnvelope | GridService) -> str:
    target = command.target
    return target.group_id or f"{len(target.device_ids or ())} device(s)"


def build_snapshot(
    core: Gateway, now: datetime, recent: Sequence[RecentCommand] = ()
) -> ViewSnapshot:
    """Everything the page shows, from the core's API, at ``now``."""
    tree = topology_tree(_location_paths(core))
    in_tree: set[str] = set()
    stack = list(tree)
    while stack:
        node = stack.pop()
        in_tree.add(node.group_id)
        stack.extend(node.children)
    baselines = core.group_baselines(now)
    groups = {
        t.group_id: GroupView(
            group_id=t.group_id,
            power_kw=t.power_kw,
            power_lower_kw=t.power_lower_kw,
            power_upper_kw=t.power_upper_kw,
            confidence=t.confidence,
            measured_kw=t.measured_kw,
            baseline_kw=baselines.get(t.group_id),
            setpoint_kw=t.setpoint_kw,
            devices_total=t.devices_total,
            devices_reporting=t.devices_reporting,
            devices_estimated=t.devices_estimated,
            quality=t.quality,
            method=t.method,
            active_commands=t.active_commands,
        )
        for t in core.group_telemetry(now)
    }
    plan = core.plan
    commands: list[CommandView] = []
    envelopes: list[EnvelopeView] = []
    for entry in sorted(core.book.open_entries(), key=lambda e: e.seq):
        command, ack = entry.command, entry.ack
        cid = command.command_id
        if isinstance(command, OperatingEnvelope):
            interval = command.interval_at(now)
            compliance = plan.compliance.get(cid, ack.compliance)
            imp = interval.import_limit_kw if interval is not None else None
            exp = interval.export_limit_kw if interval is not None else None
            measured = compliance.measured_kw if compliance is not None else None
            envelopes.append(
                EnvelopeView(
                    command_id=cid,
                    program=command.program,
                    target=_target(command),
                    state=entry.state.value,
                    start=command.start,
                    end=command.end,
                    import_limit_kw=imp,
                    export_limit_kw=exp,
                    measured_kw=measured,
                    import_headroom_kw=None
                    if imp is None or measured is None
                    else round(imp - measured, 3),
                    export_headroom_kw=None
                    if exp is None or measured is None
                    else round(exp + measured, 3),
                    outside=compliance.outside if compliance is not None else False,
                    seconds_in_force=compliance.seconds_in_force if compliance else 0.0,
                    seconds_outside=compliance.seconds_outside if compliance else 0.0,
                    worst_excursion_kw=compliance.worst_excursion_kw if compliance else 0.0,
                    devices_acting=compliance.devices_acting if compliance else 0,
                )
            )
            continue
        delivery = plan.delivery.get(cid, ack.delivery)
        allocations = plan.allocations.get(cid, ack.allocations)
        if isinstance(command, Dispatch):
            target, mode, kw = _target(command), command.mode.value, command.kw
            requested = plan.requested_kw.get(cid, delivery.requested_kw if delivery else None)
            committed = plan.committed_kw.get(cid, delivery.committed_kw if delivery else None)
        elif isinstance(command, GridService):  # its schedule's setpoints now, summed
            target, mode = _target(command), command.mode.value
            requested = sum(a.requested_kw for a in allocations) if allocations else None
            committed = sum(a.commanded_kw for a in allocations) if allocations else None
            kw = committed or 0.0
        else:  # a setpoint: what it asks is what its device is asked
            target, mode, kw = command.device_id, None, command.kw
            requested = command.kw
            committed = sum(a.commanded_kw for a in allocations) if allocations else None
        commands.append(
            CommandView(
                command_id=cid,
                type=command.type,
                program=command.program,
                target=target,
                state=entry.state.value,
                start=command.start,
                end=command.end,
                kw=kw,
                mode=mode,
                requested_kw=requested,
                committed_kw=committed,
                delivered_kw=delivery.delivered_kw if delivery else None,
                delivered_lower_kw=delivery.delivered_lower_kw if delivery else None,
                delivered_upper_kw=delivery.delivered_upper_kw if delivery else None,
                short=delivery.short if delivery else False,
                shortfall_kw=plan.shortfall_kw.get(cid, ack.shortfall_kw),
                devices=len(allocations),
                detail=ack.detail,
            )
        )
    states = core.device_states(now)
    by_class: dict[str, Availability] = {}
    by_group: dict[str, dict[str, Availability]] = {}
    for device in core.registry.devices():
        up = 1 if states.get(device.device_id) is not None else 0
        cls = device.der_class.value
        seen = by_class.get(cls, Availability())
        by_class[cls] = Availability(available=seen.available + up, total=seen.total + 1)
    for group_id in groups:
        counts: dict[str, Availability] = {}
        for device in core.registry.members(group_id):
            up = 1 if states.get(device.device_id) is not None else 0
            cls = device.der_class.value
            seen = counts.get(cls, Availability())
            counts[cls] = Availability(available=seen.available + up, total=seen.total + 1)
        by_group[group_id] = dict(sorted(counts.items()))
    return ViewSnapshot(
        gateway_id=core.config.gateway_id,
        version=core.version,
        timestamp=now,
        telemetry_period_s=core.config.timing.telemetry_period_s,
        tree=tree,
        other_groups=tuple(sorted(g for g in groups if g not in in_tree)),
        groups=groups,
        commands=tuple(commands),
        envelopes=tuple(envelopes),
        availability_by_class=dict(sorted(by_class.items())),
        availability_by_group=by_group,
        recent=tuple(recent),
    )
