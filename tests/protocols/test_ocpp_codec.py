"""The OCPP codec (pure): charging profiles out, meter values and charging needs in.

Profiles are compared as ``json.dumps(payload, sort_keys=True)`` against literal JSON, so any
change to a key, a value, a type (``7400.0`` vs ``7400``, ``42`` vs ``"42"``) or the rounding
shows up here before it reaches a charger.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from protocols.ocpp import (
    CLOCK_SKEW_ALLOWANCE,
    ChargingProfileLimit,
    EvChargingNeeds,
    InvalidChargingNeeds,
    MeterReading,
    OcppVersion,
    ProfilePurpose,
    RateUnit,
    clear_charging_profile,
    decode_data_transfer_needs,
    decode_ev_charging_needs,
    decode_meter_values,
    format_time,
    parse_time,
    profile_rate,
    register_kwh,
    set_charging_profile,
)

try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # not in the test extra: the property tests below are skipped
    HAVE_HYPOTHESIS = False
else:
    HAVE_HYPOTHESIS = True

NOW = datetime(2026, 3, 4, 5, 6, 7, 891_011, tzinfo=UTC)
START = "2026-03-04T05:05:07Z"  # NOW less the clock-skew allowance, to the second
SITE, DEFAULT, TX = ProfilePurpose.SITE_CAP, ProfilePurpose.TX_DEFAULT, ProfilePurpose.TX


def rendered(
    version: OcppVersion,
    limit: ChargingProfileLimit,
    unit: RateUnit = "W",
    phases: int = 3,
    *,
    voltage_v: float = 230.0,
    now: datetime = NOW,
) -> str:
    payload = set_charging_profile(
        version,
        limit,
        rate_unit=unit,
        voltage_v=voltage_v,
        phases=phases,
        stack_level=1,
        now=now,
    )
    return json.dumps(payload, sort_keys=True)


def sampled(*values: dict[str, Any], timestamp: str = "2026-03-04T05:00:00Z") -> list[Any]:
    return [{"timestamp": timestamp, "sampled_value": list(values)}]


# --------------------------------------------------------------------------- 1.6 profiles


def test_16_tx_profile_in_w() -> None:
    limit = ChargingProfileLimit(TX, 7.4, transaction_id="42", connector_id=1)
    assert rendered("ocpp1.6", limit) == (
        '{"connector_id": 1, "cs_charging_profiles": {"charging_profile_id": 90003, '
        '"charging_profile_kind": "Absolute", "charging_profile_purpose": "TxProfile", '
        '"charging_schedule": {"charging_rate_unit": "W", "charging_schedule_period": '
        '[{"limit": 7400.0, "start_period": 0}], "start_schedule": "2026-03-04T05:05:07Z"}, '
        '"stack_level": 1, "transaction_id": 42}}'
    )


def test_16_tx_default_profile_in_a_over_three_phases() -> None:
    # 11 kW / (230 V × 3) = 15.94 A per phase, rounded down
    assert rendered("ocpp1.6", ChargingProfileLimit(DEFAULT, 11.0), "A", 3) == (
        '{"connector_id": 0, "cs_charging_profiles": {"charging_profile_id": 90002, '
        '"charging_profile_kind": "Absolute", "charging_profile_purpose": "TxDefaultProfile", '
        '"charging_schedule": {"charging_rate_unit": "A", "charging_schedule_period": '
        '[{"limit": 15.9, "number_phases": 3, "start_period": 0}], '
        '"start_schedule": "2026-03-04T05:05:07Z"}, "stack_level": 1}}'
    )


def test_16_tx_default_profile_in_a_on_one_phase() -> None:
    # 3 kW / 230 V = 13.04 A, rounded down
    assert rendered("ocpp1.6", ChargingProfileLimit(DEFAULT, 3.0), "A", 1) == (
        '{"connector_id": 0, "cs_charging_profiles": {"charging_profile_id": 90002, '
        '"charging_profile_kind": "Absolute", "charging_profile_purpose": "TxDefaultProfile", '
        '"charging_schedule": {"charging_rate_unit": "A", "charging_schedule_period": '
        '[{"limit": 13.0, "number_phases": 1, "start_period": 0}], '
        '"start_schedule": "2026-03-04T05:05:07Z"}, "stack_level": 1}}'
    )


def test_16_charge_point_max_profile_in_w() -> None:
    assert rendered("ocpp1.6", ChargingProfileLimit(SITE, 4.26)) == (
        '{"connector_id": 0, "cs_charging_profiles": {"charging_profile_id": 90001, '
        '"charging_profile_kind": "Absolute", "charging_profile_purpose": '
        '"ChargePointMaxProfile", "charging_schedule": {"charging_rate_unit": "W", '
        '"charging_schedule_period": [{"limit": 4260.0, "start_period": 0}], '
        '"start_schedule": "2026-03-04T05:05:07Z"}, "stack_level": 1}}'
    )


def test_16_zero_kw_in_a() -> None:
    assert rendered("ocpp1.6", ChargingProfileLimit(SITE, 0.0), "A", 3) == (
        '{"connector_id": 0, "cs_charging_profiles": {"charging_profile_id": 90001, '
        '"charging_profile_kind": "Absolute", "charging_profile_purpose": '
        '"ChargePointMaxProfile", "charging_schedule": {"charging_rate_unit": "A", '
        '"charging_schedule_period": [{"limit": 0.0, "number_phases": 3, "start_period": 0}], '
        '"start_schedule": "2026-03-04T05:05:07Z"}, "stack_level": 1}}'
    )


# --------------------------------------------------------------------------- 2.0.1 profiles


def test_201_tx_profile_in_w() -> None:
    limit = ChargingProfileLimit(TX, 7.4, transaction_id="abc-1", connector_id=1)
    assert rendered("ocpp2.0.1", limit) == (
        '{"charging_profile": {"charging_profile_kind": "Absolute", '
        '"charging_profile_purpose": "TxProfile", "charging_schedule": '
        '[{"charging_rate_unit": "W", "charging_schedule_period": '
        '[{"limit": 7400.0, "start_period": 0}], "id": 90003, '
        '"start_schedule": "2026-03-04T05:05:07Z"}], "id": 90003, "stack_level": 1, '
        '"transaction_id": "abc-1"}, "evse_id": 1}'
    )


def test_201_tx_default_profile_in_a_over_three_phases() -> None:
    assert rendered("ocpp2.0.1", ChargingProfileLimit(DEFAULT, 11.0), "A", 3) == (
        '{"charging_profile": {"charging_profile_kind": "Absolute", '
        '"charging_profile_purpose": "TxDefaultProfile", "charging_schedule": '
        '[{"charging_rate_unit": "A", "charging_schedule_period": '
        '[{"limit": 15.9, "number_phases": 3, "start_period": 0}], "id": 90002, '
        '"start_schedule": "2026-03-04T05:05:07Z"}], "id": 90002, "stack_level": 1}, '
        '"evse_id": 0}'
    )


def test_201_charging_station_max_profile_in_a_on_one_phase() -> None:
    assert rendered("ocpp2.0.1", ChargingProfileLimit(SITE, 3.0), "A", 1) == (
        '{"charging_profile": {"charging_profile_kind": "Absolute", '
        '"charging_profile_purpose": "ChargingStationMaxProfile", "charging_schedule": '
        '[{"charging_rate_unit": "A", "charging_schedule_period": '
        '[{"limit": 13.0, "number_phases": 1, "start_period": 0}], "id": 90001, '
        '"start_schedule": "2026-03-04T05:05:07Z"}], "id": 90001, "stack_level": 1}, '
        '"evse_id": 0}'
    )


def test_201_zero_kw_in_w() -> None:
    assert rendered("ocpp2.0.1", ChargingProfileLimit(SITE, 0.0)) == (
        '{"charging_profile": {"charging_profile_kind": "Absolute", '
        '"charging_profile_purpose": "ChargingStationMaxProfile", "charging_schedule": '
        '[{"charging_rate_unit": "W", "charging_schedule_period": '
        '[{"limit": 0.0, "start_period": 0}], "id": 90001, '
        '"start_schedule": "2026-03-04T05:05:07Z"}], "id": 90001, "stack_level": 1}, '
        '"evse_id": 0}'
    )


def test_keys_keep_their_order_on_the_wire() -> None:
    """The ``ocpp`` package writes nested dicts in their order: it is part of the bytes sent."""
    payload = set_charging_profile(
        "ocpp2.0.1",
        ChargingProfileLimit(TX, 7.4, transaction_id="abc-1", connector_id=1),
        rate_unit="A",
        voltage_v=230.0,
        phases=3,
        stack_level=2,
        now=NOW,
    )
    assert json.dumps(payload) == (
        '{"evse_id": 1, "charging_profile": {"id": 90003, "stack_level": 2, '
        '"charging_profile_purpose": "TxProfile", "charging_profile_kind": "Absolute", '
        '"charging_schedule": [{"id": 90003, "start_schedule": "2026-03-04T05:05:07Z", '
        '"charging_rate_unit": "A", "charging_schedule_period": '
        '[{"start_period": 0, "limit": 10.7, "number_phases": 3}]}], '
        '"transaction_id": "abc-1"}}'
    )


# --------------------------------------------------------------------------- shared rules


@pytest.mark.parametrize(
    ("limit_kw", "unit", "phases", "expected"),
    [
        (7.39999, "W", 3, 7399.9),  # down, never up: a cap is never exceeded by rounding
        (1.001, "W", 3, 1001.0),  # 1.001 × 1000 is 1000.9999999999999: float noise is not a cut
        (0.00005, "W", 3, 0.0),
        (4.26, "A", 1, 18.5),  # 18.52 A
        (4.26, "A", 3, 6.1),  # 6.17 A
        (8.165, "A", 1, 35.5),  # 35.49999999999999 A
        (4.071, "A", 3, 5.9),  # 5.8999999999999995 A
        (13.8, "A", 3, 20.0),
        (0.0, "A", 1, 0.0),
    ],
)
def test_rounding_is_down_to_a_tenth(
    limit_kw: float, unit: RateUnit, phases: int, expected: float
) -> None:
    assert profile_rate(limit_kw, unit, voltage_v=230.0, phases=phases) == expected
    for version in ("ocpp1.6", "ocpp2.0.1"):
        payload = json.loads(rendered(version, ChargingProfileLimit(SITE, limit_kw), unit, phases))
        profile = payload.get("cs_charging_profiles") or payload["charging_profile"]
        schedule = profile["charging_schedule"]
        schedule = schedule if isinstance(schedule, dict) else schedule[0]
        assert schedule["charging_schedule_period"][0]["limit"] == expected


def test_voltage_matters_only_in_a() -> None:
    limit = ChargingProfileLimit(DEFAULT, 7.2)
    assert profile_rate(7.2, "A", voltage_v=120.0, phases=1) == 60.0
    assert rendered("ocpp1.6", limit, voltage_v=120.0) == rendered("ocpp1.6", limit)
    with pytest.raises(ValueError, match="phase"):
        profile_rate(7.2, "A", voltage_v=230.0, phases=0)
    with pytest.raises(ValueError, match="phase"):
        profile_rate(7.2, "A", voltage_v=0.0, phases=3)


def test_schedule_starts_a_minute_early_in_utc() -> None:
    assert timedelta(seconds=60) == CLOCK_SKEW_ALLOWANCE
    local = NOW.astimezone(timezone(timedelta(hours=10)))  # same instant, another offset
    limit = ChargingProfileLimit(SITE, 4.0)
    assert rendered("ocpp2.0.1", limit, now=local) == rendered("ocpp2.0.1", limit)
    assert START in rendered("ocpp1.6", limit)


def test_only_a_tx_profile_goes_to_a_connector() -> None:
    tx = json.loads(rendered("ocpp2.0.1", ChargingProfileLimit(TX, 1.0, "7", connector_id=2)))
    assert tx["evse_id"] == 2
    site = json.loads(rendered("ocpp1.6", ChargingProfileLimit(SITE, 1.0, connector_id=2)))
    assert site["connector_id"] == 0


def test_clear_by_our_ids() -> None:
    assert json.dumps(clear_charging_profile("ocpp1.6", SITE)) == '{"id": 90001}'
    assert json.dumps(clear_charging_profile("ocpp1.6", TX)) == '{"id": 90003}'
    assert (
        json.dumps(clear_charging_profile("ocpp2.0.1", DEFAULT)) == '{"charging_profile_id": 90002}'
    )


@pytest.mark.parametrize(
    ("purpose", "kw", "transaction_id", "match"),
    [
        (SITE, -0.1, None, "not valid"),
        (SITE, math.nan, None, "not valid"),
        (SITE, math.inf, None, "not valid"),
        (TX, 3.0, None, "transaction"),
        (DEFAULT, 3.0, "1", "transaction"),
    ],
)
def test_invalid_limits_are_refused(
    purpose: ProfilePurpose, kw: float, transaction_id: str | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ChargingProfileLimit(purpose, kw, transaction_id)


# --------------------------------------------------------------------------- meter values


def test_16_units_and_defaults() -> None:
    reading = decode_meter_values(
        sampled(
            {"value": "7.2", "measurand": "Power.Active.Import", "unit": "kW"},
            {"value": "1500"},  # no measurand: the energy register; no unit: Wh
            {"value": "230", "measurand": "Voltage", "unit": "V"},
        ),
        "ocpp1.6",
    )
    assert reading == MeterReading(datetime(2026, 3, 4, 5, tzinfo=UTC), 7.2, 1.5, None)
    in_w = decode_meter_values(
        sampled(
            {"value": "7200", "measurand": "Power.Active.Import", "unit": "W"},
            {"value": "12.5", "measurand": "Energy.Active.Import.Register", "unit": "kWh"},
            {"value": "55.5", "measurand": "SoC", "unit": "Percent"},
        ),
        "ocpp1.6",
    )
    assert in_w == MeterReading(datetime(2026, 3, 4, 5, tzinfo=UTC), 7.2, 12.5, 55.5)


def test_201_units_and_multipliers() -> None:
    reading = decode_meter_values(
        sampled(
            {"value": 7.2, "measurand": "Power.Active.Import",
             "unit_of_measure": {"unit": "W", "multiplier": 3}},
            {"value": 12500, "measurand": "Energy.Active.Import.Register"},
            {"value": 55, "measurand": "SoC", "unit_of_measure": {"unit": "Percent"}},
        ),
        "ocpp2.0.1",
    )  # fmt: skip
    assert reading is not None
    assert reading.power_kw == pytest.approx(7.2)
    assert (reading.energy_kwh, reading.soc_pct) == (12.5, 55)
    kwh = decode_meter_values(
        sampled(
            {"value": 125, "measurand": "Energy.Active.Import.Register",
             "unit_of_measure": {"unit": "kWh", "multiplier": -1}},
            {"value": 11, "measurand": "Power.Active.Import", "unit_of_measure": {"unit": "kW"}},
        ),
        "ocpp2.0.1",
    )  # fmt: skip
    assert kwh == MeterReading(datetime(2026, 3, 4, 5, tzinfo=UTC), 11.0, 12.5, None)


def test_phases_are_skipped_not_summed() -> None:
    per_phase = [
        {"value": "2000", "measurand": "Power.Active.Import", "unit": "W", "phase": phase}
        for phase in ("L1", "L2", "L3")
    ]
    assert decode_meter_values(sampled(*per_phase), "ocpp1.6") is None
    total = {"value": "6000", "measurand": "Power.Active.Import", "unit": "W"}
    reading = decode_meter_values(sampled(*per_phase, total), "ocpp1.6")
    assert reading is not None
    assert reading.power_kw == 6.0


@pytest.mark.parametrize("version", ["ocpp1.6", "ocpp2.0.1"])
def test_garbage_is_ignored(version: OcppVersion) -> None:
    power = "Power.Active.Import"
    junk: list[Any] = [
        "not a sampled value",
        {"value": "abc", "measurand": power, "unit": "W"},
        {"value": None, "measurand": power},
        {"value": True, "measurand": power},
        {"value": "NaN", "measurand": power},
        {"value": "1e999", "measurand": power},
        {"value": "10", "measurand": power, "unit": "VA"},
        {"value": "10", "measurand": power, "unit_of_measure": {"unit": "VA"}},
        {"value": "10", "measurand": "Power.Active.Export"},
        {"value": "101", "measurand": "SoC"},
        {"value": "-1", "measurand": "SoC"},
        {"value": "10", "measurand": power, "unit_of_measure": "W"},
        {"value": "10", "measurand": power, "unit_of_measure": {"multiplier": "x"}},
        {"value": "10", "measurand": power, "unit_of_measure": {"multiplier": 999}},
    ]
    assert decode_meter_values(sampled(*junk), version) is None
    for nothing in ("garbage", None, {}, [], [1, "x"], [{"sampled_value": None}]):
        assert decode_meter_values(nothing, version) is None
    good = {"value": "5", "measurand": "SoC"}
    assert decode_meter_values(sampled(*junk, good), version) == MeterReading(
        datetime(2026, 3, 4, 5, tzinfo=UTC), None, None, 5.0
    )


def test_latest_timestamp_and_last_value_win() -> None:
    energy = "Energy.Active.Import.Register"
    reading = decode_meter_values(
        [
            *sampled({"value": "1", "measurand": energy, "unit": "kWh"},
                     timestamp="2026-03-04T05:00:05Z"),
            *sampled({"value": "2", "measurand": energy, "unit": "kWh"},
                     timestamp="2026-03-04T07:00:01+02:00"),
            *sampled({"value": "3", "measurand": "SoC"}, timestamp="2026-03-04T05:00:09"),
            *sampled({"value": "V", "measurand": "SoC"}, timestamp="2026-03-04T06:00:00Z"),
        ],
        "ocpp1.6",
    )  # fmt: skip
    # A naive timestamp says nothing; an entry with nothing kept does not count.
    assert reading == MeterReading(datetime(2026, 3, 4, 5, 0, 5, tzinfo=UTC), None, 2.0, 3.0)


def test_decimals_and_registers() -> None:
    reading = decode_meter_values(
        sampled({"value": Decimal("1.5"), "measurand": "Power.Active.Import", "unit": "kW"}),
        "ocpp1.6",
    )
    assert reading is not None
    assert reading.power_kw == 1.5
    assert register_kwh(12_345) == 12.345


# --------------------------------------------------------------------------- charging needs


def test_16_data_transfer_needs() -> None:
    data = json.dumps(
        {
            "energyAmountWh": 12000,
            "departureTime": "2026-03-04T09:00:00+01:00",
            "evEnergyCapacityWh": "60000",
            "evMaxPowerW": 7400,
        }
    )
    assert decode_data_transfer_needs(data) == EvChargingNeeds(
        12.0, datetime(2026, 3, 4, 8, tzinfo=UTC), 60.0, 7.4
    )
    loose = decode_data_transfer_needs('{"energyAmountWh": 0, "evMaxPowerW": "fast"}')
    assert loose == EvChargingNeeds(0.0, None, None, None)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "energyAmountWh missing"),
        ("not json", "energyAmountWh missing"),
        ("[1]", "energyAmountWh missing"),
        ("{}", "energyAmountWh missing"),
        ('{"energyAmountWh": null}', "energyAmountWh invalid"),
        ('{"energyAmountWh": -1}', "energyAmountWh invalid"),
    ],
)
def test_16_data_transfer_without_energy(data: str | None, message: str) -> None:
    with pytest.raises(InvalidChargingNeeds) as caught:
        decode_data_transfer_needs(data)
    assert str(caught.value) == message
    assert caught.value.field == "energyAmountWh"


def test_201_ev_charging_needs() -> None:
    ac = {
        "departure_time": "2026-03-04T08:00:00Z",
        "ac_charging_parameters": {
            "energy_amount": 5000,
            "ev_min_current": 6,
            "ev_max_current": 16,
            "ev_max_voltage": 230,
        },
    }
    assert decode_ev_charging_needs(ac, phases=3) == EvChargingNeeds(
        5.0, datetime(2026, 3, 4, 8, tzinfo=UTC), None, 11.04
    )
    assert decode_ev_charging_needs(ac, phases=1).ev_max_kw == 3.68
    dc = {
        "dc_charging_parameters": {
            "energy_amount": 30000,
            "ev_energy_capacity": 80000,
            "ev_max_power": 50000,
            "ev_max_current": 125,
            "ev_max_voltage": 400,
        }
    }
    assert decode_ev_charging_needs(dc, phases=3) == EvChargingNeeds(30.0, None, 80.0, 50.0)
    with pytest.raises(InvalidChargingNeeds, match="energy_amount invalid"):
        decode_ev_charging_needs({"ac_charging_parameters": {"energy_amount": -1}}, phases=3)
    with pytest.raises(InvalidChargingNeeds):
        decode_ev_charging_needs({}, phases=3)


# --------------------------------------------------------------------------- primitives


def test_times() -> None:
    assert format_time(NOW) == "2026-03-04T05:06:07Z"
    assert format_time(NOW.astimezone(timezone(timedelta(hours=-5)))) == "2026-03-04T05:06:07Z"
    assert parse_time("2026-03-04T05:06:07Z") == NOW.replace(microsecond=0)
    assert parse_time("2026-03-04T06:06:07.5+01:00") == NOW.replace(microsecond=500_000)
    for not_a_time in ("2026-03-04T05:06:07", "yesterday", 1_700_000_000, None):
        assert parse_time(not_a_time) is None
    # Times that overflow converting to UTC, or a reset clock: not a time, never an exception.
    for far in ("9999-12-31T23:00:00-05:00", "0001-01-01T00:00:00+05:00", "1900-01-01T00:00:00Z"):
        assert parse_time(far) is None


# --------------------------------------------------------------------------- properties

if HAVE_HYPOTHESIS:
    kilowatts = st.floats(min_value=0, max_value=1000, allow_nan=False)
    volts = st.floats(min_value=100, max_value=480, allow_nan=False)
    phase_counts = st.integers(min_value=1, max_value=3)

    @given(kilowatts, volts, phase_counts)
    def test_a_to_w_to_a_round_trips(kw: float, voltage_v: float, phases: int) -> None:
        amps = profile_rate(kw, "A", voltage_v=voltage_v, phases=phases)
        back_kw = amps * voltage_v * phases / 1000
        assert profile_rate(back_kw, "A", voltage_v=voltage_v, phases=phases) == amps

    @given(kilowatts)
    def test_w_to_kw_to_w_round_trips(kw: float) -> None:
        watts = profile_rate(kw, "W", voltage_v=230.0, phases=3)
        assert profile_rate(watts / 1000, "W", voltage_v=230.0, phases=3) == watts

    @given(kilowatts, volts, phase_counts, st.sampled_from(["W", "A"]))
    def test_never_negative_never_above_the_limit(
        kw: float, voltage_v: float, phases: int, unit: RateUnit
    ) -> None:
        rate = profile_rate(kw, unit, voltage_v=voltage_v, phases=phases)
        exact = kw * 1000 / (voltage_v * phases if unit == "A" else 1)
        assert rate >= 0
        assert exact - 0.1 - 1e-9 <= rate <= exact + 1e-6

    units = st.sampled_from(["W", "kW", "Wh", "kWh", "Percent", "VA"])
    measurands = st.sampled_from(["Power.Active.Import", "Energy.Active.Import.Register", "SoC"])
    stamps = st.sampled_from(["2026-03-04T05:00:00Z", "2026-03-04T07:00:00+02:00", "05:00"])
    leaves = st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=6)
    numbers = st.floats() | st.integers() | st.decimals() | st.sampled_from(["12.5", "-3", "1e999"])
    well_formed = st.fixed_dictionaries(
        {"value": numbers, "measurand": measurands},
        optional={
            "unit": units,
            "unit_of_measure": st.fixed_dictionaries(
                {}, optional={"unit": units, "multiplier": st.integers(-3, 3)}
            ),
            "phase": st.just("L1"),
        },
    )
    malformed = st.dictionaries(
        st.sampled_from(["value", "measurand", "unit", "unit_of_measure", "phase"]),
        leaves | st.dictionaries(st.sampled_from(["unit", "multiplier"]), leaves),
    )
    entry = st.fixed_dictionaries(
        {"sampled_value": st.lists(well_formed | malformed, max_size=6)},
        optional={"timestamp": stamps | leaves},
    )
    meter_values = st.lists(entry, min_size=1, max_size=4) | st.lists(entry | leaves) | leaves

    @given(meter_values, st.sampled_from(["ocpp1.6", "ocpp2.0.1"]))
    def test_any_meter_values_decode_or_are_ignored(value: Any, version: OcppVersion) -> None:
        reading = decode_meter_values(value, version)
        if reading is not None:
            for kept in (reading.power_kw, reading.energy_kwh, reading.soc_pct):
                assert kept is None or math.isfinite(kept)
            assert reading.soc_pct is None or 0 <= reading.soc_pct <= 100
            assert reading.measured_at is None or reading.measured_at.tzinfo is UTC

else:

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_properties_need_hypothesis() -> None:
        pass
