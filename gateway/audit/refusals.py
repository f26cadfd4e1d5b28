"""Refused access at the endpoints peers connect to (an OCPP charger's credentials, a 2030.5
client out of scope or over its quota, a VEN not configured), into the audit trail.

A peer refused once usually retries every poll: each (source, reason) is recorded at most once
per ``every_s``, the next record carrying how many were refused in between, so a brute-force or
a misconfigured fleet is visible without the trail growing by a record a request."""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.audit.trail import AuditKind, AuditTrail

__all__ = ["RefusalRecorder"]


class RefusalRecorder:
    """Call with ``(source, reason, detail)``: what an endpoint's ``on_refused`` hook takes."""

    def __init__(
        self,
        audit: AuditTrail,
        endpoint: str,
        *,
        every_s: float = 60.0,
        max_keys: int = 10_000,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._audit = audit
        self._endpoint = endpoint
        self._every_s = every_s
        self._max_keys = max_keys
        self._monotonic = monotonic
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def __call__(self, source: str, reason: str, detail: str) -> None:
        now = self._monotonic()
        key = (source[:256], reason[:64])
        last = self._last.get(key)
        if last is not None and now - last[0] < self._every_s:
            self._last[key] = (last[0], last[1] + 1)
            return
        if last is None and len(self._last) >= self._max_keys:
            self._last.clear()  # a spray of identities: start counting afresh
        self._last[key] = (now, 0)
        self._audit.record(
            AuditKind.ACCESS_REFUSED,
            source=key[0],
            details={
                "endpoint": self._endpoint,
                "reason": key[1],
                "detail": detail[:512],
                "refused_since_last_record": 0 if last is None else last[1],
            },
        )
