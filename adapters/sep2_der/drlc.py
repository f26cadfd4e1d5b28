"""IEEE 2030.5 Demand Response and Load Control (§10.4) for thermal loads behind the server.

A device enrolled with a ``device_category`` (a thermostat, a water heater: a 2030.5 client
that is no DER) gets one DemandResponseProgram on its EndDevice; the gateway's setpoint for it
becomes an EndDeviceControl capping its duty cycle (the largest share of time it may run):

    /edev/{e}/drp                     DemandResponseProgramList
    /edev/{e}/drp/1                   DemandResponseProgram
    /edev/{e}/drp/1/edc[/{c}]         EndDeviceControlList / EndDeviceControl
    /edev/{e}/drp/1/actedc            ActiveEndDeviceControlList

A new setpoint supersedes the control in force (``currentStatus`` 4, as for DERControls), a
released one is cancelled (2); both stay listed until their interval is over. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from protocols.sep2 import (
    DateTimeInterval,
    DemandResponseProgram,
    DutyCycle,
    EndDeviceControl,
    EndDeviceControlList,
    EventStatus,
    ListLink,
)
from unified.model import LimitSource

__all__ = ["DEVICE_CATEGORY", "DRP_ID", "LoadControl", "end_device_control", "program"]

DRP_ID: Final = 1
# DeviceCategoryType bits (IEEE 2030.5-2018): 0 thermostat, 3 water heater.
DEVICE_CATEGORY: Final = {"thermostat": "00000001", "water_heater": "00000008"}
STATUS_SCHEDULED: Final = 0
STATUS_ACTIVE: Final = 1
STATUS_CANCELLED: Final = 2
STATUS_SUPERSEDED: Final = 4


@dataclass(slots=True)
class LoadControl:
    control_id: int
    mrid: str
    device_id: str
    device_category: str
    created: int
    start: int
    duration: int
    duty_cycle_pct: int
    provenance: tuple[LimitSource, ...]
    description: str
    status: int | None = None  # None: scheduled / active by time
    status_time: int = 0

    @property
    def end(self) -> int:
        return self.start + self.duration

    def current_status(self, now: int) -> int:
        if self.status is not None:
            return self.status
        return STATUS_ACTIVE if self.start <= now else STATUS_SCHEDULED

    def in_force(self, now: int) -> bool:
        return self.status is None and self.start <= now < self.end


def program(
    base: str, mrid: str, controls: list[LoadControl], now: int, primacy: int
) -> DemandResponseProgram:
    href = f"{base}/drp/{DRP_ID}"
    active = sum(1 for c in controls if c.current_status(now) == STATUS_ACTIVE)
    return DemandResponseProgram(
        href=href,
        mrid=mrid,
        description="thermal load control",
        active_end_device_control_list_link=ListLink(href=f"{href}/actedc", all=active),
        end_device_control_list_link=ListLink(href=f"{href}/edc", all=len(controls)),
        primacy=primacy,
    )


def end_device_control(base: str, control: LoadControl, now: int) -> EndDeviceControl:
    return EndDeviceControl(
        href=f"{base}/drp/{DRP_ID}/edc/{control.control_id}",
        mrid=control.mrid,
        description=control.description[:32],
        creation_time=control.created,
        event_status=EventStatus(
            current_status=control.current_status(now),
            date_time=control.status_time if control.status is not None else control.created,
            potentially_superseded=False,
        ),
        interval=DateTimeInterval(duration=control.duration, start=control.start),
        device_category=control.device_category,
        dr_program_mandatory=True,
        duty_cycle=DutyCycle(normal_value=control.duty_cycle_pct),
        load_shift_forward=False,
    )


def control_list(
    base: str, controls: list[LoadControl], now: int, start: int, limit: int, *, active: bool
) -> EndDeviceControlList:
    listed = [c for c in controls if not active or c.current_status(now) == STATUS_ACTIVE]
    listed.sort(key=lambda c: (c.start, -c.created, -c.control_id))
    page = tuple(end_device_control(base, c, now) for c in listed[start : start + limit])
    suffix = "actedc" if active else "edc"
    return EndDeviceControlList(
        href=f"{base}/drp/{DRP_ID}/{suffix}", all=len(listed), results=len(page), items=page
    )
