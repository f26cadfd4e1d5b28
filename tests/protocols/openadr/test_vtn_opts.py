"""EiOpt validation and the "is this resource opted out now?" rule, without I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from protocols.openadr.vtn_opts import (
    MAX_OPT_WINDOWS,
    OptRefused,
    OptSchedule,
    OptTarget,
    opt_out_in_force,
    read_opt,
)

NOW = datetime(2025, 7, 1, 14, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
TSTAT = "ctx:thermostats"
BATT = "ctx:batteries"
TARGETS = (
    OptTarget("oem.t1", "t1;class=thermostat;kw=3", TSTAT),
    OptTarget("oem.t2", "t2;class=thermostat;kw=3", TSTAT),
    OptTarget("oem.b1", "b1;class=battery;kw=5;kwh=13.5", BATT),
)


def payload(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "opt_id": "o1",
        "opt_type": "optOut",
        "opt_reason": "overrideStatus",
        "ven_id": "ven-1",
        "request_id": "r1",
        "vavailability": {"components": {"available": {"dtstart": NOW, "duration": HOUR}}},
    }
    return base | extra


def read(p: dict[str, Any], **kw: Any) -> OptSchedule:
    args: dict[str, Any] = {
        "ven_name": "oem",
        "ven_id": "ven-1",
        "targets": TARGETS,
        "market_contexts": {TSTAT, BATT},
        "events": {"ev-1": (2, "oem.b1")},
        "now": NOW,
    }
    return read_opt(p, **(args | kw))


def refused(p: dict[str, Any]) -> OptRefused:
    with pytest.raises(OptRefused) as info:
        read(p)
    return info.value


def test_several_resources_in_one_target_by_full_id_or_name() -> None:
    opt = read(
        payload(targets=[{"resource_id": "t1;class=thermostat;kw=3"}, {"resource_id": "b1"}])
    )
    assert opt.device_ids == ("oem.t1", "oem.b1")
    assert [(w.start, w.end) for w in opt.windows] == [(NOW, NOW + HOUR)]


def test_no_resource_means_the_whole_ven_within_the_market_context() -> None:
    assert read(payload()).device_ids == ("oem.t1", "oem.t2", "oem.b1")
    assert read(payload(targets=[{"ven_id": "ven-1"}])).device_ids == ("oem.t1", "oem.t2", "oem.b1")
    assert read(payload(market_context=TSTAT)).device_ids == ("oem.t1", "oem.t2")


def test_several_windows_in_openleadrs_list_form_are_sorted() -> None:
    later = {"properties": {"dtstart": NOW + 3 * HOUR, "duration": HOUR}}
    first = {"properties": {"dtstart": NOW, "duration": HOUR}}
    opt = read(payload(vavailability={"components": {"available": [later, first]}}))
    assert [w.start for w in opt.windows] == [NOW, NOW + 3 * HOUR]


def test_an_event_opt_concerns_the_events_resource() -> None:
    opt = read(payload(event_id="ev-1", modification_number=2, vavailability=None))
    assert (opt.event_id, opt.modification_number, opt.device_ids) == ("ev-1", 2, ("oem.b1",))
    assert opt.windows == ()
    defaulted = read(payload(event_id="ev-1", vavailability=None))
    assert defaulted.modification_number == 2


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"targets": [{"resource_id": "nope"}]}, 452, "unknown resource"),
        ({"targets": [{"ven_id": "ven-2"}]}, 463, "only opt for itself"),
        ({"targets": [{"group_id": "g"}]}, 454, "unsupported opt target"),
        ({"ven_id": "ven-2"}, 463, "venID"),
        ({"market_context": "ctx:other"}, 452, "unknown market context"),
        (
            {"market_context": BATT, "targets": [{"resource_id": "t1"}]},
            452,
            "not in market context",
        ),
        ({"event_id": "ev-9", "vavailability": None}, 452, "unknown event"),
        (
            {"event_id": "ev-1", "modification_number": 3, "vavailability": None},
            454,
            "no modification 3",
        ),
        (
            {"event_id": "ev-1", "vavailability": None, "targets": [{"resource_id": "t1"}]},
            452,
            "does not target",
        ),
        ({"vavailability": None}, 454, "either an event or vavailability"),
        ({"opt_type": "maybe"}, 454, "neither optIn nor optOut"),
        ({"opt_id": "x" * 200}, 452, "optID"),
        (
            {"vavailability": {"components": {"available": {"dtstart": NOW, "duration": -HOUR}}}},
            454,
            "positive",
        ),
        (
            {
                "vavailability": {
                    "components": {
                        "available": {"dtstart": NOW.replace(tzinfo=None), "duration": HOUR}
                    }
                }
            },
            454,
            "UTC",
        ),
        (
            {
                "vavailability": {
                    "components": {"available": {"dtstart": NOW - 2 * HOUR, "duration": HOUR}}
                }
            },
            454,
            "already over",
        ),
        (
            {
                "vavailability": {
                    "components": {
                        "available": [{"dtstart": NOW, "duration": HOUR}] * (MAX_OPT_WINDOWS + 1)
                    }
                }
            },
            454,
            "more than",
        ),
    ],
)
def test_bad_opts_are_refused_with_a_code_and_reason(
    change: dict[str, Any], code: int, words: str
) -> None:
    error = refused(payload(**change))
    assert error.code == code
    assert words in error.description


def schedule(opt_type: str, seq: int, start: datetime, end: datetime) -> OptSchedule:
    return OptSchedule.model_validate(
        {
            "opt_id": f"o{seq}",
            "ven_name": "oem",
            "opt_type": opt_type,
            "device_ids": ["oem.t1"],
            "windows": [{"start": start, "end": end}],
            "received_at": NOW,
            "seq": seq,
        }
    )


def test_the_schedule_received_last_wins_where_windows_overlap() -> None:
    out = schedule("optOut", 1, NOW, NOW + 3 * HOUR)
    back = schedule("optIn", 2, NOW + HOUR, NOW + 2 * HOUR)
    both = [back, out]
    assert opt_out_in_force(both, "oem.t1", NOW + HOUR / 2) == out
    assert opt_out_in_force(both, "oem.t1", NOW + HOUR * 1.5) is None  # the opt-in ends it early
    assert opt_out_in_force(both, "oem.t1", NOW + HOUR * 2.5) == out
    assert opt_out_in_force(both, "oem.t1", NOW + 3 * HOUR) is None  # windows are half-open
    assert opt_out_in_force(both, "oem.t2", NOW + HOUR / 2) is None
    assert out.expired(NOW + 3 * HOUR)
    assert not out.expired(NOW + 2 * HOUR)
