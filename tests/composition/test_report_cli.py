"""``derms-gateway report`` over a real command store and reading history: the same bytes the
charts draw (and the live view serves), to standard output or a file, and its refusals."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from composition.cli import main
from gateway.history import ReadingHistory
from gateway.store import CommandStore
from tests.adapters.operator.samples import START, compliance_series, performance_report
from unified.model import (
    Ack,
    AckState,
    DeviceSetpoint,
    Dispatch,
    EnvelopeInterval,
    OperatingEnvelope,
    Target,
)

FIXTURES = Path(__file__).parents[1] / "adapters" / "operator" / "fixtures"

CONFIG = """
gateway_id = "gw-report"
[settlement]
timezone = "America/New_York"
[store]
path = "{store}"
{devices}
"""

DEVICE = """
[[devices]]
device_id = "{id}"
der_class = "battery"
location = {{ substation = "s1", feeder = "f1" }}
adapter = "sunspec_battery"
ratings = {{ max_charge_kw = 5, max_discharge_kw = 5, capacity_kwh = 10 }}
sunspec = {{ port = {port} }}
"""

# Per 5-minute history interval from START, each device's readings: the compliance sample.
READINGS = {
    "bat-1": [6.0, 10.025, 11.75, None, -4.0],
    "bat-2": [6.0, 10.025, 11.75, None, None],
}


def ack(cid: str, state: AckState, **extra: object) -> Ack:
    return Ack(command_id=cid, state=state, timestamp=START, **extra)  # type: ignore[arg-type]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    store = tmp_path / "gw.sqlite"
    devices = "".join(DEVICE.format(id=d, port=5020 + i) for i, d in enumerate(READINGS))
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG.format(store=store, devices=devices))
    sample = compliance_series()
    envelope = OperatingEnvelope(
        command_id="doe-1",
        target=Target(group_id="feeder:f1"),
        intervals=(
            EnvelopeInterval(
                start=START,
                end=START + timedelta(minutes=20),
                import_limit_kw=20.0,
                export_limit_kw=5.0,
            ),
            EnvelopeInterval(
                start=START + timedelta(minutes=20),
                end=START + timedelta(minutes=25),
                import_limit_kw=15.0,
                export_limit_kw=2.5,
            ),
        ),
    )
    dispatch = Dispatch(
        command_id="shed-1",
        target=Target(group_id="feeder:f1"),
        kw=-10,
        start=START,
        duration_s=10800,
    )
    setpoint = DeviceSetpoint(
        command_id="sp-1", device_id="bat-1", kw=1.0, start=START, duration_s=60
    )

    async def fill() -> None:
        async with CommandStore(store) as commands:
            await commands.insert(
                envelope, ack("doe-1", AckState.ACTIVE, compliance=sample.summary)
            )
            await commands.insert(dispatch, ack("shed-1", AckState.COMPLETED))
            await commands.insert(setpoint, ack("sp-1", AckState.COMPLETED))
        async with ReadingHistory(store.with_name("gw.history.sqlite")) as history:
            for device_id, values in READINGS.items():
                for i, kw in enumerate(values):
                    if kw is not None:
                        history.observe(device_id, START + timedelta(minutes=5 * i + 2), kw)
            await history.flush()
            await history.save_report("shed-1", START, performance_report().model_dump_json())

    asyncio.run(fill())
    return path


def run(*args: str) -> tuple[int, bytes, str]:
    result = CliRunner().invoke(main, ["report", *args], catch_exceptions=False)
    return result.exit_code, result.stdout_bytes, result.stderr


def test_a_dispatch_and_an_envelope_as_csv_and_svg(config: Path, tmp_path: Path) -> None:
    assert run("shed-1", "--config", str(config)) == (
        0,
        (FIXTURES / "performance.csv").read_bytes(),
        "",
    )
    code, out, _ = run("shed-1", "--format", "svg", "--config", str(config))
    assert code == 0
    assert out == (FIXTURES / "performance.svg").read_bytes()
    # The envelope from the history: the same points as the charts' fixed sample.
    code, out, _ = run("doe-1", "--format", "csv", "--config", str(config))
    assert code == 0
    assert out == (FIXTURES / "compliance.csv").read_bytes()
    target = tmp_path / "doe-1.svg"
    code, out, err = run("doe-1", "--format", "svg", "--config", str(config), "--out", str(target))
    assert code == 0
    assert out == b""
    assert f"wrote {target}" in err
    assert target.read_bytes() == (FIXTURES / "compliance.svg").read_bytes()


def test_what_has_no_report_is_refused_with_why(config: Path, tmp_path: Path) -> None:
    code, _, err = run("nope", "--config", str(config))
    assert code == 1
    assert "nope: no command with this id" in err
    code, _, err = run("sp-1", "--config", str(config))
    assert code == 1
    assert "a setpoint has no report" in err
    code, _, err = run("shed-1", "--format", "png", "--config", str(config))
    assert code == 2
    assert "'png' is not one of 'csv', 'svg'" in err
    empty = tmp_path / "empty.toml"
    empty.write_text(
        '[settlement]\ntimezone = "UTC"\n'
        f'[store]\npath = "{tmp_path / "absent.sqlite"}"\n' + DEVICE.format(id="b", port=1)
    )
    code, _, err = run("shed-1", "--config", str(empty))
    assert code == 1
    assert "no command store at" in err
    assert not (tmp_path / "absent.sqlite").exists()
