"""A thin async holding-register transport, and its pymodbus implementation.

Adapters depend on :class:`RegisterTransport` only, so pymodbus (whose API changes in most minor
releases) stays behind this one file, and tests can plug in an in-memory register bank.

Retrying is deliberately absent: pymodbus runs with ``retries=0`` and no background reconnect, so
the device supervisor is the single place that decides when to try again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, runtime_checkable

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

__all__ = [
    "MAX_READ_COUNT",
    "MAX_WRITE_COUNT",
    "ModbusConnectionError",
    "ModbusExceptionResponse",
    "ModbusTcpTransport",
    "ModbusTimeout",
    "ModbusTransportError",
    "RegisterTransport",
]

#: Largest read (function 3) and write (function 16) a Modbus PDU can carry.
MAX_READ_COUNT: Final = 125
MAX_WRITE_COUNT: Final = 123

# Extra time our own asyncio.timeout allows beyond pymodbus's timeout: pymodbus should report the
# timeout first; ours is the backstop that guarantees the call returns.
_BACKSTOP_S: Final = 0.25


# The names follow the Modbus vocabulary ("exception response"); an Error suffix adds nothing.
class ModbusTransportError(Exception):
    """Base of every transport error; says which endpoint and operation failed."""

    def __init__(self, endpoint: str, operation: str, message: str) -> None:
        super().__init__(f"{endpoint} {operation}: {message}")
        self.endpoint = endpoint
        self.operation = operation


class ModbusTimeout(ModbusTransportError):
    """No (matching) response in time. The connection is closed: its state is unknown."""

    def __init__(self, endpoint: str, operation: str, timeout_s: float) -> None:
        super().__init__(endpoint, operation, f"no response within {timeout_s:g} s")
        self.timeout_s = timeout_s


class ModbusConnectionError(ModbusTransportError):
    """Not connected, connection refused, or connection lost."""


class ModbusExceptionResponse(ModbusTransportError):
    """The device answered with a Modbus exception (e.g. 2 illegal address, 3 illegal value)."""

    def __init__(
        self, endpoint: str, operation: str, *, function_code: int, exception_code: int
    ) -> None:
        super().__init__(
            endpoint,
            operation,
            f"exception response {exception_code} to function {function_code}",
        )
        self.function_code = function_code
        self.exception_code = exception_code


class _ConnectionLostError(Exception):
    """Internal: the connection dropped while a request was outstanding."""


@runtime_checkable
class RegisterTransport(Protocol):
    """Holding registers of one Modbus device (one unit id behind one endpoint)."""

    @property
    def endpoint(self) -> str:
        """Human-readable ``host:port/unit`` used in errors and reading sources."""

    async def connect(self) -> None:
        """Open the connection; raises :class:`ModbusTransportError`."""

    async def close(self) -> None:
        """Close the connection. Safe to call more than once."""

    async def read_holding(self, address: int, count: int) -> list[int]:
        """Read ``count`` holding registers (split into several requests if needed)."""

    async def write_registers(self, address: int, values: Sequence[int]) -> None:
        """Write a contiguous block in one request (function 16)."""


class ModbusTcpTransport:
    """:class:`RegisterTransport` over Modbus/TCP with pymodbus 3.16."""

    def __init__(self, host: str, port: int, *, device_id: int = 1, timeout_s: float = 2.0) -> None:
        if not 0 <= device_id <= 255:
            raise ValueError(f"device_id {device_id} outside 0..255")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._host = host
        self._port = port
        self._device_id = device_id
        self._timeout_s = timeout_s
        self._client: AsyncModbusTcpClient | None = None
        self._lost = asyncio.Event()

    @property
    def endpoint(self) -> str:
        return f"{self._host}:{self._port}/{self._device_id}"

    @property
    def connected(self) -> bool:
        return self._client is not None and bool(self._client.connected)

    async def connect(self) -> None:
        if self.connected:
            return
        await self.close()
        lost = self._lost = asyncio.Event()  # one per connection: a stale one must not fire

        def trace_connect(up: bool) -> None:
            if not up:
                lost.set()

        client = AsyncModbusTcpClient(
            self._host,
            port=self._port,
            trace_connect=trace_connect,
            timeout=self._timeout_s,
            retries=0,
            reconnect_delay=0,  # no background reconnect task: the supervisor owns retrying
            name=f"sunspec-{self.endpoint}",
        )
        try:
            async with asyncio.timeout(self._timeout_s + _BACKSTOP_S):
                ok = await client.connect()
        except TimeoutError:
            client.close()
            raise ModbusTimeout(self.endpoint, "connect", self._timeout_s) from None
        except OSError as exc:
            client.close()
            raise ModbusConnectionError(self.endpoint, "connect", str(exc)) from exc
        if not ok:
            client.close()
            raise ModbusConnectionError(self.endpoint, "connect", "connection refused or failed")
        self._client = client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def read_holding(self, address: int, count: int) -> list[int]:
        if count < 1 or address < 0 or address + count > 0x10000:
            raise ValueError(f"cannot read {count} registers at {address}")
        out: list[int] = []
        for start in range(address, address + count, MAX_READ_COUNT):
            chunk = min(MAX_READ_COUNT, address + count - start)
            registers = await self._call(f"read {chunk}@{start}", self._reader(start, chunk))
            if len(registers) != chunk:
                # A short answer would shift every later point: treat as a broken connection.
                await self.close()
                raise ModbusConnectionError(
                    self.endpoint, f"read {chunk}@{start}", f"got {len(registers)} registers"
                )
            out.extend(registers)
        return out

    async def write_registers(self, address: int, values: Sequence[int]) -> None:
        count = len(values)
        if not 1 <= count <= MAX_WRITE_COUNT:
            # Splitting a write would break the atomicity callers rely on: refuse instead.
            raise ValueError(f"write of {count} registers (1..{MAX_WRITE_COUNT} allowed)")
        if any(not 0 <= v <= 0xFFFF for v in values):
            raise ValueError("register values must be 0..65535")
        regs = list(values)
        await self._call(
            f"write {count}@{address}",
            lambda c: c.write_registers(address, regs, device_id=self._device_id),
        )

    def _reader(self, address: int, count: int) -> Callable[[AsyncModbusTcpClient], Awaitable[Any]]:
        def request(client: AsyncModbusTcpClient) -> Awaitable[Any]:
            return client.read_holding_registers(address, count=count, device_id=self._device_id)

        return request

    @staticmethod
    async def _unless_lost(request: Awaitable[Any], lost: asyncio.Event) -> Any:
        """Await ``request``, but give up as soon as the connection drops.

        pymodbus leaves a request waiting for its full timeout when the peer closes the
        connection; a device that went away should be reported at once, not after the timeout.
        """
        request_task = asyncio.ensure_future(request)
        lost_task = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({request_task, lost_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost_task.cancel()
            if not request_task.done():
                request_task.cancel()
        if not request_task.done() or request_task.cancelled():
            raise _ConnectionLostError
        return request_task.result()

    async def _call(
        self, operation: str, request: Callable[[AsyncModbusTcpClient], Awaitable[Any]]
    ) -> list[int]:
        """Run one request; the one place pymodbus outcomes become our exceptions."""
        client = self._client
        if client is None or not client.connected:
            raise ModbusConnectionError(self.endpoint, operation, "not connected")
        lost = self._lost
        try:
            async with asyncio.timeout(self._timeout_s + _BACKSTOP_S):
                response = await self._unless_lost(request(client), lost)
        except _ConnectionLostError:
            await self.close()
            raise ModbusConnectionError(self.endpoint, operation, "connection lost") from None
        except (TimeoutError, ModbusIOException):
            # pymodbus raises ModbusIOException when no matching response came in time. A late
            # answer could still arrive and be taken for the next request's: start afresh.
            await self.close()
            raise ModbusTimeout(self.endpoint, operation, self._timeout_s) from None
        except (ConnectionException, OSError) as exc:
            await self.close()
            raise ModbusConnectionError(self.endpoint, operation, str(exc)) from exc
        except ModbusException as exc:
            await self.close()
            raise ModbusTransportError(self.endpoint, operation, str(exc)) from exc
        if response.isError():
            raise ModbusExceptionResponse(
                self.endpoint,
                operation,
                function_code=int(response.function_code) & 0x7F,
                exception_code=int(getattr(response, "exception_code", 0)),
            )
        registers = getattr(response, "registers", None)
        return [int(r) for r in registers] if registers is not None else []
