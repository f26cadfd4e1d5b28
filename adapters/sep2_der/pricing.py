"""IEEE 2030.5 Pricing (§10.5) documents from the price schedules Grid DERMS publishes.

Pure: no I/O, no clock. The server holds the newest :class:`unified.prices.PriceSchedule` per
(scope, kind) (:class:`TariffBook`) and serves, to each client, the schedules of the first of
its groups (by program primacy) that has one, else the gateway-wide ones (scope ``*``):

    /edev/{e}/tp                                TariffProfileList
    /edev/{e}/tp/{t}                            TariffProfile: 1 day-ahead, 2 real-time
    /edev/{e}/tp/{t}/rc[/{r}]                   RateComponents: 1 import, 2 export (per kWh)
    /edev/{e}/tp/{t}/rc/{r}/tti[/{i}]           TimeTariffIntervals: one per price point not
    /edev/{e}/tp/{t}/rc/{r}/acttti              yet over (i = its index in the schedule + 1)
    /edev/{e}/tp/{t}/rc/{r}/tti/{i}/cti[/1]     its ConsumptionTariffInterval: the price
    /edev/{e}/tp/{t}/ctti                       CSIP-AUS v1.3 combined TimeTariffIntervalList
    /rt/{r}                                     ReadingType of RateComponent r (kWh in / out)

A real-time profile ranks before the day-ahead one (primacy 1 against 2), as the gateway's own
planner ranks them. Prices are in the profile's currency x 10^-5 per kWh (``price`` is an
Int32; 20 per kWh, the largest the gateway accepts, is 2,000,000). A newer schedule replaces
the held one: its intervals get new mRIDs, and the replaced schedule's intervals not yet over
stay listed under their old mRIDs (hrefs ``tti/{100001+}``) as superseded (``currentStatus`` 4)
where the new one prices their time, else cancelled (2), so a client that saw them knows they
no longer hold. Only the last replaced schedule is kept; intervals over are no longer listed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

from protocols.sep2 import (
    ConsumptionTariffInterval,
    ConsumptionTariffIntervalList,
    ConsumptionTariffIntervalListSummary,
    DateTimeInterval,
    EventStatus,
    Link,
    ListLink,
    RateComponent,
    RateComponentList,
    ReadingType,
    TariffProfile,
    TariffProfileList,
    TimeTariffInterval,
    TimeTariffIntervalList,
)
from unified.prices import PriceKind, PriceSchedule

__all__ = [
    "COMPONENTS",
    "PRICE_POWER_OF_TEN",
    "PROFILE_IDS",
    "TariffBook",
    "TariffView",
    "reading_type",
]

GATEWAY_SCOPE: Final = "*"
PRICE_POWER_OF_TEN: Final = -5
PROFILE_IDS: Final = {PriceKind.DAY_AHEAD: 1, PriceKind.REAL_TIME: 2}
_PRIMACY: Final = {PriceKind.REAL_TIME: 1, PriceKind.DAY_AHEAD: 2}
COMPONENTS: Final = {1: "import", 2: "export"}
_SERVICE_ELECTRICITY: Final = 0
_ROLE_PREMISES: Final = "0002"  # RoleFlagsType isPremisesAggregationPoint: the site's meter
_STATUS_SCHEDULED: Final = 0
_STATUS_ACTIVE: Final = 1
_STATUS_CANCELLED: Final = 2
_STATUS_SUPERSEDED: Final = 4
REPLACED: Final = 100_000
"""Interval indexes from here are the replaced schedule's (a schedule has at most 2016)."""
# ISO 4217 numeric codes (2030.5 CurrencyCode) of the currencies a utility is likely to use.
ISO_4217: Final = {
    "AUD": 36, "BRL": 986, "CAD": 124, "CHF": 756, "CNY": 156, "DKK": 208, "EUR": 978,
    "GBP": 826, "INR": 356, "JPY": 392, "KRW": 410, "MXN": 484, "NOK": 578, "NZD": 554,
    "SEK": 752, "SGD": 702, "USD": 840, "ZAR": 710,
}  # fmt: skip


def reading_type(component: int) -> ReadingType:
    """Energy in kWh, delta data, electricity: forward (import, 1) or reverse (export, 19)."""
    return ReadingType(
        href=f"/rt/{component}",
        accumulation_behaviour=4,  # deltaData
        commodity=1,  # electricity secondary metered
        flow_direction=1 if component == 1 else 19,
        kind=12,  # energy
        power_of_ten_multiplier=3,
        uom=72,  # Wh
    )


