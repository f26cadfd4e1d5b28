"""SunSpec model definitions, loaded from the official JSON files that ship with pysunspec2.

Offsets are not hand-typed: a typo in an offset silently reads the wrong register, so the layout is
computed from the SunSpec Alliance's own definitions (Apache-2.0). Only the typed view below is
exposed; nothing else in the project touches the JSON.

Offsets are relative to the model's ``ID`` register (``ID`` is offset 0, ``L`` offset 1, the first
data point offset 2), which is how a model is addressed once its start address is known.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any, Final, Literal

from protocols.sunspec.errors import UnknownModel, UnknownPoint, UnsupportedModel

__all__ = [
    "LEGACY_INVERTER_MODELS",
    "METER_MODELS",
    "MODEL_BATTERY",
    "MODEL_COMMON",
    "MODEL_CONTROLS",
    "MODEL_DER_AC_CONTROLS",
    "MODEL_DER_CAPACITY",
    "MODEL_DER_MEASURE_AC",
    "MODEL_DER_STORAGE_CAPACITY",
    "MODEL_INVERTER_1PH",
    "MODEL_INVERTER_1PH_FLOAT",
    "MODEL_INVERTER_3PH",
    "MODEL_INVERTER_3PH_FLOAT",
    "MODEL_INVERTER_SPLIT",
    "MODEL_INVERTER_SPLIT_FLOAT",
    "MODEL_NAMEPLATE",
    "MODEL_SETTINGS",
    "MODEL_STATUS",
    "MODEL_STORAGE",
    "POINT_TYPE_SIZES",
    "ModelDef",
    "PointDef",
    "PointType",
    "load_model_def",
]

MODEL_COMMON: Final = 1
MODEL_DER_MEASURE_AC: Final = 701
MODEL_DER_CAPACITY: Final = 702
MODEL_DER_AC_CONTROLS: Final = 704
MODEL_DER_STORAGE_CAPACITY: Final = 713
MODEL_BATTERY: Final = 802

# The legacy ("1xx") inverter models most deployed inverters and many storage systems still present.
MODEL_INVERTER_1PH: Final = 101
MODEL_INVERTER_SPLIT: Final = 102
MODEL_INVERTER_3PH: Final = 103
MODEL_INVERTER_1PH_FLOAT: Final = 111
MODEL_INVERTER_SPLIT_FLOAT: Final = 112
MODEL_INVERTER_3PH_FLOAT: Final = 113
MODEL_NAMEPLATE: Final = 120
MODEL_SETTINGS: Final = 121
MODEL_STATUS: Final = 122
MODEL_CONTROLS: Final = 123
MODEL_STORAGE: Final = 124

#: Legacy inverter measurement models, in the order a device's map is searched for one (the
#: integer models first: their scale factors are what most devices implement best).
LEGACY_INVERTER_MODELS: Final = (
    MODEL_INVERTER_3PH,
    MODEL_INVERTER_SPLIT,
    MODEL_INVERTER_1PH,
    MODEL_INVERTER_3PH_FLOAT,
    MODEL_INVERTER_SPLIT_FLOAT,
    MODEL_INVERTER_1PH_FLOAT,
)
#: AC meter models (integer + scale factors 201–204), searched in this order before 701.
METER_MODELS: Final = (203, 204, 202, 201)

PointType = Literal[
    "int16",
    "uint16",
    "count",
    "acc16",
    "enum16",
    "bitfield16",
    "sunssf",
    "pad",
    "int32",
    "uint32",
    "acc32",
    "enum32",
    "bitfield32",
    "int64",
    "uint64",
    "acc64",
    "float32",
    "string",
]

#: Register count of each fixed-size type (strings take their size from the definition).
POINT_TYPE_SIZES: Final[Mapping[str, int]] = MappingProxyType(
    {
        "int16": 1,
        "uint16": 1,
        "count": 1,
        "acc16": 1,
        "enum16": 1,
        "bitfield16": 1,
        "sunssf": 1,
        "pad": 1,
        "int32": 2,
        "uint32": 2,
        "acc32": 2,
        "enum32": 2,
        "bitfield32": 2,
        "float32": 2,
        "int64": 4,
        "uint64": 4,
        "acc64": 4,
    }
)


@dataclass(frozen=True, slots=True)
class PointDef:
    """One point of a model: where it is, how it is encoded, how it is scaled."""

    name: str
    type: PointType
    offset: int
    size: int
    sf: str | None = None
    writable: bool = False
    mandatory: bool = False
    units: str | None = None
    symbols: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def end(self) -> int:
        """Offset one past the point's last register."""
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class ModelDef:
    """The register layout of one SunSpec model.

    ``length`` is the value of the ``L`` register (registers after ``ID`` and ``L``). Points of
    fixed-count sub-groups are flattened as ``Group.Point`` (``Group[i].Point`` when repeated).
    """

    model_id: int
    name: str
    length: int
    points: Mapping[str, PointDef]

    def point(self, name: str) -> PointDef:
        try:
            return self.points[name]
        except KeyError:
            raise UnknownPoint(self.model_id, name) from None

    @property
    def size(self) -> int:
        """Registers the whole model occupies, ``ID`` and ``L`` included."""
        return self.length + 2

    def span(self, *names: str) -> tuple[int, int]:
        """Smallest ``(offset, count)`` window covering the named points (for one read)."""
        points = [self.point(n) for n in names]
        start = min(p.offset for p in points)
        return start, max(p.end for p in points) - start


