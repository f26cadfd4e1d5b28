"""The audit port: what the core and the uplinks tell the audit log, not how it is kept.

The core records every command it is handed, every lifecycle step and every device write; an
uplink records what it refuses before the core sees it (undecodable input, rate limits, refused
response topics) and hands the core the sender's identity as a plain string (``source``), so
the core never learns a protocol to say who commanded it. :class:`gateway.audit.AuditLog`
keeps the records in a file; :data:`NO_AUDIT` is the trail of a gateway with ``[audit]``
disabled.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Final, Protocol

from unified.model import AckState

__all__ = ["CORE_SOURCE", "NO_AUDIT", "AuditKind", "AuditTrail", "NullAuditTrail"]

CORE_SOURCE: Final = "core"
"""The ``source`` of what the core decides itself: lifecycle steps, device writes."""


class AuditKind(StrEnum):
    """What a record is about; ``show --kind command`` matches every ``command.*`` kind."""

    STARTED = "audit.started"
    """The log was opened by a gateway process (the chain continues from the last record)."""
    STOPPED = "audit.stopped"
    """The gateway stopped cleanly."""
    GAP = "audit.gap"
    """Records were dropped (queue full) or written late (the disk failed): how many, when."""
    COMMAND_RECEIVED = "command.received"
    """A command handed to the core, with its sender and its content."""
    COMMAND_REDELIVERED = "command.redelivered"
    """The same command id and content again: answered with the ack it already had."""
    COMMAND_REFUSED = "command.refused"
    """A command not taken into the book: undecodable, rate limited, its id reused."""
    COMMAND_ACCEPTED = "command.accepted"
    COMMAND_REJECTED = "command.rejected"
    COMMAND_ACTIVE = "command.active"
    COMMAND_COMPLETED = "command.completed"
    COMMAND_CANCELLED = "command.cancelled"
    COMMAND_SUPERSEDED = "command.superseded"
    COMMAND_FAILED = "command.failed"
    INPUT_REFUSED = "input.refused"
    """An inbound message refused on the errors path that names no command (or a refused
    response topic)."""
    DEVICE_WRITE = "device.write"
    """The core handed a device a new instruction (a setpoint, limits, or a release)."""
    DEVICE_REFUSED = "device.refused"
    REGISTRY_CHANGED = "registry.changed"
    REGISTRY_PENDING = "registry.pending"
    """An unknown device announced itself; it waits for an ``approve`` request."""
    """Devices enrolled, updated, retired or moved (a registry API request or the config)."""
    """A device (or the cloud behind it) refused an instruction."""
    ACCESS_REFUSED = "access.refused"
    """A peer refused at an endpoint we host (bad credentials, out of scope, over its quota,
    not configured); at most one record per source and reason a minute, with the count."""
    CLOCK_STEPPED = "clock.stepped"
    """The gateway's wall clock stepped (by how much): lifecycles follow the new clock."""

    @classmethod
    def lifecycle(cls, state: AckState) -> AuditKind:
        """The kind recording a command entering ``state``."""
        return cls(f"command.{state.value}")


class AuditTrail(Protocol):
    def record(
        self,
        kind: AuditKind,
        *,
        source: str | None = None,
        command_id: str | None = None,
        device_id: str | None = None,
        details: Mapping[str, object] | None = None,
    ) -> None:
        """Keep one record. Never blocks and never raises: an audit trail that cannot keep up
        counts what it drops and says so, it does not stop the gateway.

        ``details`` must not be changed after the call (it is written later, elsewhere)."""


class NullAuditTrail:
    """Keeps nothing (``[audit] enabled = false``)."""

    def record(
        self,
        kind: AuditKind,
        *,
        source: str | None = None,
        command_id: str | None = None,
        device_id: str | None = None,
        details: Mapping[str, object] | None = None,
    ) -> None:
        return None


NO_AUDIT: Final[AuditTrail] = NullAuditTrail()
