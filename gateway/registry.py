"""Device registry and topology groups.

Group membership is computed from device locations on demand, so moving a device to another
feeder (field switching) is one registry update and active commands need no rewrite: the next
control cycle simply allocates over the new membership.
"""

from __future__ import annotations

from collections.abc import Iterable

from unified.model import TOPOLOGY_LEVELS, Device, Group, TopologyLocation


def implicit_group_id(level: str, name: str) -> str:
    return f"{level}:{name}"


class UnknownDevice(KeyError):
    pass


class Registry:
    def __init__(self, devices: Iterable[Device], groups: Iterable[Group] = ()) -> None:
        self._devices: dict[str, Device] = {}
        self._explicit_groups: dict[str, Group] = {g.group_id: g for g in groups}
        self._groups: dict[str, Group] | None = None
        self._members: dict[str, list[Device]] = {}
        self._eligible: dict[str, frozenset[str]] = {}
        self.called_s: dict[str, float] = {}
        """Seconds each device served commands lately (participation records): who a
        thermal dispatch calls first is the one called least."""
        """Programs with an eligibility rule → the devices eligible in them."""
        for device in devices:
            self._devices[device.device_id] = device

    # ------------------------------------------------------------------ devices
    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices

    def __len__(self) -> int:
        return len(self._devices)

    def device(self, device_id: str) -> Device:
        try:
            return self._devices[device_id]
        except KeyError:
            raise UnknownDevice(device_id) from None

    def devices(self) -> list[Device]:
        return list(self._devices.values())

    def add(self, device: Device) -> None:
        if device.device_id in self._devices:
            raise ValueError(f"device {device.device_id!r} is already registered")
        self._devices[device.device_id] = device
        self._groups = None
        self._members = {}

    def relocate(self, device_id: str, location: TopologyLocation) -> None:
        device = self.device(device_id)
        self.replace(device.model_copy(update={"location": location}))

    def replace(self, device: Device) -> None:
        """A registered device's new record (class, ratings, location ...), same id."""
        self.device(device.device_id)
        self._devices[device.device_id] = device
        self._groups = None
        self._members = {}

    def remove(self, device_id: str) -> Device:
        device = self.device(device_id)
        del self._devices[device_id]
        self._groups = None
        self._members = {}
        return device

    def section_members(self, feeder_section: str) -> list[Device]:
        return [d for d in self._devices.values() if d.location.feeder_section == feeder_section]

    # ------------------------------------------------------------------ programs
    def set_eligible(self, eligible: dict[str, frozenset[str]]) -> None:
        """For each program with a rule, the devices that may serve its commands."""
        self._eligible = eligible

    def add_called(self, device_id: str, seconds: float) -> None:
        self.called_s[device_id] = self.called_s.get(device_id, 0.0) + seconds

    def may_serve(self, device_id: str, program: str) -> bool:
        """Whether a command of ``program`` may use the device: any device, unless the program
        has a rule and the device is not eligible in it."""
        eligible = self._eligible.get(program)
        return eligible is None or device_id in eligible

    # ------------------------------------------------------------------ groups
    def groups(self) -> dict[str, Group]:
        """Explicit groups plus one implicit group per substation / feeder / ... in use."""
        if self._groups is not None:
            return self._groups
        groups: dict[str, Group] = {}
        for device in self._devices.values():
            for level in TOPOLOGY_LEVELS:
                name = device.location.at(level)
                if name is not None:
                    gid = implicit_group_id(level.value, name)
                    groups.setdefault(gid, Group(group_id=gid, level=level, name=name))
        groups.update(self._explicit_groups)
        self._groups = groups
        return groups

    def group(self, group_id: str) -> Group | None:
        return self.groups().get(group_id)

    def members(self, group_id: str) -> list[Device]:
        cached = self._members.get(group_id)
        if cached is not None:
            return cached
        group = self.group(group_id)
        if group is None:
            return []
        members = [d for d in self._devices.values() if group.contains(d)]
        self._members[group_id] = members
        return members