def _point_def(raw: Mapping[str, Any], prefix: str, offset: int, model_id: int) -> PointDef:
    ptype = raw["type"]
    if ptype != "string" and ptype not in POINT_TYPE_SIZES:
        raise UnsupportedModel(model_id, f"point {raw['name']} has unsupported type {ptype}")
    size = int(raw["size"])
    symbols = {str(s["name"]): int(s["value"]) for s in raw.get("symbols", ())}
    return PointDef(
        name=prefix + str(raw["name"]),
        type=ptype,
        offset=offset,
        size=size,
        sf=raw.get("sf") if isinstance(raw.get("sf"), str) else None,
        writable=raw.get("access") == "RW",
        mandatory=raw.get("mandatory") == "M",
        units=raw.get("units"),
        symbols=MappingProxyType(symbols),
    )


def _flatten(
    group: Mapping[str, Any], prefix: str, offset: int, out: dict[str, PointDef], model_id: int
) -> int:
    for raw in group.get("points", ()):
        point = _point_def(raw, prefix, offset, model_id)
        out[point.name] = point
        offset += point.size
    for sub in group.get("groups", ()):
        count = sub.get("count", 1)
        if not isinstance(count, int):
            # A count held in another point makes the layout device-dependent; none of the models
            # this gateway uses need that, so refuse rather than guess.
            raise UnsupportedModel(model_id, f"group {sub['name']} has a variable count")
        for index in range(count):
            name = sub["name"] if count == 1 else f"{sub['name']}[{index}]"
            offset = _flatten(sub, f"{prefix}{name}.", offset, out, model_id)
    return offset


@cache
def load_model_def(model_id: int) -> ModelDef:
    """The definition of ``model_id`` from pysunspec2's bundled JSON (cached)."""
    resource = resources.files("sunspec2").joinpath(f"models/json/model_{model_id}.json")
    try:
        raw = json.loads(resource.read_text(encoding="utf-8"))
    except (FileNotFoundError, OSError):
        raise UnknownModel(model_id) from None
    group = raw["group"]
    points: dict[str, PointDef] = {}
    end = _flatten(group, "", 0, points, model_id)
    return ModelDef(
        model_id=model_id,
        name=str(group["name"]),
        length=end - 2,
        points=MappingProxyType(points),
    )
