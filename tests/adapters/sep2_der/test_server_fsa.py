"""Several FunctionSetAssignments per EndDevice (IEEE 2030.5 §10.10, CSIP-AUS GEN/LOA-10, P-02).

Each program of a device (its feeder's, its substation's, a transformer's ...) comes in its own
FunctionSetAssignments, strongest primacy first; a client that walks every one of them (our own
``Sep2Client`` over real mutual TLS) finds the control and defaults in force by primacy. When
the registry moves a device to another feeder, its FSAs follow at once and the subscribers of
its FunctionSetAssignmentsList are told; FSA ids outlive a restart (real SQLite).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from adapters.sep2_client.client import Sep2Client, Sep2ClientConfig
from adapters.sep2_der.der import Sep2Der, Sep2DerEndpoint
from adapters.sep2_der.server import Sep2DefaultEnvelope, Sep2Server, Sep2TlsConfig
from composition.certs import describe, make_ca, make_cert
from composition.config import parse_config
from gateway.core import Gateway
from protocols.sep2 import (
    DERControlBase,
    DERControlList,
    DERProgram,
    DERProgramList,
    DeviceCapability,
    EndDevice,
    EndDeviceList,
    FunctionSetAssignments,
    FunctionSetAssignmentsList,
    MirrorUsagePointList,
    from_watts,
)
from protocols.tls import client_ssl_context
from tests.adapters.sep2_der.test_server import (
    LFDI_A,
    LFDI_B,
    LFDI_STRANGER,
    Client,
    Pki,
    _config,
    pki,
)
from tests.adapters.sep2_der.test_server_subscriptions import Receiver, receiver
from tests.adapters.sep2_der.test_server_subscriptions import _subscription as subscription
from tests.gateway.test_audit_core import Acks
from unified.model import Device, LimitSource, TopologyLocation

__all__ = ["pki", "receiver"]  # fixtures


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


async def _walk(c: Client, edev: str) -> list[tuple[str, list[DERProgram]]]:
    """Every FSA of the EndDevice (href) with the programs its DERProgramList lists."""
    end_device = await c.get_as(EndDevice, edev)
    assert end_device.function_set_assignments_list_link is not None
    fsas = await c.get_as(FunctionSetAssignmentsList, f"{edev}/fsa?l=20")
    assert fsas.all == end_device.function_set_assignments_list_link.all == len(fsas.items)
    walked = []
    for item in fsas.items:
        assert await c.get_as(FunctionSetAssignments, item.href or "") == item
        assert item.der_program_list_link is not None
        listed = await c.get_as(DERProgramList, item.der_program_list_link.href + "?l=20")
        walked.append((item.href or "", list(listed.items)))
    return walked


def _names(walked: list[tuple[str, list[DERProgram]]]) -> list[list[str | None]]:
    return [[p.description for p in programs] for _, programs in walked]


async def _effective(server: Sep2Server, pki: Pki, lfdi: str, state: Path) -> Sep2Client:
    """Our own 2030.5 client, over mutual TLS, after one full walk from /dcap."""

    async def ignore(_: object) -> None:
        return None

    client = Sep2Client(
        Sep2ClientConfig(server_url=server.url, lfdi=lfdi, state_path=state),
        on_envelope=ignore,
        ssl_context=client_ssl_context(pki.device_cert, pki.device_key, pki.ca),
    )
    await client.open()
    try:
        await client.poll_once()
    finally:
        await client.stop()
    return client


def _tls_server(pki: Pki, **overrides: object) -> Sep2Server:
    tls = Sep2TlsConfig(cert_file=pki.server_cert, key_file=pki.server_key, ca_file=pki.ca)
    return Sep2Server(_config(dev_lfdi_header=None, tls=tls, **overrides))


async def test_each_program_has_its_own_fsa_and_a_client_walking_them_finds_the_control_in_force(
    pki: Pki, tmp_path: Path
) -> None:
    """Feeder F1 (primacy 10, a 1.5 kW export limit by default), substation S1 (20) and an
    unlisted transformer each get an FSA, strongest first; a dispatch for S1 is a control in
    S1's FSA, and the client that walks all three follows it, under F1's default limit."""
    server = _tls_server(pki)
    lfdi, _ = describe(pki.device_cert)
    der = Sep2Der(
        "bat-1",
        Sep2DerEndpoint(lfdi=lfdi, supports_target_w=True),
        server=server,
        groups=("substation:s1", "feeder:f1", "transformer:t1"),
    )
    await der.connect()
    try:
        server.publish(
            "bat-1",
            DERControlBase(op_mod_target_w=from_watts(3000)),
            power_kw=-3,
            provenance=(LimitSource(command_id="d-1", kind="dispatch"),),
            group_id="substation:s1",
        )
        client = await _effective(server, pki, lfdi, tmp_path / "client.json")
        effective = client.effective
        assert effective is not None
        assert effective.target_kw == pytest.approx(-3.0)
        assert effective.export_limit_kw == pytest.approx(1.5)  # feeder F1's default
        # Three programs, each reached once and through its own FSA.
        assert client.schedule is not None
        primacies = sorted(p.program.primacy for p in client._state.programs)
        assert primacies == [10, 20, 101]  # F1, S1, the transformer (unlisted: 100 + 1)
        url = server.url
        ssl_ctx = client_ssl_context(pki.device_cert, pki.device_key, pki.ca)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx)) as s:
            walked = await _walk(Client(s, url, None), server.edev_href("bat-1"))
        assert [[p.primacy for p in programs] for _, programs in walked] == [[10], [20], [101]]
        assert len({href for href, _ in walked}) == 3
        (s1_program,) = walked[1][1]
        assert s1_program.der_control_list_link is not None
        assert s1_program.der_control_list_link.all == 1  # the dispatch's control is S1's
    finally:
        await server.stop()


async def test_a_devices_unlisted_programs_never_tie_and_the_narrower_groups_default_wins(
    pki: Pki, tmp_path: Path
) -> None:
    """Groups without a [[programs]] entry: two of one device's programs at the same primacy
    would leave the client to pick between their defaults by the order it walked them. The
    feeder's program is stronger than the substation's (created first here), so the client
    keeps the feeder's export limit, whichever program the server made first."""
    server = _tls_server(pki, programs=())
    lfdi, _ = describe(pki.device_cert)
    der = Sep2Der(
        "bat-1",
        Sep2DerEndpoint(lfdi=lfdi, supports_target_w=True),
        server=server,
        groups=("substation:s9", "feeder:f9"),
    )
    await der.connect()
    try:
        assert server.set_default("substation:s9", Sep2DefaultEnvelope(export_limit_kw=5.0))
        assert server.set_default("feeder:f9", Sep2DefaultEnvelope(export_limit_kw=2.0))
        client = await _effective(server, pki, lfdi, tmp_path / "client.json")
        programs = {p.program.description: p.program.primacy for p in client._state.programs}
        assert programs == {"feeder:f9": 103, "substation:s9": 104}
        assert client.effective is not None
        assert client.effective.export_limit_kw == pytest.approx(2.0)
        assert client.effective.sources["op_mod_exp_lim_w"].primacy == 103
    finally:
        await server.stop()


