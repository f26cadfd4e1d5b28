"""External feed values as Grid DERMS (or an integration beside it) publishes them
(``derms/v1/{gw}/feeds/{name}``): a frequency, a wholesale price, a carbon intensity, an
aggregator's signal. The wire model only; what the core does with them is
:mod:`gateway.services.feeds` and the ``feed_trigger`` service.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final, Literal

from pydantic import Field

from unified.model import SCHEMA_VERSION, Frozen, Identifier, UtcDatetime

__all__ = ["MAX_FEED_VALID_S", "FeedValue"]

MAX_FEED_VALID_S: Final = 86_400


class FeedValue(Frozen):
    """One reading of a named feed: ``value`` measured (or published) at ``timestamp``, usable
    for ``valid_s`` after it (then stale: ignored, and a service it triggered releases)."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    name: Identifier = Field(description="The feed's name: the last level of its topic")
    value: float = Field(ge=-1e9, le=1e9, allow_inf_nan=False)
    timestamp: UtcDatetime
    valid_s: float = Field(default=900, gt=0, le=MAX_FEED_VALID_S)
    unit: str | None = Field(default=None, max_length=32)

    @property
    def expires(self) -> UtcDatetime:
        return self.timestamp + timedelta(seconds=self.valid_s)
