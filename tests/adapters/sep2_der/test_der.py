"""The 2030.5 DER adapter: setpoint → DERControl, mirrored telemetry → DeviceState.

The server runs for real on a free port; clients post envoy's captured request bodies over HTTP
(plain-HTTP development mode, identified by the LFDI header).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from adapters.sep2_der.der import Sep2Der, Sep2DerEndpoint
from adapters.sep2_der.server import Sep2Server, Sep2ServerConfig
from gateway.devices import DeviceAdapter, DeviceUnavailable, DispatchNotice, UnsafeCommand
from gateway.supervisor import DeviceSupervisor
from protocols.sep2 import (
    MEDIA_TYPE,
    CsipAusVersion,
    DateTimeInterval,
    DERControl,
    decode_as,
    encode,
    to_watts,
)
from tests.protocols.sep2.envoy_fixtures import load
from unified.model import DeviceCommand, EnvelopeInterval, LimitSource

LFDI = "F0F83B2BC825E617DEBD7192F9305B4B6ABC00F5"  # envoy capture's device A
HEADER = "X-LFDI"


class Clock:
    """The server's clock, movable by tests (event expiry, telemetry age)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def server(clock: Clock) -> AsyncIterator[Sep2Server]:
    config = Sep2ServerConfig(port=0, dev_lfdi_header=HEADER)
    srv = Sep2Server(config, clock=clock)
    try:
        yield srv
    finally:
        await srv.stop()


async def _send(srv: Sep2Server, method: str, href: str, fixture: str | bytes) -> str | None:
    body = load(fixture) if isinstance(fixture, str) else fixture
    headers = {HEADER: LFDI, "Content-Type": MEDIA_TYPE}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, srv.url + href, data=body, headers=headers) as resp,
    ):
        assert resp.status in (201, 204), await resp.text()
        return resp.headers.get("Location")


def _adapter(srv: Sep2Server, **endpoint: object) -> Sep2Der:
    return Sep2Der(
        "der-1",
        Sep2DerEndpoint.model_validate({"lfdi": LFDI, **endpoint}),
        server=srv,
        groups=("substation:s1",),
    )


def _command(kw: float | None) -> DeviceCommand:
    return DeviceCommand(device_id="der-1", power_kw=kw)


async def test_is_a_device_adapter(server: Sep2Server) -> None:
    adapter = _adapter(server)
    assert isinstance(adapter, DeviceAdapter)
    await adapter.connect()
    await adapter.connect()  # the shared server starts once
    assert server.running
    await adapter.close()
    await adapter.close()
    assert server.running  # other devices still use it


async def test_read_needs_fresh_telemetry(server: Sep2Server, clock: Clock) -> None:
    adapter = _adapter(server, stale_after_s=120)
    await adapter.connect()
    with pytest.raises(DeviceUnavailable, match="no der power"):
        await adapter.read()
    edev = server.edev_href("der-1")
    await _send(server, "PUT", f"{edev}/der/1/ders", "req-der-status.xml")
    await _send(server, "PUT", f"{edev}/der/1/dercap", "req-der-capability.xml")
    mup = await _send(server, "POST", "/mup", "req-mup-der.xml")
    assert mup is not None
    state = await adapter.read()
    assert state.power_kw == pytest.approx(4.21)  # + is import: the battery charges
    assert state.soc_pct == pytest.approx(65.5)
    assert (state.max_charge_kw, state.max_discharge_kw) == (5, 5)
    assert state.capacity_kwh == pytest.approx(13.5)
    assert state.setpoint_kw is None
    assert state.source == f"sep2:{LFDI}"
    assert abs((datetime.now(UTC) - state.timestamp).total_seconds()) < 5

    # A later reading with reverse flow direction: + means export, so the sign flips.
    reverse = (
        load("req-mmr.xml")
        .replace(b"F0F83B2BC825E617DEBD719210000001", b"F0F83B2BC825E617DEBD719220000009")
        .replace(
            b"<Reading>",
            b"<ReadingType><flowDirection>19</flowDirection><powerOfTenMultiplier>1"
            b"</powerOfTenMultiplier><uom>38</uom></ReadingType><Reading>",
        )
        .replace(b"-2345", b"300")
    )
    await _send(server, "POST", mup, reverse)
    assert (await adapter.read()).power_kw == pytest.approx(-3.0)

    clock.offset = -600  # the last post is now ten minutes old
    await _send(server, "POST", mup, reverse)
    with pytest.raises(DeviceUnavailable, match="stale"):
        await adapter.read()


