"""TELEMETRY_STATUS as 2.0b means it: ``oadrPayloadResourceStatus``, with one meaning both of our
sides (VEN and VTN) agree on.

* ``oadrOnline``: the resource can be dispatched (for our VEN's group: at least one device
  reports); ``oadrManualOverride``: a customer overrode control (never dispatch it then);
* ``oadrLoadControlState/oadrCapacity/oadrCurrent``: state of charge in percent (0-100), with
  ``oadrMin`` 0 and ``oadrMax`` 100; absent when unknown.

openleadr renders every report value as ``payloadFloat``, so :func:`install` gives its
``oadrUpdateReport`` template a branch for a payload carrying ``resource_status``
(:mod:`protocols.openadr.templates`; the rest is its own template, so signing works as before).
Its parser already reads the element back; a VEN that can only send ``payloadFloat`` in a status
report (openleadr's own) is read as a state of charge in percent, online, not overridden
(:func:`read_resource_status`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from protocols.openadr import templates

__all__ = ["ResourceStatus", "install", "read_resource_status", "status_payload"]

_FLOAT: Final = """            <ei:payloadFloat>
              <ei:value>{{ interval.report_payload.value }}</ei:value>
            </ei:payloadFloat>
"""
_STATUS: Final = (
    """            {% if interval.report_payload.resource_status is defined %}
            {% set st = interval.report_payload.resource_status %}
            <oadr:oadrPayloadResourceStatus>
              <oadr:oadrOnline>{{ 'true' if st.online else 'false' }}</oadr:oadrOnline>
              <oadr:oadrManualOverride>{{ 'true' if st.manual_override else 'false' }}\
</oadr:oadrManualOverride>
              {% if st.capacity_pct is not none %}
              <oadr:oadrLoadControlState>
                <oadr:oadrCapacity>
                  <oadr:oadrMin>0</oadr:oadrMin>
                  <oadr:oadrMax>100</oadr:oadrMax>
                  <oadr:oadrCurrent>{{ st.capacity_pct }}</oadr:oadrCurrent>
                </oadr:oadrCapacity>
              </oadr:oadrLoadControlState>
              {% endif %}
            </oadr:oadrPayloadResourceStatus>
            {% else %}
"""
    + _FLOAT
    + "            {% endif %}\n"
)


@dataclass(frozen=True, slots=True)
class ResourceStatus:
    online: bool
    manual_override: bool = False
    capacity_pct: float | None = None
    """State of charge, percent."""


def install() -> None:
    """Teach openleadr's templates the resource status payload (and the rest of
    :mod:`protocols.openadr.templates`), once per process."""
    templates.install({"oadrUpdateReport.xml": (_FLOAT, _STATUS)})


def status_payload(r_id: str, status: ResourceStatus) -> dict[str, Any]:
    """An interval's ``report_payload`` for :func:`install`'s template."""
    capacity = status.capacity_pct
    if capacity is not None:
        capacity = round(min(100.0, max(0.0, capacity)), 3)
    return {
        "r_id": r_id,
        "value": 0.0,  # unused; keeps openleadr's preflight content
        "resource_status": {
            "online": status.online,
            "manual_override": status.manual_override,
            "capacity_pct": capacity,
        },
    }


def read_resource_status(report_payload: Mapping[str, Any]) -> ResourceStatus | None:
    """A decoded TELEMETRY_STATUS value (None: neither a resource status nor a number)."""
    status = report_payload.get("payload_resource_status")
    if isinstance(status, Mapping):
        state = status.get("load_control_state")
        capacity = state.get("capacity") if isinstance(state, Mapping) else None
        current = _number(capacity.get("current")) if isinstance(capacity, Mapping) else None
        return ResourceStatus(
            online=status.get("online") is True,
            manual_override=status.get("manual_override") is True,
            capacity_pct=current,
        )
    value = _number(report_payload.get("value"))
    return None if value is None else ResourceStatus(online=True, capacity_pct=value)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
