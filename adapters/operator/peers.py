"""What the operator endpoint reads of the links and endpoints beside the core.

Small structural views, so this package imports no other adapter family: the composition root
hands it the objects it built (the Grid DERMS uplink, the device MQTT link, the 2030.5 server,
the OCPP central, the OpenADR VTN and VEN) and each satisfies its view as it is. Everything
here is read when a scraper or an operator asks, never pushed from a hot path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "ChargerView",
    "DeviceLinkView",
    "GridLinkView",
    "GridUplinkView",
    "OcppCentralView",
    "Peers",
    "Sep2ServerView",
    "VenView",
    "VtnView",
]


class GridLinkView(Protocol):
    @property
    def connected(self) -> asyncio.Event: ...
    @property
    def pending_acks(self) -> int: ...
    @property
    def pending_telemetry(self) -> int: ...


class UplinkStatsView(Protocol):
    @property
    def received(self) -> Mapping[str, int]: ...
    @property
    def refused(self) -> Mapping[tuple[str, str], int]: ...


class GridUplinkView(Protocol):
    """The Grid DERMS uplink: its MQTT link, and what came in on it."""

    @property
    def link(self) -> GridLinkView: ...
    @property
    def stats(self) -> UplinkStatsView: ...


class DeviceLinkStatsView(Protocol):
    @property
    def received(self) -> int: ...
    @property
    def dropped_unknown(self) -> int: ...
    @property
    def dropped_invalid(self) -> int: ...
    @property
    def dropped_over_quota(self) -> int: ...
    @property
    def published(self) -> int: ...


class DeviceLinkView(Protocol):
    @property
    def connected(self) -> asyncio.Event: ...
    @property
    def stats(self) -> DeviceLinkStatsView: ...


class QuotasView(Protocol):
    @property
    def refused(self) -> Mapping[str, int]: ...


class Sep2ServerView(Protocol):
    @property
    def answered(self) -> Mapping[int, int]: ...
    @property
    def quotas(self) -> QuotasView: ...


class ChargerView(Protocol):
    @property
    def connected(self) -> bool: ...


class OcppCentralView(Protocol):
    @property
    def refusals(self) -> Mapping[str, int]: ...
    def charge_point_ids(self) -> tuple[str, ...]: ...
    def snapshot(self, charge_point_id: str, /) -> ChargerView | None: ...


class VtnView(Protocol):
    @property
    def answered(self) -> Mapping[int, int]: ...
    @property
    def refusals(self) -> Mapping[str, int]: ...
    @property
    def registrations(self) -> Mapping[str, object]: ...


class VenView(Protocol):
    @property
    def reachable(self) -> bool | None: ...
    @property
    def polls(self) -> Mapping[str, int]: ...


@dataclass(frozen=True, slots=True)
class Peers:
    """The links and endpoints this gateway runs (None: not configured)."""

    grid: GridUplinkView
    device_mqtt: DeviceLinkView | None = None
    sep2_server: Sep2ServerView | None = None
    ocpp_central: OcppCentralView | None = None
    openadr_vtn: VtnView | None = None
    openadr_ven: VenView | None = None
