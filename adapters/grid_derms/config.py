"""``[broker]``: the MQTT broker Grid DERMS talks to us through.

Who the gateway is on it (user name, password source, TLS and mutual TLS, rotation) comes from
:class:`adapters.broker_security.BrokerLogin`, shared with the device link.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapters.broker_security import BrokerLogin

__all__ = ["BrokerConfig"]


class BrokerConfig(BrokerLogin):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535, description="Usually 8883 with TLS")
    protocol: Literal["5", "3.1.1"] = Field(
        default="5", description="MQTT version; 3.1.1 only for brokers without MQTT 5"
    )
    client_id: str | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    connect_timeout_s: float = Field(default=10.0, gt=0, le=120)
    commands_per_s: float = Field(
        default=50.0,
        gt=0,
        le=100_000,
        description="Commands taken per second on average; beyond it and the burst, a command "
        "is refused on errors with rate_limited (the gateway keeps up with the rest)",
    )
    commands_burst: int = Field(
        default=500, ge=1, le=1_000_000, description="Commands that may arrive at once"
    )
    response_topic_prefix: str = Field(
        default="derms/v1/replies/",
        min_length=1,
        max_length=128,
        pattern=r"^[^+#\x00]+$",
        description="MQTT 5 response topics are honoured only under this prefix (never the "
        "gateway's own topics); others are refused on errors and the ack goes to its usual topic",
    )
