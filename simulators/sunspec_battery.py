"""A SunSpec battery behind a real Modbus/TCP server, with believable physics and fault injection.

The register image is laid out by :func:`protocols.sunspec.build_map` (models 1, 701, 702, 704, 713,
802 at 40000, or with ``legacy=True`` the 1xx models most deployed storage inverters still show:
1, 103, 120, 121, 123, 124), so the simulator and the adapter share the codec but not each other's
assumptions: a standard client (pysunspec2) can scan it too.

Legacy control follows what storage inverters do with model 124: ``StorCtl_Mod`` enables a
charge limit (bit 0, ``InWRte``) and a discharge limit (bit 1, ``OutWRte``), both in percent of
``WChaMax`` and signed, so a window such as ``OutWRte=-40, InWRte=40`` forces charging at 40 %.
The battery sits at the point of that window nearest to idle. ``InOutWRte_RvrtTms`` lifts the
window when no control write arrives in time; ``WMaxLimPct_RvrtTms`` does the same for 123's cap.

The Modbus side (the pymodbus 3.16 ``SimDevice`` action hook, write validation, fault
injection, other unit ids) is :class:`simulators.sunspec_device.SunSpecDeviceSimulator`'s.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from typing import Any, Final

from protocols.sunspec import (
    LEGACY_INVERTER_MODELS,
    MODEL_BATTERY,
    MODEL_COMMON,
    MODEL_CONTROLS,
    MODEL_DER_AC_CONTROLS,
    MODEL_DER_CAPACITY,
    MODEL_DER_MEASURE_AC,
    MODEL_DER_STORAGE_CAPACITY,
    MODEL_INVERTER_3PH,
    MODEL_NAMEPLATE,
    MODEL_SETTINGS,
    MODEL_STORAGE,
    PointValue,
)
from simulators.sunspec_device import SunSpecDeviceSimulator, fit_sf

__all__ = ["LEGACY_SIM_MODELS", "SIM_MODELS", "SunSpecBatterySimulator", "serve_battery"]

log = logging.getLogger(__name__)

SIM_MODELS: Final = (
    MODEL_COMMON,
    MODEL_DER_MEASURE_AC,
    MODEL_DER_CAPACITY,
    MODEL_DER_AC_CONTROLS,
    MODEL_DER_STORAGE_CAPACITY,
    MODEL_BATTERY,
)
LEGACY_SIM_MODELS: Final = (
    MODEL_COMMON,
    MODEL_INVERTER_3PH,
    MODEL_NAMEPLATE,
    MODEL_SETTINGS,
    MODEL_CONTROLS,
    MODEL_STORAGE,
)

_AC_VOLTS: Final = 240.0
_DC_VOLTS: Final = 400.0
_HZ: Final = 60.0
_READ_FCS: Final = frozenset({3})
_WRITE_FCS: Final = frozenset({6, 16, 23})
_INT16_MAX: Final = 32767
_UINT16_MAX: Final = 65534  # 0xFFFF is the "not implemented" sentinel

# 704 enums
_ENABLED: Final = 1
_MODE_W_MAX_PCT: Final = 0
# 701 InvSt
_INV_RUNNING: Final = 3
_INV_STANDBY: Final = 7
# 103 St
_ST_MPPT: Final = 4
_ST_STANDBY: Final = 8
# 124 StorCtl_Mod bits
_STOR_CHARGE_BIT: Final = 1 << 0
_STOR_DISCHARGE_BIT: Final = 1 << 1
_DER_TYPE_PV_STOR: Final = 82
# 802 ChaSt (124 uses the same numbers)
_CHA_EMPTY, _CHA_DISCHARGING, _CHA_CHARGING, _CHA_FULL, _CHA_HOLDING = 2, 3, 4, 5, 6


class SunSpecBatterySimulator(SunSpecDeviceSimulator):
    """A battery + inverter speaking SunSpec over Modbus/TCP.

    Sign conventions follow SunSpec on the wire (701 ``W`` and 704 ``WSet`` positive = injecting =
    discharging) and the gateway's load convention on the Python side (:attr:`power_kw` positive =
    charging). SoC integrates power × ``time_scale`` so tests can drain a battery in seconds;
    conversion losses are ignored.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        unit_id: int = 1,
        capacity_kwh: float = 13.5,
        max_charge_kw: float = 5.0,
        max_discharge_kw: float = 5.0,
        initial_soc_pct: float = 50.0,
        min_soc_pct: float = 0.0,
        max_soc_pct: float = 100.0,
        time_scale: float = 1.0,
        step_s: float = 0.2,
        serial: str = "SIM-BAT-0001",
        manufacturer: str = "DERMS Simulators",
        model_name: str = "SunSpec Battery",
        base_address: int = 40000,
        legacy: bool = False,
        legacy_model: int = MODEL_INVERTER_3PH,
    ) -> None:
        if capacity_kwh <= 0 or max_charge_kw <= 0 or max_discharge_kw <= 0:
            raise ValueError("capacity and power ratings must be positive")
        if not 0 <= min_soc_pct < max_soc_pct <= 100 or not 0 <= initial_soc_pct <= 100:
            raise ValueError("need 0 <= min_soc_pct < max_soc_pct <= 100 and 0 <= soc <= 100")
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.legacy = legacy
        if legacy_model not in LEGACY_INVERTER_MODELS:
            raise ValueError(f"legacy_model must be one of {LEGACY_INVERTER_MODELS}")
        self.measurement = legacy_model
        self.models: tuple[int, ...] = (
            tuple(legacy_model if m == MODEL_INVERTER_3PH else m for m in LEGACY_SIM_MODELS)
            if legacy
            else SIM_MODELS
        )
        self.unit_id = unit_id
        self.capacity_kwh = capacity_kwh
        self.max_charge_kw = max_charge_kw
        self.max_discharge_kw = max_discharge_kw
        self.min_soc_pct = min_soc_pct
        self.max_soc_pct = max_soc_pct
        self.time_scale = time_scale
        self._energy_kwh = capacity_kwh * initial_soc_pct / 100
        self._power_w = 0.0  # SunSpec sign: positive = injecting (discharging)
        self._wh_injected = 0.0
        self._wh_absorbed = 0.0
        self._heartbeat = 0
        self._control_written_at: float | None = None
        self._limit_written_at: float | None = None
        initial = self._initial_values(
            serial=serial, manufacturer=manufacturer, model_name=model_name
        )
        super().__init__(
            [(m, initial[m]) for m in self.models],
            host=host,
            port=port,
            unit_id=unit_id,
            base_address=base_address,
            step_s=step_s,
        )
        self._refresh()

    # ----------------------------------------------------------------------- initial map

    def _initial_values(
        self, *, serial: str, manufacturer: str, model_name: str
    ) -> dict[int, dict[str, PointValue | None]]:
        cha_w = self.max_charge_kw * 1000
        dis_w = self.max_discharge_kw * 1000
        wmax = max(cha_w, dis_w)
        wh = self.capacity_kwh * 1000
        w_sf_16 = fit_sf(wmax, _INT16_MAX, 0)
        w_sf_u16 = fit_sf(wmax, _UINT16_MAX, 0)
        a_sf = fit_sf(wmax / _AC_VOLTS, _INT16_MAX, -1)
        wh_sf = fit_sf(wh, _UINT16_MAX, 0)
        dc_a_sf = fit_sf(wmax / _DC_VOLTS, _INT16_MAX, -1)
        ah_sf = fit_sf(wh / _DC_VOLTS, _UINT16_MAX, -1)
        common: dict[str, PointValue | None] = {
            "Mn": manufacturer,
            "Md": model_name,
            "Vr": "1.0.0",
            "SN": serial,
            "DA": self.unit_id,
        }
        if self.legacy:
            return {
                MODEL_COMMON: common,
                self.measurement: {
                    **(
                        {}
                        if self.measurement in (111, 112, 113)  # float32: no scale factors
                        else {
                            "A_SF": a_sf,
                            "V_SF": -1,
                            "W_SF": w_sf_16,
                            "Hz_SF": -2,
                            "VA_SF": w_sf_16,
                            "VAr_SF": w_sf_16,
                            "PF_SF": -1,
                            "WH_SF": 0,
                        }
                    ),
                    "PhVphA": _AC_VOLTS,
                    "Hz": _HZ,
                    "VAr": 0,
                    "PF": 100.0,
                    "Evt1": 0,
                },
                MODEL_NAMEPLATE: {
                    "DERTyp": _DER_TYPE_PV_STOR,
                    "WRtg_SF": w_sf_u16,
                    "WHRtg_SF": wh_sf,
                    "MaxChaRte_SF": w_sf_u16,
                    "MaxDisChaRte_SF": w_sf_u16,
                    "WRtg": wmax,
                    "WHRtg": wh,
                    "MaxChaRte": cha_w,
                    "MaxDisChaRte": dis_w,
                },
                MODEL_SETTINGS: {"WMax_SF": w_sf_u16, "WMax": wmax},
                MODEL_CONTROLS: {
                    "WMaxLimPct_SF": -1,
                    "Conn_WinTms": 0,
                    "Conn_RvrtTms": 0,
                    "Conn": 1,
                    "WMaxLimPct": 100.0,
                    "WMaxLimPct_WinTms": 0,
                    "WMaxLimPct_RvrtTms": 0,
                    "WMaxLimPct_RmpTms": 0,
                    "WMaxLim_Ena": 0,
                },
                MODEL_STORAGE: {
                    "WChaMax_SF": w_sf_u16,
                    "MinRsvPct_SF": 0,
                    "ChaState_SF": -1,
                    "StorAval_SF": wh_sf,
                    "InOutWRte_SF": -1,
                    "WChaMax": wmax,
                    "StorCtl_Mod": 0,
                    "MinRsvPct": round(self.min_soc_pct),
                    "OutWRte": 100.0,
                    "InWRte": 100.0,
                    "InOutWRte_WinTms": 0,
                    "InOutWRte_RvrtTms": 0,
                    "InOutWRte_RmpTms": 0,
                    "ChaGriSet": 1,
                },
            }
        return {
            MODEL_COMMON: common,
            MODEL_DER_MEASURE_AC: {
                "A_SF": a_sf,
                "V_SF": -1,
                "Hz_SF": -2,
                "W_SF": w_sf_16,
                "PF_SF": -3,
                "VA_SF": w_sf_16,
                "Var_SF": w_sf_16,
                "TotWh_SF": 0,
                "TotVarh_SF": 0,
                "Tmp_SF": -1,
                "ACType": 0,
                "St": 1,
                "ConnSt": 1,
                "Alrm": 0,
                "DERMode": 1,
                "LNV": _AC_VOLTS,
                "VL1": _AC_VOLTS,
                "Hz": _HZ,
                "TmpAmb": 25.0,
                "TmpCab": 31.5,
            },
            MODEL_DER_CAPACITY: {
                "W_SF": w_sf_u16,
                "VA_SF": w_sf_u16,
                "V_SF": -1,
                "A_SF": a_sf,
                "PF_SF": -3,
                "WMaxRtg": wmax,
                "VAMaxRtg": wmax,
                "WChaRteMaxRtg": cha_w,
                "WDisChaRteMaxRtg": dis_w,
                "VNomRtg": _AC_VOLTS,
                "VMaxRtg": 264.0,
                "VMinRtg": 211.0,
                "AMaxRtg": round(wmax / _AC_VOLTS, 1),
                "WMax": wmax,
                "VAMax": wmax,
                "WChaRteMax": cha_w,
                "WDisChaRteMax": dis_w,
                "VNom": _AC_VOLTS,
                "VMax": 264.0,
                "VMin": 211.0,
                "AMax": round(wmax / _AC_VOLTS, 1),
            },
            MODEL_DER_AC_CONTROLS: {
                "PF_SF": -3,
                "WMaxLimPct_SF": -1,
                "WSet_SF": 0,
                "WSetPct_SF": -2,
                "VarSet_SF": 0,
                "VarSetPct_SF": -1,
                "WMaxLimPctEna": 0,
                "WMaxLimPct": 100.0,
                "WMaxLimPctRvrt": 100.0,
                "WMaxLimPctEnaRvrt": 0,
                "WMaxLimPctRvrtTms": 0,
                "WMaxLimPctRvrtRem": 0,
                "WSetEna": 0,
                "WSetMod": 1,
                "WSet": 0,
                "WSetRvrt": 0,
                "WSetPct": 0,
                "WSetPctRvrt": 0,
                "WSetEnaRvrt": 0,
                "WSetRvrtTms": 0,
                "WSetRvrtRem": 0,
            },
            MODEL_DER_STORAGE_CAPACITY: {
                "WH_SF": wh_sf,
                "Pct_SF": -1,
                "WHRtg": wh,
                "SoH": 100.0,
                "Sta": 0,
            },
            MODEL_BATTERY: {
                "AHRtg_SF": ah_sf,
                "WHRtg_SF": wh_sf,
                "WChaDisChaMax_SF": w_sf_u16,
                "SoC_SF": -1,
                "DoD_SF": -1,
                "SoH_SF": -1,
                "V_SF": -1,
                "CellV_SF": -3,
                "A_SF": dc_a_sf,
                "AMax_SF": dc_a_sf,
                "W_SF": w_sf_16,
                "AHRtg": round(wh / _DC_VOLTS, 1),
                "WHRtg": wh,
                "WChaRteMax": cha_w,
                "WDisChaRteMax": dis_w,
                "SoCMax": self.max_soc_pct,
                "SoCMin": self.min_soc_pct,
                "SoH": 100.0,
                "NCyc": 1,
                "LocRemCtl": 0,
                "CtrlHb": 0,
                "AlmRst": 0,
                "Typ": 4,
                "State": 3,
                "Evt1": 0,
                "Evt2": 0,
                "EvtVnd1": 0,
                "EvtVnd2": 0,
                "V": _DC_VOLTS,
                "VMax": 450.0,
                "VMin": 350.0,
                "CellVMax": 3.7,
                "CellVMin": 3.6,
                "CellVAvg": 3.65,
                "AChaMax": round(cha_w / _DC_VOLTS, 1),
                "ADisChaMax": round(dis_w / _DC_VOLTS, 1),
                "SetOp": 1,
                "SetInvState": 3,
            },
        }

    # ----------------------------------------------------------------------- image helpers

    # ----------------------------------------------------------------------- observable state

    @property
    def soc_pct(self) -> float:
        return 100 * self._energy_kwh / self.capacity_kwh

    @property
    def power_kw(self) -> float:
        """Actual AC power, load convention (+ charging)."""
        return (-self._power_w / 1000) or 0.0  # no -0.0

    @property
    def wset_enabled(self) -> bool:
        if self.legacy:
            return self.values(MODEL_STORAGE).get("StorCtl_Mod") not in (0, None)
        return self.values(MODEL_DER_AC_CONTROLS).get("WSetEna") == _ENABLED

    @property
    def wset_w(self) -> float | None:
        """``WSet`` in watts, SunSpec sign (+ injecting); legacy: the 124 window's point."""
        if self.legacy:
            if not self.wset_enabled:
                return None
            return self._legacy_window_w(self.values(MODEL_STORAGE))[1]
        value = self.values(MODEL_DER_AC_CONTROLS).get("WSet")
        return None if value is None else float(value)

    # ----------------------------------------------------------------------- physics

    def _legacy_window_w(self, stor: Mapping[str, PointValue | None]) -> tuple[float, float]:
        """The 124 window in watts, SunSpec sign: (most absorbing, most injecting)."""
        base = float(stor.get("WChaMax") or 0)
        mode = stor.get("StorCtl_Mod")
        bits = mode if isinstance(mode, int) else 0
        low = -self.max_charge_kw * 1000
        high = self.max_discharge_kw * 1000
        in_pct, out_pct = stor.get("InWRte"), stor.get("OutWRte")
        if bits & _STOR_CHARGE_BIT and isinstance(in_pct, int | float):
            low = max(low, -float(in_pct) * base / 100)
        if bits & _STOR_DISCHARGE_BIT and isinstance(out_pct, int | float):
            high = min(high, float(out_pct) * base / 100)
        return low, max(low, high)

    def _legacy_target_w(self) -> float:
        ctl = self.values(MODEL_CONTROLS)
        if ctl.get("Conn") == 0:
            return 0.0
        low, high = self._legacy_window_w(self.values(MODEL_STORAGE))
        target = min(max(0.0, low), high)  # the point of the window nearest to idle
        lim_pct = ctl.get("WMaxLimPct")
        if ctl.get("WMaxLim_Ena") == _ENABLED and isinstance(lim_pct, int | float):
            limit = max(self.max_charge_kw, self.max_discharge_kw) * 1000 * float(lim_pct) / 100
            target = max(-limit, min(limit, target))
        return self._soc_limited(target)

    def _soc_limited(self, target: float) -> float:
        soc = self.soc_pct
        if target > 0 and soc <= self.min_soc_pct + 1e-9:
            return 0.0
        if target < 0 and soc >= self.max_soc_pct - 1e-9:
            return 0.0
        return target

    def _target_w(self, ctl: Mapping[str, PointValue | None]) -> float:
        if ctl.get("WSetEna") != _ENABLED:
            return 0.0
        wmax = self.max_discharge_kw * 1000
        if ctl.get("WSetMod") == _MODE_W_MAX_PCT:
            pct = ctl.get("WSetPct")
            rating = max(self.max_charge_kw, self.max_discharge_kw) * 1000
            target = float(pct) * rating / 100 if isinstance(pct, int | float) else 0.0
        else:
            wset = ctl.get("WSet")
            target = float(wset) if isinstance(wset, int | float) else 0.0
        target = min(target, wmax)
        target = max(target, -self.max_charge_kw * 1000)
        lim_pct = ctl.get("WMaxLimPct")
        if ctl.get("WMaxLimPctEna") == _ENABLED and isinstance(lim_pct, int | float):
            limit = max(self.max_charge_kw, self.max_discharge_kw) * 1000 * float(lim_pct) / 100
            target = max(-limit, min(limit, target))
        return self._soc_limited(target)

    def _step(self, now: float, dt: float) -> None:
        """Integrate energy since the last step, apply reversion, then follow the controls."""
        if dt > 0:
            hours = dt * self.time_scale / 3600
            wh = self._power_w * hours
            low = self.capacity_kwh * self.min_soc_pct / 100
            high = self.capacity_kwh * self.max_soc_pct / 100
            before = self._energy_kwh
            after = before - wh / 1000
            # Never cross a SoC limit (but a battery already beyond one is not pulled back).
            if self._power_w > 0:
                after = max(after, min(before, low))
                self._wh_injected += (before - after) * 1000
            elif self._power_w < 0:
                after = min(after, max(before, high))
                self._wh_absorbed += (after - before) * 1000
            self._energy_kwh = after
            self._heartbeat = (self._heartbeat + 1) % _UINT16_MAX
        if self.legacy:
            self._revert_legacy_if_due(now)
            self._power_w = self._legacy_target_w()
        else:
            ctl = self.values(MODEL_DER_AC_CONTROLS)
            self._revert_if_due(ctl, now)
            self._power_w = self._target_w(ctl)
        self._refresh()

    def _revert_legacy_if_due(self, now: float) -> None:
        """Legacy reversion: the 124 window and the 123 cap each lapse after their timeout."""
        stor = self.values(MODEL_STORAGE)
        tms = stor.get("InOutWRte_RvrtTms")
        written = self._control_written_at
        if written is not None and isinstance(tms, int) and tms > 0 and now - written >= tms:
            self._set(MODEL_STORAGE, {"StorCtl_Mod": 0})
            self._control_written_at = None
            log.info("simulated battery %s: storage window lapsed after %s s", self.port, tms)
        ctl = self.values(MODEL_CONTROLS)
        tms = ctl.get("WMaxLimPct_RvrtTms")
        written = self._limit_written_at
        if written is not None and isinstance(tms, int) and tms > 0 and now - written >= tms:
            self._set(MODEL_CONTROLS, {"WMaxLim_Ena": 0})
            self._limit_written_at = None

    def _revert_if_due(self, ctl: dict[str, PointValue | None], now: float) -> None:
        """SunSpec reversion: no control write within ``WSetRvrtTms`` → reversion values."""
        tms = ctl.get("WSetRvrtTms")
        if (
            self._control_written_at is None
            or not isinstance(tms, int)
            or tms <= 0
            or ctl.get("WSetEna") != _ENABLED
        ):
            return
        remaining = tms - (now - self._control_written_at)
        if remaining > 0:
            self._set(MODEL_DER_AC_CONTROLS, {"WSetRvrtRem": math.ceil(remaining)})
            return
        update: dict[str, PointValue | None] = {"WSetRvrtRem": 0, "WSet": ctl.get("WSetRvrt")}
        if ctl.get("WSetEnaRvrt") is not None:
            update["WSetEna"] = ctl.get("WSetEnaRvrt")
        if update["WSet"] is None:
            update["WSet"] = 0
        self._set(MODEL_DER_AC_CONTROLS, update)
        ctl.update(update)
        self._control_written_at = None
        log.info("simulated battery %s reverted: no control write for %s s", self.port, tms)

    def _refresh(self) -> None:
        """Write the measured values (701, 713, 802; legacy 103 and 124) into the image."""
        w = self._power_w
        soc = self.soc_pct
        amps_ac = abs(w) / _AC_VOLTS
        if w > 0:
            status = _CHA_DISCHARGING
        elif w < 0:
            status = _CHA_CHARGING
        elif soc >= self.max_soc_pct - 1e-9:
            status = _CHA_FULL
        elif soc <= self.min_soc_pct + 1e-9:
            status = _CHA_EMPTY
        else:
            status = _CHA_HOLDING
        low_kwh = self.capacity_kwh * self.min_soc_pct / 100
        if self.legacy:
            self._set(
                self.measurement,
                {
                    "W": round(w),
                    "VA": round(abs(w)),
                    "A": round(amps_ac, 1),
                    "AphA": round(amps_ac, 1),
                    "St": _ST_MPPT if w else _ST_STANDBY,
                    "WH": max(1, round(self._wh_injected)),  # acc32: 0 means "not implemented"
                },
            )
            self._set(
                MODEL_STORAGE,
                {
                    "ChaState": round(soc, 1),
                    "ChaSt": status,
                    "StorAval": round(max(0.0, self._energy_kwh - low_kwh) * 1000),
                },
            )
            return
        self._set(
            MODEL_DER_MEASURE_AC,
            {
                "W": round(w),
                "VA": round(abs(w)),
                "Var": 0,
                "PF": 1.0,
                "A": round(amps_ac, 1),
                "WL1": round(w),
                "VAL1": round(abs(w)),
                "VarL1": 0,
                "PFL1": 1.0,
                "AL1": round(amps_ac, 1),
                "InvSt": _INV_RUNNING if w else _INV_STANDBY,
                "TotWhInj": round(self._wh_injected),
                "TotWhAbs": round(self._wh_absorbed),
            },
        )
        self._set(
            MODEL_DER_STORAGE_CAPACITY,
            {
                "SoC": round(soc, 1),
                "WHAvail": round(max(0.0, self._energy_kwh - low_kwh) * 1000),
            },
        )
        self._set(
            MODEL_BATTERY,
            {
                "SoC": round(soc, 1),
                "DoD": round(100 - soc, 1),
                "ChaSt": status,
                "W": round(w),
                "A": round(w / _DC_VOLTS, 1),
                "Hb": self._heartbeat,
            },
        )

    def _written(self, model_id: int, now: float) -> None:
        if model_id in (MODEL_DER_AC_CONTROLS, MODEL_STORAGE):
            self._control_written_at = now
        elif model_id == MODEL_CONTROLS:
            self._limit_written_at = now

    def _check(
        self, model_id: int, values: Mapping[str, PointValue | None], names: set[str]
    ) -> bool:
        model_def = self._defs[model_id]
        for name in names:
            rating = model_def.points.get(name + "Rtg")
            value, limit = values.get(name), None if rating is None else values.get(rating.name)
            if (
                not name.endswith("Min")
                and isinstance(value, int | float)
                and isinstance(limit, int | float)
                and float(value) > float(limit)
            ):
                return False
        if model_id == MODEL_STORAGE:
            for name in ("InWRte", "OutWRte"):
                if name in names and abs(float(values[name] or 0)) > 100:
                    return False
        cap = float(values.get("WMaxLimPct") or 0)
        if model_id == MODEL_CONTROLS and "WMaxLimPct" in names and not 0 <= cap <= 100:
            return False
        if model_id == MODEL_DER_AC_CONTROLS:
            for name in ("WSet", "WSetRvrt"):
                if name in names:
                    watts = float(values[name] or 0)
                    if not -self.max_charge_kw * 1000 <= watts <= self.max_discharge_kw * 1000:
                        return False
            for name in ("WSetPct", "WSetPctRvrt"):
                if name in names and abs(float(values[name] or 0)) > 100:
                    return False
            for name in ("WMaxLimPct", "WMaxLimPctRvrt"):
                if name in names and not 0 <= float(values[name] or 0) <= 100:
                    return False
        return True


async def serve_battery(port: int, **kwargs: Any) -> None:
    """Run one simulated battery on ``port`` until cancelled (``derms-gateway simulate battery``).

    ``kwargs`` are :class:`SunSpecBatterySimulator` keyword arguments.
    """
    sim = SunSpecBatterySimulator(port=port, **kwargs)
    async with sim:
        log.info("SunSpec battery simulator on %s:%s unit %s", sim.host, sim.port, sim.unit_id)
        await asyncio.Event().wait()