async def test_site_power_when_configured(server: Sep2Server) -> None:
    adapter = _adapter(server, power_from="site")
    await adapter.connect()
    mup = await _send(server, "POST", "/mup", "req-mup-site.xml")
    assert mup is not None
    await _send(server, "POST", "/mup", "req-mup-der.xml")
    await _send(server, "POST", mup, "req-mmr.xml")
    state = await adapter.read()
    assert state.power_kw == pytest.approx(-2.345)  # site exporting
    assert state.soc_pct is None
    assert state.max_charge_kw is None


async def test_apply_target_w(server: Sep2Server) -> None:
    adapter = _adapter(server, supports_target_w=True)
    await adapter.apply(_command(-3))
    control = server.snapshot("der-1").active_control
    assert control is not None
    assert control.power_kw == -3
    base = control.base
    assert base.op_mod_target_w is not None
    assert to_watts(base.op_mod_target_w) == 3000
    assert base.op_mod_gen_lim_w is not None
    assert to_watts(base.op_mod_gen_lim_w) == 3000
    assert base.op_mod_load_lim_w is not None
    assert to_watts(base.op_mod_load_lim_w) == 0
    assert base.op_mod_fixed_w is None

    await adapter.apply(_command(2.5))
    control = server.snapshot("der-1").active_control
    assert control is not None
    assert control.base.op_mod_target_w is not None
    assert to_watts(control.base.op_mod_target_w) == -2500  # charging
    assert control.base.op_mod_load_lim_w is not None
    assert to_watts(control.base.op_mod_load_lim_w) == 2500

    await adapter.apply(_command(None))
    assert server.snapshot("der-1").active_control is None


async def test_storage_target_on_a_csip_aus_v1_3_server(server: Sep2Server) -> None:
    """opModStorageTargetW (CSIP-AUS v1.3: charge +, discharge -) when the endpoint asks for
    it; refused at enrolment on a server that speaks the v1.2 namespace."""
    with pytest.raises(ValueError, match=r"v1\.3"):
        _adapter(server, storage_target=True)
    config = Sep2ServerConfig(port=0, dev_lfdi_header=HEADER, csipaus=CsipAusVersion.V1_3)
    v13 = Sep2Server(config)
    try:
        adapter = _adapter(v13, storage_target=True)
        await adapter.apply(_command(2.5))  # charge
        control = v13.snapshot("der-1").active_control
        assert control is not None
        assert control.base.op_mod_storage_target_w is not None
        assert to_watts(control.base.op_mod_storage_target_w) == 2500
        await adapter.apply(_command(-3))  # discharge
        control = v13.snapshot("der-1").active_control
        assert control is not None
        assert control.base.op_mod_storage_target_w is not None
        assert to_watts(control.base.op_mod_storage_target_w) == -3000
        assert control.base.op_mod_target_w is None
        wire = encode(
            DERControl(
                mrid="AB" * 16,
                creation_time=0,
                interval=DateTimeInterval(duration=60, start=0),
                der_control_base=control.base,
            ),
            csipaus=CsipAusVersion.V1_3,
        )
        assert b"opModStorageTargetW" in wire
        assert decode_as(DERControl, wire).der_control_base == control.base
    finally:
        await v13.stop()


async def test_apply_chooses_mode_from_capability(server: Sep2Server) -> None:
    adapter = _adapter(server)
    await adapter.connect()
    with pytest.raises(DeviceUnavailable, match="DERCapability"):
        await adapter.apply(_command(-1))
    edev = server.edev_href("der-1")
    await _send(server, "PUT", f"{edev}/der/1/dercap", "req-der-capability.xml")
    await adapter.apply(_command(-1))  # 019001FF: no opModTargetW → opModFixedW
    control = server.snapshot("der-1").active_control
    assert control is not None
    assert control.base.op_mod_fixed_w == 2000
    assert control.base.op_mod_target_w is None

    with_target = load("req-der-capability.xml").replace(b"019001FF", b"01D001FF")
    await _send(server, "PUT", f"{edev}/der/1/dercap", with_target)
    await adapter.apply(_command(-1))
    control = server.snapshot("der-1").active_control
    assert control is not None
    assert control.base.op_mod_target_w is not None
    assert to_watts(control.base.op_mod_target_w) == 1000


