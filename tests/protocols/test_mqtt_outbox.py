"""The edge outbox's wire codec and the head end's receiver (pure, exact bytes)."""

from __future__ import annotations

from protocols.mqtt.outbox import (
    InOrderReceiver,
    Record,
    decode_record,
    encode_record,
    outbox_topic,
)


def test_record_wire_format_is_exact_and_round_trips() -> None:
    record = Record("telemetry", 42, 1765100000.25, b"\x00kW")
    data = encode_record(record, 40)
    assert data == (
        b'{"stream":"telemetry","seq":42,"floor":40,"created":1765100000.25,"payload":"AGtX"}'
    )
    assert decode_record(data) == (record, 40)
    assert outbox_topic("site-1", "acks") == "derms/v1/edge/site-1/outbox/acks"


def test_receiver_takes_each_record_once_in_order_and_skips_dropped_numbers() -> None:
    rx = InOrderReceiver()

    def rec(seq: int) -> Record:
        return Record("t", seq, 0.0, b"")

    assert rx.receive(rec(3)) == []  # a live copy ahead of the backlog: held
    assert rx.live["t"].seq == 3
    assert [r.seq for r in rx.receive(rec(1))] == [1]
    assert [r.seq for r in rx.receive(rec(2))] == [2, 3]
    assert rx.receive(rec(2)) == []  # redelivered: dropped
    assert rx.duplicates == 1
    assert [r.seq for r in rx.receive(rec(7), floor=7)] == [7]  # 4–6 dropped by the sender
    assert rx.skipped == 3
