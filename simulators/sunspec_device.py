"""What every simulated SunSpec device shares: a register image behind a real Modbus/TCP server.

The image is laid out by :func:`protocols.sunspec.build_map` from ``(model id, values)`` pairs.
Requests reach pymodbus 3.16's ``SimDevice`` ``action`` hook, which refreshes the requested window
from the image (the source of truth, updated by the subclass's physics), validates writes point by
point against the SunSpec definitions (read-only or partial point → exception 2, bad value → 3,
nothing changed), and injects latency, exceptions or refusals. Other unit ids get exception 4.

A subclass supplies the physics (:meth:`SunSpecDeviceSimulator._step`), extra write checks
(:meth:`SunSpecDeviceSimulator._check`) and what a control write starts
(:meth:`SunSpecDeviceSimulator._written`): the battery, PV inverter and site meter simulators.

Server side uses the pymodbus 3.16 ``SimDevice``/``SimData`` API (the old datastore classes are
deprecated). It holds the registers, but validation and dynamic values need more than static data,
so the device's ``action`` hook does the work: on every request it refreshes the requested window
from our own image (the source of truth, updated by the physics task), validates writes point by
point against the SunSpec definitions (read-only point → exception 2, bad value → exception 3,
nothing changed), and injects latency or exceptions. No private pymodbus classes are subclassed.

Requests to other unit ids, within the map's address span, are answered by a catch-all device
(id 0 in pymodbus's terms) with exception 4, as PROTOCOLS.md describes; without it pymodbus would
answer 4 too, but only after logging a traceback for its internal ``KeyError``. Outside the span
pymodbus answers exception 2 (illegal address) for any unit id.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Final, Self

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from protocols.sunspec import (
    ModelDef,
    ModelLocation,
    PointDef,
    PointValue,
    SunSpecError,
    build_map,
    decode_model,
    decode_point,
    decode_scale_factors,
    encode_points,
    load_model_def,
    not_implemented,
    unscale,
)

__all__ = ["SunSpecDeviceSimulator", "fit_sf"]

_READ_FCS: Final = frozenset({3})
_WRITE_FCS: Final = frozenset({6, 16, 23})


def fit_sf(max_abs: float, limit: int, base: int) -> int:
    """Smallest scale factor ≥ ``base`` at which ``max_abs`` still fits in ``limit``."""
    sf = base
    while abs(unscale(max_abs, sf)) > limit:
        sf += 1
    return sf


class SunSpecDeviceSimulator:
    """A SunSpec register image served over Modbus/TCP, with fault injection."""

    def __init__(
        self,
        models: Sequence[tuple[int, Mapping[str, PointValue | None]]],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        unit_id: int = 1,
        base_address: int = 40000,
        step_s: float = 0.2,
    ) -> None:
        if not 1 <= unit_id <= 247:
            raise ValueError("unit_id must be 1..247")
        if step_s <= 0:
            raise ValueError("step_s must be positive")
        self.host = host
        self.port = port
        self.unit_id = unit_id
        self.step_s = step_s
        self.base_address = base_address
        #: Delay added before answering each request (fault injection).
        self.latency_s = 0.0
        #: Write requests received (accepted or not).
        self.write_count = 0
        #: Write requests refused with a Modbus exception.
        self.rejected_write_count = 0
        #: Answer every write with this exception code (local mode); None: writes handled.
        self.reject_writes: int | None = None
        self._pending_exceptions: list[ExcCodes] = []
        self._offline = False
        self._server: ModbusTcpServer | None = None
        self._physics: asyncio.Task[None] | None = None
        self._last_step: float | None = None

        self.model_ids = tuple(m for m, _ in models)
        self._defs: dict[int, ModelDef] = {m: load_model_def(m) for m in self.model_ids}
        image = build_map([(self._defs[m], v) for m, v in models], base_address=base_address)
        self._image: list[int] = list(image.registers)
        self._where: dict[int, ModelLocation] = {m.model_id: m for m in image.layout.models}
        self._sfs: dict[int, dict[str, int | None]] = {
            m: decode_scale_factors(self._defs[m], self._model_regs(m)) for m in self.model_ids
        }

    # ----------------------------------------------------------------------- image

    def _model_regs(self, model_id: int) -> list[int]:
        where = self._where[model_id]
        start = where.address - self.base_address
        return self._image[start : start + where.size]

    def values(self, model_id: int) -> dict[str, PointValue | None]:
        """Every point of one model as a client would decode it now."""
        return decode_model(self._defs[model_id], self._model_regs(model_id))

    def _set(self, model_id: int, values: Mapping[str, PointValue | None]) -> None:
        start = self._where[model_id].address - self.base_address
        for offset, regs in encode_points(self._defs[model_id], values, self._sfs[model_id]):
            self._image[start + offset : start + offset + len(regs)] = regs

    def read_registers(self, address: int, count: int) -> list[int]:
        """A snapshot of ``count`` registers at ``address`` (what a client would read now)."""
        start = address - self.base_address
        if start < 0 or count < 0 or start + count > len(self._image):
            raise ValueError(f"{count} registers at {address} are outside the map")
        return self._image[start : start + count]

    def address_of(self, model_id: int, point: str) -> int:
        return self._where[model_id].address + self._defs[model_id].point(point).offset

    def unimplement(self, model_id: int, *points: str) -> None:
        """Show ``points`` as "not implemented" (a device variant that lacks them)."""
        model_def = self._defs[model_id]
        start = self._where[model_id].address - self.base_address
        for name in points:
            point = model_def.point(name)
            self._image[start + point.offset : start + point.end] = not_implemented(point)
            if point.type == "sunssf":
                self._sfs[model_id][name] = None

    def inject_exception(self, code: int, count: int = 1) -> None:
        """Answer the next ``count`` requests with Modbus exception ``code``."""
        self._pending_exceptions.extend([ExcCodes(code)] * count)

    # ----------------------------------------------------------------------- subclass hooks

    def _step(self, now: float, dt: float) -> None:
        """Advance the physics by ``dt`` seconds (loop time ``now``) and refresh the image."""

    def _check(
        self, model_id: int, values: Mapping[str, PointValue | None], names: set[str]
    ) -> bool:
        """Extra validation of a write touching ``names`` of ``model_id`` (decoded ``values``)."""
        return True

    def _written(self, model_id: int, now: float) -> None:
        """A write to ``model_id`` was accepted at loop time ``now``."""

    def _advance(self) -> None:
        now = asyncio.get_running_loop().time()
        dt = 0.0 if self._last_step is None else now - self._last_step
        self._last_step = now
        self._step(now, dt)

    async def _run_physics(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            self._advance()

    # ----------------------------------------------------------------------- Modbus side

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        writing = set_values is not None and function_code in _WRITE_FCS
        if writing:
            self.write_count += 1
        if self._pending_exceptions:
            if writing:
                self.rejected_write_count += 1
            return self._pending_exceptions.pop(0)
        if writing and self.reject_writes is not None:
            self.rejected_write_count += 1
            return ExcCodes(self.reject_writes)
        if function_code not in _READ_FCS | _WRITE_FCS:
            return ExcCodes.ILLEGAL_FUNCTION
        if writing:
            code = self._write(address, [int(v) for v in set_values or ()])
            if code is not None:
                self.rejected_write_count += 1
            return code
        base = address - start_address
        registers[base : base + count] = self.read_registers(address, count)
        return None

    def _write(self, address: int, values: list[int]) -> ExcCodes | None:
        """Validate and apply one write; on any refusal nothing changes."""
        end = address + len(values)
        where = next((m for m in self._where.values() if m.address <= address < m.end), None)
        if where is None or end > where.end:
            return ExcCodes.ILLEGAL_ADDRESS
        model_def = self._defs[where.model_id]
        rel, rel_end = address - where.address, end - where.address
        touched = [p for p in model_def.points.values() if p.offset < rel_end and p.end > rel]
        if any(not p.writable or p.offset < rel or p.end > rel_end for p in touched):
            return ExcCodes.ILLEGAL_ADDRESS
        block = self._model_regs(where.model_id)
        block[rel:rel_end] = values
        if not self._valid(model_def, block, touched):
            return ExcCodes.ILLEGAL_VALUE
        start = where.address - self.base_address
        self._image[start : start + where.size] = block
        self._written(where.model_id, asyncio.get_running_loop().time())
        self._advance()
        return None

    def _valid(self, model_def: ModelDef, block: list[int], touched: list[PointDef]) -> bool:
        try:
            values = decode_model(model_def, block, sfs=self._sfs[model_def.model_id])
        except SunSpecError:
            return False
        for point in touched:
            if point.type == "string":
                continue
            if values.get(point.name) is None:
                return False  # "not implemented" is not a setting
            raw = decode_point(point, block[point.offset : point.end])
            if (
                point.type.startswith("enum")
                and point.symbols
                and raw not in point.symbols.values()
            ):
                return False
        return self._check(model_def.model_id, values, {p.name for p in touched})

    async def _reject_unknown_unit(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        return ExcCodes.DEVICE_FAILURE

    def _devices(self) -> list[SimDevice]:
        def span() -> SimData:
            return SimData(
                address=self.base_address,
                count=len(self._image),
                values=0,
                datatype=DataType.REGISTERS,
            )

        return [
            SimDevice(id=self.unit_id, simdata=span(), action=self._action),
            SimDevice(id=0, simdata=span(), action=self._reject_unknown_unit),
        ]

    async def _listen(self) -> None:
        server = ModbusTcpServer(self._devices(), address=(self.host, self.port))
        await server.serve_forever(background=True)
        self._server = server
        sockets = getattr(server.transport, "sockets", None) or ()
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()

    # ----------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Listen (``port`` is the bound port afterwards) and start the physics task."""
        if self._physics is not None:
            return
        self._advance()
        await self._listen()
        self._physics = asyncio.create_task(self._run_physics(), name=f"sunspec-sim-{self.port}")

    async def stop(self) -> None:
        task, self._physics = self._physics, None
        try:
            await self._unlisten()
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def set_offline(self, offline: bool) -> None:
        """Drop off the network, or come back on the same port; physics keeps running."""
        if offline == self._offline:
            return
        self._offline = offline
        if offline:
            await self._unlisten()
        elif self._physics is not None:
            await self._listen()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