async def test_unsafe_setpoints_are_refused(server: Sep2Server) -> None:
    adapter = _adapter(server)
    edev = server.edev_href("der-1")
    await adapter.connect()
    await _send(server, "PUT", f"{edev}/der/1/dercap", "req-der-capability.xml")
    with pytest.raises(UnsafeCommand, match="discharge rating"):
        await adapter.apply(_command(-6))
    with pytest.raises(UnsafeCommand, match="not a number"):
        await adapter.apply(_command(float("nan")))
    with pytest.raises(UnsafeCommand, match="for other"):
        await adapter.apply(DeviceCommand(device_id="other", power_kw=1))
    assert server.snapshot("der-1").active_control is None
    await adapter.apply(_command(-5.04))  # within the 1 % tolerance: clipped to the rating
    control = server.snapshot("der-1").active_control
    assert control is not None
    assert control.power_kw == -5
    assert control.base.op_mod_fixed_w == 10000


async def test_refresh_renews_the_control_back_to_back(server: Sep2Server, clock: Clock) -> None:
    adapter = _adapter(server, supports_target_w=True, control_duration_s=600)
    await adapter.apply(_command(-2))
    first = server.snapshot("der-1").active_control
    clock.offset = 200
    await adapter.apply(_command(-2))
    assert server.snapshot("der-1").active_control == first  # unchanged: no churn
    clock.offset = 400  # under half of the duration left
    await adapter.apply(_command(-2))
    renewed = server.snapshot("der-1").active_control
    assert first is not None
    assert renewed is not None
    assert renewed.mrid != first.mrid
    assert renewed.start == first.start + 400
    clock.offset = 400 + 601  # nobody renewed it: it lapses to the default
    assert server.snapshot("der-1").active_control is None


async def test_supervisor_drives_the_adapter(server: Sep2Server) -> None:
    """The generic supervisor connects, polls and applies through this adapter unchanged."""
    adapter = _adapter(server, supports_target_w=True)
    await adapter.connect()
    await _send(server, "POST", "/mup", "req-mup-der.xml")
    supervisor = DeviceSupervisor(adapter, poll_interval_s=0.05, io_timeout_s=1, refresh_s=60)
    supervisor.command(_command(-1.5))
    task = asyncio.create_task(supervisor.run())
    try:
        for _ in range(100):
            if supervisor.latest is not None and supervisor.writes:
                break
            await asyncio.sleep(0.02)
        assert supervisor.available
        assert supervisor.latest is not None
        assert supervisor.latest.setpoint_kw == -1.5
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_autonomous_limits_are_device_or_site_limits(server: Sep2Server) -> None:
    # A single DER gets generation / load limits; a client standing for a whole site (it
    # mirrors site power) gets the CSIP-AUS site export / import limits.
    der = _adapter(server)
    await der.apply(
        DeviceCommand(device_id="der-1", power_kw=None, export_limit_kw=2.5, import_limit_kw=4.0)
    )
    control = server.snapshot("der-1").active_control
    assert control is not None
    base = control.base
    assert base.op_mod_gen_lim_w is not None
    assert to_watts(base.op_mod_gen_lim_w) == 2500
    assert base.op_mod_load_lim_w is not None
    assert to_watts(base.op_mod_load_lim_w) == 4000
    assert base.op_mod_exp_lim_w is None

    site = Sep2Der(
        "site-1",
        Sep2DerEndpoint(lfdi="86441F107B66EBFE65B39FB3D5D7BAAEDA3EA6BF", power_from="site"),
        server=server,
        groups=("substation:s1",),
    )
    await site.apply(DeviceCommand(device_id="site-1", power_kw=None, export_limit_kw=1.5))
    control = server.snapshot("site-1").active_control
    assert control is not None
    assert control.base.op_mod_exp_lim_w is not None
    assert to_watts(control.base.op_mod_exp_lim_w) == 1500
    assert control.base.op_mod_gen_lim_w is None
    # No limits at all: back to the program's default.
    await site.apply(DeviceCommand(device_id="site-1", power_kw=None))
    assert server.snapshot("site-1").active_control is None


