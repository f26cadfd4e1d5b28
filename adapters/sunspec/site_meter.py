"""The site's connection-point meter over SunSpec: 201–204 (AC meter) or 701 at the grid point.

It measures and takes no commands; :meth:`SunSpecSiteMeter.read` returns the site's net power in
the gateway's load convention (+ importing), one small read per poll (``W``). Meters disagree on
the sign of 20x ``W``: ``import_positive`` says which one this meter uses (701 is always the DER
convention, + injecting, so exporting).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from adapters.sunspec.connection import SunSpecConnection, SunSpecEndpoint
from gateway.devices import DeviceProtocolError, DeviceUnavailable, UnsafeCommand
from protocols.modbus import RegisterTransport
from protocols.sunspec import (
    METER_MODELS,
    MODEL_DER_MEASURE_AC,
    ModelDef,
    ModelLocation,
    SunSpecMap,
    decode_model,
    decode_scale_factors,
    load_model_def,
)
from unified.model import DeviceCommand, DeviceState, utcnow

__all__ = ["SunSpecSiteMeter"]


@dataclass(frozen=True, slots=True)
class _Discovered:
    layout: SunSpecMap
    location: ModelLocation
    model_def: ModelDef
    sfs: Mapping[str, int | None]


class SunSpecSiteMeter(SunSpecConnection[_Discovered]):
    """A SunSpec meter at the site's connection point (a DeviceAdapter that refuses commands)."""

    def __init__(
        self,
        device_id: str,
        endpoint: SunSpecEndpoint,
        *,
        import_positive: bool = True,
        transport: RegisterTransport | None = None,
    ) -> None:
        super().__init__(device_id, endpoint, transport=transport)
        self._import_positive = import_positive

    @property
    def model_id(self) -> int | None:
        return None if self._found is None else self._found.location.model_id

    async def connect(self) -> None:
        self._found = None
        self._found = await self._open(self._discover)

    async def close(self) -> None:
        self._found = None
        await self._transport.close()

    async def _discover(self) -> _Discovered:
        layout = await self._find_map()
        wanted = (*METER_MODELS, MODEL_DER_MEASURE_AC)
        model_id = next((m for m in wanted if m in layout), None)
        if model_id is None:
            raise DeviceProtocolError(
                self._device_id,
                f"SunSpec map has no meter model (one of {list(wanted)}; has {layout.model_ids})",
            )
        location, model_def = layout.find(model_id), load_model_def(model_id)
        regs, offset = await self._read_model(location, model_def, "W_SF")
        sfs = decode_scale_factors(model_def, regs, start_offset=offset)
        if sfs.get("W_SF") is None:
            raise DeviceProtocolError(self._device_id, f"{model_id} W_SF not implemented")
        return _Discovered(layout, location, model_def, sfs)

    async def read(self) -> DeviceState:
        if self._found is None:
            raise DeviceUnavailable(self._device_id, "not connected")
        found = self._found
        with self._translate("read"):
            regs, offset = await self._read_model(found.location, found.model_def, "W")
        watts = decode_model(found.model_def, regs, start_offset=offset, sfs=found.sfs).get("W")
        if not isinstance(watts, int | float):
            raise DeviceProtocolError(self._device_id, "meter W is not implemented")
        imports = found.location.model_id != MODEL_DER_MEASURE_AC and self._import_positive
        kw = float(watts) / 1000
        return DeviceState(
            device_id=self._device_id,
            timestamp=utcnow(),
            power_kw=(kw if imports else -kw) or 0.0,
            source=self.source,
        )

    async def apply(self, command: DeviceCommand) -> None:
        raise UnsafeCommand(self._device_id, "a meter takes no commands")
