"""Envelopes that disconnect or de-energize DERs (``connect`` / ``energize`` false): the devices
exchange no power, nothing counts on them, and their command says so (2030.5 opModConnect /
opModEnergize, SunSpec Conn)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from gateway.dispatch import ActiveCommand, plan
from gateway.registry import Registry
from tests.gateway.test_dispatch import NOW, battery, dispatch, state
from unified.model import EnvelopeInterval, OperatingEnvelope, Target


def switch(cid: str, devices: tuple[str, ...], **flags: bool) -> OperatingEnvelope:
    return OperatingEnvelope(
        command_id=cid,
        target=Target(device_ids=devices),
        intervals=(
            EnvelopeInterval(
                start=NOW - timedelta(minutes=1), end=NOW + timedelta(minutes=10), **flags
            ),
        ),
    )


def test_a_disconnected_battery_is_held_off_and_the_dispatch_goes_around_it() -> None:
    reg = Registry([battery(1), battery(2)])
    states = {"b1": state("b1"), "b2": state("b2")}
    disconnect = switch("trip-b1", ("b1",), connect=False)
    p = plan(NOW, reg, states, [ActiveCommand(dispatch(-8.0), 1), ActiveCommand(disconnect, 2)])
    held = p.setpoints["b1"]
    assert held.connect is False
    assert held.power_kw is None
    # 0 both ways too: an adapter that cannot open the connection still stops the device.
    assert (held.import_limit_kw, held.export_limit_kw) == (0.0, 0.0)
    assert [s.command_id for s in held.provenance] == ["trip-b1"]
    # The dispatch counts only on b2, and says it falls short by what b1 cannot give.
    assert [a.device_id for a in p.allocations["d1"]] == ["b2"]
    assert p.setpoints["b2"].power_kw == pytest.approx(-5.0)
    assert p.setpoints["b2"].connect is None
    assert p.shortfall_kw["d1"] == pytest.approx(3.0)


def test_de_energize_holds_the_device_and_false_wins_over_true() -> None:
    reg = Registry([battery(1), battery(2)])
    states = {"b1": state("b1"), "b2": state("b2")}
    commands = [
        ActiveCommand(switch("on", ("b1", "b2"), connect=True), 1),
        ActiveCommand(switch("off", ("b1",), energize=False), 2),
        ActiveCommand(dispatch(-2.0), 3),
    ]
    p = plan(NOW, reg, states, commands)
    assert p.setpoints["b1"].energize is False
    assert p.setpoints["b1"].power_kw is None
    assert [a.device_id for a in p.allocations["d1"]] == ["b2"]
    # A reconnect rides on the device's own setpoint.
    assert p.setpoints["b2"].connect is True
    assert p.setpoints["b2"].power_kw == pytest.approx(-2.0)
    assert {s.command_id for s in p.setpoints["b2"].provenance} == {"d1", "on"}


def test_after_its_interval_the_device_is_dispatched_again() -> None:
    reg = Registry([battery(1), battery(2)])
    states = {"b1": state("b1"), "b2": state("b2")}
    disconnect = switch("trip-b1", ("b1",), connect=False)
    later = NOW + timedelta(minutes=11)
    p = plan(
        later,
        reg,
        states,
        [ActiveCommand(dispatch(-8.0, start=later), 1), ActiveCommand(disconnect, 2)],
    )
    assert p.setpoints["b1"].connect is None
    assert p.setpoints["b1"].power_kw == pytest.approx(-4.0)


def test_an_interval_may_carry_only_a_switch_but_not_nothing() -> None:
    with pytest.raises(ValueError, match="sets none of"):
        EnvelopeInterval(start=NOW, end=NOW + timedelta(minutes=1))
    only = EnvelopeInterval(start=NOW, end=NOW + timedelta(minutes=1), connect=False)
    assert only.connect is False