async def test_a_site_gets_its_storage_target_and_its_export_limit_in_one_control() -> None:
    """CSIP-AUS STO-03/06: a dispatch and an envelope on the same site at once are one DERControl
    with opModStorageTargetW and the site's opModExpLimW / opModImpLimW; an envelope over a
    group of several devices is not one site's connection-point limit and stays out of it."""
    config = Sep2ServerConfig(port=0, dev_lfdi_header=HEADER, csipaus=CsipAusVersion.V1_3)
    v13 = Sep2Server(config)
    try:
        site = Sep2Der(
            "site-1",
            Sep2DerEndpoint(lfdi=LFDI, storage_target=True, power_from="site"),
            server=v13,
            groups=("substation:s1",),
        )
        now = datetime.now(UTC)
        hour = timedelta(hours=1)
        group_wide = EnvelopeInterval(start=now - hour, end=now + hour, export_limit_kw=0.5)
        site.notice(
            DispatchNotice(
                "env-feeder", now - hour, now + hour, 0.0, kind="envelope",
                intervals=(group_wide,), devices=40,
            )
        )
        dispatch = (LimitSource(command_id="dispatch-1", kind="dispatch"),)
        await site.apply(DeviceCommand(device_id="site-1", power_kw=-3, provenance=dispatch))
        control = v13.snapshot("site-1").active_control
        assert control is not None
        assert control.base.op_mod_exp_lim_w is None  # 40 sites share that limit

        own = EnvelopeInterval(
            start=now - hour, end=now + hour, export_limit_kw=1.5, import_limit_kw=6.0
        )
        later = EnvelopeInterval(start=now + hour, end=now + 2 * hour, export_limit_kw=0.0)
        site.notice(
            DispatchNotice(
                "env-site", now - hour, now + 2 * hour, 0.0, kind="envelope",
                intervals=(own, later), devices=1,
            )
        )
        await site.apply(DeviceCommand(device_id="site-1", power_kw=-3, provenance=dispatch))
        control = v13.snapshot("site-1").active_control
        assert control is not None
        base = control.base
        assert base.op_mod_storage_target_w is not None
        assert to_watts(base.op_mod_storage_target_w) == -3000  # discharge 3 kW
        assert base.op_mod_exp_lim_w is not None
        assert to_watts(base.op_mod_exp_lim_w) == 1500  # the interval in force now
        assert base.op_mod_imp_lim_w is not None
        assert to_watts(base.op_mod_imp_lim_w) == 6000
        assert [s.command_id for s in control.provenance] == ["dispatch-1", "env-site"]
        wire = encode(
            DERControl(
                mrid="AB" * 16,
                creation_time=0,
                interval=DateTimeInterval(duration=60, start=0),
                der_control_base=base,
            ),
            csipaus=CsipAusVersion.V1_3,
        )
        assert b"opModStorageTargetW" in wire
        assert b"opModExpLimW" in wire

        # The envelope withdrawn: the next refresh carries the storage target alone.
        site.notice(
            DispatchNotice("env-site", now - hour, now + 2 * hour, 0.0, withdrawn=True)
        )
        await site.apply(DeviceCommand(device_id="site-1", power_kw=-3, provenance=dispatch))
        control = v13.snapshot("site-1").active_control
        assert control is not None
        assert control.base.op_mod_exp_lim_w is None
        assert control.base.op_mod_storage_target_w is not None
    finally:
        await v13.stop()


async def test_disconnect_and_de_energize_are_opmodconnect_and_opmodenergize(
    server: Sep2Server,
) -> None:
    """CSIP-AUS ALL-11/12: an envelope's disconnect reaches the client as a DERControl with
    opModConnect false (de-energize: opModEnergize false), on its own; the release after it
    cancels it, so the client falls back to its default and reconnects."""
    der = _adapter(server, supports_target_w=True)
    trip = (LimitSource(command_id="trip-1", kind="envelope"),)
    await der.apply(
        DeviceCommand(
            device_id="der-1",
            power_kw=None,
            import_limit_kw=0.0,
            export_limit_kw=0.0,
            connect=False,
            provenance=trip,
        )
    )
    control = server.snapshot("der-1").active_control
    assert control is not None
    assert control.base.op_mod_connect is False
    assert control.base.op_mod_energize is None
    assert control.base.op_mod_gen_lim_w is None  # the on/off control alone
    assert control.provenance == trip
    wire = encode(
        DERControl(
            mrid="AB" * 16,
            creation_time=0,
            interval=DateTimeInterval(duration=60, start=0),
            der_control_base=control.base,
        )
    )
    assert b"<opModConnect>false</opModConnect>" in wire

    await der.apply(
        DeviceCommand(device_id="der-1", power_kw=None, energize=False, provenance=trip)
    )
    control = server.snapshot("der-1").active_control
    assert control is not None
    assert (control.base.op_mod_connect, control.base.op_mod_energize) == (None, False)

    # A reconnect rides on a setpoint.
    await der.apply(DeviceCommand(device_id="der-1", power_kw=-1.0, connect=True))
    control = server.snapshot("der-1").active_control
    assert control is not None
    assert control.base.op_mod_connect is True
    assert control.base.op_mod_target_w is not None

    await der.apply(DeviceCommand(device_id="der-1", power_kw=None))
    assert server.snapshot("der-1").active_control is None
