"""Wall-clock steps: detected against the monotonic clock, said on every open command's ack,
and kept out of the control state's elapsed time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.clock import STEP_DETAIL, ClockWatch
from gateway.commands import CommandBook
from gateway.delivery import DeliveryLoop, DeliveryTuning, DeviceBaseline, EnvelopeWatch
from gateway.dispatch import Plan, Release
from gateway.store import CommandStore
from tests.gateway.test_commands import NOW, Sink, dispatch, registry
from unified.model import AckState


class Monotonic:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_steady_time_and_ntp_slewing_are_not_steps() -> None:
    mono = Monotonic()
    watch = ClockWatch(tolerance_s=2.0, monotonic=mono)
    assert watch.observe(NOW) is None
    for k in range(1, 200):
        mono.t += 10.0
        # 400 ppm fast: slewing, not stepping.
        assert watch.observe(NOW + timedelta(seconds=10.004 * k)) is None
    assert watch.steps == 0


@pytest.mark.parametrize("step_s", [3600.0, -3600.0, 5.0, -5.0])
def test_a_step_either_way_is_measured(step_s: float) -> None:
    mono = Monotonic()
    watch = ClockWatch(tolerance_s=2.0, monotonic=mono)
    watch.observe(NOW)
    mono.t += 10.0
    step = watch.observe(NOW + timedelta(seconds=10.0 + step_s))
    assert step is not None
    assert step.step.total_seconds() == pytest.approx(step_s)
    assert step.describe().startswith(STEP_DETAIL)
    assert ("forward" in step.describe()) == (step_s > 0)
    assert watch.steps == 1
    # Time goes on normally after it: no second step.
    mono.t += 10.0
    assert watch.observe(NOW + timedelta(seconds=20.0 + step_s)) is None


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CommandStore]:
    async with CommandStore(tmp_path / "cmd.sqlite") as s:
        yield s


async def test_a_forward_step_that_ends_a_command_says_so_on_its_completion(
    store: CommandStore,
) -> None:
    sink = Sink()
    book = CommandBook(store, registry(), sink)
    await book.submit(dispatch(duration=600), NOW)
    await book.tick(NOW, Plan())
    assert sink.states("d1")[-1] is AckState.ACTIVE
    book.clock_stepped(f"{STEP_DETAIL} forward by 3600 s")
    await book.tick(NOW + timedelta(seconds=3610), Plan())
    last = sink.acks[-1]
    assert last.state is AckState.COMPLETED
    assert last.detail is not None
    assert last.detail.startswith(STEP_DETAIL)


async def test_a_backward_step_is_said_once_on_a_running_command_and_on_a_pending_one(
    store: CommandStore,
) -> None:
    sink = Sink()
    book = CommandBook(store, registry(), sink, progress_interval_s=3600)
    await book.submit(dispatch("d1", duration=7200), NOW)
    await book.submit(dispatch("d2", start=NOW + timedelta(hours=1), program="q"), NOW)
    await book.tick(NOW, Plan())
    published = len(sink.acks)
    later = NOW + timedelta(seconds=10)
    await book.tick(later, Plan())
    assert len(sink.acks) == published, "nothing new to say without the step"
    book.clock_stepped(f"{STEP_DETAIL} back by 1800 s")
    await book.tick(later - timedelta(seconds=1800), Plan())
    said = {a.command_id: a for a in sink.acks[published:]}
    assert set(said) == {"d1", "d2"}
    assert said["d1"].state is AckState.ACTIVE
    assert said["d2"].state is AckState.ACCEPTED
    assert all(a.detail and a.detail.startswith(STEP_DETAIL) for a in said.values())
    # Said once: the next running ack no longer carries it.
    await book.tick(later - timedelta(seconds=1790), Plan())
    d1 = [a for a in sink.acks if a.command_id == "d1"]
    assert d1[-1].detail is None


def test_a_shifted_loop_counts_the_true_period_not_the_step() -> None:
    tuning = DeliveryTuning(smoothing_s=60.0, integral_s=300.0, settle_s=300.0)
    baseline = {f"d{i}": DeviceBaseline(3.0, 0.01) for i in range(4)}
    measured = dict.fromkeys(baseline, 2.0)  # delivering -4 of -8: short
    steady, stepped = DeliveryLoop(tuning), DeliveryLoop(tuning)
    for loop in (steady, stepped):
        loop.hold(baseline)
        loop.update(NOW, -8.0, measured, 100.0)
    stepped.shift(timedelta(hours=1))
    a = steady.update(NOW + timedelta(seconds=10), -8.0, measured, 100.0)
    b = stepped.update(NOW + timedelta(seconds=3610), -8.0, measured, 100.0)
    assert b.committed_kw == pytest.approx(a.committed_kw)
    # Without the shift the hour counts as elapsed and the correction winds up.
    unshifted = DeliveryLoop(tuning)
    unshifted.hold(baseline)
    unshifted.update(NOW, -8.0, measured, 100.0)
    c = unshifted.update(NOW + timedelta(seconds=3610), -8.0, measured, 100.0)
    assert abs(c.committed_kw) > abs(a.committed_kw) + 1.0


def test_a_shifted_envelope_watch_and_plan_keep_true_durations() -> None:
    watch = EnvelopeWatch()
    watch.update(NOW, (10.0, None), 20.0, 1, 1)
    watch.shift(timedelta(hours=1))
    report = watch.update(NOW + timedelta(seconds=3610), (10.0, None), 20.0, 1, 1)
    assert report.seconds_outside == pytest.approx(10.0)
    plan = Plan(
        held_since={"t1": NOW},
        releasing={"t2": Release("d1", -1.0, NOW + timedelta(minutes=5))},
    )
    plan.shift(timedelta(hours=-1))
    assert plan.held_since["t1"] == NOW - timedelta(hours=1)
    assert plan.releasing["t2"].at == NOW + timedelta(minutes=5) - timedelta(hours=1)
    assert plan.releasing["t2"].command_id == "d1"
