"""Errors of the SunSpec codec. Each carries the ids it concerns as attributes, not only text."""

# The names say what went wrong in SunSpec terms (``MapNotFound``, ``ModelMissing``), like
# gateway.devices does; an ``Error`` suffix on each would add nothing.

from __future__ import annotations

__all__ = [
    "MapCorrupt",
    "MapNotFound",
    "MapTruncated",
    "ModelMissing",
    "PointNotImplemented",
    "ReadOnlyPoint",
    "ScaleFactorMissing",
    "SunSpecError",
    "UnknownModel",
    "UnknownPoint",
    "UnsupportedModel",
    "ValueOutOfRange",
]


class SunSpecError(Exception):
    """Base class of every SunSpec codec error."""


class MapNotFound(SunSpecError):
    """No ``'SunS'`` marker where a SunSpec map should start."""

    def __init__(self, address: int, found: tuple[int, ...] = ()) -> None:
        shown = " ".join(f"0x{r:04X}" for r in found) or "nothing"
        super().__init__(f"no SunSpec marker at {address} (found {shown})")
        self.address = address
        self.found = found


class MapTruncated(SunSpecError):
    """The register image ends before the model chain does; read ``count`` at ``address``.

    Raised by the pure chain walker so that the caller (who does the I/O) knows exactly which
    registers to fetch next: the sans-I/O equivalent of "need more data".
    """

    def __init__(self, address: int, count: int) -> None:
        super().__init__(f"register image needs {count} register(s) at {address}")
        self.address = address
        self.count = count


class MapCorrupt(SunSpecError):
    """The model chain is not well formed (runs off the address space, never ends, ...)."""

    def __init__(self, address: int, reason: str) -> None:
        super().__init__(f"corrupt SunSpec map at {address}: {reason}")
        self.address = address
        self.reason = reason


class ModelMissing(SunSpecError):
    """The device's map does not contain a model the caller needs."""

    def __init__(self, model_id: int) -> None:
        super().__init__(f"model {model_id} is not in the device's SunSpec map")
        self.model_id = model_id


class UnknownModel(SunSpecError):
    """No definition is available for this model id."""

    def __init__(self, model_id: int) -> None:
        super().__init__(f"no SunSpec definition for model {model_id}")
        self.model_id = model_id


class UnsupportedModel(SunSpecError):
    """The definition exists but uses a layout this codec does not handle."""

    def __init__(self, model_id: int, reason: str) -> None:
        super().__init__(f"model {model_id} unsupported: {reason}")
        self.model_id = model_id
        self.reason = reason


class UnknownPoint(SunSpecError):
    def __init__(self, model_id: int, point: str) -> None:
        super().__init__(f"model {model_id} has no point {point!r}")
        self.model_id = model_id
        self.point = point


class PointNotImplemented(SunSpecError):
    """The device reports a point the caller needs as "not implemented"."""

    def __init__(self, model_id: int, point: str) -> None:
        super().__init__(f"model {model_id} point {point} is not implemented by the device")
        self.model_id = model_id
        self.point = point


class ScaleFactorMissing(SunSpecError):
    """A scaled point was decoded or encoded without its scale factor's value."""

    def __init__(self, model_id: int, point: str, sf: str) -> None:
        super().__init__(f"model {model_id} point {point} needs scale factor {sf}")
        self.model_id = model_id
        self.point = point
        self.sf = sf


class ValueOutOfRange(SunSpecError):
    """A value does not fit the point's type (after scaling) or is not one of its symbols."""

    def __init__(self, model_id: int, point: str, value: object) -> None:
        super().__init__(f"model {model_id} point {point}: {value!r} out of range")
        self.model_id = model_id
        self.point = point
        self.value = value


class ReadOnlyPoint(SunSpecError):
    def __init__(self, model_id: int, point: str) -> None:
        super().__init__(f"model {model_id} point {point} is read-only")
        self.model_id = model_id
        self.point = point
