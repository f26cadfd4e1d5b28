"""Modbus register transport: a small async interface and its pymodbus implementation."""

from protocols.modbus.transport import (
    MAX_READ_COUNT,
    MAX_WRITE_COUNT,
    ModbusConnectionError,
    ModbusExceptionResponse,
    ModbusTcpTransport,
    ModbusTimeout,
    ModbusTransportError,
    RegisterTransport,
)

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
