"""What every SunSpec adapter shares: the endpoint, map discovery, reads, writes, errors.

Each adapter (battery, PV inverter, site meter) learns a different set of models at connect, but
they find the map, read a model window and translate transport and codec errors the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Final, Generic, Protocol, TypeVar

from pydantic import Field

from gateway.devices import DeviceProtocolError, DeviceRejected, DeviceUnavailable, UnsafeCommand
from protocols.modbus import (
    ModbusExceptionResponse,
    ModbusTcpTransport,
    ModbusTransportError,
    RegisterTransport,
)
from protocols.sunspec import (
    BASE_ADDRESSES,
    MapNotFound,
    MapTruncated,
    ModelDef,
    ModelLocation,
    PointValue,
    SunSpecError,
    SunSpecMap,
    ValueOutOfRange,
    encode_points,
    parse_model_chain,
)
from unified.model import Frozen

__all__ = ["SunSpecConnection", "SunSpecEndpoint", "positive"]


class Discovered(Protocol):
    """What an adapter learns of its device at connect: at least the map."""

    @property
    def layout(self) -> SunSpecMap: ...


_D = TypeVar("_D", bound=Discovered)
_ILLEGAL_ADDRESS: Final = 2
_ILLEGAL_VALUE: Final = 3


class SunSpecEndpoint(Frozen):
    """Where a SunSpec device is and how to talk to it."""

    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    unit_id: int = Field(default=1, ge=1, le=247)
    timeout_s: float = Field(default=2.0, gt=0, le=60)
    base_address: int | None = Field(
        default=None, ge=0, le=65535, description="None: look at 40000, then 0, then 50000"
    )
    setpoint_revert_s: int = Field(
        default=300,
        ge=1,
        le=86_400,
        description="704 WSetRvrtTms: the battery idles if no setpoint arrives for this long",
    )


class SunSpecConnection(Generic[_D]):
    """One SunSpec device over one register transport (a base for the adapters); ``_D`` is
    what each adapter learns at connect."""

    def __init__(
        self,
        device_id: str,
        endpoint: SunSpecEndpoint,
        *,
        transport: RegisterTransport | None = None,
    ) -> None:
        self._device_id = device_id
        self._endpoint = endpoint
        self._transport: RegisterTransport = transport or ModbusTcpTransport(
            endpoint.host,
            endpoint.port,
            device_id=endpoint.unit_id,
            timeout_s=endpoint.timeout_s,
        )
        self._found: _D | None = None

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def source(self) -> str:
        ep = self._endpoint
        return f"sunspec:{ep.host}:{ep.port}/{ep.unit_id}"

    @property
    def layout(self) -> SunSpecMap | None:
        """The discovered map (None before connect)."""
        return None if self._found is None else self._found.layout

    def _require(self) -> _D:
        if self._found is None:
            raise DeviceUnavailable(self._device_id, "not connected")
        return self._found

    async def _open(self, discover: Callable[[], Awaitable[_D]]) -> _D:
        """Open the transport and learn the device (``discover``); closed again if that fails."""
        with self._translate("connect"):
            await self._transport.connect()
        try:
            with self._translate("discover"):
                return await discover()
        except BaseException:
            await self._transport.close()
            raise

    # ----------------------------------------------------------------------- error mapping

    @contextmanager
    def _translate(self, doing: str) -> Iterator[None]:
        """The one place transport and codec errors become adapter errors."""
        try:
            yield
        except ModbusExceptionResponse as exc:
            raise DeviceRejected(
                self._device_id, f"{doing}: {exc}", code=exc.exception_code
            ) from exc
        except ModbusTransportError as exc:
            # Timeouts, refused or lost connections, garbled answers: the device is not usable
            # right now; the supervisor reconnects.
            raise DeviceUnavailable(self._device_id, f"{doing}: {exc}") from exc
        except SunSpecError as exc:
            raise DeviceProtocolError(self._device_id, f"{doing}: {exc}") from exc

    async def _read(self, address: int, count: int) -> list[int]:
        return await self._transport.read_holding(address, count)

    async def _read_model(
        self, location: ModelLocation, model_def: ModelDef, *names: str
    ) -> tuple[list[int], int]:
        """Registers covering ``names`` (all of the model if none), and their model offset."""
        if names:
            offset, count = model_def.span(*names)
        else:
            offset, count = 0, min(location.size, model_def.size)
        if offset + count > location.size:
            raise DeviceProtocolError(
                self._device_id,
                f"model {location.model_id} is {location.length} registers long, "
                f"too short for its definition",
            )
        return await self._read(location.address + offset, count), offset

    async def _find_map(self) -> SunSpecMap:
        bases = (
            (self._endpoint.base_address,)
            if self._endpoint.base_address is not None
            else BASE_ADDRESSES
        )
        for base in bases:
            image: dict[int, int] = {}
            while True:
                try:
                    return parse_model_chain(image, base)
                except MapNotFound:
                    break
                except MapTruncated as need:
                    try:
                        regs = await self._read(need.address, need.count)
                    except ModbusExceptionResponse as exc:
                        if exc.exception_code not in {_ILLEGAL_ADDRESS, _ILLEGAL_VALUE}:
                            raise
                        if need.address == base:
                            break  # nothing mapped at this base: try the next one
                        if need.count > 1:
                            # Some devices omit the end marker's length register.
                            regs = await self._read(need.address, 1)
                        else:
                            raise
                    addresses = range(need.address, need.address + len(regs))
                    image.update(zip(addresses, regs, strict=True))
        raise MapNotFound(bases[-1])

    async def _write_points(
        self,
        location: ModelLocation,
        model_def: ModelDef,
        values: Mapping[str, PointValue | None],
        sfs: Mapping[str, int | None],
    ) -> None:
        try:
            runs = encode_points(model_def, values, sfs)
        except ValueOutOfRange as exc:
            raise UnsafeCommand(self._device_id, str(exc)) from exc
        with self._translate("apply"):
            for offset, regs in runs:
                await self._transport.write_registers(location.address + offset, regs)


def positive(*candidates: PointValue | None) -> float | None:
    """The first candidate that is a positive number (a rating a device really reports)."""
    for value in candidates:
        if isinstance(value, int | float) and value > 0:
            return float(value)
    return None
