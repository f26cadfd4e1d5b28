"""Pure SunSpec codec: register lists in, typed values out, and back. No I/O here.

A SunSpec device exposes ``'SunS'`` (0x5375 0x6E53) at a base address, then a chain of models,
each ``[ID, L, <L registers>]``, ended by ``[0xFFFF, 0]``. Values are integers; a scaled point is
worth ``raw × 10^SF`` where ``SF`` is another point (type ``sunssf``) of the same model. Every type
has a "not implemented" sentinel, which decodes to ``None`` here so that callers can never mistake
0x8000 for -32768 W.

The chain walker is sans-I/O: given whatever registers the caller has, it either returns the map
or raises :class:`MapTruncated` naming the registers it needs next, so the adapter decides how to
read them (and tests replay exact register images).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from protocols.sunspec.errors import (
    MapCorrupt,
    MapNotFound,
    MapTruncated,
    ModelMissing,
    PointNotImplemented,
    ScaleFactorMissing,
    UnknownPoint,
    ValueOutOfRange,
)
from protocols.sunspec.models import ModelDef, PointDef

__all__ = [
    "BASE_ADDRESSES",
    "END_MODEL_ID",
    "MAX_MODELS",
    "SUNS_MARKER",
    "MapImage",
    "ModelLocation",
    "PointValue",
    "SunSpecMap",
    "build_map",
    "decode_model",
    "decode_point",
    "decode_scale_factors",
    "encode_point",
    "encode_points",
    "not_implemented",
    "parse_model_chain",
    "require",
    "scale",
    "unscale",
]

SUNS_MARKER: Final = (0x5375, 0x6E53)
END_MODEL_ID: Final = 0xFFFF
#: Where SunSpec says to look for the marker, in order.
BASE_ADDRESSES: Final = (40000, 0, 50000)
#: A chain longer than this is treated as corrupt rather than walked forever.
MAX_MODELS: Final = 256

PointValue = int | float | str

_SIGNED = {"int16": 16, "sunssf": 16, "int32": 32, "int64": 64}
_UNSIGNED = {
    "uint16": 16,
    "count": 16,
    "acc16": 16,
    "enum16": 16,
    "bitfield16": 16,
    "pad": 16,
    "uint32": 32,
    "acc32": 32,
    "enum32": 32,
    "bitfield32": 32,
    "uint64": 64,
    "acc64": 64,
}
_ACCUMULATORS = frozenset({"acc16", "acc32", "acc64"})
_FLOAT32_NAN: Final = 0x7FC00000


def _sentinel(ptype: str) -> int:
    """Raw (unsigned, whole-width) value meaning "not implemented" for numeric types."""
    if ptype in _ACCUMULATORS:
        return 0
    if ptype == "float32":
        return _FLOAT32_NAN
    if ptype in _SIGNED:
        return 1 << (_SIGNED[ptype] - 1)
    return (1 << _UNSIGNED[ptype]) - 1


def not_implemented(point: PointDef) -> list[int]:
    """The registers a device shows for ``point`` when it does not implement it."""
    if point.type == "string":
        return [0] * point.size
    if point.type == "pad":
        return [0x8000]
    return _split(_sentinel(point.type), point.size)


def _join(registers: Sequence[int]) -> int:
    value = 0
    for register in registers:
        value = (value << 16) | (register & 0xFFFF)
    return value


def _split(value: int, size: int) -> list[int]:
    return [(value >> (16 * (size - 1 - i))) & 0xFFFF for i in range(size)]


def decode_point(point: PointDef, registers: Sequence[int]) -> int | float | str | None:
    """Raw (unscaled) value of one point from exactly its registers; ``None`` if not implemented."""
    if len(registers) != point.size:
        raise ValueError(f"{point.name} needs {point.size} registers, got {len(registers)}")
    if point.type == "string":
        data = b"".join(r.to_bytes(2, "big") for r in registers)
        text = data.split(b"\0", 1)[0].decode("utf-8", errors="replace").rstrip()
        return text or None
    if point.type == "pad":
        return None
    raw = _join(registers)
    if point.type == "float32":
        number = float(struct.unpack(">f", raw.to_bytes(4, "big"))[0])
        return None if math.isnan(number) else number
    if raw == _sentinel(point.type):
        return None
    bits = _SIGNED.get(point.type)
    if bits is not None and raw & (1 << (bits - 1)):
        raw -= 1 << bits
    return raw


def scale(raw: int, sf: int) -> int | float:
    """``raw × 10^sf``; divides for negative ``sf`` so 1234 @ -2 is exactly 12.34."""
    if sf >= 0:
        factor: int = 10**sf
        return raw * factor
    return raw / 10.0**-sf


def unscale(value: float, sf: int) -> int:
    """The integer a device stores for ``value`` at scale factor ``sf`` (rounded)."""
    if sf >= 0:
        return round(value / 10.0**sf)
    return round(value * 10.0**-sf)


_WINDOWS: dict[tuple[int, int, int, int], tuple[PointDef, ...]] = {}


def _points_within(model_def: ModelDef, start: int, end: int) -> tuple[PointDef, ...]:
    # A poll decodes the same small window of the same model every time: scanning all points
    # of the model for each decode was a measurable share of the gateway's CPU per poll.
    key = (model_def.model_id, model_def.length, start, end)
    points = _WINDOWS.get(key)
    if points is None:
        points = tuple(
            p for p in model_def.points.values() if p.offset >= start and p.offset + p.size <= end
        )
        if len(_WINDOWS) < 4096:
            _WINDOWS[key] = points
    return points


def _window(
    model_def: ModelDef, registers: Sequence[int], start_offset: int
) -> Iterable[tuple[PointDef, Sequence[int]]]:
    end = start_offset + len(registers)
    for point in _points_within(model_def, start_offset, end):
        yield (
            point,
            registers[point.offset - start_offset : point.offset + point.size - start_offset],
        )


def decode_scale_factors(
    model_def: ModelDef, registers: Sequence[int], *, start_offset: int = 0
) -> dict[str, int | None]:
    """Values of the ``sunssf`` points inside the window (``None`` = not implemented)."""
    out: dict[str, int | None] = {}
    for point, regs in _window(model_def, registers, start_offset):
        if point.type == "sunssf":
            value = decode_point(point, regs)
            out[point.name] = value if isinstance(value, int) else None
    return out


def decode_model(
    model_def: ModelDef,
    registers: Sequence[int],
    *,
    start_offset: int = 0,
    sfs: Mapping[str, int | None] | None = None,
) -> dict[str, PointValue | None]:
    """Decode every point wholly inside ``registers`` (which start at model ``start_offset``).

    Scaled points are returned in engineering units. A scale factor inside the window wins over
    one passed in ``sfs`` (cached from an earlier read), because it is fresher. A point whose scale
    factor is "not implemented" decodes to ``None``: its magnitude is unknowable.
    """
    known: dict[str, int | None] = dict(sfs or {})
    known.update(decode_scale_factors(model_def, registers, start_offset=start_offset))
    out: dict[str, PointValue | None] = {}
    for point, regs in _window(model_def, registers, start_offset):
        if point.type == "pad":
            continue
        raw = decode_point(point, regs)
        if point.sf is None or raw is None or isinstance(raw, str):
            out[point.name] = raw
            continue
        if point.sf not in known:
            raise ScaleFactorMissing(model_def.model_id, point.name, point.sf)
        sf = known[point.sf]
        out[point.name] = None if sf is None else scale(int(raw), sf)
    return out


def require(model_def: ModelDef, values: Mapping[str, PointValue | None], name: str) -> PointValue:
    """``values[name]``, raising :class:`PointNotImplemented` if the device reported none."""
    if name not in model_def.points:
        raise UnknownPoint(model_def.model_id, name)
    value = values.get(name)
    if value is None:
        raise PointNotImplemented(model_def.model_id, name)
    return value


def encode_point(
    model_def: ModelDef,
    point: PointDef,
    value: PointValue | None,
    sfs: Mapping[str, int | None],
) -> list[int]:
    """Registers for one point; ``value`` in engineering units, ``None`` = not implemented."""
    model_id = model_def.model_id
    if value is None:
        return not_implemented(point)
    if point.type == "string":
        if not isinstance(value, str):
            raise ValueOutOfRange(model_id, point.name, value)
        data = value.encode("utf-8")
        if len(data) > 2 * point.size:
            raise ValueOutOfRange(model_id, point.name, value)
        data = data.ljust(2 * point.size, b"\0")
        return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if isinstance(value, (str, bool)) or not math.isfinite(value):
        raise ValueOutOfRange(model_id, point.name, value)
    if point.type == "float32":
        return _split(int.from_bytes(struct.pack(">f", value), "big"), 2)
    raw: int
    if point.sf is not None:
        sf = sfs.get(point.sf)
        if sf is None:
            raise ScaleFactorMissing(model_id, point.name, point.sf)
        raw = unscale(value, sf)
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueOutOfRange(model_id, point.name, value)
        raw = int(value)
    else:
        raw = value
    if point.symbols and raw not in point.symbols.values() and point.type.startswith("enum"):
        raise ValueOutOfRange(model_id, point.name, value)
    if point.type == "sunssf" and not -10 <= raw <= 10:
        raise ValueOutOfRange(model_id, point.name, value)
    bits = _SIGNED.get(point.type)
    if bits is not None:
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        low, high = 0, (1 << _UNSIGNED[point.type]) - 1
    unsigned = raw & ((1 << (16 * point.size)) - 1)
    # A value equal to the sentinel would read back as "not implemented": refuse it.
    if not low <= raw <= high or unsigned == _sentinel(point.type):
        raise ValueOutOfRange(model_id, point.name, value)
    return _split(unsigned, point.size)


def encode_points(
    model_def: ModelDef,
    values: Mapping[str, PointValue | None],
    sfs: Mapping[str, int | None] | None = None,
) -> list[tuple[int, list[int]]]:
    """Encode named points into ``(model offset, registers)`` runs, contiguous points merged.

    Scale factors come from ``sfs`` (what the device reported) and from ``values`` itself when
    the caller writes a scale factor too. The caller adds the model's address to each offset; a
    contiguous block becomes one Modbus write, which devices apply atomically.
    """
    known: dict[str, int | None] = dict(sfs or {})
    for name, value in values.items():
        if model_def.point(name).type == "sunssf":
            known[name] = value if isinstance(value, int) else None
    encoded = sorted(
        (model_def.point(name).offset, encode_point(model_def, model_def.point(name), v, known))
        for name, v in values.items()
    )
    runs: list[tuple[int, list[int]]] = []
    for offset, regs in encoded:
        if runs and runs[-1][0] + len(runs[-1][1]) == offset:
            runs[-1][1].extend(regs)
        else:
            runs.append((offset, list(regs)))
    return runs


# --------------------------------------------------------------------------- the model chain


@dataclass(frozen=True, slots=True)
class ModelLocation:
    """Where one model sits: ``address`` of its ``ID`` register and its ``L`` value."""

    model_id: int
    address: int
    length: int

    @property
    def size(self) -> int:
        return self.length + 2

    @property
    def end(self) -> int:
        return self.address + self.size


@dataclass(frozen=True, slots=True)
class SunSpecMap:
    """The models a device exposes, in map order."""

    base_address: int
    models: tuple[ModelLocation, ...]

    def __contains__(self, model_id: object) -> bool:
        return any(m.model_id == model_id for m in self.models)

    def find(self, model_id: int) -> ModelLocation:
        """The first instance of ``model_id``; raises :class:`ModelMissing`."""
        for model in self.models:
            if model.model_id == model_id:
                return model
        raise ModelMissing(model_id)

    @property
    def model_ids(self) -> tuple[int, ...]:
        return tuple(m.model_id for m in self.models)


def parse_model_chain(
    registers: Mapping[int, int] | Sequence[int], base_address: int
) -> SunSpecMap:
    """Walk the model chain from ``base_address``.

    ``registers`` is either a dense list starting at ``base_address`` or a sparse mapping of
    absolute address to value. Raises :class:`MapNotFound` without the marker,
    :class:`MapTruncated` when more registers are needed, :class:`MapCorrupt` for a bad chain.
    """
    if isinstance(registers, Mapping):
        image: Mapping[int, int] = registers
    else:
        image = {base_address + i: v for i, v in enumerate(registers)}

    def get(address: int, count: int) -> list[int]:
        if any(a not in image for a in range(address, address + count)):
            raise MapTruncated(address, count)
        return [image[a] for a in range(address, address + count)]

    if base_address not in image or base_address + 1 not in image:
        # Marker plus the first model header: one read is enough to start.
        raise MapTruncated(base_address, 4)
    marker = (image[base_address], image[base_address + 1])
    if marker != SUNS_MARKER:
        raise MapNotFound(base_address, marker)
    models: list[ModelLocation] = []
    address = base_address + 2
    while True:
        if address > 0xFFFF:
            raise MapCorrupt(address, "model chain runs past the end of the address space")
        if address not in image:
            raise MapTruncated(address, 2)
        model_id = image[address]
        if model_id == END_MODEL_ID:
            # The end marker's length register is optional in practice, so it is not required.
            return SunSpecMap(base_address=base_address, models=tuple(models))
        if model_id == 0:
            raise MapCorrupt(address, "model id 0")
        (length,) = get(address + 1, 1)
        models.append(ModelLocation(model_id=model_id, address=address, length=length))
        if len(models) > MAX_MODELS:
            raise MapCorrupt(address, f"more than {MAX_MODELS} models without an end marker")
        address += length + 2


@dataclass(frozen=True, slots=True)
class MapImage:
    """A complete register image starting at ``base_address``, with its layout."""

    base_address: int
    registers: tuple[int, ...]
    layout: SunSpecMap


def build_map(
    models: Sequence[tuple[ModelDef, Mapping[str, PointValue | None]]],
    *,
    base_address: int = 40000,
) -> MapImage:
    """Lay out marker, models and end marker; unspecified points read as "not implemented".

    Scale factors are ordinary entries of each model's values (e.g. ``{"W_SF": -1, "W": 5000}``),
    and scaled values are given in engineering units.
    """
    registers: list[int] = [*SUNS_MARKER]
    locations: list[ModelLocation] = []
    for model_def, values in models:
        address = base_address + len(registers)
        block: list[int] = []
        for point in model_def.points.values():
            block.extend(not_implemented(point))
        block[0:2] = [model_def.model_id, model_def.length]
        for offset, regs in encode_points(model_def, values):
            block[offset : offset + len(regs)] = regs
        registers.extend(block)
        locations.append(ModelLocation(model_def.model_id, address, model_def.length))
    registers.extend([END_MODEL_ID, 0])
    if base_address + len(registers) > 0x10000:
        raise MapCorrupt(base_address, "map does not fit the Modbus address space")
    return MapImage(
        base_address=base_address,
        registers=tuple(registers),
        layout=SunSpecMap(base_address=base_address, models=tuple(locations)),
    )