async def test_a_device_moved_to_another_feeder_gets_its_fsa_and_subscribers_are_told(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """The registry moves the device from feeder F1 to F2 (``Core.update_device``): its
    FSAList loses F1's FSA and gains F2's (a new id, S1's unchanged), a subscriber of the list
    is notified with the new list, and the control it had in F1's program is withdrawn."""
    server = Sep2Server(_config())
    der = Sep2Der(
        "bat-a",
        Sep2DerEndpoint(lfdi=LFDI_A, supports_target_w=True),
        server=server,
        groups=("substation:s1", "feeder:f1"),
    )
    location = TopologyLocation(substation="s1", feeder="f1")
    config = parse_config(
        {
            "store": {"path": ":memory:"},
            "history": {"enabled": False},
            "devices": [
                {
                    "device_id": "bat-a",
                    "der_class": "battery",
                    "adapter": "sunspec_battery",
                    "location": location.model_dump(exclude_none=True),
                    "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 10},
                    "sunspec": {"port": 5020},
                }
            ],
        }
    )
    devices = [d.as_device() for d in config.devices]
    gateway = Gateway(config, devices=devices, adapters={"bat-a": der}, publisher=Acks())
    await der.connect()
    try:
        c = Client(session, server.url, LFDI_A)
        edev = server.edev_href("bat-a")
        before = await _walk(c, edev)
        assert _names(before) == [["Feeder F1"], ["substation:s1"]]
        server.publish(
            "bat-a",
            DERControlBase(op_mod_target_w=from_watts(2000)),
            power_kw=-2,
            group_id="feeder:f1",
        )
        for resource in (f"{edev}/fsa", f"{edev}/derp"):
            status, _, _ = await c.request(
                "POST", f"{edev}/sub", subscription(resource, receiver.url + "/n")
            )
            assert status == 201

        moved: Device = devices[0].model_copy(
            update={"location": TopologyLocation(substation="s1", feeder="f2")}
        )
        gateway.update_device(moved)

        notes = {}
        while set(notes) != {f"{edev}/fsa", f"{edev}/derp"}:
            note = await receiver.next()
            notes[note.subscribed_resource] = note.resource  # (the last of each)
        fsa_list, program_list = notes[f"{edev}/fsa"], notes[f"{edev}/derp"]
        assert isinstance(fsa_list, FunctionSetAssignmentsList)
        notified = [f.href for f in fsa_list.items]
        # F2's program, made at run time for the move, reaches the DERProgramList's subscriber.
        assert isinstance(program_list, DERProgramList)
        assert [p.description for p in program_list.items] == ["substation:s1", "feeder:f2"]
        after = await _walk(c, edev)
        assert notified == [href for href, _ in after]
        assert _names(after) == [["substation:s1"], ["feeder:f2"]]
        # S1 keeps its FSA; F2's is a new one, not F1's old id.
        assert after[0][0] == before[1][0]
        assert after[1][0] not in {href for href, _ in before}
        status, _, _ = await c.request("GET", before[0][0])
        assert status == 404
        assert server.snapshot("bat-a").active_control is None  # F1's control went with F1
        # The same groups told again, in another order (the core tells every update): no move.
        assert not server.regroup("bat-a", ("feeder:f2", "substation:s1"))
        assert await _walk(c, edev) == after
    finally:
        await server.stop()


async def test_fsa_ids_survive_a_restart(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    """A device that moved keeps the FSA ids its client knows across a restart (without the
    state file its FSAs would be numbered afresh from 1)."""
    config = _config(state_file=tmp_path / "sep2.sqlite")

    def enrol(server: Sep2Server, groups: tuple[str, ...]) -> Sep2Der:
        return Sep2Der("bat-a", Sep2DerEndpoint(lfdi=LFDI_A), server=server, groups=groups)

    first = Sep2Server(config)
    der = enrol(first, ("substation:s1", "feeder:f1"))
    await der.connect()
    try:
        der.regroup(("substation:s1", "feeder:f2"))
        before = await _walk(Client(session, first.url, LFDI_A), first.edev_href("bat-a"))
    finally:
        await first.stop()
    assert [href.rsplit("/", 1)[1] for href, _ in before] == ["2", "3"]

    second = Sep2Server(config)
    await enrol(second, ("substation:s1", "feeder:f2")).connect()
    try:
        after = await _walk(Client(session, second.url, LFDI_A), second.edev_href("bat-a"))
        assert [href for href, _ in after] == [href for href, _ in before]
    finally:
        await second.stop()


def _mup(lfdi: str) -> bytes:
    reading_type = (
        "<ReadingType><accumulationBehaviour>12</accumulationBehaviour><commodity>1</commodity>"
        "<dataQualifier>2</dataQualifier><flowDirection>1</flowDirection>"
        "<intervalLength>300</intervalLength><kind>37</kind><phase>0</phase>"
        "<powerOfTenMultiplier>0</powerOfTenMultiplier><uom>38</uom></ReadingType>"
    )
    return (
        '<MirrorUsagePoint xmlns="urn:ieee:std:2030.5:ns">'
        f"<mRID>{lfdi[:24]}20000000</mRID><description>DER</description>"
        "<roleFlags>49</roleFlags><serviceCategoryKind>0</serviceCategoryKind><status>1</status>"
        f"<deviceLFDI>{lfdi}</deviceLFDI><MirrorMeterReading><mRID>{lfdi[:24]}20000001</mRID>"
        f"<description>DER active power avg</description>{reading_type}</MirrorMeterReading>"
        "</MirrorUsagePoint>"
    ).encode()


def _response(lfdi: str, mrid: str) -> bytes:
    return (
        '<DERControlResponse xmlns="urn:ieee:std:2030.5:ns">'
        f"<createdDateTime>{int(time.time())}</createdDateTime>"
        f"<endDeviceLFDI>{lfdi}</endDeviceLFDI><status>2</status>"
        f"<subject>{mrid}</subject></DERControlResponse>"
    ).encode()


async def test_an_aggregator_certificate_lists_and_answers_for_its_end_devices(
    tmp_path: Path,
) -> None:
    """CSIP-AUS P-01: one aggregator client (its own certificate, configured with the LFDIs it
    acts for) finds both its EndDevices in its EndDeviceList, the feeder's FSA and program
    under each with the same mRIDs, each EndDevice's control, and answers each under that
    EndDevice; a third EndDevice stays out of its reach."""
    ca = make_ca(tmp_path / "ca")
    server_cert = make_cert(ca, tmp_path / "ca", "gateway", server=True)
    aggregator_cert = make_cert(ca, tmp_path / "ca", "aggregator")
    aggregator_lfdi, _ = describe(aggregator_cert.cert_path)
    tls = Sep2TlsConfig(
        cert_file=server_cert.cert_path, key_file=server_cert.key_path, ca_file=ca.cert_path
    )
    config = _config(
        dev_lfdi_header=None,
        tls=tls,
        aggregators=({"lfdi": aggregator_lfdi, "end_devices": (LFDI_A, LFDI_B.lower())},),
    )
    recorded: list[str] = []
    server = Sep2Server(config, on_response=lambda record: recorded.append(record.device_id))
    ders = [
        Sep2Der(device, Sep2DerEndpoint(lfdi=lfdi), server=server, groups=("feeder:f1",))
        for device, lfdi in (("bat-a", LFDI_A), ("bat-b", LFDI_B), ("bat-c", LFDI_STRANGER))
    ]
    await ders[0].connect()
    ssl_ctx = client_ssl_context(aggregator_cert.cert_path, aggregator_cert.key_path, ca.cert_path)
    try:
        for device in ("bat-a", "bat-b", "bat-c"):
            server.publish(
                device,
                DERControlBase(op_mod_exp_lim_w=from_watts(0), op_mod_imp_lim_w=from_watts(0)),
                power_kw=None,
                group_id="feeder:f1",
            )
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx)) as s:
            c = Client(s, server.url, None)
            dcap = await c.get_as(DeviceCapability, "/dcap")
            assert dcap.end_device_list_link is not None
            assert dcap.end_device_list_link.all == 2
            edevs = await c.get_as(EndDeviceList, "/edev?l=10")
            assert [e.lfdi for e in edevs.items] == [LFDI_A, LFDI_B]
            fsa_mrids = set()
            pairs = zip(edevs.items, ((LFDI_A, "bat-a"), (LFDI_B, "bat-b")), strict=True)
            for edev, (lfdi, device) in pairs:
                walked = await _walk(c, edev.href or "")
                fsas = await c.get_as(FunctionSetAssignmentsList, f"{edev.href}/fsa?l=10")
                fsa_mrids |= {f.mrid for f in fsas.items}
                (program,) = walked[0][1]
                assert program.der_control_list_link is not None
                controls = await c.get_as(DERControlList, program.der_control_list_link.href)
                (control,) = controls.items
                assert control.reply_to is not None
                answer = _response(lfdi, control.mrid)
                status, _, _ = await c.request("POST", control.reply_to, answer)
                assert status == 201
                assert recorded[-1] == device
            assert len(fsa_mrids) == 1  # the feeder's FSA, shared by both EndDevices
            # It mirrors telemetry for the EndDevice a MirrorUsagePoint names, and no other.
            status, headers, _ = await c.request("POST", "/mup", _mup(LFDI_B))
            assert status == 201
            mups = await c.get_as(MirrorUsagePointList, "/mup?l=10")
            assert [m.href for m in mups.items] == [headers["Location"]]
            assert mups.items[0].device_lfdi == LFDI_B
            status, _, _ = await c.request("POST", "/mup", _mup(LFDI_STRANGER))
            assert status == 403
            status, _, _ = await c.request("GET", server.edev_href("bat-c"))
            assert status == 403
    finally:
        await server.stop()
