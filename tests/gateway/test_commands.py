"""Command book: validation reasons, idempotency, lifecycle, supersession, restart (real SQLite)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.commands import CommandBook, CommandRejected
from gateway.dispatch import Plan
from gateway.registry import Registry
from gateway.store import CommandStore, StoreError
from unified.model import (
    Ack,
    AckState,
    Allocation,
    BatteryRatings,
    Cancel,
    DerClass,
    Device,
    DeviceSetpoint,
    Dispatch,
    Reason,
    Target,
    TopologyLocation,
)

NOW = datetime(2026, 7, 1, 16, 0, tzinfo=UTC)


def registry() -> Registry:
    return Registry(
        [
            Device(
                device_id=f"b{i}",
                der_class=DerClass.BATTERY,
                adapter="sunspec_battery",
                location=TopologyLocation(substation="s1", feeder="f1"),
                ratings=BatteryRatings(max_charge_kw=5, max_discharge_kw=5, capacity_kwh=10),
            )
            for i in (1, 2)
        ]
    )


class Sink:
    def __init__(self) -> None:
        self.acks: list[Ack] = []

    def __call__(self, ack: Ack, reply: object | None) -> None:
        self.acks.append(ack)

    def states(self, command_id: str) -> list[AckState]:
        return [a.state for a in self.acks if a.command_id == command_id]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CommandStore]:
    async with CommandStore(tmp_path / "cmd.sqlite") as s:
        yield s


def dispatch(
    cid: str = "d1",
    *,
    kw: float = -4.0,
    start: datetime = NOW,
    duration: float = 60,
    group: str = "feeder:f1",
    program: str = "p",
) -> Dispatch:
    return Dispatch(
        command_id=cid,
        target=Target(group_id=group),
        kw=kw,
        start=start,
        duration_s=duration,
        program=program,
    )


async def test_lifecycle_received_accepted_active_completed(store: CommandStore) -> None:
    sink = Sink()
    book = CommandBook(store, registry(), sink)
    await book.submit(dispatch(start=NOW + timedelta(seconds=10)), NOW)
    assert sink.states("d1") == [AckState.RECEIVED, AckState.ACCEPTED]
    await book.tick(NOW + timedelta(seconds=5), Plan())
    assert sink.states("d1")[-1] is AckState.ACCEPTED
    await book.tick(NOW + timedelta(seconds=10), Plan())
    assert sink.states("d1")[-1] is AckState.ACTIVE
    await book.tick(NOW + timedelta(seconds=70), Plan())
    assert sink.states("d1")[-1] is AckState.COMPLETED
    assert book.active(NOW + timedelta(seconds=70)) == []
    assert (await store.get("d1")).ack.state is AckState.COMPLETED  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (dispatch(group="feeder:nowhere"), Reason.UNKNOWN_GROUP),
        (
            Dispatch(
                command_id="d1",
                target=Target(device_ids=("b1", "ghost")),
                kw=-1,
                start=NOW,
                duration_s=60,
            ),
            Reason.UNKNOWN_DEVICE,
        ),
        (dispatch(start=NOW - timedelta(hours=1), duration=60), Reason.ALREADY_ENDED),
        (dispatch(kw=-10.5), Reason.BEYOND_RATINGS),
        (dispatch(kw=10.5), Reason.BEYOND_RATINGS),
        (
            DeviceSetpoint(command_id="d1", device_id="b1", kw=-5.5, start=NOW, duration_s=60),
            Reason.BEYOND_RATINGS,
        ),
        (
            DeviceSetpoint(command_id="d1", device_id="ghost", kw=-1, start=NOW, duration_s=60),
            Reason.UNKNOWN_DEVICE,
        ),
        (Cancel(command_id="d1", cancels="never-seen"), Reason.UNKNOWN_COMMAND),
    ],
)
async def test_rejections_carry_a_specific_reason(
    store: CommandStore, command: Dispatch, reason: Reason
) -> None:
    sink = Sink()
    book = CommandBook(store, registry(), sink)
    ack = await book.submit(command, NOW)
    assert ack.state is AckState.REJECTED
    assert ack.reason is reason
    assert ack.detail
    assert book.active(NOW) == []


async def test_redelivery_gets_the_same_ack_and_is_applied_once(store: CommandStore) -> None:
    sink = Sink()
    book = CommandBook(store, registry(), sink)
    first = await book.submit(dispatch(), NOW)
    again = await book.submit(dispatch(), NOW + timedelta(seconds=1))
    assert again == first
    assert len(book.active(NOW)) == 1
    assert await store.count() == 1


async def test_same_id_different_content_is_refused(store: CommandStore) -> None:
    book = CommandBook(store, registry(), Sink())
    await book.submit(dispatch(kw=-4), NOW)
    with pytest.raises(CommandRejected) as info:
        await book.submit(dispatch(kw=-3), NOW)
    assert info.value.reason is Reason.DUPLICATE_ID_CONFLICT
    assert book.active(NOW)[0].command.kw == -4  # type: ignore[union-attr]


async def test_cancel_marks_cancelled_and_a_second_cancel_is_not_cancellable(
    store: CommandStore,
) -> None:
    sink = Sink()
    book = CommandBook(store, registry(), sink)
    await book.submit(dispatch(), NOW)
    await book.tick(NOW, Plan())
    ack = await book.submit(Cancel(command_id="c1", cancels="d1"), NOW + timedelta(seconds=2))
    assert ack.state is AckState.COMPLETED
    assert sink.states("d1")[-1] is AckState.CANCELLED
    # Out of force at once, not only after the next lifecycle tick.
    assert book.active(NOW + timedelta(seconds=2)) == []
    await book.tick(NOW + timedelta(seconds=3), Plan())
    assert book.active(NOW + timedelta(seconds=3)) == []
    again = await book.submit(Cancel(command_id="c2", cancels="d1"), NOW + timedelta(seconds=4))
    assert again.reason is Reason.NOT_CANCELLABLE


async def test_newer_command_in_same_program_supersedes_older(store: CommandStore) -> None:
    sink = Sink()
    book = CommandBook(store, registry(), sink)
    await book.submit(dispatch("old", duration=600), NOW)
    await book.tick(NOW, Plan())
    await book.submit(
        dispatch("new", start=NOW + timedelta(seconds=30), duration=60), NOW + timedelta(seconds=1)
    )
    await book.tick(NOW + timedelta(seconds=20), Plan())
    assert sink.states("old")[-1] is AckState.ACTIVE  # the newer has not started yet
    await book.tick(NOW + timedelta(seconds=30), Plan())
    assert sink.states("old")[-1] is AckState.SUPERSEDED
    assert sink.states("new")[-1] is AckState.ACTIVE
    # Another program does not supersede: both stay in force.
    await book.submit(dispatch("other", program="q", duration=60), NOW + timedelta(seconds=31))
    await book.tick(NOW + timedelta(seconds=31), Plan())
    assert sink.states("new")[-1] is AckState.ACTIVE
    assert sink.states("other")[-1] is AckState.ACTIVE


async def test_a_superseding_commands_ack_never_names_what_it_superseded(
    store: CommandStore,
) -> None:
    """The plan of the cycle the newer command starts in was made while the older still held
    the devices: its ack must not name the command it has just superseded, and a conflict that
    ends is cleared from the ack at once."""
    sink = Sink()
    book = CommandBook(store, registry(), sink)
    await book.submit(dispatch("old", duration=600), NOW)
    await book.tick(NOW, Plan())
    later = NOW + timedelta(seconds=30)
    await book.submit(dispatch("new", start=later, duration=60), NOW + timedelta(seconds=1))
    stale = Plan(conflicts={"new": ["old"]}, allocations={"old": ()})
    await book.tick(later, stale)
    assert sink.states("old")[-1] is AckState.SUPERSEDED
    active = sink.acks[-1]
    assert active.command_id == "new"
    assert active.state is AckState.ACTIVE
    assert "old" not in (active.detail or "")

    # A real conflict with a command still in force is named, and cleared when it ends.
    await book.submit(dispatch("other", program="q", duration=600), later)
    await book.tick(later, Plan())
    blocked = Plan(conflicts={"new": ["other"]})
    await book.tick(later + timedelta(seconds=1), blocked)
    assert "other" in (sink.acks[-1].detail or "")
    await book.tick(later + timedelta(seconds=2), Plan())
    assert sink.acks[-1].command_id == "new"
    assert sink.acks[-1].detail is None


async def test_open_commands_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "cmd.sqlite"
    async with CommandStore(path) as store:
        book = CommandBook(store, registry(), Sink())
        await book.submit(dispatch("running", duration=600), NOW)
        await book.submit(dispatch("later", start=NOW + timedelta(hours=1), program="x"), NOW)
        await book.submit(
            dispatch("missed", start=NOW + timedelta(seconds=5), duration=5, program="y"), NOW
        )
        await book.tick(NOW, Plan())
    async with CommandStore(path) as store:
        sink = Sink()
        book = CommandBook(store, registry(), sink)
        # Back after 2 minutes: "missed" ran its whole window while we were down.
        await book.load(NOW + timedelta(minutes=2))
        active = {a.command.command_id for a in book.active(NOW + timedelta(minutes=2))}
        assert active == {"running"}
        assert sink.states("missed") == [AckState.FAILED]
        assert {e.command.command_id for e in book.open_entries()} == {"running", "later"}
        # a redelivery after the restart is still recognised
        again = await book.submit(dispatch("running", duration=600), NOW + timedelta(minutes=2))
        assert again.state is AckState.ACTIVE


async def test_a_store_that_cannot_record_the_command_leaves_a_final_failed_ack(
    store: CommandStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = Sink()
    book = CommandBook(store, registry(), sink)

    async def disk_full(*_: object) -> int:
        raise StoreError("command store: OperationalError: database or disk is full")

    monkeypatch.setattr(store, "insert", disk_full)
    with pytest.raises(StoreError):
        await book.submit(dispatch(), NOW)
    assert sink.states("d1") == [AckState.RECEIVED, AckState.FAILED]
    assert sink.acks[-1].reason is Reason.INTERNAL
    assert "not applied" in (sink.acks[-1].detail or "")
    assert book.active(NOW + timedelta(seconds=1)) == []


async def test_store_retention_deletes_only_old_commands_that_ended(store: CommandStore) -> None:
    old = NOW - timedelta(days=100)
    await store.insert(
        dispatch("old-done"), Ack(command_id="old-done", state=AckState.COMPLETED, timestamp=old)
    )
    await store.insert(
        dispatch("old-open"), Ack(command_id="old-open", state=AckState.ACTIVE, timestamp=old)
    )
    await store.insert(
        dispatch("new-done"), Ack(command_id="new-done", state=AckState.CANCELLED, timestamp=NOW)
    )
    removed = await store.prune(NOW - timedelta(days=90))
    assert removed == 1
    assert await store.get("old-done") is None
    assert await store.get("old-open") is not None  # open: never, whatever its age
    assert await store.get("new-done") is not None
    assert await store.count() == 2


async def test_acks_are_stored_compactly_and_read_back_exactly(
    store: CommandStore, tmp_path: Path
) -> None:
    # A feeder dispatch's ack with an allocation for each of 210 devices.
    allocations = tuple(
        Allocation(
            device_id=f"north-f{i % 7}-tstat-{i:05d}",
            requested_kw=-0.5 - (i * 0.0137) % 2.5,
            commanded_kw=-0.5 - (i * 0.0173) % 2.5,
            limited_by=("doe-north-f1",) if i % 5 == 0 else (),
        )
        for i in range(210)
    )
    ack = Ack(command_id="big", state=AckState.ACTIVE, timestamp=NOW, allocations=allocations)
    await store.insert(
        dispatch("big"), Ack(command_id="big", state=AckState.ACCEPTED, timestamp=NOW)
    )
    await store.update_ack(ack)
    stored = await store.get("big")
    assert stored is not None
    assert stored.ack.model_dump_json() == ack.model_dump_json(), "byte for byte what was sent"
    async with store.db.execute("SELECT length(ack) FROM commands WHERE command_id = 'big'") as cur:
        row = await cur.fetchone()
    assert row is not None
    assert len(ack.model_dump_json()) > 20_000
    assert row[0] < len(ack.model_dump_json()) / 4, "kept compact"
    # A row written as plain text (before compaction) is still read.
    await store.db.execute(
        "UPDATE commands SET ack = ? WHERE command_id = 'big'", (ack.model_dump_json(),)
    )
    stored = await store.get("big")
    assert stored is not None
    assert stored.ack == ack


async def test_pv_is_never_asked_to_import(store: CommandStore) -> None:
    pv = Device(
        device_id="pv1",
        der_class=DerClass.PV,
        adapter="sunspec_pv",
        location=TopologyLocation(substation="s1", feeder="f1"),
        ratings=BatteryRatings(max_charge_kw=6, max_discharge_kw=6, capacity_kwh=1),
    )
    book = CommandBook(store, Registry([*registry().devices(), pv]), Sink())
    ack = await book.submit(
        DeviceSetpoint(command_id="sp", device_id="pv1", kw=1.0, start=NOW, duration_s=60), NOW
    )
    assert (ack.state, ack.reason) == (AckState.REJECTED, Reason.BEYOND_RATINGS)
    assert "cannot import" in (ack.detail or "")
    # Curtailing it is fine ...
    ack = await book.submit(
        DeviceSetpoint(command_id="sp2", device_id="pv1", kw=-2.0, start=NOW, duration_s=60), NOW
    )
    assert ack.state is AckState.ACCEPTED
    # ... and a charging dispatch is held to the batteries' charge ratings alone (2 × 5 kW).
    ack = await book.submit(dispatch("d2", kw=12.0), NOW)
    assert (ack.state, ack.reason) == (AckState.REJECTED, Reason.BEYOND_RATINGS)
