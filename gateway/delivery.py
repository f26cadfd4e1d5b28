"""Closing the loop on a dispatch: estimated delivered response against the request (pure).

The planner's allocation is open loop: it asks each device for a change and trusts it. Thermal
loads do not follow that trust. A thermostat whose setpoint is raised stops its compressor at once,
so a fleet called together sheds everything it draws (twice the request) until the houses have
warmed to the new setpoint, and then comes back to nearly its old duty cycle (a fraction of the
request). Any device may also fall short, refuse or lie. So each control period, for each active
dispatch, :class:`DeliveryLoop`:

* takes the **baseline** of every device the dispatch holds: its power when left alone, learnt
  by the core while the device ran on its own (an exponential mean and variance of its readings)
  and frozen while it is held (:class:`DeviceBaseline`);
  a thermal load with enough reading history follows the **same-hour profile** of its similar
  days over the event instead (:mod:`gateway.flex.profiles`, read by the core off the loop),
  scaled by its level over the hour before it was held (:meth:`DeviceBaseline.profiled`), so
  an afternoon's drift is not read as response;
* estimates the **delivered** response, ``Σ (measured − baseline)`` over the held devices,
  smoothed over ``smoothing_s`` (a compressor cycles in minutes), with a 90 % interval from the
  spread of each baseline (thermostats cycling on and off have a wide one; an idle battery none);
* corrects the request with an **integral term**: ``I += dt / integral_s × (request −
  delivered)``, so the planner allocates ``request + I``. A fleet that over-delivers is asked
  for less (smaller offsets), one whose response decays as the houses warm is asked for more
  (the offsets rise over the event, spending the comfort band at the rate the request needs).
  The corrected request keeps the request's sign (a shed is never turned into a load-up to
  offset its own over-delivery) and never exceeds what the held devices can do (anti-windup).

A battery does what it is told, so for a battery-only dispatch the delivered response equals the
request and the correction stays at zero: the loop changes nothing where open loop was right.

:class:`Delivery` is what the ack reports while the dispatch runs: requested, committed and
estimated delivered kW with its interval, and whether delivery is short beyond tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from gateway.dispatch import Plan, corrected
from gateway.flex.profiles import BaselineProfile
from unified.model import (
    ComplianceInterval,
    Delivery,
    DerClass,
    Device,
    DeviceState,
    EnvelopeCompliance,
    EnvelopeReport,
    OperatingEnvelope,
)

__all__ = [
    "BASELINE_TAU_S",
    "BaselineTracker",
    "DeliveryLoop",
    "DeliveryTuning",
    "DeviceBaseline",
    "EnvelopeWatch",
    "ReleaseGovernor",
    "baseline_taus",
    "close_loops",
    "govern_releases",
    "planning_baselines",
]

_Z90 = 1.645
_EPS = 1e-9


PROFILE_ADJUSTMENT_CAP = 0.2
"""Cap on ``|day-of factor - 1|`` of a profiled baseline (the settlement rule's ±20 %): one
house's hour of compressor cycles says its level only roughly; the fleet's errors average out."""
_MIN_ADJUST_KW = 0.01


@dataclass(frozen=True, slots=True)
class DeviceBaseline:
    """A device's power when left alone: mean and variance of its recent readings (kW, kW²).

    With a ``profile`` (the same-hour profile of its history, :mod:`gateway.flex.profiles`) the
    baseline varies over the event: the profile at each moment times ``factor``, the day-of
    adjustment (:meth:`profiled`); its variance is the profile's day-to-day spread."""

    mean_kw: float
    var_kw2: float = 0.0
    learnt_s: float = 450.0
    """How far back, on average, ``level_kw`` was measured before the device was held."""
    profile: BaselineProfile | None = None
    factor: float = 1.0
    level_kw: float | None = None
    """Its level before it was held, over a longer stretch than ``mean_kw`` (None: that)."""

    def at(self, when_s: float) -> tuple[float, float]:
        """``(kW, kW²)`` the device would draw at ``when_s`` (epoch seconds) if left alone."""
        if self.profile is None:
            return self.mean_kw, self.var_kw2
        kw, var = self.profile.at(when_s)
        return kw * self.factor, var * self.factor**2

    def profiled(self, profile: BaselineProfile, held_s: float) -> DeviceBaseline:
        """This pre-event level carried along ``profile``: scaled by the day-of factor, its
        level over the hour before it was held (``level_kw``) over the profile's where that
        level was measured (``learnt_s``, its readings' mean age, before ``held_s``), capped to
        ``1 ± PROFILE_ADJUSTMENT_CAP``. A profile too small there for a ratio to mean anything
        is taken as it is (as settlement does)."""
        reference, _ = profile.at(held_s - self.learnt_s)
        level = self.mean_kw if self.level_kw is None else self.level_kw
        factor = 1.0
        if reference > _MIN_ADJUST_KW:
            cap = PROFILE_ADJUSTMENT_CAP
            factor = min(1.0 + cap, max(1.0 - cap, level / reference))
        return DeviceBaseline(
            self.mean_kw, self.var_kw2, self.learnt_s, profile, factor, self.level_kw
        )


_IDLE = DeviceBaseline(0.0)


@dataclass(slots=True)
class BaselineTracker:
    """Each device's power while left alone: an exponentially weighted mean and variance of its
    readings over ``tau_s`` (a thermostat's duty cycle is minutes), learnt only while nothing
    holds the device (``observe`` with ``held=True`` keeps the last values)."""

    tau_s: float = 900.0
    tau_of: dict[str, float] = field(default_factory=dict)
    """Devices learnt over their own time constant (:func:`baseline_taus`: a water heater's
    cycle is hours of draws, not a compressor's minutes). Until such a device has been seen for
    its time constant, its baseline is drawn toward the mean of the devices learnt over the same
    one, in proportion to how little of it has been seen: an hour of a water heater's readings
    says little about its average (it heated in that hour or it did not), and calling those
    that happened to heat, whose baseline is then high, would count as shed what they would
    not have drawn anyway."""
    mean_kw: dict[str, float] = field(default_factory=dict)
    var_kw2: dict[str, float] = field(default_factory=dict)
    _last: dict[str, datetime] = field(default_factory=dict)
    _span: dict[str, float] = field(default_factory=dict)
    _own: dict[str, float] = field(default_factory=dict)
    _pools: dict[float, list[float]] = field(default_factory=dict)
    """Time constant → [sum of its devices' own means, how many]."""
    level_tau_s: float = 3600.0
    """Time constant of each device's pre-event *level*, the anchor of a same-hour profile's
    day-of adjustment (:meth:`DeviceBaseline.profiled`): a quarter hour of a cycling
    compressor says its level to within a large fraction of its power, an hour better."""
    level_kw: dict[str, float] = field(default_factory=dict)
    _level_span: dict[str, float] = field(default_factory=dict)
    _level_age: dict[str, float] = field(default_factory=dict)
    """The mean age of the readings in each level (s): where on the clock it was measured."""

    def observe(self, device_id: str, at: datetime, power_kw: float, *, held: bool) -> None:
        previous = self._last.get(device_id)
        self._last[device_id] = at
        if held:
            return  # under a setpoint or a limit: not what it would do alone
        level = self.level_kw.get(device_id)
        if level is None or previous is None:
            self.level_kw[device_id] = power_kw
            self._level_span[device_id] = self._level_age[device_id] = 0.0
        else:
            gap = max(0.0, (at - previous).total_seconds())
            seen = self._level_span[device_id] = min(
                self._level_span[device_id] + gap, self.level_tau_s
            )
            w = max(1.0 - math.exp(-gap / self.level_tau_s), gap / seen if seen > 0 else 1.0)
            self.level_kw[device_id] = level + w * (power_kw - level)
            self._level_age[device_id] = (1.0 - w) * (self._level_age[device_id] + gap)
        slow = self.tau_of.get(device_id)
        known = self.mean_kw.get(device_id) if slow is None else self._own.get(device_id)
        if known is None or previous is None:
            self.var_kw2.setdefault(device_id, 0.0)
            if slow is None:
                self.mean_kw[device_id] = power_kw
            else:
                self._learn_pooled(device_id, slow, power_kw, 0.0)
            return
        dt = max(0.0, (at - previous).total_seconds())
        tau = self.tau_s if slow is None else slow
        # Until it has seen tau_s of readings, the plain mean of what it has seen: an average
        # that starts from one reading of an on/off compressor would carry it for an hour.
        span = self._span[device_id] = min(self._span.get(device_id, 0.0) + dt, tau)
        weight = max(1.0 - math.exp(-dt / tau), dt / span if span > 0 else 1.0)
        deviation = power_kw - known
        if slow is None:
            self.mean_kw[device_id] = known + weight * deviation
        else:
            self._learn_pooled(device_id, slow, known + weight * deviation, span / slow)
        var = self.var_kw2.get(device_id, 0.0)
        self.var_kw2[device_id] = (1.0 - weight) * (var + weight * deviation**2)

    def _learn_pooled(self, device_id: str, tau: float, own_kw: float, seen: float) -> None:
        pool = self._pools.setdefault(tau, [0.0, 0])
        before = self._own.get(device_id)
        if before is None:
            pool[1] += 1
            before = 0.0
        pool[0] += own_kw - before
        self._own[device_id] = own_kw
        pooled = pool[0] / pool[1]
        self.mean_kw[device_id] = pooled + min(1.0, seen) * (own_kw - pooled)

    def baseline(self, device_id: str, fallback_kw: float | None) -> DeviceBaseline | None:
        mean = self.mean_kw.get(device_id, fallback_kw)
        if mean is None:
            return None
        tau = self.tau_of.get(device_id, self.tau_s)
        level = self.level_kw.get(device_id)
        if level is None or device_id in self.tau_of:  # a slow class: its mean is its level
            level, age = mean, tau
        else:
            age = self._level_age.get(device_id, 0.0)
        return DeviceBaseline(mean, self.var_kw2.get(device_id, 0.0), age, level_kw=level)


BASELINE_TAU_S: dict[DerClass, float] = {DerClass.WATER_HEATER: 4 * 3600.0}
"""Device classes whose baseline is learnt over longer than the tracker's default: a water
heater's element runs a few minutes in an hour, when hot water has been drawn, so its power over
the last quarter of an hour says whether it heated lately, not what it draws on average. (With
a quarter of an hour, heaters that had not heated had a baseline of 0 kW and could not be called,
and those that had were asked for several times what they would draw.)"""


def baseline_taus(devices: Iterable[Device]) -> dict[str, float]:
    """:attr:`BaselineTracker.tau_of` for ``devices`` (those of a class in ``BASELINE_TAU_S``)."""
    return {
        d.device_id: tau for d in devices if (tau := BASELINE_TAU_S.get(d.der_class)) is not None
    }


@dataclass(frozen=True, slots=True)
class DeliveryTuning:
    smoothing_s: float = 60.0
    """Time constant of the delivered-response average."""
    integral_s: float = 90.0
    """Integral time: a steady error of E kW moves the correction by E kW in this long.

    Tuned against the thermal fleet's own dynamics (``bench.dispatch_delivery``): a house held
    off sheds at once and its turn ends within the hour, so the response the loop corrects moves
    over minutes; with 120 s / 300 s the correction lagged it and the delivered response swung
    by ±15-25 % of the request around it (a 5-minute interval in three outside ±15 % at 1,000
    houses), with 60 s / 90 s it follows. Shorter still chases the noise of the held houses'
    own cycling (and a device's reporting delay, tens of seconds, is the lag that bounds it)."""
    tolerance: float = 0.1
    """Delivery is *short* when the smoothed delivered response falls below the request by more
    than this fraction of it (and more than ``tolerance_kw``) once ``settle_s`` has passed."""
    tolerance_kw: float = 1.0
    settle_s: float = 300.0
    """Time the devices get after the start (or a change of request) before short is flagged."""
    rebound_limit: float = 0.3
    """After a dispatch ends, its thermal loads are released only while the group's measured
    rise above its pre-event baseline stays under this fraction of the request
    (:class:`ReleaseGovernor`); the ``release_s`` schedule is the floor."""


@dataclass(slots=True)
class DeliveryLoop:
    """One dispatch's closed loop; the core keeps one per active dispatch."""

    tuning: DeliveryTuning = field(default_factory=DeliveryTuning)
    baselines: dict[str, DeviceBaseline] = field(default_factory=dict)
    """Frozen when a device is first held by this dispatch (and dropped when released)."""
    correction_kw: float = 0.0
    delivered_kw: float | None = None
    """The estimated delivered response, as measured (what the ack reports)."""
    delivered_var: float = 0.0
    controlled_kw: float | None = None
    """What the loop corrects on: the same, but with each trusted device's setpoint instead of
    its measured power (see :meth:`update`)."""
    _last: datetime | None = None
    _settled_from: datetime | None = None
    _settle_request: float | None = None
    _left: dict[str, DeviceBaseline] = field(default_factory=dict)
    last_request_kw: float = 0.0
    profiles: Mapping[str, BaselineProfile] = field(default_factory=dict)
    """Same-hour profiles of the held devices' history (:meth:`use_profiles`)."""
    _held_s: dict[str, float] = field(default_factory=dict)
    """When each device was first held (epoch s): where its pre-event level was measured."""

    def shift(self, by: timedelta) -> None:
        """The wall clock stepped by ``by``: keep the time this loop has counted true."""
        if self._last is not None:
            self._last += by
        if self._settled_from is not None:
            self._settled_from += by

    def hold(self, held: Mapping[str, DeviceBaseline], at: datetime | None = None) -> None:
        """The devices the dispatch holds now, with the baseline each had before it was held.

        A device keeps the baseline it had when this dispatch first held it (``at``); a device
        no longer held (refused, dropped out, regrouped) leaves the estimate."""
        for device_id in [d for d in self.baselines if d not in held]:
            self._left[device_id] = self.baselines.pop(device_id)
        at_s = None if at is None else at.timestamp()
        for device_id, baseline in held.items():
            if device_id not in self.baselines:
                # One that comes back (after a dropout) keeps the baseline it had before the
                # dispatch: what it learnt in between was the event, not its own behaviour.
                base = self._left.pop(device_id, baseline)
                held_s = self._held_s.setdefault(device_id, at_s) if at_s is not None else None
                profile = self.profiles.get(device_id)
                if profile is not None and base.profile is None and held_s is not None:
                    base = base.profiled(profile, held_s)
                self.baselines[device_id] = base

    def use_profiles(self, profiles: Mapping[str, BaselineProfile]) -> None:
        """From now on each held device whose history has a same-hour profile is measured
        against it (loaded off the control loop once the dispatch is active, and refreshed):
        its pre-event level, where it was held, anchors the day-of adjustment. Devices without
        one keep their flat pre-event level."""
        self.profiles = profiles
        for book in (self.baselines, self._left):
            for device_id, base in book.items():
                profile = profiles.get(device_id)
                held_s = self._held_s.get(device_id)
                if profile is not None and held_s is not None and profile is not base.profile:
                    book[device_id] = base.profiled(profile, held_s)

    @property
    def profiled(self) -> int:
        """Held devices measured against a same-hour profile."""
        return sum(1 for b in self.baselines.values() if b.profile is not None)

    def update(
        self,
        now: datetime,
        requested_kw: float,
        measured_kw: Mapping[str, float],
        available_kw: float,
        trusted_kw: Mapping[str, float] | None = None,
    ) -> Delivery:
        """Fold in this period's measurements of the held devices and move the correction.

        ``measured_kw`` holds the fresh power of each held device (a device without a fresh
        reading is left out of this period's estimate, not counted as delivering nothing).
        ``trusted_kw`` holds the setpoints of devices whose power *is* their setpoint (batteries,
        EV chargers): the correction works on the thermal loads' measured response and on those
        setpoints, so that a battery's poll latency (a second or two behind each new setpoint)
        never winds the loop up. What is reported is measured, for every device."""
        trusted_kw = trusted_kw or {}
        tuning = self.tuning
        self.last_request_kw = requested_kw
        dt = 0.0 if self._last is None else max(0.0, (now - self._last).total_seconds())
        self._last = now
        if self._settle_request is None or _changed(self._settle_request, requested_kw, tuning):
            self._settled_from, self._settle_request = now, requested_kw
        delivered, controlled, var, counted = 0.0, 0.0, 0.0, 0
        now_s = now.timestamp()
        for device_id, baseline in self.baselines.items():
            trusted = trusted_kw.get(device_id)
            power = measured_kw.get(device_id)
            base_kw, base_var = baseline.at(now_s)  # its counterfactual now
            if trusted is not None:
                controlled += trusted - base_kw
            if power is None:
                continue
            delivered += power - base_kw
            if trusted is None:
                controlled += power - base_kw
            var += base_var
            counted += 1
        if self.delivered_kw is None or self.controlled_kw is None:
            self.delivered_kw, self.delivered_var = delivered, var
            self.controlled_kw = controlled
        elif dt > 0:
            weight = 1.0 - math.exp(-dt / tuning.smoothing_s)
            self.delivered_kw += weight * (delivered - self.delivered_kw)
            self.controlled_kw += weight * (controlled - self.controlled_kw)
            # The average of n noisy periods has less variance than one; the baselines'
            # own spread does not average away (it is the same error every period).
            self.delivered_var += weight * (var - self.delivered_var)
        if counted and dt > 0 and abs(requested_kw) > _EPS:
            sign = 1.0 if requested_kw > 0 else -1.0
            step = dt / tuning.integral_s * (requested_kw - self.controlled_kw)
            beyond = sign * (requested_kw + self.correction_kw) >= available_kw
            # Anti-windup: past what the devices can give, the correction does not grow (a
            # momentary dip in what is available never cuts the request itself).
            if not (beyond and sign * step > 0):
                self.correction_kw += step
            # Nor does it take the total across zero.
            self.correction_kw = max(self.correction_kw * sign, -abs(requested_kw)) * sign
        return self._report(now, requested_kw, available_kw)

    def _report(self, now: datetime, requested_kw: float, available_kw: float) -> Delivery:
        tuning = self.tuning
        delivered = self.delivered_kw or 0.0
        half = _Z90 * math.sqrt(max(0.0, self.delivered_var))
        settled = (
            self._settled_from is not None
            and (now - self._settled_from).total_seconds() >= tuning.settle_s
        )
        gap = abs(requested_kw) - math.copysign(1.0, requested_kw or 1.0) * delivered
        short = settled and gap > tuning.tolerance * abs(requested_kw) and gap > tuning.tolerance_kw
        return Delivery(
            requested_kw=round(requested_kw, 3),
            committed_kw=round(corrected(requested_kw, self.correction_kw, available_kw), 3),
            delivered_kw=round(delivered, 3),
            delivered_lower_kw=round(delivered - half, 3),
            delivered_upper_kw=round(delivered + half, 3),
            devices=len(self.baselines),
            short=short,
            profiled=self.profiled,
        )


def _changed(before: float, now: float, tuning: DeliveryTuning) -> bool:
    return abs(now - before) > max(tuning.tolerance * abs(before), tuning.tolerance_kw)


def close_loops(
    now: datetime,
    previous: Plan,
    states: Mapping[str, DeviceState | None],
    baselines: BaselineTracker,
    loops: MutableMapping[str, DeliveryLoop],
    tuning: DeliveryTuning,
    thermal: Container[str],
    governors: MutableMapping[str, ReleaseGovernor] | None = None,
    profiles: Mapping[str, Mapping[str, BaselineProfile]] | None = None,
) -> dict[str, Delivery]:
    """Measure each running dispatch's response to what ``previous`` (the last plan) asked of
    its devices, and move each loop's correction; loops of dispatches no longer planned go.

    A ``thermal`` device's response is measured against its learnt baseline; any other's (a
    battery's, an EV charger's) against 0 kW, as the planner plans it (its setpoint is its
    power): after a restart, a battery still on the last setpoint is not its own baseline.
    The corrections (``loop.correction_kw``) feed the next plan. A dispatch that has ended with
    thermal loads still to release hands its loop's baselines to a :class:`ReleaseGovernor` in
    ``governors``. ``profiles`` holds, by command id, the same-hour profiles of its thermal
    devices' history (:meth:`DeliveryLoop.use_profiles`)."""
    for cid in [c for c in loops if c not in previous.requested_kw]:
        ended = loops.pop(cid)
        if governors is not None and any(r.command_id == cid for r in previous.releasing.values()):
            governors[cid] = ReleaseGovernor.after(ended, tuning)
    out: dict[str, Delivery] = {}
    for cid, requested in previous.requested_kw.items():
        loop = loops.get(cid)
        if loop is None:
            loop = loops[cid] = DeliveryLoop(tuning)
        shapes = None if profiles is None else profiles.get(cid)
        if shapes is not None and shapes is not loop.profiles:
            loop.use_profiles(shapes)
        held: dict[str, DeviceBaseline] = {}
        measured: dict[str, float] = {}
        trusted: dict[str, float] = {}
        state_of, known_baseline = states.get, loop.baselines.get  # 10,000 devices a period
        allocations = previous.allocations.get(cid, ())
        # Thermal members count (all of them, called or resting: counting only the called
        # ones over-counts, since a house called has just finished cooling) once the dispatch
        # has called any; while batteries alone carry it, the houses' drift is noise the loop
        # must not chase.
        thermal_in = any(d in thermal for d in loop.baselines) or any(
            a.commanded_kw != 0.0 and a.device_id in thermal for a in allocations
        )
        for allocation in allocations:
            did = allocation.device_id
            if did in thermal and not thermal_in:
                continue
            state = state_of(did)
            if state is not None:
                measured[did] = state.power_kw
            if did not in thermal:
                held[did] = _IDLE
                trusted[did] = allocation.commanded_kw
                continue
            known = known_baseline(did)
            if known is not None:
                held[did] = known  # frozen when it was first held: no need to look again
                continue
            baseline = baselines.baseline(did, state.power_kw if state else None)
            if baseline is not None:
                held[did] = baseline
        loop.hold(held, now)
        out[cid] = loop.update(
            now, requested, measured, previous.available_kw.get(cid, 0.0), trusted
        )
    return out


def planning_baselines(
    now: datetime, loops: Mapping[str, DeliveryLoop], flat: Mapping[str, float]
) -> Mapping[str, float]:
    """Each device's power when left alone, for the planner (``target`` mode, envelopes, what a
    held thermal load sheds): a device a running dispatch measures against its same-hour
    profile is planned from that profile now, the others from their ``flat`` level."""
    now_s = now.timestamp()
    profiled = {
        device_id: baseline.at(now_s)[0]
        for loop in loops.values()
        if loop.profiles
        for device_id, baseline in loop.baselines.items()
        if baseline.profile is not None
    }
    return {**flat, **profiled} if profiled else flat


@dataclass(slots=True)
class ReleaseGovernor:
    """The end of a dispatch, closed on measurement: how much more of its held thermal load may
    be let go this period without the group's rebound passing ``limit_kw``.

    Every house held off has stored heat (it is warmer than its setpoint) and pays it back at its
    compressor's full power once released. Released on a fixed schedule, the houses still
    recovering add up to a rebound larger than the shed itself; so the measured rise of the
    dispatch's devices above the baselines they had before it (the same baselines its loop
    measured the shed against: held ones still count below theirs) is held under the limit, and
    only the room left is released. The planner's ``release_s`` schedule stays the floor, so no
    house is held longer than that after the end."""

    limit_kw: float
    baselines: dict[str, DeviceBaseline]
    smoothing_s: float = 60.0
    rise_kw: float | None = None
    """The measured rise above the baselines, smoothed (what :meth:`allowance` works on)."""
    pending_s: float = 300.0
    """How long a released device's expected power is counted while readings do not show it."""
    _pending: dict[str, tuple[datetime, float]] = field(default_factory=dict)
    _last: datetime | None = None

    @classmethod
    def after(cls, loop: DeliveryLoop, tuning: DeliveryTuning) -> ReleaseGovernor:
        return cls(
            limit_kw=tuning.rebound_limit * abs(loop.last_request_kw),
            baselines={**loop._left, **loop.baselines},
            smoothing_s=min(60.0, tuning.smoothing_s),
        )

    def shift(self, by: timedelta) -> None:
        if self._last is not None:
            self._last += by
        self._pending = {d: (at + by, kw) for d, (at, kw) in self._pending.items()}

    def _mean(self, device_id: str, now_s: float) -> float:
        baseline = self.baselines.get(device_id)
        return 0.0 if baseline is None else baseline.at(now_s)[0]

    def allowance(
        self,
        now: datetime,
        states: Mapping[str, DeviceState | None],
        released: Mapping[str, float] | None = None,
    ) -> float:
        """kW of expected rise that may be released this period (≤ 0: release nothing more).

        ``released`` holds the devices the last plan let go of, with the rise expected of each:
        counted until a reading shows it (a released house starts its compressor only once it
        has drifted up to its lowered setpoint, minutes later, and reports every half minute or
        so; without this, the next periods would see no rise yet and release again)."""
        since = self._last or now
        now_s = now.timestamp()
        for device_id, rise in (released or {}).items():
            state = states.get(device_id)
            before = state.power_kw if state is not None else self._mean(device_id, now_s)
            self._pending[device_id] = (since, before + rise)
        rise_kw = 0.0
        for device_id, baseline in self.baselines.items():
            state = states.get(device_id)
            power = state.power_kw if state is not None else None
            pending = self._pending.get(device_id)
            if pending is not None:
                at, expected_kw = pending
                if (now - at).total_seconds() > self.pending_s or (
                    power is not None and power >= expected_kw
                ):
                    del self._pending[device_id]
                else:
                    # Let go but not yet running (its house drifts up to the lowered setpoint
                    # within minutes): count what it is about to draw.
                    power = expected_kw if power is None else max(power, expected_kw)
            if power is not None:
                rise_kw += power - baseline.at(now_s)[0]
        dt = 0.0 if self._last is None else max(0.0, (now - self._last).total_seconds())
        self._last = now
        if self.rise_kw is None:
            self.rise_kw = rise_kw
        elif dt > 0:
            # Quick to see a rise, slow to believe a fall: releasing more is the risky way.
            tau = self.smoothing_s / 4 if rise_kw > self.rise_kw else self.smoothing_s
            self.rise_kw += (1.0 - math.exp(-dt / tau)) * (rise_kw - self.rise_kw)
        return self.limit_kw - self.rise_kw


def govern_releases(
    now: datetime,
    previous: Plan,
    states: Mapping[str, DeviceState | None],
    governors: MutableMapping[str, ReleaseGovernor],
) -> dict[str, float]:
    """Each ended dispatch still releasing: the rise it may release this period (the planner's
    ``release_allowance``); governors whose devices are all released go."""
    releasing = {r.command_id for r in previous.releasing.values()}
    for cid in [c for c in governors if c not in releasing]:
        del governors[cid]
    released: dict[str, dict[str, float]] = {}
    for device_id, (cid, rise) in previous.released.items():
        released.setdefault(cid, {})[device_id] = rise
    return {
        cid: governor.allowance(now, states, released.get(cid))
        for cid, governor in governors.items()
    }


@dataclass(slots=True)
class _Bucket:
    start: datetime
    limits: tuple[float | None, float | None]
    seconds: float = 0.0
    kw_seconds: float = 0.0
    seconds_outside: float = 0.0
    max_kw: float = -math.inf
    min_kw: float = math.inf
    readings_kw: float = 0.0
    readings: int = 0


@dataclass(slots=True)
class EnvelopeWatch:
    """One envelope's compliance at the meter: the group's measured net power against its
    limits, period by period (what the ack reports while it runs), and interval by interval
    with the devices that acted (the report published when it ends: :meth:`report`)."""

    tolerance: float = 0.02
    interval_s: int = 300
    seconds_in_force: float = 0.0
    seconds_outside: float = 0.0
    worst_excursion_kw: float = 0.0
    acted: set[str] = field(default_factory=set)
    _buckets: dict[datetime, _Bucket] = field(default_factory=dict)
    _last: datetime | None = None

    def shift(self, by: timedelta) -> None:
        """The wall clock stepped by ``by``: time outside is counted in true seconds."""
        if self._last is not None:
            self._last += by

    def pause(self) -> None:
        """No limit in force now (a gap between the envelope's intervals): the time until the
        next :meth:`update` is not counted."""
        self._last = None

    def update(
        self,
        now: datetime,
        limits: tuple[float | None, float | None],
        measured_kw: float,
        reporting: int,
        acting: int | set[str],
    ) -> EnvelopeCompliance:
        imp, exp = limits
        dt = 0.0 if self._last is None else max(0.0, (now - self._last).total_seconds())
        self._last = now
        excess = _excess(measured_kw, limits)
        outside = self._outside(excess, limits)
        self.seconds_in_force += dt
        if outside:
            self.seconds_outside += dt
        self.worst_excursion_kw = max(self.worst_excursion_kw, excess)
        if isinstance(acting, set):
            self.acted |= acting
        bucket_start = _floor(now, self.interval_s)
        bucket = self._buckets.get(bucket_start)
        if bucket is None:
            bucket = self._buckets[bucket_start] = _Bucket(bucket_start, limits)
        bucket.limits = limits  # the latest in force (an interval boundary moves them)
        bucket.seconds += dt
        bucket.kw_seconds += measured_kw * dt
        bucket.readings_kw += measured_kw
        bucket.readings += 1
        bucket.max_kw = max(bucket.max_kw, measured_kw)
        bucket.min_kw = min(bucket.min_kw, measured_kw)
        if outside:
            bucket.seconds_outside += dt
        return EnvelopeCompliance(
            import_limit_kw=imp,
            export_limit_kw=exp,
            measured_kw=round(measured_kw, 3),
            devices_reporting=reporting,
            devices_acting=acting if isinstance(acting, int) else len(acting),
            seconds_in_force=round(self.seconds_in_force, 1),
            seconds_outside=round(self.seconds_outside, 1),
            worst_excursion_kw=round(self.worst_excursion_kw, 3),
            outside=outside,
        )

    def _outside(self, excess: float, limits: tuple[float | None, float | None]) -> bool:
        bound = min(x for x in (*limits, math.inf) if x is not None)
        return excess > max(self.tolerance * bound, _EPS) if math.isfinite(bound) else False

    def report(self, command: OperatingEnvelope, generated_at: datetime) -> EnvelopeReport:
        """The compliance report of an envelope that has ended."""
        intervals = []
        for start in sorted(self._buckets):
            bucket = self._buckets[start]
            if bucket.seconds > 0:
                mean = bucket.kw_seconds / bucket.seconds
            else:  # one reading only (the envelope's first or last period)
                mean = bucket.readings_kw / max(1, bucket.readings)
            intervals.append(
                ComplianceInterval(
                    start=start,
                    end=start + timedelta(seconds=self.interval_s),
                    import_limit_kw=bucket.limits[0],
                    export_limit_kw=bucket.limits[1],
                    mean_measured_kw=round(mean, 3),
                    max_measured_kw=round(bucket.max_kw, 3),
                    min_measured_kw=round(bucket.min_kw, 3),
                    seconds_measured=round(bucket.seconds, 1),
                    seconds_outside=round(bucket.seconds_outside, 1),
                    held=not self._outside(_excess(mean, bucket.limits), bucket.limits),
                )
            )
        acted = sorted(self.acted)
        return EnvelopeReport(
            command_id=command.command_id,
            target=command.target,
            start=command.start,
            end=command.end,
            generated_at=generated_at,
            interval_s=self.interval_s,
            tolerance=self.tolerance,
            intervals=tuple(intervals),
            intervals_total=len(intervals),
            intervals_held=sum(1 for i in intervals if i.held),
            seconds_in_force=round(self.seconds_in_force, 1),
            seconds_outside=round(self.seconds_outside, 1),
            worst_excursion_kw=round(self.worst_excursion_kw, 3),
            devices_acted=tuple(acted[:1000]),
            devices_acted_count=len(acted),
        )


def _excess(measured_kw: float, limits: tuple[float | None, float | None]) -> float:
    imp, exp = limits
    excess = 0.0
    if imp is not None:
        excess = max(excess, measured_kw - imp)
    if exp is not None:
        excess = max(excess, -measured_kw - exp)
    return excess


def _floor(when: datetime, interval_s: int) -> datetime:
    seconds = when.timestamp()
    return datetime.fromtimestamp(seconds - seconds % interval_s, UTC)
