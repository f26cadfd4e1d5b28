"""Per-reading data quality: classify every device reading as it arrives.

Quality follows IEC 61850 (``q``): a *validity* (good / questionable / invalid), *detail* flags
that say why, and a *source* (process or substituted); ``estimated`` marks values the gateway
computed rather than received. ``TelemetryQuality.to_core`` maps it onto the core
``unified.model.Quality`` so the northbound messages can carry it unchanged.

What is checked, and why it is done this way:

* **duplicate** — the device timestamp equals one of the device's last few accepted timestamps
  (clouds and MQTT QoS 1 redeliver). The first copy wins; the duplicate changes nothing.
* **out of order** — older than the newest accepted reading. Kept out of the current value.
* **late** — received more than one report interval after it was measured (after clock
  correction). Still the device's current value if it is the newest: late is a flag, not a fault.
* **stale** — measured more than ``stale_intervals`` report intervals before it arrived, and the
  device status *stale* when its newest value is that old at the time of a snapshot.
* **stuck** — a frozen payload fingerprint for ``stuck_fingerprint_readings`` readings whose
  timestamps advance; a value that stayed frozen across ``stuck_hint_readings`` readings on which
  the device's own state announced a change (relay toggled, session started, setpoint moved);
  or the same non-zero value for longer than is plausible for its class. Exact zeros are exempt
  from the run-length rule because an idle battery or an off compressor really reports 0.0.
  A zero is stuck when peers make it implausible (thermostatic loads), or when the device's own
  state says it must be drawing power: a water heater whose tank is below its setpoint band, an
  EV charger with an EV plugged in, charging allowed and energy still needed (the ``demand``
  of a reading, see ``QualityClassifier.demand_of``), a battery held at a non-zero setpoint its
  state of charge allows; for ``zero_demand_readings`` readings in a row. A device going stuck
  is logged once, and once more when its readings come back.
* **out of range** — outside the device's rating bounds (with a small tolerance), or not finite.
* **outlier** — outside *both* the device's own envelope (range of its last accepted values) and
  its peers' envelope (same DER class and peer group), each widened by half its width, *and* a
  jump from the device's previous reading. Not a median/MAD z-score, deliberately: on/off loads
  (an AC is ~0 or ~4 kW, an EV 0 or 7 kW) are two-point mixtures whose MAD is zero whenever
  most devices are off, so a MAD test flags every compressor start, and rejected values then
  never enter the history that would have vindicated them; in our benchmark that feedback loop
  removed a third of the fleet's load. The peers' envelope includes a slowly decaying
  class-wide "on level" (see ``refresh_peers``), so a water heater that switches on while all
  its feeder peers are off is still normal. A level the device then *holds* is accepted: a
  corrupted value is a spike, a real change persists. Because excluding true high values biases
  an aggregate downwards, the test is conservative; gross errors are caught by the bounds.
* **clock skew** — latency is never negative, so the lower envelope of ``received - device
  time`` over the last readings estimates the clock offset (the NTP clock-filter idea). Once
  enough readings are seen (immediately if the device clock runs ahead) and the offset exceeds
  ``skew_threshold_s``, timestamps are corrected by it and flagged; validity stays good.

All state is a fixed number of numpy arrays per device (rings of ``history`` values), so memory is
bounded per device and a batch of readings costs O(batch). Readings of one batch are processed in
*waves* — the first reading of every device in the batch, then the second, ... — which keeps the
exact per-device arrival-order semantics while vectorising across devices. Peer statistics are
refreshed at most every ``peer_refresh_s`` seconds (O(N log N) per refresh, amortised O(1) per
reading when devices report about once per refresh period).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, IntFlag, StrEnum

import numpy as np
import numpy.typing as npt

from gateway.telemetry.commands import CommandBoard
from gateway.telemetry.fleet import CLASSES, FleetIndex, FloatArray, IntArray
from unified.model import DerClass, DeviceState, Quality

BoolArray = npt.NDArray[np.bool_]

_log = logging.getLogger(__name__)


class Validity(IntEnum):
    """IEC 61850 validity, ordered by severity."""

    GOOD = 0
    QUESTIONABLE = 1
    INVALID = 2


class Detail(IntFlag):
    """Why a reading is not simply good (several can hold at once)."""

    NONE = 0
    DUPLICATE = 1
    OUT_OF_ORDER = 2
    LATE = 4
    STALE = 8
    STUCK = 16
    OUT_OF_RANGE = 32
    OUTLIER = 64
    CLOCK_SKEW = 128
    MISSING = 256
    UNIT_ERROR = 512


class Source(StrEnum):
    PROCESS = "process"
    SUBSTITUTED = "substituted"


_OLD_DATA = Detail.DUPLICATE | Detail.OUT_OF_ORDER | Detail.STALE
_BAD_VALUE = Detail.STUCK | Detail.OUT_OF_RANGE | Detail.OUTLIER | Detail.UNIT_ERROR


@dataclass(frozen=True, slots=True)
class TelemetryQuality:
    """Quality of one value, IEC 61850 style."""

    validity: Validity
    detail: Detail = Detail.NONE
    source: Source = Source.PROCESS
    estimated: bool = False

    def to_core(self) -> Quality:
        """The core model's single quality value.

        Invalid wins; then anything the gateway made up (estimated, substituted); then
        questionable values are *stale* when only their age is the problem and *suspect* when
        the value itself is doubted.
        """
        if self.validity is Validity.INVALID:
            return Quality.INVALID
        if self.estimated:
            return Quality.ESTIMATED
        if self.source is Source.SUBSTITUTED:
            return Quality.SUBSTITUTED
        if self.validity is Validity.QUESTIONABLE:
            if self.detail & _OLD_DATA and not self.detail & _BAD_VALUE:
                return Quality.STALE
            return Quality.SUSPECT
        return Quality.GOOD

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(f.name.lower() for f in Detail if f and f in self.detail and f.name)


@dataclass(frozen=True, slots=True)
class QualityConfig:
    """Thresholds of the classifier; times in seconds, powers in kW."""

    stale_intervals: float = 3.0
    late_intervals: float = 1.0
    fresh_intervals: float = 1.5
    history: int = 16
    min_history: int = 8
    min_peers: int = 10
    outlier_margin: float = 0.5
    persist_tolerance: float = 0.2
    envelope_decay: float = 0.999
    peer_refresh_s: float = 60.0
    range_tolerance: float = 0.02
    skew_threshold_s: float = 30.0
    skew_min_samples: int = 4
    future_tolerance_s: float = 2.0
    stuck_fingerprint_readings: int = 3
    stuck_hint_readings: int = 2
    zero_kw: float = 1e-3
    #: Unit errors: readings of consistent evidence before a device's scale is corrected, and
    #: how many times its rating a value must be to count as W reported as kW.
    unit_confirm: int = 3
    unit_gross: float = 50.0
    #: Stuck at zero, against peers. *Novel zero*: a device that (like its peers) practically
    #: never reads an exact zero reads one ``zero_novel_readings`` times in a row. *Long zero*:
    #: a zero run so long that a device running like its peers (share ``p`` of them on now,
    #: one on/off cycle per ``zero_cycle_s``) would have switched on with probability
    #: ``1 - zero_alpha``: ``(1 - p) ** (run / cycle) < zero_alpha``.
    zero_novel_readings: int = 3
    zero_novel_share: float = 0.02
    zero_alpha: float = 1e-3
    zero_min_on_share: float = 0.3
    zero_cycle_s: dict[str, float] = field(
        default_factory=lambda: {"thermostat": 1200.0, "water_heater": 3600.0}
    )
    duty_halflife_readings: float = 360.0
    #: Stuck at zero against the device's own state: readings of 0 kW in a row while it must
    #: draw power. A water heater must when its tank (``soc_pct``, the tank's stored heat) is
    #: below ``tank_band_soc_pct``; a battery held at a setpoint must follow it unless its
    #: state of charge is below ``battery_reserve_soc_pct`` (discharging) or above
    #: ``battery_full_soc_pct`` (charging).
    zero_demand_readings: int = 3
    tank_band_soc_pct: float = 60.0
    battery_reserve_soc_pct: float = 20.0
    battery_full_soc_pct: float = 95.0
    #: Commands in force: how long a device may take to follow, and how far from the expected
    #: power a reading may be (absolute kW or relative, the larger).
    command_settle_s: float = 120.0
    command_tolerance_kw: float = 0.2
    command_tolerance: float = 0.1
    #: Longest plausible run of one exact non-zero value, by DER class value.
    max_run_s: dict[str, float] = field(
        default_factory=lambda: {
            "battery": 4 * 3600.0,
            "thermostat": 2 * 3600.0,
            "evse": 4 * 3600.0,
            "water_heater": 2 * 3600.0,
            "pv": 1800.0,
            "ci_site": 1800.0,
        }
    )


@dataclass(frozen=True, slots=True)
class RawReading:
    """One power reading as it arrived from an adapter, before any judgement."""

    device_id: str
    device_time: datetime
    received_at: datetime
    value_kw: float
    fingerprint: int | str | bytes | None = None
    should_change: bool | None = None
    #: The device's own state says it must be drawing power now (see
    #: ``QualityClassifier.demand_of``); ``None``: nothing says.
    demand: bool | None = None
    #: State of charge reported with the reading (batteries), percent.
    soc_pct: float | None = None


@dataclass(frozen=True, slots=True)
class ReadingQuality:
    """The verdict on one reading, with its clock-corrected timestamp."""

    quality: TelemetryQuality
    corrected_time: datetime
    accepted: bool


@dataclass(frozen=True, slots=True)
class BatchQuality:
    """Verdicts on a batch of readings, aligned with the input arrays."""

    validity: npt.NDArray[np.int8]
    detail: npt.NDArray[np.int32]
    corrected_ts: FloatArray
    accepted: BoolArray
    value_kw: FloatArray
    """The values, with unit errors corrected where the classifier is sure of them."""

    def quality(self, i: int) -> TelemetryQuality:
        validity, detail = Validity(int(self.validity[i])), Detail(int(self.detail[i]))
        # A value the gateway corrected (a unit error it is sure of) is a substituted one.
        corrected = validity is Validity.GOOD and Detail.UNIT_ERROR in detail
        return TelemetryQuality(
            validity, detail, Source.SUBSTITUTED if corrected else Source.PROCESS
        )


class DeviceStatus(IntEnum):
    """Status of a device at a snapshot instant, as the estimator sees it."""

    REPORTING = 0
    EXCLUDED = 1
    MISSING = 2


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """Every device's usable value at one instant.

    ``value`` is the newest value that passed the value checks (NaN if none yet) and ``age_s``
    its age at ``now``. ``status`` says whether that value is current (*reporting*), whether a
    current reading exists but was screened out (*excluded*), or whether the device has nothing
    current (*missing*, which includes *stale*).
    """

    now: float
    value: FloatArray
    age_s: FloatArray
    status: npt.NDArray[np.int8]
    stale: BoolArray


def fingerprint_of(payload: int | str | bytes) -> int:
    """A stable signed 64-bit fingerprint of a payload (Python's ``hash`` is salted per run)."""
    if isinstance(payload, int):
        value = payload & 0x7FFF_FFFF_FFFF_FFFF
    else:
        data = payload.encode() if isinstance(payload, str) else payload
        value = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big", signed=True)
    return value or 1  # 0 is reserved for "no fingerprint"


def _tri(flag: bool | None) -> int:
    return -1 if flag is None else int(flag)


def _soc(soc_pct: float | None) -> float:
    return np.nan if soc_pct is None else float(soc_pct)


def _epoch(when: datetime) -> float:
    if when.tzinfo is None:
        raise ValueError("naive datetime: telemetry times must be timezone-aware")
    return when.timestamp()


def grouped_quantile(keys: IntArray, values: FloatArray, n_keys: int, q: float) -> FloatArray:
    """Quantile ``q`` (linear interpolation) of ``values`` per key; NaN for empty keys."""
    out = np.full(n_keys, np.nan)
    if len(values) == 0:
        return out
    order = np.lexsort((values, keys))
    k, v = keys[order], values[order]
    counts = np.bincount(k, minlength=n_keys)
    starts = np.cumsum(counts) - counts
    pos = starts + q * np.maximum(counts - 1, 0)
    lo = np.clip(np.floor(pos).astype(np.intp), 0, len(v) - 1)
    hi = np.clip(np.minimum(lo + 1, starts + counts - 1), 0, len(v) - 1)
    res = v[lo] + (v[hi] - v[lo]) * (pos - np.floor(pos))
    has = counts > 0
    out[has] = res[has]
    return out


#: Per-device state: attribute → (initial value, dtype, one ring of ``history`` per device).
#: Enrolling devices appends rows with these values; nothing else is rebuilt.
_DEVICE_STATE: dict[str, tuple[float, type[np.generic], bool]] = {
    # Newest accepted (in-order, non-duplicate) reading.
    "_last_dev": (-np.inf, np.float64, False),
    "_last_corr": (-np.inf, np.float64, False),
    "_last_value": (np.nan, np.float64, False),
    "_last_ok": (False, np.bool_, False),
    "_last_detail": (0, np.int32, False),
    "_last_fp": (0, np.int64, False),
    "_last_has_fp": (False, np.bool_, False),
    "_run_n": (0, np.int64, False),
    "_run_start": (0.0, np.float64, False),
    "_fp_run": (0, np.int64, False),
    "_hint_run": (0, np.int64, False),
    # Newest value that passed the value checks, and the one before the current run began.
    "_good_value": (np.nan, np.float64, False),
    "_good_ts": (-np.inf, np.float64, False),
    "_pre_run_value": (np.nan, np.float64, False),
    "_pre_run_ts": (-np.inf, np.float64, False),
    "_pre_run_zero": (np.nan, np.float64, False),
    "_pre_run_duty": (np.nan, np.float64, False),
    "_zero_stuck": (False, np.bool_, False),
    # Zero readings in a row while the device's own state says it must draw power; the
    # newest state of charge; whether the device's newest in-order reading was stuck.
    "_demand_run": (0, np.int64, False),
    "_soc": (np.nan, np.float64, False),
    "_stuck": (False, np.bool_, False),
    # Rings: recent device timestamps (duplicates), clock offsets, accepted values.
    "_dup_ring": (np.nan, np.float64, True),
    "_dup_pos": (0, np.int64, False),
    "_off_ring": (np.inf, np.float64, True),
    "_off_n": (0, np.int64, False),
    "_hist": (np.nan, np.float64, True),
    "_hist_n": (0, np.int64, False),
    "_offset": (0.0, np.float64, False),
    # Unit errors: the scale in force, and the evidence for another one.
    "_scale": (1.0, np.float64, False),
    "_unit_cand": (0, np.int8, False),
    "_unit_n": (0, np.int64, False),
    # Long-run shares of good readings that are on (|v| > zero) and exactly zero.
    "_duty": (np.nan, np.float64, False),
    "_zero_share": (np.nan, np.float64, False),
}

# Unit-error candidates: what one reading says about the unit its device reports in.
_U_NONE, _U_PLAIN, _U_MILLI, _U_KILO, _U_SIGN = 0, 1, 2, 3, 4
#: The factor that turns a reading of each candidate into kW (load convention).
_U_FACTOR = np.array([1.0, 1.0, 1e-3, 1e3, -1.0])


class QualityClassifier:
    """Classifies readings of the devices of a ``FleetIndex`` as they arrive."""

    _last_dev: FloatArray
    _last_corr: FloatArray
    _last_value: FloatArray
    _last_ok: BoolArray
    _last_detail: npt.NDArray[np.int32]
    _last_fp: npt.NDArray[np.int64]
    _last_has_fp: BoolArray
    _run_n: npt.NDArray[np.int64]
    _run_start: FloatArray
    _fp_run: npt.NDArray[np.int64]
    _hint_run: npt.NDArray[np.int64]
    _good_value: FloatArray
    _good_ts: FloatArray
    _pre_run_value: FloatArray
    _pre_run_ts: FloatArray
    _pre_run_zero: FloatArray
    _pre_run_duty: FloatArray
    _zero_stuck: BoolArray
    _demand_run: npt.NDArray[np.int64]
    _soc: FloatArray
    _stuck: BoolArray
    _dup_ring: FloatArray
    _dup_pos: npt.NDArray[np.int64]
    _off_ring: FloatArray
    _off_n: npt.NDArray[np.int64]
    _hist: FloatArray
    _hist_n: npt.NDArray[np.int64]
    _offset: FloatArray
    _scale: FloatArray
    _unit_cand: npt.NDArray[np.int8]
    _unit_n: npt.NDArray[np.int64]
    _duty: FloatArray
    _zero_share: FloatArray

    def __init__(
        self,
        index: FleetIndex,
        config: QualityConfig | None = None,
        *,
        commands: CommandBoard | None = None,
    ) -> None:
        """``commands``: the board the core keeps of the commands in force (shared with the
        group estimator); without one, no device is ever under command."""
        self.index = index
        self.config = cfg = config or QualityConfig()
        self.commands = commands if commands is not None else CommandBoard(index)
        n, w = len(index), cfg.history
        for name, (fill, dtype, ring) in _DEVICE_STATE.items():
            setattr(self, name, np.full((n, w) if ring else n, fill, dtype=dtype))
        self._n_strata = 0
        self._peer_lo = self._peer_hi = self._peer_on = self._peer_zero = np.zeros(0)
        self._class_lo = np.full(index.n_classes, np.nan)
        self._class_hi = np.full(index.n_classes, np.nan)
        self._peer_at = -np.inf
        self._derive(index)
        self._queue: list[tuple[int, float, float, float, int, int, int, float]] = []

    def _derive(self, index: FleetIndex) -> None:
        """What follows from the index alone: bounds, thresholds, strata."""
        cfg = self.config
        self._interval = index.interval_s
        span = index.max_kw - index.min_kw
        tol = cfg.range_tolerance * span + 0.05
        self._lo = index.min_kw - tol
        self._hi = index.max_kw + tol
        self._floor = np.maximum(0.05 * span, 0.05)
        self._mag = np.maximum(np.abs(index.min_kw), np.abs(index.max_kw))
        # A load that cannot export (an AC, a water heater): a negative reading is a sign error.
        self._load_only = index.min_kw > -0.5
        runs = [cfg.max_run_s.get(c.value, 3600.0) for c in CLASSES]
        self._max_run = np.array(runs)[index.class_code]
        cycles = [cfg.zero_cycle_s.get(c.value, np.inf) for c in CLASSES]
        self._is_battery = index.class_code == CLASSES.index(DerClass.BATTERY)
        self._zero_cycle = np.array(cycles)[index.class_code]
        # Peer statistics per (peer group, class) stratum; codes of old groups never change.
        self._stratum = index.peer_code * index.n_classes + index.class_code
        n_strata = (len(index.peer_groups) or 1) * index.n_classes
        grow = n_strata - self._n_strata
        self._peer_lo = np.r_[self._peer_lo, np.full(grow, np.nan)]
        self._peer_hi = np.r_[self._peer_hi, np.full(grow, np.nan)]
        self._peer_on = np.r_[self._peer_on, np.full(grow, np.nan)]
        self._peer_zero = np.r_[self._peer_zero, np.full(grow, np.nan)]
        self._n_strata = n_strata

    def extend(self, index: FleetIndex) -> None:
        """Enrol the devices ``index`` appends to the current one; every device's state is kept.

        ``index`` must be the current index with rows appended (``FleetIndex.extended``).
        """
        old = len(self.index)
        if index.ids[:old] != self.index.ids:
            raise ValueError("the new index must extend the current one")
        grow, w = len(index) - old, self.config.history
        for name, (fill, dtype, ring) in _DEVICE_STATE.items():
            pad = np.full((grow, w) if ring else grow, fill, dtype=dtype)
            setattr(self, name, np.concatenate([getattr(self, name), pad]))
        self.index = index
        if len(self.commands.index) < len(index):
            self.commands.extend(index)
        self._derive(index)

    # ------------------------------------------------------------------ per reading
    def observe(self, reading: RawReading) -> ReadingQuality:
        """Classify one reading (convenient; feed batches to ``observe_batch`` when you can)."""
        fp = None if reading.fingerprint is None else fingerprint_of(reading.fingerprint)
        result = self.observe_batch(
            np.array([self.index.row[reading.device_id]], dtype=np.intp),
            np.array([_epoch(reading.device_time)]),
            np.array([_epoch(reading.received_at)]),
            np.array([reading.value_kw], dtype=np.float64),
            fingerprint=None if fp is None else np.array([fp], dtype=np.int64),
            should_change=(
                None
                if reading.should_change is None
                else np.array([1 if reading.should_change else 0], dtype=np.int8)
            ),
            demand=np.array([_tri(reading.demand)], dtype=np.int8),
            soc_pct=np.array([_soc(reading.soc_pct)], dtype=np.float64),
        )
        return ReadingQuality(
            quality=result.quality(0),
            corrected_time=datetime.fromtimestamp(float(result.corrected_ts[0]), UTC),
            accepted=bool(result.accepted[0]),
        )

    def observe_state(
        self,
        state: DeviceState,
        received_at: datetime,
        *,
        fingerprint: int | str | bytes | None = None,
        should_change: bool | None = None,
    ) -> ReadingQuality:
        """Classify the power of a ``DeviceState`` an adapter just produced."""
        return self.observe(
            RawReading(
                device_id=state.device_id,
                device_time=state.timestamp,
                received_at=received_at,
                value_kw=state.power_kw,
                fingerprint=fingerprint,
                should_change=should_change,
                demand=self.demand_of(state),
                soc_pct=state.soc_pct,
            )
        )

    def demand_of(self, state: DeviceState) -> bool | None:
        """Whether a device's own state says it must be drawing power (``None``: it does not say).

        A water heater whose tank (its ``soc_pct``) is below ``tank_band_soc_pct`` must heat
        unless told not to (a setpoint of 0 in force); an EV charger must charge when an EV is
        plugged in that still needs energy and the charging limit in force is positive, and
        need not when none is plugged in or the EV wants nothing. A battery's duty follows from
        the setpoint it is held at and its state of charge, which the classifier judges itself.
        """
        row = self.index.row.get(state.device_id)
        if row is None:
            return None
        der_class = CLASSES[int(self.index.class_code[row])]
        off = state.setpoint_kw is not None and abs(state.setpoint_kw) <= self.config.zero_kw
        if der_class is DerClass.WATER_HEATER and state.soc_pct is not None:
            return state.soc_pct < self.config.tank_band_soc_pct and not off
        if der_class is DerClass.EVSE:
            if state.ev is None or state.ev.energy_needed_kwh == 0:
                return False
            if state.ev.energy_needed_kwh is None or state.setpoint_kw is None:
                return None
            return state.setpoint_kw > self.config.zero_kw
        return None

    # ------------------------------------------------------------------ queued readings
    def enqueue(self, reading: RawReading) -> None:
        """Queue a reading for the next :meth:`flush` (cheap: no numpy per reading).

        One vectorised batch per flush costs about what a single reading costs through
        :meth:`observe`, so a gateway ingesting hundreds of readings a second queues them as
        they arrive and flushes once per telemetry cycle (and whenever ``queued`` grows past
        a bound). Arrival order and each reading's own ``received_at`` are kept, so the
        verdicts are the ones :meth:`observe` would have given one by one.
        """
        row = self.index.row.get(reading.device_id)
        if row is None:
            raise KeyError(f"unknown device {reading.device_id!r}")
        self._queue.append(
            (
                row,
                _epoch(reading.device_time),
                _epoch(reading.received_at),
                float(reading.value_kw),
                0 if reading.fingerprint is None else fingerprint_of(reading.fingerprint),
                -1 if reading.should_change is None else int(reading.should_change),
                _tri(reading.demand),
                _soc(reading.soc_pct),
            )
        )

    @property
    def queued(self) -> int:
        return len(self._queue)

    def flush(self) -> dict[str, TelemetryQuality]:
        """Classify every queued reading in one batch; the newest verdict per device."""
        queue, self._queue = self._queue, []
        if not queue:
            return {}
        rows, dev, recv, value, fp, hint, demand, soc = zip(*queue, strict=True)
        row_arr = np.array(rows, dtype=np.intp)
        result = self.observe_batch(
            row_arr,
            np.array(dev, dtype=np.float64),
            np.array(recv, dtype=np.float64),
            np.array(value, dtype=np.float64),
            fingerprint=np.array(fp, dtype=np.int64),
            should_change=np.array(hint, dtype=np.int8),
            demand=np.array(demand, dtype=np.int8),
            soc_pct=np.array(soc, dtype=np.float64),
        )
        ids = self.index.ids
        return {ids[int(row_arr[i])]: result.quality(i) for i in range(len(queue))}

    # ------------------------------------------------------------------ batches
    def observe_batch(
        self,
        rows: IntArray,
        device_ts: FloatArray,
        received_ts: FloatArray,
        value_kw: FloatArray,
        *,
        fingerprint: npt.NDArray[np.int64] | None = None,
        should_change: npt.NDArray[np.int8] | None = None,
        demand: npt.NDArray[np.int8] | None = None,
        soc_pct: FloatArray | None = None,
    ) -> BatchQuality:
        """Classify readings given in arrival order (times in epoch seconds).

        ``fingerprint`` may be omitted (0 means "this reading has none"); ``should_change`` is
        1 (the device's state says its power should have changed since its previous reading),
        0 (it should not) or -1 (unknown); ``demand`` likewise 1 when the device's own state
        says it must be drawing power (``demand_of``), 0 when not, -1 unknown; ``soc_pct`` the
        state of charge reported with each reading (NaN: none).
        """
        m = len(rows)
        fp = np.zeros(m, dtype=np.int64) if fingerprint is None else fingerprint
        has_fp = fp != 0
        hint = np.full(m, -1, dtype=np.int8) if should_change is None else should_change
        dem = np.full(m, -1, dtype=np.int8) if demand is None else demand
        soc = np.full(m, np.nan) if soc_pct is None else soc_pct
        if m and received_ts.max() - self._peer_at >= self.config.peer_refresh_s:
            self.refresh_peers(float(received_ts.max()))
        out_validity = np.zeros(m, dtype=np.int8)
        out_detail = np.zeros(m, dtype=np.int32)
        out_corr = np.array(device_ts, dtype=np.float64, copy=True)
        out_acc = np.zeros(m, dtype=bool)
        out_value = np.array(value_kw, dtype=np.float64, copy=True)
        if m == 0:
            return BatchQuality(out_validity, out_detail, out_corr, out_acc, out_value)
        # Rank of each reading among the batch's readings of the same device (arrival order).
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
        run_id = np.cumsum(np.r_[False, sorted_rows[1:] != sorted_rows[:-1]])
        rank = np.empty(m, dtype=np.intp)
        rank[order] = np.arange(m) - starts[run_id]
        for wave in range(int(rank.max()) + 1):
            sel = np.flatnonzero(rank == wave)
            v, d, c, a, x = self._wave(
                rows[sel], device_ts[sel], received_ts[sel], value_kw[sel], fp[sel], has_fp[sel],
                hint[sel], dem[sel], soc[sel],
            )  # fmt: skip
            out_validity[sel], out_detail[sel], out_corr[sel], out_acc[sel] = v, d, c, a
            out_value[sel] = x
        return BatchQuality(out_validity, out_detail, out_corr, out_acc, out_value)

    def _wave(
        self,
        d: IntArray,
        dev: FloatArray,
        recv: FloatArray,
        value: FloatArray,
        fp: npt.NDArray[np.int64],
        has_fp: BoolArray,
        hint: npt.NDArray[np.int8],
        demand: npt.NDArray[np.int8],
        soc_pct: FloatArray,
    ) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int32], FloatArray, BoolArray, FloatArray]:
        """Readings of distinct devices: classify, then update their state."""
        cfg, w = self.config, self.config.history
        interval = self._interval[d]
        detail = np.zeros(len(d), dtype=np.int32)

        dup = (self._dup_ring[d] == dev[:, None]).any(axis=1)
        fresh = ~dup
        # Clock offset: lower envelope of (received - device time) over recent readings.
        nd = d[fresh]
        self._off_ring[nd, self._off_n[nd] % w] = (recv - dev)[fresh]
        self._off_n[nd] += 1
        off_min = self._off_ring[d].min(axis=1)
        known = (np.minimum(self._off_n[d], w) >= cfg.skew_min_samples) | (
            off_min < -cfg.future_tolerance_s
        )
        skewed = known & (np.abs(off_min) > cfg.skew_threshold_s)
        self._offset[d] = np.where(skewed, off_min, 0.0)
        corr = dev + self._offset[d]

        out_of_order = fresh & (dev < self._last_dev[d])
        in_order = fresh & ~out_of_order
        delay = recv - corr
        late = delay > cfg.late_intervals * interval
        stale = delay > cfg.stale_intervals * interval

        # Commands in force: what the device should read, once it has had time to follow.
        board = self.commands
        expected = board.expected_kw[d]
        settled = corr > board.changed_at[d] + cfg.command_settle_s
        tol = np.maximum(cfg.command_tolerance_kw, cfg.command_tolerance * np.abs(expected))

        # Unit errors: correct a device's readings once its unit is certain, doubt them before.
        raw = value
        cand, kept, unit_n, scale = self._units(d, raw, expected, settled & board.held[d], tol)
        scaled = raw * scale
        use_scale = (scale != 1.0) & (scaled >= self._lo[d]) & (scaled <= self._hi[d])
        value = np.where(use_scale, scaled, raw)
        corrected = use_scale & (np.abs(raw) > cfg.zero_kw)
        doubted = ~use_scale & (cand >= _U_MILLI)
        with np.errstate(invalid="ignore"):
            off_command = settled & (np.abs(value - expected) > tol)
        out_of_range = ~np.isfinite(value) | (value < self._lo[d]) | (value > self._hi[d])

        same_value = value == self._last_value[d]
        run_n = np.where(same_value, self._run_n[d] + 1, 1)
        run_start = np.where(same_value, self._run_start[d], corr)
        same_fp = has_fp & self._last_has_fp[d] & (fp == self._last_fp[d])
        fp_run = np.where(same_fp, self._fp_run[d] + 1, 1)
        # State changes the device announced while its value stayed frozen.
        hint_run = np.where(same_value, self._hint_run[d] + (hint == 1), 0)
        nonzero = np.abs(value) > cfg.zero_kw
        long_run = nonzero & (corr - run_start > self._max_run[d])
        # A frozen non-zero value away from the power the device was told to hold, or frozen
        # since before its command moved (zero is exempt: an empty battery truly reads 0).
        frozen_vs_command = (
            nonzero
            & off_command
            & same_value
            & ((run_n > cfg.stuck_hint_readings) | (run_start < board.changed_at[d]))
        )
        # A zero while the device's own state says it must draw power: a water heater whose
        # tank is cold, an EV plugged in that needs energy and may charge (``demand``), a
        # battery held at a non-zero setpoint its state of charge allows. A command expecting
        # about zero excuses it (a shed water heater, a paused charger).
        soc = np.where(np.isfinite(soc_pct), soc_pct, self._soc[d])
        with np.errstate(invalid="ignore"):
            soc_allows = np.where(
                expected < 0, soc > cfg.battery_reserve_soc_pct, soc < cfg.battery_full_soc_pct
            )
            battery_due = (
                self._is_battery[d]
                & settled
                & board.held[d]
                & (np.abs(expected) > 2 * tol)
                & soc_allows
            )
            excused = np.abs(expected) <= tol
        must_draw = ((demand == 1) | battery_due) & ~excused
        demand_run = np.where(in_order & ~nonzero & must_draw, self._demand_run[d] + 1, 0)
        demand_run = np.where(in_order, demand_run, self._demand_run[d])
        zero_vs_state = ~nonzero & (demand_run >= cfg.zero_demand_readings)
        zero_vs_peers = self._stuck_at_zero(d, value, corr - run_start, run_n)
        reasons = (
            (fp_run >= cfg.stuck_fingerprint_readings, "a frozen payload"),
            (hint_run >= cfg.stuck_hint_readings, "frozen while its state changed"),
            (long_run, "one value for longer than plausible"),
            (frozen_vs_command, "frozen away from its setpoint"),
            (zero_vs_peers, "zero where its peers and past make zero implausible"),
            (zero_vs_state, "zero while its own state says it must draw power"),
            # A zero run once found stuck stays so until the value moves (peers' share of
            # running devices wanders around the threshold; the sensor does not recover).
            (~nonzero & same_value & self._zero_stuck[d], "still zero"),
        )
        stuck = in_order & np.logical_or.reduce([r for r, _ in reasons])
        outlier = in_order & ~out_of_range & ~stuck & self._outlier(d, value)
        # Following a command is no outlier, however unusual the level.
        outlier &= ~(np.isfinite(expected) & ~off_command)

        detail |= np.where(dup, int(Detail.DUPLICATE), 0)
        detail |= np.where(out_of_order, int(Detail.OUT_OF_ORDER), 0)
        detail |= np.where(fresh & late, int(Detail.LATE), 0)
        detail |= np.where(fresh & stale, int(Detail.STALE), 0)
        detail |= np.where(stuck, int(Detail.STUCK), 0)
        detail |= np.where(out_of_range, int(Detail.OUT_OF_RANGE), 0)
        detail |= np.where(outlier, int(Detail.OUTLIER), 0)
        detail |= np.where(skewed, int(Detail.CLOCK_SKEW), 0)
        detail |= np.where(corrected | doubted, int(Detail.UNIT_ERROR), 0)
        validity = np.where(
            out_of_range,
            Validity.INVALID,
            np.where(
                dup | out_of_order | stale | stuck | outlier | doubted, Validity.QUESTIONABLE, 0
            ),
        ).astype(np.int8)

        # State updates: duplicates change nothing; out-of-order readings only join the
        # duplicate ring and the offset ring (already done); in-order readings become current.
        od = d[out_of_order]
        self._dup_ring[od, self._dup_pos[od] % w] = dev[out_of_order]
        self._dup_pos[od] += 1
        i = in_order
        di = d[i]
        self._dup_ring[di, self._dup_pos[di] % w] = dev[i]
        self._dup_pos[di] += 1
        self._last_dev[di] = dev[i]
        self._last_corr[di] = corr[i]
        value_ok = ~out_of_range & ~stuck & ~outlier & ~doubted
        # The newest good value before a run of one value began: what stands for the device
        # when that run turns out to be a stuck sensor.
        new_run = i & ~same_value
        dn = d[new_run]
        self._pre_run_value[dn] = self._good_value[dn]
        self._pre_run_ts[dn] = self._good_ts[dn]
        self._pre_run_zero[dn] = self._zero_share[dn]
        self._pre_run_duty[dn] = self._duty[dn]
        self._last_value[di] = value[i]
        self._last_ok[di] = value_ok[i]
        self._last_detail[di] = detail[i]
        self._last_fp[di] = fp[i]
        self._last_has_fp[di] = has_fp[i]
        self._run_n[di] = run_n[i]
        self._run_start[di] = run_start[i]
        self._fp_run[di] = fp_run[i]
        self._hint_run[di] = hint_run[i]
        self._zero_stuck[di] = (stuck & ~nonzero)[i]
        self._demand_run[di] = demand_run[i]
        has_soc = np.isfinite(soc_pct)
        self._soc[d[has_soc]] = soc_pct[has_soc]
        self._log_stuck(d, i, stuck, value, reasons)
        self._unit_cand[di] = kept[i]
        self._unit_n[di] = unit_n[i]
        self._scale[di] = scale[i]
        good = i & value_ok
        dg = d[good]
        self._good_value[dg] = value[good]
        self._good_ts[dg] = corr[good]
        self._hist[dg, self._hist_n[dg] % w] = value[good]
        self._hist_n[dg] += 1
        # Running means at first (an EWMA started on one reading remembers it for hours).
        a = np.maximum(1.0 - 0.5 ** (1.0 / cfg.duty_halflife_readings), 1.0 / self._hist_n[dg])
        for share, x in (
            (self._duty, self._running(dg, value[good])),
            (self._zero_share, ~nonzero[good]),
        ):
            old = np.nan_to_num(share[dg])
            share[dg] = old + a * (x.astype(np.float64) - old)
        # A sensor found stuck: its zeros since the run began were never the device's power.
        found = i & stuck & ~nonzero
        df = d[found]
        self._good_value[df] = self._pre_run_value[df]
        self._good_ts[df] = self._pre_run_ts[df]
        return validity, detail, corr, in_order, value

    def _log_stuck(
        self,
        d: IntArray,
        in_order: BoolArray,
        stuck: BoolArray,
        value: FloatArray,
        reasons: tuple[tuple[BoolArray, str], ...],
    ) -> None:
        """Log a device once when its readings go stuck and once when they come back."""
        went = in_order & stuck & ~self._stuck[d]
        back = in_order & ~stuck & self._stuck[d]
        self._stuck[d[in_order]] = stuck[in_order]
        ids = self.index.ids
        for k in np.flatnonzero(went):
            why = next((text for flags, text in reasons if flags[k]), "stuck")
            _log.warning(
                "telemetry: %s is stuck (%s) at %.3f kW; estimated until it recovers",
                ids[int(d[k])], why, float(value[k]),
            )  # fmt: skip
        for k in np.flatnonzero(back):
            _log.info(
                "telemetry: %s recovered: reading %.3f kW", ids[int(d[k])], float(value[k])
            )

    def _running(self, d: IntArray, value: FloatArray) -> BoolArray:
        """Drawing real power: more than 5 % of the rating (an AC's fan alone is not)."""
        result: BoolArray = np.abs(value) > 0.05 * self._mag[d]
        return result

    def _units(
        self,
        d: IntArray,
        raw: FloatArray,
        expected: FloatArray,
        held: BoolArray,
        tol: FloatArray,
    ) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int8], npt.NDArray[np.int64], FloatArray]:
        """Unit evidence of each reading, and each device's scale after it.

        A reading is evidence of W reported as kW when it is ``unit_gross`` times the rating
        and a thousandth of it fits; of kW reported as MW when it is at most a thousandth of
        the rating and a thousand times it is a real draw; of a flipped sign when a load that
        cannot export reads a negative draw, or a device held at a setpoint reads its mirror.
        A plain in-range reading is evidence of kW; zero says nothing (0 W is 0 kW). A scale is
        adopted after ``unit_confirm`` readings of the same evidence in a row, so a single
        corrupted value never rescales a device. Returns the candidate of each reading, the
        candidate kept for each device, its run of evidence and its scale.
        """
        cfg = self.config
        lo, hi, mag = self._lo[d], self._hi[d], self._mag[d]

        def inside(x: FloatArray) -> BoolArray:
            result: BoolArray = (x >= lo) & (x <= hi)
            return result

        load_only = self._load_only[d]
        with np.errstate(invalid="ignore", over="ignore"):
            nonzero = np.abs(raw) > cfg.zero_kw
            milli = ~inside(raw) & inside(raw * 1e-3) & (np.abs(raw) >= cfg.unit_gross * mag)
            kilo = (
                nonzero
                & inside(raw)
                & (np.abs(raw) <= 1.2e-3 * mag)
                & (np.abs(raw * 1e3) >= 0.1 * mag)
            )
            sign = (load_only & (raw < lo) & inside(-raw)) | (
                held & (np.abs(expected) > 2 * tol) & (np.abs(raw + expected) <= tol)
            )
            plain = nonzero & inside(raw) & ~kilo & ~sign & ~(load_only & (raw < -cfg.zero_kw))
        cand = np.select(
            [milli, kilo, sign, plain], [_U_MILLI, _U_KILO, _U_SIGN, _U_PLAIN], _U_NONE
        ).astype(np.int8)
        prev_c, prev_n = self._unit_cand[d], self._unit_n[d]
        informative = cand != _U_NONE
        run = np.where(informative, np.where(cand == prev_c, prev_n + 1, 1), prev_n)
        kept = np.where(informative, cand, prev_c).astype(np.int8)
        scale = np.where(run >= cfg.unit_confirm, _U_FACTOR[kept], self._scale[d])
        return cand, kept, run.astype(np.int64), scale

    def _stuck_at_zero(
        self, d: IntArray, value: FloatArray, run_s: FloatArray, run_n: npt.NDArray[np.int64]
    ) -> BoolArray:
        """A zero that the device's peers (and its own past) make implausible.

        Only for classes with a thermostatic cycle (``zero_cycle_s``): a battery or an EV at
        zero may simply be empty or unplugged. *Novel zero*: the device and its peers
        practically never read an exact zero, yet it has read one ``zero_novel_readings``
        times in a row (a sensor that died). *Long zero*:
        the run is so long that a device running like its peers would almost surely have
        switched on: ``(1 - p) ** (run / cycle) < zero_alpha`` with ``p`` the share of its
        peers running now; only for a device that ran like its peers before (its own duty).
        """
        cfg = self.config
        zero = np.abs(value) <= cfg.zero_kw
        s = self._stratum[d]
        p_on, p_zero = self._peer_on[s], self._peer_zero[s]
        known = self._hist_n[d] >= cfg.min_history
        with np.errstate(invalid="ignore", divide="ignore"):
            novel = (
                zero
                & known
                & np.isfinite(self._zero_cycle[d])
                & (run_n >= cfg.zero_novel_readings)
                & (self._pre_run_zero[d] < cfg.zero_novel_share)
                & (p_zero < cfg.zero_novel_share)
            )
            log_off = (run_s / self._zero_cycle[d]) * np.log1p(-np.clip(p_on, 0.0, 0.99))
            long_zero = (
                zero
                & known
                & (p_on >= cfg.zero_min_on_share)
                & (log_off < np.log(cfg.zero_alpha))
                & (self._pre_run_duty[d] >= 0.25 * p_on)
            )
        result: BoolArray = novel | long_zero
        return result

    def _outlier(self, d: IntArray, value: FloatArray) -> BoolArray:
        """Outside the device's own envelope *and* its peers' envelope, and a sudden jump."""
        cfg = self.config
        floor = self._floor[d]
        counts = np.minimum(self._hist_n[d], cfg.history)
        hist = self._hist[d]
        missing = np.isnan(hist)
        h_lo = np.where(missing, np.inf, hist).min(axis=1)
        h_hi = np.where(missing, -np.inf, hist).max(axis=1)
        hist_ok = counts >= cfg.min_history
        with np.errstate(invalid="ignore"):
            h_margin = np.maximum(cfg.outlier_margin * (h_hi - h_lo), floor)
        h_far = (value > h_hi + h_margin) | (value < h_lo - h_margin)
        s = self._stratum[d]
        p_lo, p_hi = self._peer_lo[s], self._peer_hi[s]
        peer_ok = np.isfinite(p_lo) & np.isfinite(p_hi)
        p_margin = np.maximum(cfg.outlier_margin * (p_hi - p_lo), floor)
        p_far = (value > p_hi + p_margin) | (value < p_lo - p_margin)
        # A level the device holds over two readings is a real change, not a corrupted value.
        prev = self._last_value[d]
        jump = ~(np.abs(value - prev) <= cfg.persist_tolerance * np.abs(value) + floor)
        # Both tests must be available: a verdict from one side alone would reject a device
        # that is simply unlike its peers, and a rejected value never joins the history.
        result: BoolArray = jump & hist_ok & peer_ok & h_far & p_far
        return result

    def refresh_peers(self, now: float) -> None:
        """Recompute the peer envelopes from the current good values.

        A stratum's envelope is the union of its current 10–90 % range and its class's
        *on-level* envelope: a slowly decaying 95th percentile of the class's positive values
        (5th of its negative values). The class part is what makes on/off loads work: when
        only 2 % of the water heaters on a feeder are heating, the feeder's current range is
        [0, 0], yet a 4.5 kW reading is perfectly normal for a water heater.
        """
        cfg, n_cls = self.config, self.index.n_classes
        current = self._last_ok & (now - self._good_ts <= cfg.stale_intervals * self._interval)
        vals = self._good_value[current]
        strata = self._stratum[current]
        classes = self.index.class_code[current]
        counts = np.bincount(strata, minlength=self._n_strata)
        q10 = grouped_quantile(strata, vals, self._n_strata, 0.10)
        q90 = grouped_quantile(strata, vals, self._n_strata, 0.90)
        enough = counts >= cfg.min_peers
        safe = np.maximum(counts, 1)
        running = self._running(np.flatnonzero(current), vals)
        on = np.bincount(strata, weights=running.astype(np.float64), minlength=self._n_strata)
        self._peer_on = np.where(enough, on / safe, np.nan)
        # How often a typical peer reads an exact zero, over the long run: the median of the
        # peers' own shares, so the few sensors stuck at zero now do not make zero look normal.
        zshare = grouped_quantile(strata, self._zero_share[current], self._n_strata, 0.5)
        self._peer_zero = np.where(enough, zshare, np.nan)
        pos, neg = vals > cfg.zero_kw, vals < -cfg.zero_kw
        hi = grouped_quantile(classes[pos], vals[pos], n_cls, 0.95)
        lo = grouped_quantile(classes[neg], vals[neg], n_cls, 0.05)
        hi = np.where(np.bincount(classes[pos], minlength=n_cls) >= cfg.min_peers, hi, np.nan)
        lo = np.where(np.bincount(classes[neg], minlength=n_cls) >= cfg.min_peers, lo, np.nan)
        decay = cfg.envelope_decay
        self._class_hi = np.fmax(hi, self._class_hi * decay)
        self._class_lo = np.fmin(lo, self._class_lo * decay)
        class_of = np.arange(self._n_strata) % n_cls
        c_hi = np.fmax(self._class_hi[class_of], 0.0)
        c_lo = np.fmin(self._class_lo[class_of], 0.0)
        self._peer_hi = np.where(enough, np.fmax(q90, c_hi), np.nan)
        self._peer_lo = np.where(enough, np.fmin(q10, c_lo), np.nan)
        self._peer_at = now

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, now: float | datetime) -> FleetSnapshot:
        """Every device's usable value and status at ``now`` (O(N), vectorised)."""
        t = _epoch(now) if isinstance(now, datetime) else float(now)
        cfg = self.config
        fresh = t - self._last_corr <= cfg.fresh_intervals * self._interval
        status = np.where(
            fresh & self._last_ok,
            DeviceStatus.REPORTING,
            np.where(fresh, DeviceStatus.EXCLUDED, DeviceStatus.MISSING),
        ).astype(np.int8)
        age = t - self._good_ts
        return FleetSnapshot(
            now=t,
            value=self._good_value.copy(),
            age_s=np.where(np.isfinite(age), np.maximum(age, 0.0), np.inf),
            status=status,
            stale=t - self._last_corr > cfg.stale_intervals * self._interval,
        )

    def clock_offset_s(self, device_id: str) -> float:
        """The clock offset currently applied to a device's timestamps (0 when none)."""
        return float(self._offset[self.index.row[device_id]])

    def device_quality(self, device_id: str, now: datetime) -> TelemetryQuality:
        """Quality of a device's current value at ``now`` (stale when it is too old)."""
        r = self.index.row[device_id]
        t = _epoch(now)
        if not np.isfinite(self._last_corr[r]):
            return TelemetryQuality(Validity.INVALID, Detail.MISSING)
        if t - self._last_corr[r] > self.config.stale_intervals * self._interval[r]:
            return TelemetryQuality(Validity.QUESTIONABLE, Detail.STALE)
        if not self._last_ok[r]:
            detail = Detail(int(self._last_detail[r]))
            invalid = Detail.OUT_OF_RANGE in detail
            return TelemetryQuality(Validity.INVALID if invalid else Validity.QUESTIONABLE, detail)
        return TelemetryQuality(Validity.GOOD)
