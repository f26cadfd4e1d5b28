"""The core's exception family: what a caller of the core API can be told it did wrong.

Uplinks translate it once, at their boundary, into their own answer (an MQTT error message, an
OpenADR opt-out, a 2030.5 response). ``reason`` is the unified :class:`Reason`.
"""

from __future__ import annotations

from unified.model import Reason


class CoreError(Exception):
    """A request to the core that it cannot honour (unknown group, no report yet, ...)."""

    def __init__(self, reason: Reason, detail: str, *, command_id: str | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.command_id = command_id
