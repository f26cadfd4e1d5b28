"""The one interface every device adapter implements, and the errors it may raise.

An adapter joins a protocol codec to a transport for one device. It does no scheduling, retrying
or availability bookkeeping: :class:`gateway.supervisor.DeviceSupervisor` does that once for all
adapters, so every device family gets the same backoff and the same log discipline.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from unified.model import DeviceCommand, DeviceState


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
