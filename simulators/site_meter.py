"""A site's grid-connection meter speaking SunSpec (203, or 701) over Modbus/TCP.

What it measures is the site: its own load profile plus every simulated device behind the meter
(PV inverters, batteries), each read through its ``power_kw`` (load convention, + importing).
So a test that curtails the PV or moves the battery sees the meter move exactly as it would on
site, one physics step later.

Sign on the wire: 203 ``W`` positive = importing from the grid (the common convention of
revenue meters at the connection point; the adapter is told which one a real meter uses), 701
``W`` positive = injecting (the DER convention, so exporting).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from protocols.sunspec import MODEL_COMMON, MODEL_DER_MEASURE_AC, PointValue
from simulators.sunspec_device import SunSpecDeviceSimulator, fit_sf

__all__ = ["METER_MODEL_3PH", "LoadStep", "SiteLoadProfile", "SiteMeterSimulator"]

METER_MODEL_3PH: Final = 203
_INT16_MAX: Final = 32767
_VOLTS: Final = 230.0
_HZ: Final = 50.0


class BehindTheMeter(Protocol):
    """A simulated device whose power the meter sees."""

    @property
    def power_kw(self) -> float: ...


@dataclass(frozen=True, slots=True)
class LoadStep:
    """From ``start_s`` to ``end_s`` (seconds after start) the load is ``kw`` higher."""

    start_s: float
    end_s: float
    kw: float


@dataclass(frozen=True, slots=True)
class SiteLoadProfile:
    """The site's own consumption (kW, ≥ 0) at ``t`` seconds after start: a base plus steps."""

    base_kw: float = 1.0
    steps: tuple[LoadStep, ...] = ()

    def at(self, t_s: float) -> float:
        kw = self.base_kw + sum(s.kw for s in self.steps if s.start_s <= t_s < s.end_s)
        return max(0.0, kw)


class SiteMeterSimulator(SunSpecDeviceSimulator):
    """The connection-point meter: net = load + Σ devices (kW, + importing)."""

    def __init__(
        self,
        *,
        devices: Sequence[BehindTheMeter] = (),
        load: SiteLoadProfile | None = None,
        model: int = METER_MODEL_3PH,
        max_kw: float = 60.0,
        host: str = "127.0.0.1",
        port: int = 0,
        unit_id: int = 1,
        base_address: int = 40000,
        step_s: float = 0.05,
    ) -> None:
        if model not in (METER_MODEL_3PH, MODEL_DER_MEASURE_AC):
            raise ValueError("model must be 203 or 701")
        self.devices = list(devices)
        self.load = load or SiteLoadProfile()
        self.model = model
        self._net_w = 0.0
        self._wh_imp = 0.0
        self._wh_exp = 0.0
        self._started_at: float | None = None
        self._last_step_at = 0.0
        w_sf = fit_sf(max_kw * 1000, _INT16_MAX, 0)
        values: dict[int, Mapping[str, PointValue | None]] = {
            MODEL_COMMON: {"Mn": "DERMS Simulators", "Md": "Site meter", "SN": "SIM-METER-1"},
        }
        if model == METER_MODEL_3PH:
            values[model] = {
                "A_SF": -1,
                "V_SF": -1,
                "Hz_SF": -2,
                "W_SF": w_sf,
                "VA_SF": w_sf,
                "VAR_SF": w_sf,
                "PF_SF": -1,
                "TotWh_SF": 0,
                "PhV": _VOLTS,
                "PhVphA": _VOLTS,
                "PhVphB": _VOLTS,
                "PhVphC": _VOLTS,
                "Hz": _HZ,
            }
        else:
            values[model] = {
                "A_SF": -1,
                "V_SF": -1,
                "Hz_SF": -2,
                "W_SF": w_sf,
                "VA_SF": w_sf,
                "Var_SF": w_sf,
                "PF_SF": -3,
                "TotWh_SF": 0,
                "ACType": 2,
                "LNV": _VOLTS,
                "Hz": _HZ,
            }
        super().__init__(
            list(values.items()),
            host=host,
            port=port,
            unit_id=unit_id,
            base_address=base_address,
            step_s=step_s,
        )

    @property
    def net_kw(self) -> float:
        """The site's net power at the meter, + importing."""
        return self._net_w / 1000

    @property
    def load_kw(self) -> float:
        if self._started_at is None:
            return self.load.at(0.0)
        return self.load.at(self._last_step_at - self._started_at)

    def _step(self, now: float, dt: float) -> None:
        if self._started_at is None:
            self._started_at = now
        self._last_step_at = now
        if self._net_w > 0:
            self._wh_imp += self._net_w * dt / 3600
        else:
            self._wh_exp -= self._net_w * dt / 3600
        kw = self.load.at(now - self._started_at) + sum(d.power_kw for d in self.devices)
        self._net_w = kw * 1000
        w = round(self._net_w)
        amps = round(abs(w) / _VOLTS / 3, 1)
        if self.model == METER_MODEL_3PH:
            third = round(w / 3)
            self._set(
                self.model,
                {
                    "W": w,
                    "WphA": third,
                    "WphB": third,
                    "WphC": w - 2 * third,
                    "A": round(amps * 3, 1),
                    "AphA": amps,
                    "AphB": amps,
                    "AphC": amps,
                    "TotWhImp": max(1, round(self._wh_imp)),
                    "TotWhExp": max(1, round(self._wh_exp)),
                },
            )
        else:
            self._set(self.model, {"W": -w, "A": round(amps * 3, 1)})
