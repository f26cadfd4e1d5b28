"""A DER that polls the gateway's IEEE 2030.5 server (smart inverter, battery, aggregator cloud).

Unlike Modbus, the gateway cannot write to such a device: it publishes a DERControl on its
``adapters.sep2_der.server.Sep2Server`` and the device's 2030.5 client picks it up at its next poll.
So ``apply`` *publishes* and ``read`` returns what the client last *posted*; the server is the
transport, this adapter is the translation between the unified model and 2030.5 controls.

Setpoint → DERControlBase (the planner has already folded envelopes and dispatch into one setpoint
per device, in kW with the load convention: + import/charge, - export/discharge):

* ``opModTargetW`` (generator sign: + export) when the device supports it (its DERCapability
  ``modesSupported`` bit 22, or ``supports_target_w`` in the config), else ``opModFixedW`` in
  hundredths of a percent of its ``rtgMaxW``;
* plus ``opModGenLimW`` / ``opModLoadLimW``: the magnitude in the setpoint's direction and 0 in
  the other, so a device that ignores or overshoots the target still cannot exceed the setpoint.

``power_kw=None`` cancels the control (marked cancelled, not deleted) and the DefaultDERControl
of the device's programs applies again.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, Literal

from pydantic import Field

from adapters.sep2_der.drlc import DEVICE_CATEGORY
from adapters.sep2_der.server import DerSnapshot, Sep2Enrollment, Sep2ResponseRecord, Sep2Server
from gateway.devices import (
    AdapterError,
    DeviceRejected,
    DeviceUnavailable,
    DispatchNotice,
    UnsafeCommand,
)
from protocols.sep2 import (
    CsipAusVersion,
    DERCapability,
    DERControlBase,
    InvalidValue,
    from_percent,
    from_watts,
    scaled_value,
    to_watts,
)
from unified.model import DeviceCommand, DeviceState, EnvelopeInterval, Frozen, LimitSource

log = logging.getLogger(__name__)

__all__ = ["MODE_TARGET_W", "RATING_TOLERANCE", "Sep2Der", "Sep2DerEndpoint"]

#: DERControlType bit of opModTargetW in DERCapability.modesSupported.
MODE_TARGET_W: Final = 1 << 22
#: A setpoint may exceed the device's rating by this fraction (allocation rounding); it is then
#: clipped. Anything further is refused as unsafe.
RATING_TOLERANCE: Final = 0.01
_MAX_WINDOWS: Final = 256


class Sep2DerEndpoint(Frozen):
    """How a 2030.5 DER is recognised and driven (``[devices.sep2]`` in the config)."""

    lfdi: str = Field(
        pattern=r"^[0-9A-Fa-f]{40}$",
        description="LFDI of the device's client certificate (derms-gateway certs prints it)",
    )
    pin: int | None = Field(
        default=None,
        ge=0,
        le=9_999_999,
        description="Registration PIN without its check digit (served with it: 11111 → 111115)",
    )
    supports_target_w: bool | None = Field(
        default=None,
        description="Use opModTargetW (True) or opModFixedW (False); None: from its DERCapability",
    )
    storage_target: bool = Field(
        default=False,
        description="Send setpoints as CSIP-AUS v1.3 opModStorageTargetW (a battery's charge "
        "+ / discharge - target); needs [sep2_server] csipaus = the v1.3 namespace",
    )
    shares_end_device: bool = Field(
        default=False,
        description="A further DER of the EndDevice of the device enrolled before it with the "
        "same LFDI (one 2030.5 client for a site's PV and battery): listed in its DERList, its "
        "controls in a program of its own",
    )
    power_from: Literal["der", "site"] = Field(
        default="der",
        description="Which MirrorUsagePoint is the device's power: the DER's or the site's",
    )
    load: Literal["thermostat", "water_heater"] | None = Field(
        default=None,
        description="A thermal load, not a DER: its setpoints (a shed from its baseline) are "
        "2030.5 DRLC EndDeviceControls capping its duty cycle at 1 - shed / rated_kw "
        "(IEEE 2030.5 §10.4)",
    )
    rated_kw: float | None = Field(
        default=None,
        gt=0,
        le=10_000,
        description="A load's power when running (kW): 100 % duty cycle",
    )
    stale_after_s: float = Field(
        default=660.0,
        gt=0,
        le=86_400,
        description="Telemetry older than this makes the device unavailable",
    )
    control_duration_s: int = Field(
        default=900,
        ge=60,
        le=86_400,
        description="Duration of each published DERControl; renewed while the setpoint holds, "
        "so a silent gateway's last setpoint lapses to the default after at most this long",
    )


class Sep2Der:
    """:class:`gateway.devices.DeviceAdapter` for one DER enrolled on a shared Sep2Server."""

    def __init__(
        self,
        device_id: str,
        endpoint: Sep2DerEndpoint,
        *,
        server: Sep2Server,
        groups: tuple[str, ...] = (),
    ) -> None:
        if endpoint.load is not None and endpoint.rated_kw is None:
            raise ValueError(f"{device_id}: a load ({endpoint.load}) needs its rated_kw")
        if endpoint.storage_target and server.config.csipaus is not CsipAusVersion.V1_3:
            raise ValueError(
                f"{device_id}: storage_target (opModStorageTargetW) needs the CSIP-AUS v1.3 "
                "namespace on the server ([sep2_server] csipaus)"
            )
        self._device_id = device_id
        self._endpoint = endpoint
        self._server = server
        self._windows: dict[str, tuple[int | None, str | None]] = {}
        """By command id, from notices: the dispatch's end (epoch s; a control lasts its
        dispatch) and the group it addresses (its control goes into that group's program)."""
        self._site_envelopes: dict[str, tuple[EnvelopeInterval, ...]] = {}
        """By command id: envelopes addressed to this device alone, when it stands for a site
        (``power_from = "site"``): their limits are the site's, at its connection point."""
        server.enroll(
            Sep2Enrollment(
                device_id=device_id,
                lfdi=endpoint.lfdi,
                pin=endpoint.pin,
                groups=groups,
                control_duration_s=endpoint.control_duration_s,
                shares_end_device=endpoint.shares_end_device,
                device_category=None if endpoint.load is None else DEVICE_CATEGORY[endpoint.load],
            )
        )

    @property
    def stale_after_s(self) -> float:
        """The gateway treats this device's readings as fresh for this long (it posts slowly)."""
        return self._endpoint.stale_after_s

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def source(self) -> str:
        return f"sep2:{self._endpoint.lfdi.upper()}"

    @property
    def server(self) -> Sep2Server:
        return self._server

    def regroup(self, groups: tuple[str, ...]) -> None:
        """The device's new topology groups (the registry moved it): its programs and its
        EndDevice's FunctionSetAssignments follow on the server at once."""
        self._server.regroup(self._device_id, groups)

    def responses(self) -> tuple[Sep2ResponseRecord, ...]:
        """Responses the device's client posted for this device's controls, oldest first."""
        return self._server.responses(self._device_id)

    # ----------------------------------------------------------------------- lifecycle

    async def connect(self) -> None:
        """Make sure the shared server is listening. There is no per-device connection: the
        device is "connected" whenever it polls, which ``read`` judges by telemetry age."""
        try:
            await self._server.start()
        except (OSError, ssl.SSLError) as exc:
            # A port in use or an unreadable certificate must reach the supervisor as an
            # adapter error (retried with backoff), not escape and stop the whole gateway.
            raise DeviceUnavailable(self._device_id, f"2030.5 server cannot start: {exc}") from exc

    async def close(self) -> None:
        """Nothing to release: the server is shared, and the device's control stays published
        (it lapses by its own duration if the gateway stops renewing it)."""

    # ----------------------------------------------------------------------- polling

    async def read(self) -> DeviceState:
        snap = self._server.snapshot(self._device_id)
        sample = snap.der_power if self._endpoint.power_from == "der" else snap.site_power
        if sample is None:
            raise DeviceUnavailable(
                self._device_id, f"no {self._endpoint.power_from} power mirrored yet"
            )
        age = (datetime.now(UTC) - sample.received_at).total_seconds()
        if age > self._endpoint.stale_after_s:
            raise DeviceUnavailable(
                self._device_id,
                f"last telemetry {age:.0f} s ago (stale after {self._endpoint.stale_after_s:g} s)",
            )
        soc: float | None = None
        if snap.status is not None and snap.status.state_of_charge_status is not None:
            soc = min(100.0, snap.status.state_of_charge_status.value / 100)
        charge_kw, discharge_kw = self._ratings_kw(snap.capability)
        capacity_kwh: float | None = None
        if snap.capability is not None and snap.capability.rtg_max_wh is not None:
            capacity_kwh = scaled_value(snap.capability.rtg_max_wh) / 1000
        control = snap.active_control
        if self._endpoint.load is not None:  # sheds up to its rating; cannot be loaded up
            charge_kw, discharge_kw = None, self._endpoint.rated_kw
        return DeviceState(
            device_id=self._device_id,
            timestamp=sample.received_at,
            power_kw=sample.watts / 1000 + 0.0,
            soc_pct=soc,
            capacity_kwh=capacity_kwh,
            max_charge_kw=charge_kw,
            max_discharge_kw=discharge_kw,
            setpoint_kw=None if control is None else control.power_kw,
            source=self.source,
        )

    @staticmethod
    def _ratings_kw(capability: DERCapability | None) -> tuple[float | None, float | None]:
        if capability is None:
            return None, None
        max_w = abs(to_watts(capability.rtg_max_w))
        charge = capability.rtg_max_charge_rate_w
        discharge = capability.rtg_max_discharge_rate_w
        charge_w = abs(to_watts(charge)) if charge is not None else max_w
        discharge_w = abs(to_watts(discharge)) if discharge is not None else max_w
        return charge_w / 1000, discharge_w / 1000

    # ----------------------------------------------------------------------- control

    def _uses_target_w(self, capability: DERCapability | None) -> bool:
        if self._endpoint.supports_target_w is not None:
            return self._endpoint.supports_target_w
        if capability is None:
            # The control mode cannot be chosen before the client says what it supports; the
            # supervisor retries after its backoff, by which time the client has usually PUT it.
            raise DeviceUnavailable(self._device_id, "DERCapability not yet PUT by the client")
        try:
            modes = int(capability.modes_supported or "0", 16)
        except ValueError:
            modes = 0
        return bool(modes & MODE_TARGET_W)

    def _checked_kw(self, power_kw: float, capability: DERCapability | None) -> float:
        if not math.isfinite(power_kw):
            raise UnsafeCommand(self._device_id, f"setpoint {power_kw} kW is not a number")
        charge_kw, discharge_kw = self._ratings_kw(capability)
        limit = charge_kw if power_kw > 0 else discharge_kw
        if limit is None:
            return power_kw  # no nameplate yet: the planner held it to the configured ratings
        if abs(power_kw) > limit * (1 + RATING_TOLERANCE):
            direction = "charge" if power_kw > 0 else "discharge"
            raise UnsafeCommand(
                self._device_id,
                f"setpoint {power_kw} kW beyond the {direction} rating of {limit} kW",
            )
        return math.copysign(min(abs(power_kw), limit), power_kw)

    def control_base(self, power_kw: float, snap: DerSnapshot) -> DERControlBase:
        """The DERControlBase for a setpoint (load convention kW), given what the client sent."""
        capability = snap.capability
        power_kw = self._checked_kw(power_kw, capability)
        export_w = -power_kw * 1000 + 0.0  # 2030.5 DER power: + generates / discharges
        try:
            gen_limit = from_watts(max(export_w, 0.0))
            load_limit = from_watts(max(-export_w, 0.0))
            if self._endpoint.storage_target:
                return DERControlBase(
                    op_mod_storage_target_w=from_watts(-export_w + 0.0),
                    op_mod_gen_lim_w=gen_limit,
                    op_mod_load_lim_w=load_limit,
                )
            if self._uses_target_w(capability):
                return DERControlBase(
                    op_mod_target_w=from_watts(export_w),
                    op_mod_gen_lim_w=gen_limit,
                    op_mod_load_lim_w=load_limit,
                )
            if capability is None:
                raise DeviceUnavailable(
                    self._device_id, "opModFixedW needs rtgMaxW: DERCapability not yet PUT"
                )
            rated_w = abs(to_watts(capability.rtg_max_w))
            if rated_w <= 0:
                raise UnsafeCommand(self._device_id, "rtgMaxW is 0: no percentage can be set")
            percent = max(-100.0, min(100.0, export_w / rated_w * 100))
            return DERControlBase(
                op_mod_fixed_w=from_percent(percent, signed=True),
                op_mod_gen_lim_w=gen_limit,
                op_mod_load_lim_w=load_limit,
            )
        except InvalidValue as exc:
            raise UnsafeCommand(self._device_id, str(exc)) from exc

    def notice(self, notice: DispatchNotice) -> None:
        """:class:`gateway.devices.TakesNotice`: a dispatch ahead becomes a scheduled
        DERControl at once (the client sees it coming, randomizes its start as the program
        says, ramps over the dispatch's ramp); the setpoint at the start confirms or replaces
        it. A withdrawn dispatch's controls are cancelled."""
        if self._endpoint.load is not None:
            return  # a load's EndDeviceControl comes with its setpoint
        if notice.withdrawn:
            self._windows.pop(notice.command_id, None)
            self._site_envelopes.pop(notice.command_id, None)
            self._server.withdraw(self._device_id, notice.command_id)
            return
        if notice.kind == "envelope":  # its limits come per interval: only where they go
            self._windows[notice.command_id] = (None, notice.group_id)
            if self._endpoint.power_from == "site" and notice.devices == 1 and notice.intervals:
                self._site_envelopes[notice.command_id] = notice.intervals
                while len(self._site_envelopes) > _MAX_WINDOWS:
                    del self._site_envelopes[next(iter(self._site_envelopes))]
        else:
            self._windows[notice.command_id] = (int(notice.end.timestamp()), notice.group_id)
        while len(self._windows) > _MAX_WINDOWS:
            del self._windows[next(iter(self._windows))]
        if notice.kind == "envelope":
            return
        try:
            snap = self._server.snapshot(self._device_id)
            power_kw = self._checked_kw(notice.expected_kw, snap.capability)
            base = self.control_base(power_kw, snap)
        except AdapterError as exc:  # no nameplate yet: it is told at the start instead
            log.info(
                "2030.5 %s: dispatch %s not scheduled ahead: %s",
                self._device_id,
                notice.command_id,
                exc,
            )
            return
        if notice.ramp_s > 0:
            base = base.model_copy(update={"ramp_tms": min(65_535, round(notice.ramp_s * 100))})
        self._server.schedule(
            self._device_id,
            base,
            start=int(notice.start.timestamp()),
            end=int(notice.end.timestamp()),
            power_kw=power_kw,
            provenance=(LimitSource(command_id=notice.command_id, kind="dispatch"),),
            description=f"dispatch {power_kw:+.3f} kW",
            group_id=notice.group_id,
        )

    async def apply(self, command: DeviceCommand) -> None:
        """Publish the setpoint as this device's DERControl, or cancel it for ``None``."""
        if command.device_id != self._device_id:
            raise UnsafeCommand(self._device_id, f"command is for {command.device_id}")
        if self._endpoint.load is not None:
            self._apply_load(command)
            return
        switch = {"op_mod_connect": command.connect, "op_mod_energize": command.energize}
        if command.power_kw is None:
            if command.connect is False or command.energize is False:
                # Disconnect / cease to energize (CSIP-AUS ALL-11/12): the on/off control alone;
                # the limits the planner adds (0 both ways) are for devices that cannot switch.
                source = command.provenance[0].command_id if command.provenance else ""
                self._server.publish(
                    self._device_id,
                    DERControlBase(
                        op_mod_connect=command.connect, op_mod_energize=command.energize
                    ),
                    power_kw=None,
                    provenance=command.provenance,
                    description="disconnect" if command.connect is False else "de-energize",
                    group_id=self._windows.get(source, (None, None))[1],
                )
                return
            if (
                command.import_limit_kw is None
                and command.export_limit_kw is None
                and command.connect is None
                and command.energize is None
            ):
                self._server.release(self._device_id)
                return
            # Autonomous within limits: the device keeps its own mode, capped both ways. A
            # client that stands for a whole site (it mirrors site power) gets the CSIP-AUS site
            # limits at the connection point; a single DER gets its generation / load limits.
            try:
                export_w = (
                    None
                    if command.export_limit_kw is None
                    else from_watts(command.export_limit_kw * 1000)
                )
                import_w = (
                    None
                    if command.import_limit_kw is None
                    else from_watts(command.import_limit_kw * 1000)
                )
                if self._endpoint.power_from == "site":
                    base = DERControlBase(op_mod_exp_lim_w=export_w, op_mod_imp_lim_w=import_w)
                else:
                    base = DERControlBase(op_mod_gen_lim_w=export_w, op_mod_load_lim_w=import_w)
                base = base.model_copy(update=switch)
            except InvalidValue as exc:
                raise UnsafeCommand(self._device_id, str(exc)) from exc
            source = command.provenance[0].command_id if command.provenance else ""
            self._server.publish(
                self._device_id,
                base,
                power_kw=None,
                provenance=command.provenance,
                description=_limits_text(command),
                group_id=self._windows.get(source, (None, None))[1],
            )
            return
        snap = self._server.snapshot(self._device_id)
        power_kw = self._checked_kw(command.power_kw, snap.capability)
        base = self.control_base(power_kw, snap)
        command_id = command.provenance[0].command_id if command.provenance else None
        until, group_id = self._windows.get(command_id or "", (None, None))
        provenance = command.provenance
        if command.connect is not None or command.energize is not None:
            base = base.model_copy(update=switch)
        # A site's envelope in force with the setpoint: one control carries both (CSIP-AUS:
        # a storage target with the site's export / import limit), the client applies both.
        import_kw, export_kw, sources = self._site_limits(datetime.now(UTC))
        if sources:
            try:
                imp_w = None if import_kw is None else from_watts(import_kw * 1e3)
                exp_w = None if export_kw is None else from_watts(export_kw * 1e3)
                limits = {"op_mod_imp_lim_w": imp_w, "op_mod_exp_lim_w": exp_w}
                base = base.model_copy(update=limits)
            except InvalidValue as exc:
                raise UnsafeCommand(self._device_id, str(exc)) from exc
            provenance += tuple(s for s in sources if s not in provenance)
        self._server.publish(
            self._device_id,
            base,
            power_kw=power_kw,
            provenance=provenance,
            description=f"setpoint {power_kw:+.3f} kW",
            until=until,
            group_id=group_id,
        )

    def _apply_load(self, command: DeviceCommand) -> None:
        """A thermal load, whose setpoint is (as for every thermal load, ``gateway.dispatch``)
        a change from its own baseline: shedding ``-power_kw`` of its ``rated_kw`` is a cap on
        the share of time it may run, 100 x (1 - shed / rated_kw) % (cycling, as utilities'
        load-control programs run it), an EndDeviceControl's DutyCycle. An import limit (an
        envelope, absolute) caps it at 100 x limit / rated_kw %; a disconnect or cease to
        energize at 0 %. Caps are rounded down (never more than asked). No setpoint and no
        limit releases it; a load-up (a positive change) cannot be asked of it by duty cycle
        and is refused, so the dispatch is re-allocated."""
        rated = self._endpoint.rated_kw
        assert rated is not None
        if command.connect is False or command.energize is False:
            share: float | None = 0.0
        elif command.power_kw is not None:
            if not math.isfinite(command.power_kw):
                raise UnsafeCommand(self._device_id, f"setpoint {command.power_kw} kW")
            if command.power_kw > RATING_TOLERANCE * rated:
                raise DeviceRejected(
                    self._device_id,
                    f"a 2030.5 load cannot be loaded up ({command.power_kw:+.3f} kW): "
                    "a duty cycle only caps it",
                )
            share = 1.0 - min(rated, max(0.0, -command.power_kw)) / rated
        elif command.import_limit_kw is not None:
            share = min(1.0, command.import_limit_kw / rated)
        else:
            share = None
        if share is None or share >= 1.0 - 1e-9:
            self._server.release_load_control(self._device_id)  # nothing to cap
            return
        duty = max(0, min(100, math.floor(100 * share + 1e-9)))
        self._server.publish_load_control(
            self._device_id,
            duty,
            provenance=command.provenance,
            description=f"duty cycle at most {duty} %",
        )

    def _site_limits(
        self, now: datetime
    ) -> tuple[float | None, float | None, tuple[LimitSource, ...]]:
        """The tightest site import / export limits of this site's envelopes in force now."""
        import_kw = export_kw = None
        sources: list[LimitSource] = []
        for command_id, intervals in self._site_envelopes.items():
            interval = next((i for i in intervals if i.start <= now < i.end), None)
            if interval is None:
                continue
            import_kw = _tighter(import_kw, interval.import_limit_kw)
            export_kw = _tighter(export_kw, interval.export_limit_kw)
            sources.append(LimitSource(command_id=command_id, kind="envelope"))
        return import_kw, export_kw, tuple(sources)


def _tighter(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _limits_text(command: DeviceCommand) -> str:
    parts = []
    if command.export_limit_kw is not None:
        parts.append(f"export<={command.export_limit_kw:g} kW")
    if command.import_limit_kw is not None:
        parts.append(f"import<={command.import_limit_kw:g} kW")
    if command.connect is not None:
        parts.append("connect" if command.connect else "disconnect")
    if command.energize is not None:
        parts.append("energize" if command.energize else "de-energize")
    return "limits " + " ".join(parts)


def refusals_to(
    report_refusal: Callable[[DeviceCommand, AdapterError], None],
) -> Callable[[Sep2ResponseRecord], None]:
    """The server's response listener: a client's Response to a control carrying our commands.

    Rejections (252 cannot be met, 253 invalid, 254 rejected by the user) are refusals, handed
    to ``report_refusal`` (the core's): the commands behind the control are re-allocated around
    the device (a setpoint fails), the same way a Modbus exception or an OpenADR opt-out is
    handled. The other states (received, started, completed, superseded) confirm what the
    planner already knows and are logged.
    """

    def on_response(record: Sep2ResponseRecord) -> None:
        if 252 <= record.status <= 254:
            log.warning(
                "device %s refused control %s: %s (%d)",
                record.device_id,
                record.control_mrid,
                record.status_name,
                record.status,
            )
            command = DeviceCommand(
                device_id=record.device_id,
                power_kw=record.power_kw,
                provenance=record.provenance,
            )
            report_refusal(
                command,
                DeviceRejected(
                    record.device_id,
                    f"2030.5 Response {record.status} ({record.status_name})",
                    code=record.status,
                ),
            )
        else:
            log.debug(
                "device %s: control %s %s",
                record.device_id,
                record.control_mrid,
                record.status_name,
            )

    return on_response
