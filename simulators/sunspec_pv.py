"""A PV inverter speaking SunSpec over Modbus/TCP, under an irradiance profile with cloud steps.

Either map: the DER models (1, 701, 702, 704, 715) or the legacy ones most installed inverters
show (1, 103, 120, 121, 122, 123). The inverter makes what the sun allows, capped by the active
power limit (704 ``WMaxLimPct`` / 123 ``WMaxLimPct``, percent of ``WMax``) and nothing while
disconnected (715 ``OpCtl`` STOP / 123 ``Conn`` DISCONNECT). Limits and disconnection carry the
device's own reversion timers: when the controller goes quiet the inverter returns to full
output by itself, as a real one does.

The irradiance profile is a pure function of elapsed seconds (no clock inside), so a test can
state exactly when a cloud passes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from protocols.sunspec import (
    LEGACY_INVERTER_MODELS,
    MODEL_COMMON,
    MODEL_CONTROLS,
    MODEL_DER_AC_CONTROLS,
    MODEL_DER_CAPACITY,
    MODEL_DER_MEASURE_AC,
    MODEL_INVERTER_3PH,
    MODEL_NAMEPLATE,
    MODEL_SETTINGS,
    MODEL_STATUS,
    PointValue,
)
from simulators.sunspec_device import SunSpecDeviceSimulator, fit_sf

__all__ = [
    "DER_PV_MODELS",
    "LEGACY_PV_MODELS",
    "CloudStep",
    "IrradianceProfile",
    "SunSpecPvSimulator",
]

log = logging.getLogger(__name__)

MODEL_DER_CONTROL: Final = 715
DER_PV_MODELS: Final = (
    MODEL_COMMON,
    MODEL_DER_MEASURE_AC,
    MODEL_DER_CAPACITY,
    MODEL_DER_AC_CONTROLS,
    MODEL_DER_CONTROL,
)
_FLOAT_MODELS: Final = frozenset({111, 112, 113})
LEGACY_PV_MODELS: Final = (
    MODEL_COMMON,
    MODEL_INVERTER_3PH,
    MODEL_NAMEPLATE,
    MODEL_SETTINGS,
    MODEL_STATUS,
    MODEL_CONTROLS,
)

_AC_VOLTS: Final = 240.0
_HZ: Final = 60.0
_INT16_MAX: Final = 32767
_UINT16_MAX: Final = 65534
_ENABLED: Final = 1
_OP_STOP: Final = 0
_CONNECT: Final = 1
_DER_TYPE_PV: Final = 4
_ST_MPPT, _ST_THROTTLED, _ST_STANDBY = 4, 5, 8
_INV_RUNNING, _INV_STANDBY = 3, 7
_PV_CONNECTED_AVAILABLE_OPERATING: Final = 0b111


@dataclass(frozen=True, slots=True)
class CloudStep:
    """From ``start_s`` to ``end_s`` (seconds after start) only ``factor`` of the sun is left."""

    start_s: float
    end_s: float
    factor: float

    def __post_init__(self) -> None:
        if not 0 <= self.factor <= 1 or self.end_s <= self.start_s:
            raise ValueError("need 0 <= factor <= 1 and start_s < end_s")


@dataclass(frozen=True, slots=True)
class IrradianceProfile:
    """Available power per unit of rating at ``t`` seconds after start.

    ``clear_sky_pu`` all day, or a half sine over ``day_s`` seconds when given; clouds multiply
    it (overlapping clouds compound).
    """

    clear_sky_pu: float = 1.0
    day_s: float | None = None
    clouds: tuple[CloudStep, ...] = ()

    def at(self, t_s: float) -> float:
        pu = self.clear_sky_pu
        if self.day_s is not None:
            pu *= max(0.0, math.sin(math.pi * t_s / self.day_s)) if 0 <= t_s <= self.day_s else 0.0
        for cloud in self.clouds:
            if cloud.start_s <= t_s < cloud.end_s:
                pu *= cloud.factor
        return max(0.0, min(1.0, pu))


class SunSpecPvSimulator(SunSpecDeviceSimulator):
    """A PV inverter: SunSpec sign on the wire (``W`` + injecting), load convention in Python
    (:attr:`power_kw` negative while generating)."""

    def __init__(
        self,
        *,
        rated_kw: float = 5.0,
        profile: IrradianceProfile | None = None,
        legacy: bool = False,
        legacy_model: int = MODEL_INVERTER_3PH,
        host: str = "127.0.0.1",
        port: int = 0,
        unit_id: int = 1,
        base_address: int = 40000,
        step_s: float = 0.1,
        serial: str = "SIM-PV-0001",
    ) -> None:
        if rated_kw <= 0:
            raise ValueError("rated_kw must be positive")
        self.rated_kw = rated_kw
        self.profile = profile or IrradianceProfile()
        if legacy_model not in LEGACY_INVERTER_MODELS:
            raise ValueError(f"legacy_model must be one of {LEGACY_INVERTER_MODELS}")
        self.legacy = legacy
        self.measurement = legacy_model if legacy else MODEL_DER_MEASURE_AC
        self._float = legacy and legacy_model in _FLOAT_MODELS
        self._power_w = 0.0
        self._available_w = 0.0
        self._wh = 0.0
        self._started_at: float | None = None
        self._limit_written_at: float | None = None
        self._conn_written_at: float | None = None
        super().__init__(
            list(self._initial_values(serial).items()),
            host=host,
            port=port,
            unit_id=unit_id,
            base_address=base_address,
            step_s=step_s,
        )

    def _initial_values(self, serial: str) -> dict[int, Mapping[str, PointValue | None]]:
        wmax = self.rated_kw * 1000
        w_sf = fit_sf(wmax, _INT16_MAX, 0)
        wu_sf = fit_sf(wmax, _UINT16_MAX, 0)
        a_sf = fit_sf(wmax / _AC_VOLTS, _INT16_MAX, -1)
        common: dict[str, PointValue | None] = {
            "Mn": "DERMS Simulators",
            "Md": "SunSpec PV inverter",
            "Vr": "1.0.0",
            "SN": serial,
            "DA": 1,
        }
        if self.legacy:
            scale_factors: dict[str, PointValue | None] = {
                "A_SF": a_sf,
                "V_SF": -1,
                "W_SF": w_sf,
                "Hz_SF": -2,
                "VA_SF": w_sf,
                "VAr_SF": w_sf,
                "PF_SF": -1,
                "WH_SF": 0,
            }
            measured: dict[str, PointValue | None] = {
                "PhVphA": _AC_VOLTS,
                "Hz": _HZ,
                "VAr": 0,
                "PF": 100.0,
                "Evt1": 0,
            }
            return {
                MODEL_COMMON: common,
                self.measurement: measured if self._float else scale_factors | measured,
                MODEL_NAMEPLATE: {"DERTyp": _DER_TYPE_PV, "WRtg_SF": wu_sf, "WRtg": wmax},
                MODEL_SETTINGS: {"WMax_SF": wu_sf, "WMax": wmax},
                MODEL_STATUS: {"WAval_SF": wu_sf, "PVConn": _PV_CONNECTED_AVAILABLE_OPERATING},
                MODEL_CONTROLS: {
                    "WMaxLimPct_SF": -1,
                    "Conn_WinTms": 0,
                    "Conn_RvrtTms": 0,
                    "Conn": _CONNECT,
                    "WMaxLimPct": 100.0,
                    "WMaxLimPct_WinTms": 0,
                    "WMaxLimPct_RvrtTms": 0,
                    "WMaxLimPct_RmpTms": 0,
                    "WMaxLim_Ena": 0,
                },
            }
        return {
            MODEL_COMMON: common,
            MODEL_DER_MEASURE_AC: {
                "A_SF": a_sf,
                "V_SF": -1,
                "Hz_SF": -2,
                "W_SF": w_sf,
                "PF_SF": -3,
                "VA_SF": w_sf,
                "Var_SF": w_sf,
                "TotWh_SF": 0,
                "ACType": 0,
                "St": 1,
                "ConnSt": 1,
                "LNV": _AC_VOLTS,
                "Hz": _HZ,
            },
            MODEL_DER_CAPACITY: {
                "W_SF": wu_sf,
                "VA_SF": wu_sf,
                "WMaxRtg": wmax,
                "VAMaxRtg": wmax,
                "WMax": wmax,
                "VAMax": wmax,
            },
            MODEL_DER_AC_CONTROLS: {
                "WMaxLimPct_SF": -1,
                "WMaxLimPctEna": 0,
                "WMaxLimPct": 100.0,
                "WMaxLimPctRvrt": 100.0,
                "WMaxLimPctEnaRvrt": 0,
                "WMaxLimPctRvrtTms": 0,
                "WMaxLimPctRvrtRem": 0,
            },
            MODEL_DER_CONTROL: {
                "LocRemCtl": 0,
                "DERHb": 1,
                "ControllerHb": 1,
                "AlarmReset": 0,
                "OpCtl": 1,
            },
        }

    # ----------------------------------------------------------------------- observable state

    @property
    def power_kw(self) -> float:
        """AC power, load convention (negative while generating)."""
        return (-self._power_w / 1000) or 0.0

    @property
    def available_kw(self) -> float:
        """What the sun would give now without a limit."""
        return self._available_w / 1000

    @property
    def connected(self) -> bool:
        if self.legacy:
            return self.values(MODEL_CONTROLS).get("Conn") == _CONNECT
        return self.values(MODEL_DER_CONTROL).get("OpCtl") != _OP_STOP

    @property
    def limit_pct(self) -> float | None:
        """The active power limit in force (percent of WMax), None when none is."""
        if self.legacy:
            ctl = self.values(MODEL_CONTROLS)
            on = ctl.get("WMaxLim_Ena") == _ENABLED
        else:
            ctl = self.values(MODEL_DER_AC_CONTROLS)
            on = ctl.get("WMaxLimPctEna") == _ENABLED
        pct = ctl.get("WMaxLimPct")
        return float(pct) if on and isinstance(pct, int | float) else None

    # ----------------------------------------------------------------------- physics

    def _written(self, model_id: int, now: float) -> None:
        if model_id in (MODEL_DER_AC_CONTROLS, MODEL_CONTROLS):
            self._limit_written_at = now
        if model_id in (MODEL_DER_CONTROL, MODEL_CONTROLS):
            self._conn_written_at = now

    def _check(
        self, model_id: int, values: Mapping[str, PointValue | None], names: set[str]
    ) -> bool:
        for name in ("WMaxLimPct", "WMaxLimPctRvrt"):
            value = values.get(name)
            if name in names and not (isinstance(value, int | float) and 0 <= value <= 100):
                return False
        return True

    def _revert(self, now: float) -> None:
        if self.legacy:
            ctl = self.values(MODEL_CONTROLS)
            tms = ctl.get("WMaxLimPct_RvrtTms")
            at = self._limit_written_at
            if at is not None and isinstance(tms, int) and tms > 0 and now - at >= tms:
                self._set(MODEL_CONTROLS, {"WMaxLim_Ena": 0})
                self._limit_written_at = None
                log.info("simulated PV %s: power limit lapsed after %s s", self.port, tms)
            tms = ctl.get("Conn_RvrtTms")
            at = self._conn_written_at
            if at is not None and isinstance(tms, int) and tms > 0 and now - at >= tms:
                self._set(MODEL_CONTROLS, {"Conn": _CONNECT})
                self._conn_written_at = None
            return
        ctl = self.values(MODEL_DER_AC_CONTROLS)
        tms = ctl.get("WMaxLimPctRvrtTms")
        at = self._limit_written_at
        if at is None or not isinstance(tms, int) or tms <= 0:
            return
        if ctl.get("WMaxLimPctEna") != _ENABLED:
            return
        remaining = tms - (now - at)
        if remaining > 0:
            self._set(MODEL_DER_AC_CONTROLS, {"WMaxLimPctRvrtRem": math.ceil(remaining)})
            return
        self._set(
            MODEL_DER_AC_CONTROLS,
            {
                "WMaxLimPctRvrtRem": 0,
                "WMaxLimPctEna": ctl.get("WMaxLimPctEnaRvrt") or 0,
                "WMaxLimPct": ctl.get("WMaxLimPctRvrt") or 100.0,
            },
        )
        self._limit_written_at = None
        log.info("simulated PV %s: power limit lapsed after %s s", self.port, tms)

    def _step(self, now: float, dt: float) -> None:
        if self._started_at is None:
            self._started_at = now
        self._wh += self._power_w * dt / 3600
        self._revert(now)
        wmax = self.rated_kw * 1000
        self._available_w = wmax * self.profile.at(now - self._started_at)
        power = self._available_w if self.connected else 0.0
        pct = self.limit_pct
        if pct is not None:
            power = min(power, wmax * pct / 100)
        self._power_w = round(power)
        self._refresh(throttled=pct is not None and power < self._available_w)

    def _refresh(self, *, throttled: bool) -> None:
        w = self._power_w
        amps = round(w / _AC_VOLTS, 1)
        if self.legacy:
            state = _ST_THROTTLED if throttled else (_ST_MPPT if w else _ST_STANDBY)
            self._set(
                self.measurement,
                {
                    "W": w,
                    "VA": w,
                    "A": amps,
                    "AphA": amps,
                    "St": state,
                    "WH": max(1, round(self._wh)),
                },
            )
            self._set(MODEL_STATUS, {"WAval": round(self._available_w)})
            return
        self._set(
            MODEL_DER_MEASURE_AC,
            {
                "W": w,
                "VA": w,
                "Var": 0,
                "PF": 1.0,
                "A": amps,
                "InvSt": _INV_RUNNING if w else _INV_STANDBY,
                "TotWhInj": round(self._wh),
            },
        )
