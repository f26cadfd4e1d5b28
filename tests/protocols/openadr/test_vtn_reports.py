"""Report periods a VTN asks for, within the VEN's oadrSamplingRate."""

from __future__ import annotations

from datetime import timedelta

import pytest

from protocols.openadr.vtn_reports import (
    SamplingRate,
    SamplingRateError,
    granularity_for,
    read_sampling_rate,
)

S = timedelta(seconds=1)


@pytest.mark.parametrize(
    ("wanted", "offered", "expected"),
    [
        (10 * S, None, 10 * S),
        (10 * S, SamplingRate(S, 3600 * S), 10 * S),
        (10 * S, SamplingRate(60 * S, 300 * S), 60 * S),  # too fast for it: its minimum
        (600 * S, SamplingRate(60 * S, 300 * S), 300 * S),  # too slow for it: its maximum
        (10 * S, SamplingRate(2 * S, 2 * S), 2 * S),
        (10 * S, SamplingRate(30 * S, timedelta(0)), 30 * S),  # max 0: no upper bound
        (10 * S, SamplingRate(1.5 * S, 1.5 * S), 1.5 * S),  # whole seconds only where allowed
        (10 * S, SamplingRate(1.5 * S, 5 * S), 5 * S),
    ],
)
def test_granularity_is_the_wish_moved_into_the_offered_range(
    wanted: timedelta, offered: SamplingRate | None, expected: timedelta
) -> None:
    assert granularity_for(wanted, offered) == expected


def test_sampling_rate_is_read_from_a_decoded_description() -> None:
    description = {"sampling_rate": {"min_period": 2 * S, "max_period": 30 * S, "on_change": True}}
    assert read_sampling_rate(description) == SamplingRate(2 * S, 30 * S, True)
    assert read_sampling_rate({"r_id": "x"}) is None


@pytest.mark.parametrize(
    "offered",
    [
        {"min_period": 30 * S, "max_period": 2 * S},
        {"min_period": 2 * S},
        {"min_period": -S, "max_period": S},
        "PT1S",
    ],
)
def test_an_impossible_sampling_rate_is_an_error(offered: object) -> None:
    with pytest.raises(SamplingRateError):
        read_sampling_rate({"sampling_rate": offered})
