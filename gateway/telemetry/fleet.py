"""A dense index over the devices whose telemetry is screened and aggregated.

The quality classifier and the group estimator keep their per-device state in numpy arrays, so a
whole fleet is screened or aggregated with a handful of vectorised operations instead of one
Python call per device. ``FleetIndex`` fixes the row of every device and the codes of its DER
class and peer group (the topology group whose devices of the same class serve as its peers).
Enrolment appends rows (``FleetIndex.extended``; the classifier and estimator ``extend`` their
state and keep every device's history); removing devices needs a rebuild. *Query* groups are
given at estimation time, so regrouping needs no rebuild.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from unified.model import DerClass, Device, TopologyLevel

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

#: Every DER class has a code, its position in this tuple.
CLASSES: tuple[DerClass, ...] = tuple(DerClass)
CLASS_CODE: dict[DerClass, int] = {c: i for i, c in enumerate(CLASSES)}


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """What screening and estimation need to know about one device.

    ``min_kw`` / ``max_kw`` are its physical bounds in the load convention (``min_kw`` is minus
    the export rating); ``report_interval_s`` is how often it is expected to report.
    """

    device_id: str
    der_class: DerClass
    peer_group: str
    min_kw: float
    max_kw: float
    report_interval_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.min_kw < self.max_kw:
            raise ValueError(f"{self.device_id}: min_kw must be below max_kw")
        if self.report_interval_s <= 0:
            raise ValueError(f"{self.device_id}: report_interval_s must be positive")

    @classmethod
    def from_device(
        cls,
        device: Device,
        *,
        peer_level: TopologyLevel = TopologyLevel.FEEDER,
        report_interval_s: float = 60.0,
    ) -> DeviceProfile:
        """Profile of a registry device: bounds from its ratings, peers at ``peer_level``.

        Falls back to the substation when the device's location has no name at ``peer_level``.
        """
        peer = device.location.at(peer_level) or device.location.substation
        return cls(
            device_id=device.device_id,
            der_class=device.der_class,
            peer_group=f"{peer_level.value}:{peer}",
            min_kw=-device.ratings.max_discharge_kw,
            max_kw=device.ratings.max_charge_kw,
            report_interval_s=report_interval_s,
        )


class FleetIndex:
    """Rows, class codes and peer-group codes of a fixed set of devices."""

    def __init__(self, profiles: Sequence[DeviceProfile], peer_groups: Sequence[str] = ()) -> None:
        """``peer_groups``: codes to keep (an index being extended); new groups follow, sorted."""
        self.profiles: tuple[DeviceProfile, ...] = tuple(profiles)
        self.ids: tuple[str, ...] = tuple(p.device_id for p in self.profiles)
        self.row: dict[str, int] = {d: i for i, d in enumerate(self.ids)}
        if len(self.row) != len(self.ids):
            raise ValueError("duplicate device ids in the fleet index")
        known = set(peer_groups)
        groups = [*peer_groups, *sorted({p.peer_group for p in self.profiles} - known)]
        self.peer_groups: tuple[str, ...] = tuple(groups)
        group_code = {g: i for i, g in enumerate(groups)}
        self.class_code: IntArray = np.array(
            [CLASS_CODE[p.der_class] for p in self.profiles], dtype=np.intp
        )
        self.peer_code: IntArray = np.array(
            [group_code[p.peer_group] for p in self.profiles], dtype=np.intp
        )
        self.min_kw: FloatArray = np.array([p.min_kw for p in self.profiles], dtype=np.float64)
        self.max_kw: FloatArray = np.array([p.max_kw for p in self.profiles], dtype=np.float64)
        self.interval_s: FloatArray = np.array(
            [p.report_interval_s for p in self.profiles], dtype=np.float64
        )

    def extended(self, profiles: Sequence[DeviceProfile]) -> FleetIndex:
        """This index with ``profiles`` appended: every existing row and peer-group code kept."""
        return FleetIndex([*self.profiles, *profiles], self.peer_groups)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_classes(self) -> int:
        return len(CLASSES)

    def rows(self, device_ids: Iterable[str]) -> IntArray:
        """Rows of ``device_ids``; unknown ids raise ``KeyError``."""
        return np.fromiter((self.row[d] for d in device_ids), dtype=np.intp)
