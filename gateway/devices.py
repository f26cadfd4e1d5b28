"""The one interface every device adapter implements, and the errors it may raise.

An adapter joins a protocol codec to a transport for one device. It does no scheduling, retrying
or availability bookkeeping: :class:`gateway.supervisor.DeviceSupervisor` does that once for all
adapters, so every device family gets the same backoff and the same log discipline.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, runtime_checkable

from unified.model import Device, DeviceCommand, DeviceState, EnvelopeInterval


class AdapterError(Exception):
    """Base class for errors an adapter raises; carries the device it concerns."""

    def __init__(self, device_id: str, message: str) -> None:
        super().__init__(f"{device_id}: {message}")
        self.device_id = device_id


class DeviceUnavailable(AdapterError):
    """The device cannot be reached (connection refused or lost, timeout)."""


class DeviceProtocolError(AdapterError):
    """The device answered, but not as its protocol says (bad map, bad values)."""


class DeviceRejected(AdapterError):
    """The device refused a request, e.g. with a Modbus exception code."""

    def __init__(self, device_id: str, message: str, *, code: int | None = None) -> None:
        super().__init__(device_id, message)
        self.code = code


class UnsafeCommand(AdapterError):
    """The adapter refused to forward a command outside the device's own limits."""


@runtime_checkable
class DeviceAdapter(Protocol):
    """One device reached through one protocol."""

    @property
    def device_id(self) -> str: ...

    async def connect(self) -> None:
        """Open the transport and discover the device; raises :class:`AdapterError`."""

    async def close(self) -> None:
        """Release the transport. Safe to call more than once."""

    async def read(self) -> DeviceState:
        """Poll the device once."""

    async def apply(self, command: DeviceCommand) -> None:
        """Write one setpoint (or release control when ``power_kw`` is None)."""


# --------------------------------------------------------------------------- abilities


@runtime_checkable
class ReportsOnItsOwnSchedule(Protocol):
    """A device that reports when it chooses, more slowly than the gateway polls (a 2030.5
    client posts every minute or five; MQTT devices push): its readings stay fresh this long."""

    @property
    def stale_after_s(self) -> float: ...


@runtime_checkable
class CommandsLapse(Protocol):
    """Every command it is given carries a hold time and lapses by itself (MQTT thermostats and
    water heaters), so a (re)connect needs no release: the supervisor writes only when there is
    something to ask."""

    @property
    def hold_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class DispatchNotice:
    """A dispatch a device may be called for, told when it is accepted (ahead of its start).

    ``expected_kw`` is a provisional share (pro rata of rating over the dispatch's devices);
    the setpoint itself comes at the start as for every device. ``withdrawn``: the dispatch
    is over, cancelled or superseded.
    """

    command_id: str
    start: datetime
    end: datetime
    expected_kw: float
    withdrawn: bool = False
    ramp_s: float = 0.0
    """The dispatch's linear ramp from its start."""
    group_id: str | None = None
    """The group the dispatch addresses (None: a list of devices)."""
    kind: Literal["dispatch", "envelope"] = "dispatch"
    """An envelope's notice says only which group and window it concerns (``expected_kw`` 0):
    its limits come per interval, as setpoints do."""
    intervals: tuple[EnvelopeInterval, ...] = ()
    """An envelope's intervals: a device that stands for the whole target on its own (a
    2030.5 client for a site) carries them as its connection-point limits."""
    devices: int = 0
    """How many devices the command addresses."""


@runtime_checkable
class TakesNotice(Protocol):
    """A device that needs notice of a dispatch before it starts: an OEM cloud pre-cools and
    tells its customers (OpenADR's ``far`` / ``near`` events). Must return at once."""

    def notice(self, notice: DispatchNotice) -> None: ...


# --------------------------------------------------------------------------- enrolment


@runtime_checkable
class Retires(Protocol):
    """It holds something for its device beyond the connection (a subscription on a shared
    link): told once when its device is retired, after its last release."""

    def retire(self) -> None: ...


@runtime_checkable
class Regroups(Protocol):
    """It serves its device's topology groups to the device (a 2030.5 server's programs per
    group): told the device's groups whenever the registry gives it a new record."""

    def regroup(self, groups: tuple[str, ...]) -> None: ...


@runtime_checkable
class Registrar(Protocol):
    """What an endpoint that enrols devices needs from the core (the OCPP central, the OpenADR
    VTN): a device discovered at run time, and a refusal reported after a setpoint was handed
    over (an opt-out, a rejected profile)."""

    def add_device(self, device: Device, adapter: DeviceAdapter) -> None: ...

    def report_refusal(self, command: DeviceCommand, error: AdapterError) -> None: ...
