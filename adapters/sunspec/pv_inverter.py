"""A PV inverter reached over Modbus/TCP with the SunSpec DER models or the legacy ones.

A PV inverter only generates, so the one thing to control is how much: an active power limit in
percent of ``WMax`` (704 ``WMaxLimPct`` or legacy 123 ``WMaxLimPct``), and whether it is
connected at all (715 ``OpCtl`` or legacy 123 ``Conn``). A unified command maps onto that:

* a setpoint ``power_kw <= 0`` caps generation at ``-power_kw`` (the sun may give less), with the
  device's own reversion timer, so full output comes back if the gateway goes quiet;
* a setpoint ``power_kw > 0`` asks a PV inverter to import: refused as unsafe;
* autonomous operation with ``export_limit_kw`` caps generation there, without reversion (a
  safety limit must not lapse because the gateway went quiet); without one the cap is lifted.
  An import limit means nothing to a generator and is ignored.
* ``connect`` / ``energize`` false (an envelope's disconnect) opens its connection, with no
  timer; the first command without them closes it again.

Polling is one read of ``W`` (and, for the legacy maps, the scale factor next to it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from adapters.sunspec.connection import SunSpecConnection, SunSpecEndpoint, positive
from gateway.devices import DeviceProtocolError, DeviceRejected, UnsafeCommand
from protocols.modbus import RegisterTransport
from protocols.sunspec import (
    LEGACY_INVERTER_MODELS,
    MODEL_CONTROLS,
    MODEL_DER_AC_CONTROLS,
    MODEL_DER_CAPACITY,
    MODEL_DER_MEASURE_AC,
    MODEL_NAMEPLATE,
    MODEL_SETTINGS,
    ModelDef,
    ModelLocation,
    PointValue,
    SunSpecMap,
    decode_model,
    decode_scale_factors,
    load_model_def,
)
from unified.model import DeviceCommand, DeviceState, utcnow

__all__ = ["RATING_TOLERANCE", "SunSpecPvInverter"]

#: A cap may exceed the rating by this fraction (rounding upstream); beyond it, it is clipped.
RATING_TOLERANCE: Final = 0.01
MODEL_DER_CONTROL: Final = 715

_ENABLED: Final = 1
_DISABLED: Final = 0
_OP_STOP, _OP_START = 0, 1
_DISCONNECT, _CONNECT = 0, 1
_UINT16_TIMER_MAX: Final = 0xFFFE

_M701 = load_model_def(MODEL_DER_MEASURE_AC)
_M702 = load_model_def(MODEL_DER_CAPACITY)
_M704 = load_model_def(MODEL_DER_AC_CONTROLS)
_M715 = load_model_def(MODEL_DER_CONTROL)
_M120 = load_model_def(MODEL_NAMEPLATE)
_M121 = load_model_def(MODEL_SETTINGS)
_M123 = load_model_def(MODEL_CONTROLS)


@dataclass(frozen=True, slots=True)
class _Discovered:
    layout: SunSpecMap
    legacy: bool
    measure: ModelLocation
    measure_def: ModelDef
    sfs_measure: Mapping[str, int | None]
    controls: ModelLocation | None
    """704, or legacy 123; None: the inverter takes no limit."""
    sfs_controls: Mapping[str, int | None]
    connection: ModelLocation | None
    """715, or legacy 123; None: it cannot be disconnected remotely."""
    wmax_kw: float


@dataclass(frozen=True, slots=True)
class _Cap:
    pct: float | None  # None: no cap
    reverting: bool


class SunSpecPvInverter(SunSpecConnection[_Discovered]):
    """The DeviceAdapter for a SunSpec PV inverter (701/702/704/715, or legacy 1xx/120/121/123)."""

    def __init__(
        self,
        device_id: str,
        endpoint: SunSpecEndpoint,
        *,
        transport: RegisterTransport | None = None,
    ) -> None:
        super().__init__(device_id, endpoint, transport=transport)
        self._cap: _Cap | None = None  # None: unknown, so the next command writes
        self._switched_off = False  # disconnected by a command (reconnected when it ends)

    @property
    def legacy(self) -> bool:
        return self._found is not None and self._found.legacy

    @property
    def rated_kw(self) -> float | None:
        return None if self._found is None else self._found.wmax_kw

    # ----------------------------------------------------------------------- lifecycle

    async def connect(self) -> None:
        self._found = None
        self._cap = None
        self._found = await self._open(self._discover)

    async def close(self) -> None:
        self._found = None
        self._cap = None
        await self._transport.close()

    async def _whole(self, layout: SunSpecMap, model_def: ModelDef) -> dict[str, PointValue | None]:
        if model_def.model_id not in layout:
            return {}
        regs, _ = await self._read_model(layout.find(model_def.model_id), model_def)
        return decode_model(model_def, regs)

    async def _discover(self) -> _Discovered:
        layout = await self._find_map()
        if MODEL_DER_MEASURE_AC in layout:
            measure, measure_def, legacy = layout.find(MODEL_DER_MEASURE_AC), _M701, False
        else:
            legacy_id = next((m for m in LEGACY_INVERTER_MODELS if m in layout), None)
            if legacy_id is None:
                raise DeviceProtocolError(
                    self._device_id,
                    f"SunSpec map has no inverter measurement (701 or one of "
                    f"{list(LEGACY_INVERTER_MODELS)}; has {layout.model_ids})",
                )
            measure, measure_def, legacy = layout.find(legacy_id), load_model_def(legacy_id), True
        scaled = measure_def.point("W").sf is not None
        sfs_measure: dict[str, int | None] = {}
        if scaled:
            regs, offset = await self._read_model(measure, measure_def, "W_SF")
            sfs_measure = decode_scale_factors(measure_def, regs, start_offset=offset)
        if scaled and sfs_measure.get("W_SF") is None:
            raise DeviceProtocolError(self._device_id, f"{measure.model_id} W_SF not implemented")
        if legacy:
            controls_def: ModelDef = _M123
            settings = await self._whole(layout, _M121)
            nameplate = await self._whole(layout, _M120)
            wmax = positive(settings.get("WMax"), nameplate.get("WRtg"))
            connection = layout.find(MODEL_CONTROLS) if MODEL_CONTROLS in layout else None
        else:
            controls_def = _M704
            capacity = await self._whole(layout, _M702)
            wmax = positive(capacity.get("WMax"), capacity.get("WMaxRtg"))
            connection = layout.find(MODEL_DER_CONTROL) if MODEL_DER_CONTROL in layout else None
        if wmax is None:
            raise DeviceProtocolError(self._device_id, "no WMax rating: a limit has no base")
        controls = layout.find(controls_def.model_id) if controls_def.model_id in layout else None
        sfs_controls: dict[str, int | None] = {}
        if controls is not None:
            regs, offset = await self._read_model(controls, controls_def, "WMaxLimPct_SF")
            sfs_controls = decode_scale_factors(controls_def, regs, start_offset=offset)
        return _Discovered(
            layout=layout,
            legacy=legacy,
            measure=measure,
            measure_def=measure_def,
            sfs_measure=sfs_measure,
            controls=controls,
            sfs_controls=sfs_controls,
            connection=connection,
            wmax_kw=wmax / 1000,
        )

    # ----------------------------------------------------------------------- polling

    async def read(self) -> DeviceState:
        found = self._require()
        with self._translate("read"):
            regs, offset = await self._read_model(found.measure, found.measure_def, "W")
        values = decode_model(found.measure_def, regs, start_offset=offset, sfs=found.sfs_measure)
        watts = values.get("W")
        if not isinstance(watts, int | float):
            raise DeviceProtocolError(
                self._device_id, f"{found.measure.model_id} W is not implemented"
            )
        return DeviceState(
            device_id=self._device_id,
            timestamp=utcnow(),
            power_kw=(-float(watts) / 1000) or 0.0,  # SunSpec W: + injecting; ours: + importing
            max_charge_kw=0.0,
            max_discharge_kw=found.wmax_kw,
            source=self.source,
        )

    # ----------------------------------------------------------------------- control

    async def apply(self, command: DeviceCommand) -> None:
        if command.device_id != self._device_id:
            raise UnsafeCommand(self._device_id, f"command is for {command.device_id}")
        self._require()
        if command.connect is False or command.energize is False:
            # An envelope disconnects / de-energizes it: open its connection (123 Conn / 715
            # OpCtl), no timer (a safety instruction must not lapse by itself).
            if not self._switched_off:
                await self.set_connected(False)
                self._switched_off = True
            return
        if self._switched_off or command.connect is True:
            await self.set_connected(True)
            self._switched_off = False
        if command.power_kw is not None:
            if not math.isfinite(command.power_kw) or command.power_kw > 0:
                raise UnsafeCommand(
                    self._device_id, f"a PV inverter cannot take {command.power_kw} kW (import)"
                )
            await self.curtail(-command.power_kw, revert_s=self._endpoint.setpoint_revert_s)
            return
        await self.curtail(command.export_limit_kw)

    async def curtail(self, limit_kw: float | None, *, revert_s: int | None = None) -> None:
        """Cap generation at ``limit_kw`` (None lifts the cap); ``revert_s``: the device lifts
        it by itself after that long without a new write."""
        found = self._require()
        if limit_kw is None:
            if self._cap is not None and self._cap.pct is None:
                return
            if found.controls is None:
                self._cap = _Cap(None, reverting=False)
                return
            enable = "WMaxLim_Ena" if found.legacy else "WMaxLimPctEna"
            values: dict[str, PointValue | None] = {enable: _DISABLED}
            await self._write_points(
                found.controls, _M123 if found.legacy else _M704, values, found.sfs_controls
            )
            self._cap = _Cap(None, reverting=False)
            return
        if not math.isfinite(limit_kw) or limit_kw < 0:
            raise UnsafeCommand(self._device_id, f"limit {limit_kw} kW is not valid")
        if limit_kw > found.wmax_kw * (1 + RATING_TOLERANCE):
            # A cap above the rating is no cap: lift it rather than refuse.
            await self.curtail(None)
            return
        pct = min(100.0, limit_kw / found.wmax_kw * 100)
        if found.controls is None:
            raise DeviceRejected(self._device_id, "no power limit control (704 or 123)")
        if found.sfs_controls.get("WMaxLimPct_SF") is None:
            raise DeviceRejected(self._device_id, "WMaxLimPct_SF is not implemented")
        cached = self._cap
        if (
            revert_s is None
            and cached is not None
            and not cached.reverting
            and cached.pct is not None
            and abs(cached.pct - pct) < 0.05
        ):
            return  # the same standing cap is in force
        timer = 0 if revert_s is None else revert_s
        if found.legacy:
            values = {
                "WMaxLimPct": pct,
                "WMaxLimPct_WinTms": 0,
                "WMaxLimPct_RvrtTms": min(timer, _UINT16_TIMER_MAX),
                "WMaxLimPct_RmpTms": 0,
                "WMaxLim_Ena": _ENABLED,
            }
            await self._write_points(found.controls, _M123, values, found.sfs_controls)
        else:
            values = {
                "WMaxLimPctEna": _ENABLED,
                "WMaxLimPct": pct,
                "WMaxLimPctRvrt": 100.0,
                "WMaxLimPctEnaRvrt": _DISABLED,
                "WMaxLimPctRvrtTms": timer,
            }
            await self._write_points(found.controls, _M704, values, found.sfs_controls)
        self._cap = _Cap(pct, reverting=revert_s is not None)

    async def set_connected(self, connected: bool, *, revert_s: int | None = None) -> None:
        """Connect or disconnect the inverter (123 ``Conn`` or 715 ``OpCtl``).

        ``revert_s`` (legacy only: 715 has no timer): reconnect by itself after that long.
        """
        found = self._require()
        if found.connection is None:
            raise DeviceRejected(self._device_id, "no connect control (715 or 123)")
        if found.legacy:
            values: dict[str, PointValue | None] = {
                "Conn_WinTms": 0,
                "Conn_RvrtTms": 0 if revert_s is None else min(revert_s, _UINT16_TIMER_MAX),
                "Conn": _CONNECT if connected else _DISCONNECT,
            }
            await self._write_points(found.connection, _M123, values, found.sfs_controls)
        else:
            values = {"OpCtl": _OP_START if connected else _OP_STOP}
            await self._write_points(found.connection, _M715, values, {})