class TariffBook:
    """The newest price schedule per (scope, kind)."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], PriceSchedule] = {}
        self._replaced: dict[tuple[str, str], PriceSchedule] = {}  # the one before, per key
        self.version = 0
        """+1 on every change (the server's cached documents compare it)."""

    def put(self, schedule: PriceSchedule) -> bool:
        held = self._held.get(schedule.key)
        if held is not None and schedule.issued_at <= held.issued_at:
            return False
        if held is not None:
            self._replaced[schedule.key] = held
        self._held[schedule.key] = schedule
        self.version += 1
        return True

    def for_groups(self, groups: Sequence[str]) -> dict[int, PriceSchedule]:
        """Profile id → schedule, for the first of ``groups`` with any schedule (then ``*``)."""
        for scope in [*(g for g in groups if g != GATEWAY_SCOPE), GATEWAY_SCOPE]:
            found = {
                PROFILE_IDS[kind]: held
                for kind in PriceKind
                if (held := self._held.get((scope, kind.value))) is not None
            }
            if found:
                return found
        return {}

    def scope_for(self, groups: Sequence[str]) -> str | None:
        """The one of ``groups`` whose schedules :meth:`for_groups` serves (``*``: the
        gateway's; None: none at all)."""
        for scope in [*(g for g in groups if g != GATEWAY_SCOPE), GATEWAY_SCOPE]:
            if any((scope, kind.value) in self._held for kind in PriceKind):
                return scope
        return None

    def replaced(self, profiles: dict[int, PriceSchedule]) -> dict[int, PriceSchedule]:
        """Profile id → the schedule the held one replaced, if any (its intervals not yet over
        are served cancelled / superseded, under the mRIDs the client knows them by)."""
        return {t: self._replaced[s.key] for t, s in profiles.items() if s.key in self._replaced}


def price_units(price: float) -> int:
    return round(price * 10 ** -PRICE_POWER_OF_TEN)


class TariffView:
    """One client's pricing documents under ``base`` (its ``/edev/{e}``)."""

    def __init__(
        self,
        base: str,
        profiles: dict[int, PriceSchedule],
        pen: int,
        *,
        v13: bool,
        replaced: dict[int, PriceSchedule] | None = None,
    ) -> None:
        self.base = base
        self.profiles = profiles
        self.replaced = replaced or {}
        self.pen = pen
        self.v13 = v13

    def list_href(self) -> str:
        return f"{self.base}/tp"

    def profile_list(self, start: int, limit: int, poll_rate: int) -> TariffProfileList:
        ids = sorted(self.profiles, key=lambda t: _PRIMACY[self.profiles[t].kind])
        page = tuple(self.profile(t) for t in ids[start : start + limit])
        return TariffProfileList(
            href=self.list_href(), all=len(ids), results=len(page), poll_rate=poll_rate, items=page
        )

    def profile(self, t: int) -> TariffProfile:
        schedule = self.profiles[t]
        href = f"{self.list_href()}/{t}"
        return TariffProfile(
            href=href,
            mrid=self._mrid(schedule, "tp"),
            description=(schedule.source or f"{schedule.kind.value} {schedule.key[0]}")[:32],
            currency=ISO_4217.get(schedule.currency),
            price_power_of_ten_multiplier=PRICE_POWER_OF_TEN,
            primacy=_PRIMACY[schedule.kind],
            rate_code=schedule.currency if schedule.currency not in ISO_4217 else None,
            rate_component_list_link=ListLink(href=f"{href}/rc", all=len(COMPONENTS)),
            service_category_kind=_SERVICE_ELECTRICITY,
            combined_time_tariff_interval_list_link=(
                ListLink(href=f"{href}/ctti", all=len(COMPONENTS) * len(schedule.points))
                if self.v13
                else None
            ),
        )

    def components(self, t: int, start: int, limit: int) -> RateComponentList:
        page = tuple(self.component(t, r) for r in list(COMPONENTS)[start : start + limit])
        return RateComponentList(
            href=f"{self.list_href()}/{t}/rc", all=len(COMPONENTS), results=len(page), items=page
        )

    def component(self, t: int, r: int) -> RateComponent:
        schedule = self.profiles[t]
        href = f"{self.list_href()}/{t}/rc/{r}"
        return RateComponent(
            href=href,
            mrid=self._mrid(schedule, f"rc{r}"),
            description=f"{COMPONENTS[r]} energy per kWh",
            active_time_tariff_interval_list_link=ListLink(href=f"{href}/acttti"),
            reading_type_link=Link(href=f"/rt/{r}"),
            role_flags=_ROLE_PREMISES,
            time_tariff_interval_list_link=ListLink(href=f"{href}/tti"),
        )

    def current(self, t: int, now: int) -> list[int]:
        """Indexes of the points not yet over: the held schedule's, then (from REPLACED) those
        of the schedule it replaced."""
        found = []
        for offset, schedule in ((0, self.profiles[t]), (REPLACED, self.replaced.get(t))):
            if schedule is None:
                continue
            first = int(schedule.points[0].start.timestamp())
            found += [
                offset + i
                for i in range(len(schedule.points))
                if first + (i + 1) * schedule.step_s > now
            ]
        return found

    def has_interval(self, t: int, i: int) -> bool:
        if i >= REPLACED:
            old = self.replaced.get(t)
            return old is not None and i - REPLACED < len(old.points)
        return 0 <= i < len(self.profiles[t].points)

    def _point(self, t: int, i: int) -> tuple[PriceSchedule, int]:
        if i >= REPLACED:
            return self.replaced[t], i - REPLACED
        return self.profiles[t], i

    def intervals(
        self, t: int, r: int, now: int, start: int, limit: int, *, active: bool = False
    ) -> TimeTariffIntervalList:
        href = f"{self.list_href()}/{t}/rc/{r}/{'acttti' if active else 'tti'}"
        indexes = self.current(t, now)
        if active:  # the held schedule's interval in force now, if any
            indexes = [i for i in indexes[:1] if i < REPLACED and self._start(t, i) <= now]
        page = tuple(self.interval(t, r, i, now) for i in indexes[start : start + limit])
        return TimeTariffIntervalList(
            href=href, all=len(indexes), results=len(page), items=page
        )

    def combined(self, t: int, now: int, start: int, limit: int) -> TimeTariffIntervalList:
        every = [(r, i) for i in self.current(t, now) for r in COMPONENTS]
        page = tuple(self.interval(t, r, i, now) for r, i in every[start : start + limit])
        return TimeTariffIntervalList(
            href=f"{self.list_href()}/{t}/ctti", all=len(every), results=len(page), items=page
        )

    def _start(self, t: int, i: int) -> int:
        schedule, k = self._point(t, i)
        return int(schedule.points[0].start.timestamp()) + k * schedule.step_s

    def interval(self, t: int, r: int, i: int, now: int) -> TimeTariffInterval:
        schedule, k = self._point(t, i)
        href = f"{self.list_href()}/{t}/rc/{r}/tti/{i + 1}"
        start = self._start(t, i)
        issued = int(schedule.issued_at.timestamp())
        status, status_time = (_STATUS_ACTIVE if start <= now else _STATUS_SCHEDULED), issued
        if i >= REPLACED:  # replaced by the held schedule: superseded where it prices the
            held = self.profiles[t]  # same time, cancelled elsewhere
            held_first = held.points[0].start.timestamp()
            covered = held_first <= start < held.end_s
            status = _STATUS_SUPERSEDED if covered else _STATUS_CANCELLED
            status_time = int(held.issued_at.timestamp())
        cti = self.consumption(t, r, i)
        return TimeTariffInterval(
            href=href,
            mrid=self._mrid(schedule, f"tti{r}.{k}"),
            creation_time=issued,
            event_status=EventStatus(
                current_status=status,
                date_time=status_time,
                potentially_superseded=False,
            ),
            interval=DateTimeInterval(duration=schedule.step_s, start=start),
            consumption_tariff_interval_list_link=ListLink(href=f"{href}/cti", all=1),
            tou_tier=0,  # not applicable: the price is the interval's own
            consumption_tariff_interval_list_summary=(
                ConsumptionTariffIntervalListSummary(all=1, results=1, items=(cti,))
                if self.v13
                else None
            ),
            rate_component_link=(
                Link(href=f"{self.list_href()}/{t}/rc/{r}") if self.v13 else None
            ),
        )

    def consumption(self, t: int, r: int, i: int) -> ConsumptionTariffInterval:
        schedule, k = self._point(t, i)
        point = schedule.points[k]
        price = point.price if r == 1 or point.export_price is None else point.export_price
        return ConsumptionTariffInterval(
            href=f"{self.list_href()}/{t}/rc/{r}/tti/{i + 1}/cti/1",
            consumption_block=0,  # not applicable: one block from zero
            price=price_units(price),
            start_value=0,
        )

    def consumption_list(self, t: int, r: int, i: int) -> ConsumptionTariffIntervalList:
        item = self.consumption(t, r, i)
        return ConsumptionTariffIntervalList(
            href=f"{self.list_href()}/{t}/rc/{r}/tti/{i + 1}/cti", all=1, results=1, items=(item,)
        )

    def next_boundary(self, now: int) -> int | None:
        """When the documents next read differently by time alone (an interval starts/ends)."""
        times: list[int] = []
        for t in self.profiles:
            for i in self.current(t, now):
                schedule, _ = self._point(t, i)
                times += [self._start(t, i), self._start(t, i) + schedule.step_s]
        return min((x for x in times if x > now), default=None)

    def _mrid(self, schedule: PriceSchedule, what: str) -> str:
        """Stable for one schedule, new for the next: scope, kind, issue time and the part."""
        seed = f"{schedule.key}|{schedule.issued_at.isoformat()}|{what}".encode()
        return hashlib.blake2b(seed, digest_size=12).hexdigest().upper() + f"{self.pen:08X}"
