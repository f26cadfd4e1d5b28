"""The edge outbox's records on the wire, and the head end's in-order, de-duplicating receiver.

Pure (no I/O): :mod:`edge_agent.outbox` stores and forwards these records, :mod:`edge_agent.uplink`
publishes them, and the head end decodes them here and hands them to :class:`InOrderReceiver`.
Topic ``derms/v1/edge/{site}/outbox/{stream}``; payload JSON ``{"stream", "seq", "floor",
"created", "payload"}`` (``payload`` base64, ``floor`` the sender's oldest stored number).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["InOrderReceiver", "Record", "decode_record", "encode_record", "outbox_topic"]


def outbox_topic(site_id: str, stream: str) -> str:
    return f"derms/v1/edge/{site_id}/outbox/{stream}"


@dataclass(frozen=True, slots=True)
class Record:
    stream: str
    seq: int
    created: float
    payload: bytes


def encode_record(record: Record, floor: int) -> bytes:
    return json.dumps(
        {
            "stream": record.stream,
            "seq": record.seq,
            "floor": floor,
            "created": record.created,
            "payload": base64.b64encode(record.payload).decode("ascii"),
        },
        separators=(",", ":"),
    ).encode()


def decode_record(data: bytes) -> tuple[Record, int]:
    """The head end's side of :func:`encode_record`: the record and its stream's floor."""
    obj: dict[str, Any] = json.loads(data)
    record = Record(
        stream=str(obj["stream"]),
        seq=int(obj["seq"]),
        created=float(obj["created"]),
        payload=base64.b64decode(obj["payload"]),
    )
    return record, int(obj["floor"])


class InOrderReceiver:
    """The head end's side: each ``(stream, seq)`` once, and each stream's records in order.

    A record ahead of the next expected one (the live copy sent before the backlog) is held
    back until the gap is filled, but shown at once as the stream's :attr:`live` value; a number
    already taken is dropped. ``floor`` (the sender's oldest stored number) lets the receiver
    skip numbers the sender dropped when its outbox was full.
    """

    def __init__(self) -> None:
        self.next_seq: dict[str, int] = {}
        self.delivered: list[Record] = []
        self.live: dict[str, Record] = {}
        self._held: dict[str, dict[int, Record]] = {}
        self.duplicates = 0
        self.skipped = 0

    def receive(self, record: Record, floor: int = 1) -> list[Record]:
        """Take one record off the wire; returns the records it makes deliverable, in order."""
        expected = self.next_seq.get(record.stream, 1)
        held = self._held.setdefault(record.stream, {})
        if floor > expected:
            self.skipped += floor - expected - sum(1 for s in held if s < floor)
            for seq in sorted(s for s in held if s < floor):
                self.delivered.append(held.pop(seq))
            expected = floor
        live = self.live.get(record.stream)
        if live is None or record.seq > live.seq:
            self.live[record.stream] = record
        if record.seq < expected or record.seq in held:
            self.duplicates += 1
            return []
        held[record.seq] = record
        out: list[Record] = []
        while expected in held:
            out.append(held.pop(expected))
            expected += 1
        self.next_seq[record.stream] = expected
        self.delivered.extend(out)
        return out
