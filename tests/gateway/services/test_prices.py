"""Price schedules: validation on the wire, the newest per scope and kind, layered by area."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from gateway.services.prices import PriceBook
from protocols.mqtt.northbound import PricesDecodeError, decode_prices
from unified.prices import PriceSchedule

T0 = datetime(2026, 7, 1, tzinfo=UTC)


def doc(prices: list[float], *, start: datetime = T0, step_s: int = 3600, **extra: Any) -> bytes:
    body = {
        "issued_at": (T0 - timedelta(hours=1)).isoformat(),
        "step_s": step_s,
        "points": [
            {"start": (start + timedelta(seconds=k * step_s)).isoformat(), "price": p}
            for k, p in enumerate(prices)
        ],
    }
    return json.dumps(body | extra).encode()


def test_a_valid_schedule_decodes() -> None:
    schedule = decode_prices(doc([0.1, 0.2], scope="feeder:f1", kind="real_time"))
    assert schedule.key == ("feeder:f1", "real_time")
    assert schedule.end_s == T0.timestamp() + 7200


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"[", "malformed_json"),
        (b"[1]", "schema_violation"),
        (doc([0.1], schema_version="2"), "unsupported_version"),
        (b'{"issued_at": "2026-07-01T00:00:00Z", "points": [{"start": "2026-07-01T00:00:00Z",'
         b' "price": NaN}]}', "schema_violation"),
        (doc([0.1, 99.0]), "schema_violation"),
        (doc([0.1], kind="hourly"), "schema_violation"),
        (doc([0.1], issued_at="2026-07-01T00:00:00"), "schema_violation"),  # no time zone
        (b"{" + b" " * (2 * 1024 * 1024) + b"}", "payload_too_large"),
    ],
)
def test_every_bad_schedule_is_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(PricesDecodeError) as info:
        decode_prices(payload)
    assert info.value.reason.value == reason


def test_points_must_keep_the_step() -> None:
    body = json.loads(doc([0.1, 0.2, 0.3]))
    body["points"][2]["start"] = (T0 + timedelta(hours=3)).isoformat()
    with pytest.raises(PricesDecodeError, match="step_s"):
        decode_prices(json.dumps(body).encode())


def test_only_a_newer_schedule_replaces_the_held_one() -> None:
    book = PriceBook()
    first = decode_prices(doc([0.1]))
    assert book.put(first)
    same_age = PriceSchedule.model_validate(
        first.model_dump() | {"points": [{"start": T0, "price": 9.0}]}
    )
    assert not book.put(same_age)
    newer = same_age.model_copy(update={"issued_at": T0})
    assert book.put(newer)
    assert book.series(["*"], T0.timestamp(), 3600, 1)[0][0] == pytest.approx(9.0)
    assert PriceBook.is_stale(first, T0.timestamp() + 3600)
    assert not PriceBook.is_stale(first, T0.timestamp() + 3599)


def test_series_layers_area_and_kind_and_resamples() -> None:
    book = PriceBook()
    book.put(decode_prices(doc([0.1, 0.2, 0.3, 0.4])))  # the gateway's day-ahead
    book.put(decode_prices(doc([1.0], start=T0 + timedelta(hours=1), kind="real_time")))
    book.put(decode_prices(doc([2.0], start=T0 + timedelta(hours=3), scope="feeder:f1")))
    imp, exp = book.series(["feeder:f1"], T0.timestamp(), 3600, 5)
    np.testing.assert_allclose(imp[:4], [0.1, 1.0, 0.3, 2.0])
    np.testing.assert_allclose(exp[:4], imp[:4])
    assert np.isnan(imp[4])
    imp, _ = book.series(["feeder:f2"], T0.timestamp(), 3600, 4)
    np.testing.assert_allclose(imp, [0.1, 1.0, 0.3, 0.4])
    # 30-min steps read the hour they fall in; 2-h steps the mean of the two hours.
    half, _ = book.series(["*"], T0.timestamp(), 1800, 4)
    np.testing.assert_allclose(half, [0.1, 0.1, 1.0, 1.0])
    two, _ = book.series(["*"], T0.timestamp(), 7200, 2)
    np.testing.assert_allclose(two, [0.55, 0.35])
    # A step covered less than half is not priced.
    late, _ = book.series(["*"], T0.timestamp() + 4 * 3600 - 1000, 3600, 1)
    assert np.isnan(late[0])


def test_export_price_when_given() -> None:
    body = json.loads(doc([0.3]))
    body["points"][0]["export_price"] = 0.05
    book = PriceBook()
    book.put(decode_prices(json.dumps(body).encode()))
    imp, exp = book.series([], T0.timestamp(), 3600, 1)
    assert (imp[0], exp[0]) == pytest.approx((0.3, 0.05))
