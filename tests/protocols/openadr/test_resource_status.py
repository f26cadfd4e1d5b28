"""TELEMETRY_STATUS as oadrPayloadResourceStatus: rendered through openleadr's template, valid
against the 2.0b schema, and read back with the meaning both our sides agree on."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from protocols.openadr import decode, encode
from protocols.openadr.resource_status import (
    ResourceStatus,
    install,
    read_resource_status,
    status_payload,
)

NOW = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)


def update_report(*payloads: dict[str, Any]) -> bytes:
    install()
    return encode(
        "oadrUpdateReport",
        {
            "request_id": "r1",
            "ven_id": "ven-1",
            "reports": [
                {
                    "report_id": "rep-1",
                    "report_request_id": "req-1",
                    "report_specifier_id": "status",
                    "report_name": "TELEMETRY_STATUS",
                    "created_date_time": NOW,
                    "dtstart": NOW,
                    "intervals": [{"dtstart": NOW, "report_payload": p} for p in payloads],
                }
            ],
        },
    )


@pytest.mark.parametrize(
    "status",
    [
        ResourceStatus(online=True, capacity_pct=55.5),
        ResourceStatus(online=False),
        ResourceStatus(online=True, manual_override=True, capacity_pct=0.0),
    ],
)
def test_a_status_goes_out_as_a_resource_status_and_reads_back(status: ResourceStatus) -> None:
    xml = update_report(status_payload("status:b1", status))
    assert b"oadrPayloadResourceStatus" in xml
    assert b"payloadFloat" not in xml
    _, parsed = decode(xml)  # validated against the 2.0b schema
    (interval,) = parsed["reports"][0]["intervals"]
    assert read_resource_status(interval["report_payload"]) == status


def test_usage_values_stay_payload_floats_beside_statuses() -> None:
    xml = update_report(
        status_payload("status:b1", ResourceStatus(online=True)), {"r_id": "usage:b1", "value": 2.5}
    )
    _, parsed = decode(xml)
    usage = parsed["reports"][0]["intervals"][1]["report_payload"]
    assert usage == {"r_id": "usage:b1", "value": 2.5}


def test_a_plain_float_status_from_openleadrs_own_ven_is_a_state_of_charge() -> None:
    assert read_resource_status({"r_id": "s", "value": 61.0}) == ResourceStatus(True, False, 61.0)
    assert read_resource_status({"r_id": "s", "value": "x"}) is None
    assert read_resource_status({"r_id": "s", "value": float("nan")}) is None
