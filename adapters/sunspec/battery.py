"""A battery (inverter) reached over Modbus/TCP with the SunSpec DER models, or the legacy ones.

The adapter joins the pure SunSpec codec (``protocols.sunspec``) to a register transport
(``protocols.modbus``). It discovers the map once per connection, caches ratings and scale
factors, then polls with two small reads: 701 ``W`` and 713 (or 802) state of charge. Control goes
through 704 ``WSet`` in watts, with a reversion timer so the battery returns to idle by itself if
the gateway stops talking to it.

A device that shows only the legacy models (1, 101–103 or 111–113, 120, 121, 123, 124: how most
deployed storage inverters present themselves) is driven through them instead: power from the
1xx ``W``, ratings from 120/121/124, state of charge from 124 ``ChaState``, and a setpoint as a
124 charge/discharge window collapsed onto one point (``InWRte = -OutWRte``, percent of
``WChaMax``, ``StorCtl_Mod`` both bits), with ``InOutWRte_RvrtTms`` as the reversion timer.
Autonomous limits go to 123 ``WMaxLimPct`` (percent of 121 ``WMax``). A legacy device whose 124
cannot express a setpoint is still read, and each setpoint to it is refused with a reason.

Retrying and availability bookkeeping are the supervisor's job, not this adapter's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from adapters.sunspec.connection import SunSpecConnection, SunSpecEndpoint, positive
from gateway.devices import DeviceProtocolError, DeviceRejected, UnsafeCommand
from protocols.modbus import (
    RegisterTransport,
)
from protocols.sunspec import (
    LEGACY_INVERTER_MODELS,
    MODEL_BATTERY,
    MODEL_COMMON,
    MODEL_CONTROLS,
    MODEL_DER_AC_CONTROLS,
    MODEL_DER_CAPACITY,
    MODEL_DER_MEASURE_AC,
    MODEL_DER_STORAGE_CAPACITY,
    MODEL_NAMEPLATE,
    MODEL_SETTINGS,
    MODEL_STORAGE,
    ModelDef,
    ModelLocation,
    PointValue,
    SunSpecMap,
    decode_model,
    decode_scale_factors,
    load_model_def,
)
from unified.model import DeviceCommand, DeviceState, utcnow

__all__ = ["RATING_TOLERANCE", "SunSpecBattery", "SunSpecEndpoint"]

#: A command may exceed a rating by this fraction (rounding in upstream allocation); it is then
#: clipped to the rating. Anything further is refused as unsafe.
RATING_TOLERANCE: Final = 0.01

_ENABLED: Final = 1
_DISABLED: Final = 0
_MODE_WATTS: Final = 1
_ILLEGAL_ADDRESS: Final = 2
_ILLEGAL_VALUE: Final = 3

_M701 = load_model_def(MODEL_DER_MEASURE_AC)
_M702 = load_model_def(MODEL_DER_CAPACITY)
_M704 = load_model_def(MODEL_DER_AC_CONTROLS)
_M713 = load_model_def(MODEL_DER_STORAGE_CAPACITY)
_M802 = load_model_def(MODEL_BATTERY)
_M120 = load_model_def(MODEL_NAMEPLATE)
_M121 = load_model_def(MODEL_SETTINGS)
_M123 = load_model_def(MODEL_CONTROLS)
_M124 = load_model_def(MODEL_STORAGE)
#: 124 ``StorCtl_Mod``: bit 0 enables the charge limit, bit 1 the discharge limit.
_STOR_BOTH_LIMITS: Final = 0b11
_UINT16_TIMER_MAX: Final = 0xFFFE


@dataclass(frozen=True, slots=True)
class _Discovered:
    """What connect() learned; valid until the connection is closed."""

    layout: SunSpecMap
    measure: ModelLocation
    measure_def: ModelDef
    """701, or a legacy 1xx inverter model."""
    controls: ModelLocation | None
    """704, or legacy 123 (None: the legacy device takes no limit)."""
    soc_model: ModelDef
    soc_location: ModelLocation
    sfs_measure: Mapping[str, int | None]
    sfs_controls: Mapping[str, int | None]
    sfs_soc: Mapping[str, int | None]
    max_charge_kw: float
    max_discharge_kw: float
    capacity_kwh: float | None
    wmax_kw: float
    """What 704 ``WMaxLimPct`` is a percentage of (702 ``WMaxRtg``, else the larger rating)."""
    limit_enabled: bool
    """704 ``WMaxLimPctEna`` (123 ``WMaxLim_Ena``) as found at connect."""
    legacy: bool = False
    storage: ModelLocation | None = None
    """Legacy: 124, where setpoints go."""
    sfs_storage: Mapping[str, int | None] | None = None
    rate_base_w: float = 0.0
    """Legacy: 124 ``WChaMax``, what ``InWRte`` and ``OutWRte`` are percentages of."""
    no_setpoint: str | None = None
    """Legacy: why this device cannot take a power setpoint (None: it can)."""


@dataclass(frozen=True, slots=True)
class _Setpoint:
    """The setpoint in force as far as we know, and until when that knowledge holds."""

    power_kw: float | None
    valid_until: float  # time.monotonic()


class SunSpecBattery(SunSpecConnection[_Discovered]):
    """The DeviceAdapter for a SunSpec battery (models 1/701/702/704/713/802, or legacy
    1/1xx/120/121/123/124)."""

    def __init__(
        self,
        device_id: str,
        endpoint: SunSpecEndpoint,
        *,
        transport: RegisterTransport | None = None,
    ) -> None:
        super().__init__(device_id, endpoint, transport=transport)
        self._limit_on: bool | None = None  # None: unknown (after a connect), so clear it once
        self._limit_pct: float | None = None
        self._setpoint: _Setpoint | None = None

    # ----------------------------------------------------------------------- lifecycle

    async def connect(self) -> None:
        """Open the transport, find the SunSpec map and learn ratings and scale factors."""
        self._found = None
        self._setpoint = None
        self._limit_on = None
        self._limit_pct = None
        self._found = await self._open(self._discover)
        self._limit_on = self._found.limit_enabled

    async def close(self) -> None:
        self._found = None
        self._setpoint = None
        await self._transport.close()

    async def _discover(self) -> _Discovered:
        layout = await self._find_map()
        has_der = MODEL_DER_MEASURE_AC in layout and MODEL_DER_AC_CONTROLS in layout
        legacy_measure = next((m for m in LEGACY_INVERTER_MODELS if m in layout), None)
        if not has_der and legacy_measure is not None and MODEL_STORAGE in layout:
            return await self._discover_legacy(layout, layout.find(legacy_measure))
        missing = [
            m
            for m in (MODEL_COMMON, MODEL_DER_MEASURE_AC, MODEL_DER_AC_CONTROLS)
            if m not in layout
        ]
        if MODEL_DER_STORAGE_CAPACITY not in layout and MODEL_BATTERY not in layout:
            missing.append(MODEL_DER_STORAGE_CAPACITY)
        if missing:
            legacy = f"; or legacy 1, one of {list(LEGACY_INVERTER_MODELS)}, {MODEL_STORAGE}"
            raise DeviceProtocolError(
                self._device_id,
                f"SunSpec map lacks model(s) {missing}{legacy} (has {layout.model_ids})",
            )
        measure = layout.find(MODEL_DER_MEASURE_AC)
        controls = layout.find(MODEL_DER_AC_CONTROLS)

        sf_names_701 = [p.name for p in _M701.points.values() if p.type == "sunssf"]
        regs, offset = await self._read_model(measure, _M701, *sf_names_701)
        sfs_701 = decode_scale_factors(_M701, regs, start_offset=offset)
        sf_names_704 = [p.name for p in _M704.points.values() if p.type == "sunssf"]
        # One read from WMaxLimPctEna to the scale factors: it also tells whether a generation
        # cap is in force, so a later setpoint knows whether it must lift it.
        regs, offset = await self._read_model(controls, _M704, "WMaxLimPctEna", *sf_names_704)
        sfs_704 = decode_scale_factors(_M704, regs, start_offset=offset)
        limit_enabled = decode_model(_M704, regs, start_offset=offset).get("WMaxLimPctEna")
        if sfs_701.get("W_SF") is None or sfs_704.get("WSet_SF") is None:
            raise DeviceProtocolError(self._device_id, "W_SF or WSet_SF not implemented")

        battery: dict[str, PointValue | None] = {}
        if MODEL_BATTERY in layout:
            regs, _ = await self._read_model(layout.find(MODEL_BATTERY), _M802)
            battery = decode_model(_M802, regs)
        storage: dict[str, PointValue | None] = {}
        if MODEL_DER_STORAGE_CAPACITY in layout:
            regs, _ = await self._read_model(layout.find(MODEL_DER_STORAGE_CAPACITY), _M713)
            storage = decode_model(_M713, regs)
        capacity: dict[str, PointValue | None] = {}
        if MODEL_DER_CAPACITY in layout:
            regs, _ = await self._read_model(layout.find(MODEL_DER_CAPACITY), _M702)
            capacity = decode_model(_M702, regs)

        wmax = positive(capacity.get("WMaxRtg"))
        charge_w = positive(capacity.get("WChaRteMaxRtg"), battery.get("WChaRteMax"), wmax)
        discharge_w = positive(capacity.get("WDisChaRteMaxRtg"), battery.get("WDisChaRteMax"), wmax)
        if charge_w is None or discharge_w is None:
            # Without ratings no command can be checked, so none may be sent.
            raise DeviceProtocolError(self._device_id, "no charge/discharge power ratings")
        if wmax is not None:
            charge_w, discharge_w = min(charge_w, wmax), min(discharge_w, wmax)
        wh = positive(storage.get("WHRtg"), battery.get("WHRtg"))

        if MODEL_DER_STORAGE_CAPACITY in layout and storage.get("Pct_SF") is not None:
            soc_model, soc_location = _M713, layout.find(MODEL_DER_STORAGE_CAPACITY)
            sfs_soc = {"Pct_SF": int(storage["Pct_SF"] or 0)}
        elif MODEL_BATTERY in layout and battery.get("SoC_SF") is not None:
            soc_model, soc_location = _M802, layout.find(MODEL_BATTERY)
            sfs_soc = {"SoC_SF": int(battery["SoC_SF"] or 0)}
        else:
            raise DeviceProtocolError(self._device_id, "no state-of-charge scale factor")
        return _Discovered(
            layout=layout,
            measure=measure,
            measure_def=_M701,
            controls=controls,
            soc_model=soc_model,
            soc_location=soc_location,
            sfs_measure=sfs_701,
            sfs_controls=sfs_704,
            sfs_soc=sfs_soc,
            max_charge_kw=charge_w / 1000,
            max_discharge_kw=discharge_w / 1000,
            capacity_kwh=None if wh is None else wh / 1000,
            wmax_kw=(wmax if wmax is not None else max(charge_w, discharge_w)) / 1000,
            limit_enabled=limit_enabled == _ENABLED,
        )

    async def _discover_legacy(self, layout: SunSpecMap, measure: ModelLocation) -> _Discovered:
        """Learn a legacy map: 1xx measurement, 120 nameplate, 121 settings, 123, 124."""
        measure_def = load_model_def(measure.model_id)
        scaled = measure_def.point("W").sf is not None
        regs, offset = await self._read_model(
            measure, measure_def, *(("W", "W_SF") if scaled else ("W",))
        )
        sfs_measure = decode_scale_factors(measure_def, regs, start_offset=offset)
        if scaled and sfs_measure.get("W_SF") is None:
            raise DeviceProtocolError(self._device_id, f"{measure.model_id} W_SF not implemented")

        async def whole(model_def: ModelDef) -> dict[str, PointValue | None]:
            if model_def.model_id not in layout:
                return {}
            regs, _ = await self._read_model(layout.find(model_def.model_id), model_def)
            return decode_model(model_def, regs)

        nameplate, settings, controls, storage = (
            await whole(_M120),
            await whole(_M121),
            await whole(_M123),
            await whole(_M124),
        )

        wmax = positive(settings.get("WMax"), nameplate.get("WRtg"))
        base = positive(storage.get("WChaMax"))
        charge_w = positive(nameplate.get("MaxChaRte"), base, wmax)
        discharge_w = positive(nameplate.get("MaxDisChaRte"), base, wmax)
        if charge_w is None or discharge_w is None:
            raise DeviceProtocolError(self._device_id, "no charge/discharge power ratings")
        # The window is in percent of WChaMax within ±100 %: nothing beyond it can be asked.
        for bound in (wmax, base):
            if bound is not None:
                charge_w, discharge_w = min(charge_w, bound), min(discharge_w, bound)
        if storage.get("ChaState_SF") is None:
            raise DeviceProtocolError(self._device_id, "124 ChaState_SF not implemented")
        no_setpoint: str | None = None
        unimplemented = [
            name
            for name in ("StorCtl_Mod", "InWRte", "OutWRte", "InOutWRte_SF", "InOutWRte_RvrtTms")
            if storage.get(name) is None
        ]
        if base is None:
            no_setpoint = "124 WChaMax is not implemented: a charge rate has no base"
        elif unimplemented:
            no_setpoint = f"124 {', '.join(unimplemented)} not implemented"
        wh = positive(nameplate.get("WHRtg"))
        return _Discovered(
            layout=layout,
            measure=measure,
            measure_def=measure_def,
            controls=layout.find(MODEL_CONTROLS) if MODEL_CONTROLS in layout else None,
            soc_model=_M124,
            soc_location=layout.find(MODEL_STORAGE),
            sfs_measure=sfs_measure,
            sfs_controls={"WMaxLimPct_SF": _sf(controls.get("WMaxLimPct_SF"))},
            sfs_soc={"ChaState_SF": _sf(storage.get("ChaState_SF"))},
            max_charge_kw=charge_w / 1000,
            max_discharge_kw=discharge_w / 1000,
            capacity_kwh=None if wh is None else wh / 1000,
            wmax_kw=(wmax if wmax is not None else max(charge_w, discharge_w)) / 1000,
            limit_enabled=controls.get("WMaxLim_Ena") == _ENABLED,
            legacy=True,
            storage=layout.find(MODEL_STORAGE),
            sfs_storage={
                p.name: _sf(storage.get(p.name))
                for p in _M124.points.values()
                if p.type == "sunssf"
            },
            rate_base_w=base or 0.0,
            no_setpoint=no_setpoint,
        )

    # ----------------------------------------------------------------------- polling

    async def read(self) -> DeviceState:
        found = self._require()
        with self._translate("read"):
            regs, offset = await self._read_model(found.measure, found.measure_def, "W")
            measured = decode_model(
                found.measure_def, regs, start_offset=offset, sfs=found.sfs_measure
            )
            soc_name = "ChaState" if found.legacy else "SoC"
            regs, offset = await self._read_model(found.soc_location, found.soc_model, soc_name)
            soc = decode_model(found.soc_model, regs, start_offset=offset, sfs=found.sfs_soc).get(
                soc_name
            )
            setpoint = await self._setpoint_in_force(found)
        watts = measured.get("W")
        if not isinstance(watts, int | float):
            raise DeviceProtocolError(
                self._device_id, f"{found.measure.model_id} W is not implemented"
            )
        if soc is not None and not (isinstance(soc, int | float) and 0 <= soc <= 100):
            raise DeviceProtocolError(self._device_id, f"state of charge {soc!r} out of range")
        return DeviceState(
            device_id=self._device_id,
            timestamp=utcnow(),
            power_kw=(-float(watts) / 1000) or 0.0,  # SunSpec W: + injecting; ours: + importing
            soc_pct=None if soc is None else float(soc),
            capacity_kwh=found.capacity_kwh,
            max_charge_kw=found.max_charge_kw,
            max_discharge_kw=found.max_discharge_kw,
            setpoint_kw=setpoint,
            source=self.source,
        )

    async def _setpoint_in_force(self, found: _Discovered) -> float | None:
        """The setpoint in force, read from 704 only when our cached knowledge may be stale.

        After our own write the device holds that setpoint until its reversion timer fires, so no
        read is needed before then. Otherwise one read of WSetEna..WSetRvrtRem tells the state and
        how long it will last.
        """
        now = time.monotonic()
        cached = self._setpoint
        if cached is not None and now < cached.valid_until:
            return cached.power_kw
        if found.legacy:
            return await self._legacy_setpoint_in_force(found, now)
        assert found.controls is not None  # a 7xx map always has 704
        regs, offset = await self._read_model(found.controls, _M704, "WSetEna", "WSetRvrtRem")
        ctl = decode_model(_M704, regs, start_offset=offset, sfs=found.sfs_controls)
        power: float | None = None
        wset = ctl.get("WSet")
        if (
            ctl.get("WSetEna") == _ENABLED
            and ctl.get("WSetMod") == _MODE_WATTS
            and isinstance(wset, int | float)
        ):
            power = -float(wset) / 1000
        # A percent-mode setpoint set by someone else is not reported as kW.
        lasts: float = self._endpoint.setpoint_revert_s
        remaining = ctl.get("WSetRvrtRem")
        if ctl.get("WSetEna") == _ENABLED and isinstance(remaining, int | float) and remaining > 0:
            lasts = min(lasts, float(remaining))
        self._setpoint = _Setpoint(power, now + lasts)
        return power

    async def _legacy_setpoint_in_force(self, found: _Discovered, now: float) -> float | None:
        """A 124 window collapsed onto one point is a setpoint; anything else is not."""
        storage, sfs = _storage(found)
        regs, offset = await self._read_model(storage, _M124, "StorCtl_Mod", "InOutWRte_RvrtTms")
        stor = decode_model(_M124, regs, start_offset=offset, sfs=sfs)
        power: float | None = None
        in_pct, out_pct = stor.get("InWRte"), stor.get("OutWRte")
        if (
            stor.get("StorCtl_Mod") == _STOR_BOTH_LIMITS
            and isinstance(in_pct, int | float)
            and isinstance(out_pct, int | float)
            and math.isclose(in_pct, -out_pct, abs_tol=1e-9)
        ):
            power = round(float(in_pct) * found.rate_base_w / 100) / 1000
        lasts: float = self._endpoint.setpoint_revert_s
        timer = stor.get("InOutWRte_RvrtTms")
        if isinstance(timer, int) and timer > 0:
            # 124 has no "time remaining" point: the full timer is an upper bound.
            lasts = min(lasts, float(timer))
        self._setpoint = _Setpoint(power, now + lasts)
        return power

    # ----------------------------------------------------------------------- control

    def _checked_kw(self, found: _Discovered, power_kw: float) -> float:
        if not math.isfinite(power_kw):
            raise UnsafeCommand(self._device_id, f"setpoint {power_kw} kW is not a number")
        limit = found.max_charge_kw if power_kw > 0 else found.max_discharge_kw
        if abs(power_kw) > limit * (1 + RATING_TOLERANCE):
            direction = "charge" if power_kw > 0 else "discharge"
            raise UnsafeCommand(
                self._device_id,
                f"setpoint {power_kw} kW beyond the {direction} rating of {limit} kW",
            )
        return math.copysign(min(abs(power_kw), limit), power_kw)

    async def apply(self, command: DeviceCommand) -> None:
        """Write one setpoint to 704 (``WSet`` in watts), or release control with ``WSetEna=0``.

        The setpoint, the mode and the reversion settings go in one contiguous write, which the
        device applies as a whole: it never runs a new setpoint without the reversion timer.
        """
        if command.device_id != self._device_id:
            raise UnsafeCommand(self._device_id, f"command is for {command.device_id}")
        found = self._require()
        if found.legacy:
            await self._apply_legacy(found, command)
            return
        power_kw: float | None = None
        if command.power_kw is None:
            values: dict[str, PointValue | None] = {"WSetEna": _DISABLED}
            await self._write_limit(found, command.export_limit_kw, command.import_limit_kw)
        else:
            power_kw = self._checked_kw(found, command.power_kw)
            await self._write_limit(found, None, None)
            values = {
                "WSetEna": _ENABLED,
                "WSetMod": _MODE_WATTS,
                "WSet": -power_kw * 1000,  # SunSpec: + injects (discharges)
                "WSetRvrt": 0,  # after the timeout: hold 0 W, i.e. idle
                "WSetPct": 0,  # unused in watts mode; written only to keep one block
                "WSetPctRvrt": 0,
                "WSetEnaRvrt": _ENABLED,
                "WSetRvrtTms": self._endpoint.setpoint_revert_s,
            }
        # 0 is 0 at any scale factor, so an unimplemented WSetPct_SF cannot block the write.
        sfs = {**found.sfs_controls, "WSetPct_SF": found.sfs_controls.get("WSetPct_SF") or 0}
        assert found.controls is not None  # a 7xx map always has 704
        await self._write_points(found.controls, _M704, values, sfs)
        self._setpoint = _Setpoint(power_kw, time.monotonic() + self._endpoint.setpoint_revert_s)

    async def _apply_legacy(self, found: _Discovered, command: DeviceCommand) -> None:
        """A setpoint as a 124 window of one point; a release clears ``StorCtl_Mod``.

        The window and its reversion timer go in one write before the mode that enables them,
        so the device never runs an enabled window without its timer.
        """
        storage, sfs = _storage(found)
        if command.power_kw is None:
            await self._write_limit(found, command.export_limit_kw, command.import_limit_kw)
            if found.no_setpoint is None:  # a device that cannot take one has none to release
                await self._write_points(storage, _M124, {"StorCtl_Mod": 0}, {})
            self._setpoint = _Setpoint(None, time.monotonic() + self._endpoint.setpoint_revert_s)
            return
        power_kw = self._checked_kw(found, command.power_kw)
        if found.no_setpoint is not None:
            raise DeviceRejected(self._device_id, f"cannot take a setpoint: {found.no_setpoint}")
        await self._write_limit(found, None, None)
        pct = power_kw * 1000 / found.rate_base_w * 100  # + charges
        window: dict[str, PointValue | None] = {
            "OutWRte": -pct,
            "InWRte": pct,
            "InOutWRte_WinTms": 0,
            "InOutWRte_RvrtTms": min(self._endpoint.setpoint_revert_s, _UINT16_TIMER_MAX),
            "InOutWRte_RmpTms": 0,
        }
        await self._write_points(storage, _M124, window, sfs)
        await self._write_points(storage, _M124, {"StorCtl_Mod": _STOR_BOTH_LIMITS}, {})
        self._setpoint = _Setpoint(power_kw, time.monotonic() + self._endpoint.setpoint_revert_s)

    async def _write_limit(
        self, found: _Discovered, export_kw: float | None, import_kw: float | None
    ) -> None:
        """Cap an autonomous battery with 704 ``WMaxLimPct`` (a percentage of WMax).

        SunSpec has one symmetric cap, so the tighter of the export and import limits is
        written. No reversion: a safety limit must not lapse because the gateway went quiet.
        """
        caps = [x for x in (export_kw, import_kw) if x is not None]
        pct: float | None = None
        enable = "WMaxLim_Ena" if found.legacy else "WMaxLimPctEna"
        if not caps:
            if self._limit_on is False or found.controls is None:
                return  # already off (or nothing that could be on): no write
            values: dict[str, PointValue | None] = {enable: _DISABLED}
        else:
            limit_kw = min(caps)
            if not math.isfinite(limit_kw) or limit_kw < 0:
                raise UnsafeCommand(self._device_id, f"limit {limit_kw} kW is not valid")
            pct = min(100.0, limit_kw / found.wmax_kw * 100)
            if self._limit_on and self._limit_pct is not None and abs(pct - self._limit_pct) < 0.05:
                return  # the same cap is in force
            if found.controls is None:
                raise DeviceRejected(self._device_id, "no model 123: cannot take a power limit")
            if found.sfs_controls.get("WMaxLimPct_SF") is None:
                raise DeviceRejected(self._device_id, "WMaxLimPct_SF is not implemented")
        if found.controls is None:
            return
        if found.legacy:
            if pct is not None:
                values = {
                    "WMaxLimPct": pct,
                    "WMaxLimPct_WinTms": 0,
                    "WMaxLimPct_RvrtTms": 0,  # a safety limit must not lapse
                    "WMaxLimPct_RmpTms": 0,
                    "WMaxLim_Ena": _ENABLED,
                }
            model_def = _M123
        else:
            if pct is not None:
                values = {
                    "WMaxLimPctEna": _ENABLED,
                    "WMaxLimPct": pct,
                    "WMaxLimPctRvrt": pct,
                    "WMaxLimPctEnaRvrt": _ENABLED,
                    "WMaxLimPctRvrtTms": 0,
                }
            model_def = _M704
        await self._write_points(found.controls, model_def, values, found.sfs_controls)
        self._limit_on = bool(caps)
        self._limit_pct = pct

    # ----------------------------------------------------------------------- diagnostics

    @property
    def legacy(self) -> bool:
        """Whether the device is driven through the legacy 1xx models (False before connect)."""
        return self._found is not None and self._found.legacy

    async def registers(self, model_id: int) -> dict[str, PointValue | None]:
        """Read and decode a whole model (diagnostics; not used when polling)."""
        found = self._require()
        model_def = load_model_def(model_id)
        with self._translate(f"read model {model_id}"):
            location = found.layout.find(model_id)
            regs, _ = await self._read_model(location, model_def)
            return decode_model(model_def, regs)


def _sf(value: PointValue | None) -> int | None:
    return value if isinstance(value, int) else None


def _storage(found: _Discovered) -> tuple[ModelLocation, Mapping[str, int | None]]:
    if found.storage is None or found.sfs_storage is None:
        raise RuntimeError("a legacy device was discovered without model 124")
    return found.storage, found.sfs_storage
