"""Fuzz: registry requests (``{root}/requests/registry``) at the decoder: a request or a
:class:`RegistryDecodeError`, never anything else; an error keeps the request id when the payload
had a usable one (so the refusal goes to that request's ack topic)."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import example, given

from protocols.mqtt.northbound import RegistryDecodeError, decode_registry_request
from tests.fuzz.common import Tally, dumps, fuzz_settings, json_payloads
from unified.model import ID_PATTERN
from unified.registry import RegistryRequest

_ID = re.compile(ID_PATTERN)

BATTERY: dict[str, Any] = {
    "device_id": "bat-1",
    "der_class": "battery",
    "adapter": "sunspec_battery",
    "location": {"substation": "s1", "feeder": "f1", "feeder_section": "x"},
    "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 10},
    "programs": ["p"],
    "rate_class": "tou",
    "reach": {"sunspec": {"host": "10.0.0.7", "port": 502}},
}
VALID: list[dict[str, Any]] = [
    {"request_id": "r1", "op": "enrol", "devices": [BATTERY], "expected_version": 3},
    {"request_id": "r2", "op": "update", "devices": [BATTERY]},
    {"request_id": "r3", "op": "retire", "device_ids": ["bat-1", "bat-2"]},
    {
        "request_id": "r4",
        "op": "topology",
        "section_moves": [{"feeder_section": "x", "feeder": "f2", "substation": "s1"}],
        "moves": [{"device_id": "bat-1", "location": {"substation": "s2"}}],
    },
    {
        "request_id": "r5",
        "op": "approve",
        "devices": [{"device_id": "t1", "location": {"substation": "s1", "feeder": "f1"}}],
    },
    {
        "request_id": "r6",
        "op": "eligibility",
        "decisions": [{"device_id": "t1", "program_id": "p", "eligibility": "eligible"}],
    },
    {"request_id": "r7", "op": "get"},
]


def test_decode_registry_request_raises_only_its_own_error() -> None:
    tally = Tally("northbound.decode_registry_request")

    @fuzz_settings(500)
    @given(json_payloads(VALID))
    @example(b"[" * 100_000)
    @example(b'{"request_id":"r1","op":"get","x":' + b"[" * 50_000)
    @example(dumps(VALID[0] | {"devices": [BATTERY | {"ratings": {"max_charge_kw": "nan"}}]}))
    def one(payload: bytes) -> None:
        result = _decoded(payload)  # raises anything but RegistryDecodeError
        if isinstance(result, RegistryDecodeError):
            tally(result.reason.value)
            raw = _object(payload)
            rid = None if raw is None else raw.get("request_id")
            usable = isinstance(rid, str) and _ID.fullmatch(rid) is not None
            assert result.request_id == (rid if usable else None), (result, rid)
            return
        tally("decoded")
        assert _ID.fullmatch(result.request_id)

    one()
    tally.check(300)


def _decoded(payload: bytes) -> RegistryRequest | RegistryDecodeError:
    try:
        return decode_registry_request(payload)
    except RegistryDecodeError as exc:
        return exc


def _object(payload: bytes) -> dict[str, Any] | None:
    try:
        raw = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return raw if isinstance(raw, dict) else None
