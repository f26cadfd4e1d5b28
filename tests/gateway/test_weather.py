"""Weather forecasts: validation, the per-interval series lookup and the scope of each device."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from gateway.flex import flex_json_schemas
from gateway.registry import Registry
from gateway.weather import TemperatureSeries, WeatherBook
from protocols.mqtt.northbound import MAX_WEATHER_BYTES, WeatherDecodeError, decode_weather
from unified.model import DerClass, Device, Group, Reason, TopologyLevel, TopologyLocation
from unified.weather import MAX_POINTS, WeatherForecast

from .flex.conftest import make_device

T0 = datetime(2024, 6, 20, 12, 0, tzinfo=UTC)
H = 3600.0


def iso(hours: float) -> str:
    return (T0 + timedelta(hours=hours)).isoformat()


def doc(temps: list[float], *, step_h: float = 1.0, **extra: Any) -> dict[str, Any]:
    return {
        "issued_at": iso(-6),
        "step_s": int(step_h * 3600),
        "points": [{"start": iso(k * step_h), "temp_c": t} for k, t in enumerate(temps)],
    } | extra


def forecast(temps: list[float], **extra: Any) -> WeatherForecast:
    return WeatherForecast.model_validate(doc(temps, **extra))


# --------------------------------------------------------------------------- validation


def test_a_valid_forecast_parses_with_its_defaults() -> None:
    f = decode_weather(json.dumps(doc([20.0, 25.5])).encode())
    assert f.scope is None
    assert f.scope_key == "*"
    assert f.step_s == 3600
    assert [p.temp_c for p in f.points] == [20.0, 25.5]
    scoped = decode_weather(json.dumps(doc([1.0], scope="feeder:f1")).encode())
    assert scoped.scope_key == "feeder:f1"


@pytest.mark.parametrize(
    ("payload", "reason", "fragment"),
    [
        (b"{not json", Reason.MALFORMED_JSON, ""),
        (b"[1, 2]", Reason.SCHEMA_VIOLATION, "must be an object"),
        (
            json.dumps(doc([20.0]) | {"schema_version": "2"}).encode(),
            Reason.UNSUPPORTED_VERSION,
            "",
        ),
        (
            b'{"issued_at": "2024-06-20T06:00:00Z", "points": [{"start": "2024-06-20T12:00:00Z",'
            b' "temp_c": NaN}]}',
            Reason.SCHEMA_VIOLATION,
            "points.0.temp_c",
        ),
        (json.dumps(doc([20.0, 61.0])).encode(), Reason.SCHEMA_VIOLATION, "points.1.temp_c"),
        (json.dumps(doc([-60.5])).encode(), Reason.SCHEMA_VIOLATION, "points.0.temp_c"),
        (json.dumps(doc([])).encode(), Reason.SCHEMA_VIOLATION, "points"),
        (
            json.dumps(doc([20.0]) | {"issued_at": "2024-06-20T06:00:00"}).encode(),
            Reason.SCHEMA_VIOLATION,
            "issued_at",
        ),
        (json.dumps(doc([20.0], scope="feeder f1")).encode(), Reason.SCHEMA_VIOLATION, "scope"),
        (json.dumps(doc([20.0], wind_kmh=3)).encode(), Reason.SCHEMA_VIOLATION, "wind_kmh"),
    ],
)
def test_invalid_forecasts_are_rejected_with_a_specific_reason(
    payload: bytes, reason: Reason, fragment: str
) -> None:
    with pytest.raises(WeatherDecodeError) as caught:
        decode_weather(payload)
    assert caught.value.reason is reason
    assert fragment in caught.value.detail


def test_points_must_be_ordered_on_the_step() -> None:
    unordered = doc([20.0, 21.0, 22.0])
    unordered["points"].reverse()
    with pytest.raises(ValidationError, match=re.escape("points[1].start is not after")):
        WeatherForecast.model_validate(unordered)
    duplicate = doc([20.0, 21.0])
    duplicate["points"][1]["start"] = duplicate["points"][0]["start"]
    with pytest.raises(ValidationError, match="not after"):
        WeatherForecast.model_validate(duplicate)
    gap = doc([20.0, 21.0, 22.0])
    gap["points"][2]["start"] = iso(3)  # 2 h after the previous point with a 1 h step
    with pytest.raises(ValidationError, match="7200 s after the previous point; step_s is 3600"):
        WeatherForecast.model_validate(gap)
    with pytest.raises(ValidationError, match="step_s"):
        WeatherForecast.model_validate(doc([20.0, 21.0], step_h=0.5) | {"step_s": 3600})


def test_the_point_count_and_span_are_bounded() -> None:
    fourteen_days = [20.0] * (14 * 24)
    assert len(forecast(fourteen_days).points) == 14 * 24
    with pytest.raises(ValidationError, match="more than 14 days"):
        forecast([20.0] * (14 * 24 + 1))
    with pytest.raises(ValidationError, match="at most"):
        forecast([20.0] * (MAX_POINTS + 1), step_h=300 / 3600)
    with pytest.raises(WeatherDecodeError) as caught:
        decode_weather(b" " * (MAX_WEATHER_BYTES + 1))
    assert caught.value.reason is Reason.PAYLOAD_TOO_LARGE


# --------------------------------------------------------------------------- the series


def test_series_means_are_time_weighted_over_each_interval() -> None:
    series = TemperatureSeries.from_forecast(forecast([20.0, 30.0, 26.0]))
    t0 = T0.timestamp()
    starts = t0 + H * np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 2.5, 3.0])
    means = series.means(starts, H)
    # Before, half-covered (uses what is covered), steps, straddling two steps, the last step,
    # half of the last step, after the end.
    expected = [np.nan, 20.0, 20.0, 25.0, 30.0, 26.0, 26.0, np.nan]
    np.testing.assert_allclose(means, expected, equal_nan=True)
    # Finer and coarser grids than the forecast's step.
    np.testing.assert_allclose(series.means(t0 + 900 * np.arange(4.0), 900), [20.0] * 4)
    assert series.means(np.array([t0]), 3 * H)[0] == pytest.approx(76.0 / 3)
    # Less than half of the interval covered: not used.
    assert np.isnan(series.means(np.array([t0 + 2.6 * H]), H)[0])


def test_series_step_lookup() -> None:
    series = TemperatureSeries.from_forecast(forecast([20.0, 30.0]))
    assert series.at(T0) == 20.0
    assert series.at(T0 + timedelta(minutes=59)) == 20.0
    assert series.at(T0 + timedelta(hours=1, minutes=30)) == 30.0
    assert series.at(T0 - timedelta(seconds=1)) is None
    assert series.at(T0 + timedelta(hours=2)) is None


# --------------------------------------------------------------------------- the book


def test_an_older_or_equal_issue_is_ignored_per_scope() -> None:
    book = WeatherBook()
    first = forecast([20.0], issued_at=iso(-6))
    assert book.put(first)
    assert not book.put(forecast([35.0], issued_at=iso(-7))), "stale redelivery"
    assert not book.put(forecast([35.0], issued_at=iso(-6))), "same issue again"
    assert book.get(None) is first
    assert book.put(forecast([22.0], issued_at=iso(-8), scope="feeder:f1")), "another scope"
    newer = forecast([23.0], issued_at=iso(-5))
    assert book.put(newer)
    assert book.get(None) is newer
    assert len(book) == 2


def test_each_device_gets_the_most_specific_scope_covering_it() -> None:
    def located(device_id: str, feeder: str, transformer: str | None = None) -> Device:
        location = TopologyLocation(substation="s1", feeder=feeder, transformer=transformer)
        device = make_device(device_id, DerClass.THERMOSTAT)
        return device.model_copy(update={"location": location})

    devices = [located("a", "f1", "t1"), located("b", "f1"), located("c", "f2")]
    registry = Registry(
        devices, [Group(group_id="north", level=TopologyLevel.SUBSTATION, name="s1")]
    )
    book = WeatherBook()
    assert book.for_devices(devices, registry) == {}
    book.put(forecast([10.0], issued_at=iso(-1)))  # gateway-wide, newest of all
    book.put(forecast([11.0], issued_at=iso(-3), scope="substation:s1"))
    book.put(forecast([12.0], issued_at=iso(-2), scope="north"))  # same level, newer
    book.put(forecast([13.0], issued_at=iso(-4), scope="feeder:f1"))
    book.put(forecast([14.0], issued_at=iso(-5), scope="transformer:t1"))
    book.put(forecast([15.0], scope="feeder:gone"))  # not in the registry: covers nobody
    temps = {d: s.at(T0) for d, s in book.for_devices(devices, registry).items()}
    assert temps == {"a": 14.0, "b": 13.0, "c": 12.0}
    only = book.for_devices(devices[2:], registry)
    assert set(only) == {"c"}


def test_docs_schemas_of_the_flex_and_weather_messages_are_current() -> None:
    root = Path(__file__).resolve().parents[2]
    schemas = flex_json_schemas()
    assert "weather_forecast" in schemas
    for name, schema in schemas.items():
        on_disk = json.loads((root / "docs" / "schemas" / f"{name}.schema.json").read_text())
        assert on_disk == schema, (
            f"docs/schemas/{name}.schema.json is stale: run "
            "`derms-gateway schema --out docs/schemas`"
        )
