"""The newest value of every external feed, for the ``feed_trigger`` services."""

from __future__ import annotations

from datetime import datetime, timedelta

from unified.feeds import FeedValue

MAX_FUTURE_S = 60.0
"""A value stamped further ahead than this is refused (a clock that far off is not a reading)."""


class FeedBook:
    def __init__(self) -> None:
        self._held: dict[str, FeedValue] = {}

    def __len__(self) -> int:
        return len(self._held)

    def is_newer(self, value: FeedValue) -> bool:
        held = self._held.get(value.name)
        return held is None or value.timestamp > held.timestamp

    @staticmethod
    def is_stale(value: FeedValue, now: datetime) -> bool:
        return value.expires <= now

    @staticmethod
    def is_ahead(value: FeedValue, now: datetime) -> bool:
        return value.timestamp > now + timedelta(seconds=MAX_FUTURE_S)

    def put(self, value: FeedValue) -> bool:
        """Keep ``value`` if it is newer than the one held for its name."""
        if not self.is_newer(value):
            return False
        self._held[value.name] = value
        return True

    def fresh(self, name: str, now: datetime) -> FeedValue | None:
        """The newest value of ``name`` still valid at ``now``; None if none or stale."""
        value = self._held.get(name)
        return None if value is None or self.is_stale(value, now) else value
