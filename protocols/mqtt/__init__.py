"""MQTT topic scheme and payload codec for the Grid DERMS interface (pure, no I/O)."""

from protocols.mqtt.northbound import (
    MAX_COMMAND_BYTES,
    CommandDecodeError,
    Topics,
    decode_command,
    encode,
)

__all__ = ["MAX_COMMAND_BYTES", "CommandDecodeError", "Topics", "decode_command", "encode"]
