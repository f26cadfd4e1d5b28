"""The OpenADR VEN end to end against a real openleadr VTN over loopback HTTP.

The VEN submits into a real CommandBook (tmp SQLite, two 5 kW batteries on feeder f1), so what
reaches the "gateway" is validated exactly as in production.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from openleadr import OpenADRServer, enums, objects  # type: ignore[import-untyped]

from adapters.openadr_ven.ven import (
    OpenAdrVen,
    OpenAdrVenConfig,
    VenStore,
    VenTlsConfig,
    capacity_from_registry,
    submit_to_book,
)
from gateway.commands import CommandBook
from gateway.registry import Registry
from gateway.store import CommandStore
from protocols.openadr import (
    RecordStatus,
    VenProgramConfig,
    VenState,
    parse_distribution,
    pending_commands,
    reconcile,
)
from unified.model import (
    Ack,
    AckState,
    BatteryRatings,
    Cancel,
    Command,
    DerClass,
    Device,
    Dispatch,
    GroupTelemetry,
    Quality,
    TopologyLocation,
    utcnow,
)

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning")

VEN_NAME = "site-1"
VEN_ID = "ven-123"
GROUP = "feeder:f1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(predicate: Callable[[], object], within_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within_s}s")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- the VTN


@dataclass
class Vtn:
    port: int
    server: Any = None
    opts: dict[str, list[str]] = field(default_factory=dict)
    deliveries: dict[str, int] = field(default_factory=dict)
    report_values: dict[str, list[tuple[datetime, float]]] = field(default_factory=dict)
    tls: tuple[Path, Path, Path] | None = None
    """(certificate, key, CA of the VENs' certificates): serve HTTPS with client certificates."""
    registrations: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """Messages handed out on the next polls, before openleadr's own."""
    received: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Report-service messages from the VEN, by type."""
    statuses: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    forgotten: set[str] = field(default_factory=set)
    """Registration ids the VTN no longer knows: a re-registration with one is refused."""
    """TELEMETRY_STATUS values (oadrPayloadResourceStatus) by rID."""

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/OpenADR2/Simple/2.0b"

    async def start(self) -> None:
        cert, key, ca = self.tls or (None, None, None)
        server = OpenADRServer(
            vtn_id="VTN",
            http_host="127.0.0.1",
            http_port=self.port,
            requested_poll_freq=timedelta(seconds=1),
            show_fingerprint=False,
            http_cert=None if cert is None else str(cert),
            http_key=None if key is None else str(key),
            http_ca_file=None if ca is None else str(ca),
        )

        async def on_create_party_registration(payload: dict[str, Any]) -> Any:
            self.registrations.append(payload)
            if payload.get("ven_name") != VEN_NAME:
                return False
            if payload.get("registration_id") in self.forgotten:
                return False  # (openleadr answers a refusal with 200 and no ids)
            return VEN_ID, f"reg-{len(self.forgotten) + 1}"

        async def on_register_report(
            ven_id: str,
            resource_id: str,
            measurement: str,
            unit: str,
            scale: str,
            min_sampling_interval: timedelta,
            max_sampling_interval: timedelta,
        ) -> Any:
            key = f"{measurement}:{resource_id}"

            def collect(values: list[tuple[datetime, float]]) -> None:
                self.report_values.setdefault(key, []).extend(values)

            return collect, timedelta(seconds=1)

        server.add_handler("on_create_party_registration", on_create_party_registration)
        server.add_handler("on_register_report", on_register_report)
        self._tap(server)
        await server.run()
        self.server = server

    def _tap(self, server: Any) -> None:
        """Serve ``outbox`` first on polls, and record what the VEN sends to EiReport."""
        poll_handlers = server.services["poll_service"].handlers
        poll = poll_handlers["oadrPoll"]

        async def tapped_poll(payload: dict[str, Any]) -> Any:
            if self.outbox:
                return self.outbox.pop(0)
            return await poll(payload)

        poll_handlers["oadrPoll"] = tapped_poll
        report_handlers = server.services["report_service"].handlers
        for message_type in ("oadrCreatedReport", "oadrUpdateReport"):
            original = report_handlers[message_type]

            async def tapped(
                payload: dict[str, Any], original: Any = original, kind: str = message_type
            ) -> Any:
                self.received.setdefault(kind, []).append(payload)
                if kind == "oadrUpdateReport":
                    payload = self._take_statuses(payload)
                result = original(payload)
                return await result if asyncio.iscoroutine(result) else result

            report_handlers[message_type] = tapped
        event_handlers = server.services["event_service"].handlers
        created = event_handlers["oadrCreatedEvent"]

        async def tapped_created(payload: dict[str, Any]) -> Any:
            self.received.setdefault("oadrCreatedEvent", []).append(payload)
            result = created(payload)
            return await result if asyncio.iscoroutine(result) else result

        event_handlers["oadrCreatedEvent"] = tapped_created

    def _take_statuses(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Keep the oadrPayloadResourceStatus values (openleadr's VTN reads only payloadFloat
        and fails on anything else) and hand it the rest."""
        reports = []
        for report in payload.get("reports", []):
            floats = []
            for interval in report.get("intervals", []):
                status = interval["report_payload"].get("payload_resource_status")
                if status is None:
                    floats.append(interval)
                else:
                    r_id = interval["report_payload"]["r_id"]
                    self.statuses.setdefault(r_id, []).append(status)
            if floats:
                reports.append(report | {"intervals": floats})
        return payload | {"reports": reports}

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    def on_opt(self, ven_id: str, event_id: str, opt_type: str) -> None:
        self.opts.setdefault(event_id, []).append(opt_type)

    def add_event(
        self,
        event_id: str,
        *,
        values: tuple[float, ...] = (-4000.0,),
        start: datetime | None = None,
        interval_s: int = 600,
        signal_name: str = "LOAD_DISPATCH",
        signal_type: str = "delta",
        startafter_s: int | None = None,
        ramp_up_s: int = 30,
    ) -> None:
        start = start or utcnow() + timedelta(seconds=60)
        intervals = [
            objects.Interval(
                dtstart=start + timedelta(seconds=i * interval_s),
                duration=timedelta(seconds=interval_s),
                signal_payload=v,
            )
            for i, v in enumerate(values)
        ]
        measurement = enums.MEASUREMENTS.POWER_REAL if signal_name == "LOAD_DISPATCH" else None
        active = objects.ActivePeriod(
            dtstart=start,
            duration=timedelta(seconds=interval_s * len(values)),
            tolerance=({"startafter": timedelta(seconds=startafter_s)} if startafter_s else None),
            ramp_up_period=timedelta(seconds=ramp_up_s) if ramp_up_s else None,
        )
        event = objects.Event(
            event_descriptor=objects.EventDescriptor(
                event_id=event_id,
                modification_number=0,
                market_context="http://utility.example/dr",
                event_status="far",
            ),
            active_period=active,
            event_signals=[
                objects.EventSignal(
                    intervals=intervals,
                    signal_name=signal_name,
                    signal_type=signal_type,
                    signal_id=f"{event_id}-s",
                    measurement=measurement,
                )
            ],
            targets=[objects.Target(ven_id=VEN_ID)],
        )

        def delivered() -> None:
            self.deliveries[event_id] = self.deliveries.get(event_id, 0) + 1

        self.server.add_raw_event(
            ven_id=VEN_ID, event=event, callback=self.on_opt, delivery_callback=delivered
        )
        # openleadr 0.5.36 looks for 'event_descriptor.active_period' (never set) and so
        # replaces the active period with one rebuilt from the intervals, dropping the ramp-up
        # and the tolerance: put ours back (the event is queued by reference).
        event.active_period = active

    def cancel_event(self, event_id: str) -> None:
        self.server.cancel_event(VEN_ID, event_id)

    def drop_event(self, event_id: str) -> None:
        """Remove an event without cancelling it: the next distribution implies the cancel."""
        events = self.server.events[VEN_ID]
        events[:] = [e for e in events if e.event_descriptor.event_id != event_id]
        self.server.events_updated[VEN_ID] = True


@pytest.fixture
async def vtn() -> AsyncIterator[Vtn]:
    logging.getLogger("openleadr").setLevel(logging.WARNING)
    server = Vtn(free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# --------------------------------------------------------------------------- the gateway side


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


@dataclass
class Gateway:
    book: CommandBook
    submitted: list[Command] = field(default_factory=list)
    acks: dict[str, Ack] = field(default_factory=dict)

    async def submit(self, command: Command) -> Ack:
        self.submitted.append(command)
        ack = await submit_to_book(self.book)(command)
        self.acks[command.command_id] = ack
        return ack

    def telemetry(self, now: datetime) -> list[GroupTelemetry]:
        return [
            GroupTelemetry(
                group_id=GROUP,
                timestamp=now,
                power_kw=-3.5,
                measured_kw=-3.5,
                setpoint_kw=-4.0,
                devices_total=2,
                devices_reporting=1,
                devices_missing=1,
                quality=Quality.SUSPECT,
                energy_available_kwh=8.0,
            )
        ]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with CommandStore(tmp_path / "commands.sqlite") as store:
        yield Gateway(CommandBook(store, registry(), lambda ack, reply: None))


def ven_config(vtn: Vtn, tmp_path: Path, tls: VenTlsConfig | None = None) -> OpenAdrVenConfig:
    return OpenAdrVenConfig(
        vtn_url=vtn.url,
        tls=tls,
        program=VenProgramConfig(ven_name=VEN_NAME, program="utility-dr", default_group=GROUP),
        store_path=tmp_path / "ven.sqlite",
        poll_interval_s=0.1,
        io_timeout_s=2.0,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        report_min_period_s=0.5,
    )


@asynccontextmanager
async def running(
    vtn: Vtn, gateway: Gateway, tmp_path: Path, seed: int = 1, tls: VenTlsConfig | None = None
) -> AsyncIterator[OpenAdrVen]:
    ven = OpenAdrVen(
        ven_config(vtn, tmp_path, tls),
        submit=gateway.submit,
        telemetry=gateway.telemetry,
        rng=random.Random(seed),
    )
    task = asyncio.create_task(ven.run(), name="test:ven")
    try:
        await wait_for(lambda: ven.registration is not None and ven.reachable, 10)
        yield ven
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def dispatch_ids(gateway: Gateway) -> list[str]:
    return [c.command_id for c in gateway.submitted if isinstance(c, Dispatch)]


# --------------------------------------------------------------------------- tests


async def test_event_becomes_commands_opt_in_and_cancel(
    vtn: Vtn, gateway: Gateway, tmp_path: Path
) -> None:
    async with running(vtn, gateway, tmp_path) as ven:
        assert ven.registration is not None
        assert (ven.registration.ven_id, ven.registration.registration_id) == (VEN_ID, "reg-1")
        vtn.add_event("ev1", values=(-4000.0, -2000.0))
        await wait_for(lambda: vtn.opts.get("ev1") == ["optIn"])
        assert dispatch_ids(gateway) == ["oadr-site-1-ev1-m0-i0", "oadr-site-1-ev1-m0-i1"]
        first = gateway.submitted[0]
        assert isinstance(first, Dispatch)
        assert (first.kw, first.ramp_s, first.target.group_id) == (-4.0, 30.0, GROUP)
        assert gateway.acks[first.command_id].state is AckState.ACCEPTED

        vtn.cancel_event("ev1")
        await wait_for(lambda: ven.state.events["ev1"].status is RecordStatus.CANCELLED)
        await wait_for(lambda: not ven.state.events["ev1"].outbox)
        cancels = [c for c in gateway.submitted if isinstance(c, Cancel)]
        assert sorted(c.cancels for c in cancels) == [
            "oadr-site-1-ev1-m0-i0",
            "oadr-site-1-ev1-m0-i1",
        ]
        assert all(gateway.acks[c.command_id].state is AckState.COMPLETED for c in cancels)
        stored = await gateway.book._store.get("oadr-site-1-ev1-m0-i0")
        assert stored is not None
        assert stored.ack.state is AckState.CANCELLED
        # The VTN drops a cancelled event once the VEN has answered for it.
        await wait_for(lambda: not vtn.server.events[VEN_ID])


async def test_unsupported_signal_opts_out_and_submits_nothing(
    vtn: Vtn, gateway: Gateway, tmp_path: Path
) -> None:
    async with running(vtn, gateway, tmp_path) as ven:
        vtn.add_event(
            "price-1", values=(0.25,), signal_name="ELECTRICITY_PRICE", signal_type="price"
        )
        await wait_for(lambda: vtn.opts.get("price-1") == ["optOut"])
        assert gateway.submitted == []
        record = ven.state.events["price-1"]
        assert (record.status, record.reason) == (RecordStatus.OPTED_OUT, "unsupported_signal")
        # An opt-out is an answer: 200 with optOut, the reason in the description.
        (answer,) = [
            r
            for m in vtn.received["oadrCreatedEvent"]
            for r in m["event_responses"]
            if r["event_id"] == "price-1"
        ]
        assert (answer["response_code"], answer["opt_type"]) == (200, "optOut")
        assert answer["response_description"].startswith("unsupported_signal")
        # A pull VEN has no transport address: none is sent (openleadr's template said "None").
        assert "transport_address" not in vtn.registrations[0]


async def test_gateway_rejection_becomes_an_opt_out_with_its_reason(
    vtn: Vtn, gateway: Gateway, tmp_path: Path
) -> None:
    async with running(vtn, gateway, tmp_path) as ven:
        # 50 kW of discharge from two 5 kW batteries: the book refuses it.
        vtn.add_event("big", values=(-50_000.0,))
        await wait_for(lambda: vtn.opts.get("big") == ["optOut"])
        record = ven.state.events["big"]
        assert record.reason == "beyond_ratings"
        assert gateway.acks["oadr-site-1-big-m0-i0"].state is AckState.REJECTED


async def test_implied_cancel_when_the_vtn_drops_an_event(
    vtn: Vtn, gateway: Gateway, tmp_path: Path
) -> None:
    async with running(vtn, gateway, tmp_path) as ven:
        vtn.add_event("keep", values=(-1000.0,))
        vtn.add_event("drop", values=(-1000.0,), start=utcnow() + timedelta(hours=1))
        await wait_for(lambda: {"keep", "drop"} <= set(vtn.opts))
        vtn.drop_event("drop")
        await wait_for(lambda: ven.state.events["drop"].status is RecordStatus.CANCELLED)
        await wait_for(lambda: "oadr-site-1-drop-m0-i0-cancel" in gateway.acks)
        assert gateway.acks["oadr-site-1-drop-m0-i0-cancel"].state is AckState.COMPLETED
        assert ven.state.events["keep"].status is RecordStatus.ACTIVE


async def test_restart_neither_redraws_nor_resubmits(
    vtn: Vtn, gateway: Gateway, tmp_path: Path
) -> None:
    async with running(vtn, gateway, tmp_path, seed=1) as ven:
        vtn.add_event("rand", values=(-1000.0,), startafter_s=600)
        await wait_for(lambda: vtn.opts.get("rand") == ["optIn"])
        draw = ven.state.events["rand"].startafter_s
        (first,) = gateway.submitted
    assert 0 < draw <= 600
    assert isinstance(first, Dispatch)

    restarted = Gateway(gateway.book)
    before = vtn.deliveries["rand"]
    # A different seed would draw differently: the persisted draw must win.
    async with running(vtn, restarted, tmp_path, seed=99) as ven:
        # The restarted VEN asks the VTN for its events again and sees the same event.
        await wait_for(lambda: vtn.deliveries["rand"] > before)
        await asyncio.sleep(0.3)  # a few poll cycles
        assert ven.state.events["rand"].startafter_s == draw
        assert ven.registration is not None
        assert ven.registration.registration_id == "reg-1"
    assert restarted.submitted == []


async def test_reports_reach_the_vtn(vtn: Vtn, gateway: Gateway, tmp_path: Path) -> None:
    async with running(vtn, gateway, tmp_path):
        await wait_for(
            lambda: (
                vtn.report_values.get("RealPower:feeder:f1")
                and vtn.statuses.get("status:feeder:f1")
            ),
            within_s=8,
        )
    assert vtn.report_values["RealPower:feeder:f1"][0][1] == -3.5
    # TELEMETRY_STATUS as oadrPayloadResourceStatus: the group is online (a device reports);
    # no state of charge for a group (protocols.openadr.resource_status).
    assert vtn.statuses["status:feeder:f1"][0] == {"online": True, "manual_override": False}


@contextmanager
def captured(logger: str) -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Handler(logging.DEBUG)
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.DEBUG)
    target.addHandler(handler)
    try:
        yield records
    finally:
        target.removeHandler(handler)
        target.setLevel(level)


async def test_a_vtn_that_forgot_us_gets_a_fresh_registration_not_a_loop(
    gateway: Gateway, tmp_path: Path
) -> None:
    """Over mutual TLS, as the utility runs it: the VTN asks us to re-register and refuses our
    old ids; we register afresh (no venID, no registrationID) once, not on every poll."""
    from composition.certs import make_ca, make_cert

    logging.getLogger("openleadr").setLevel(logging.WARNING)
    ca = make_ca(tmp_path / "pki")
    server_cert = make_cert(ca, tmp_path / "pki", "utility-vtn", server=True)
    client = make_cert(ca, tmp_path / "pki", "site-1")
    vtn = Vtn(free_port(), tls=(server_cert.cert_path, server_cert.key_path, ca.cert_path))
    await vtn.start()
    tls = VenTlsConfig(cert_path=client.cert_path, key_path=client.key_path, ca_path=ca.cert_path)
    try:
        async with running(vtn, gateway, tmp_path, tls=tls) as ven:
            assert ven.registration is not None
            assert ven.registration.registration_id == "reg-1"
            vtn.forgotten.add("reg-1")
            vtn.outbox.append(("oadrRequestReregistration", {"ven_id": VEN_ID}))
            await wait_for(
                lambda: (
                    ven.registration is not None and ven.registration.registration_id == "reg-2"
                ),
                10,
            )
            attempts = [(r.get("ven_id"), r.get("registration_id")) for r in vtn.registrations]
            assert attempts == [(None, None), (VEN_ID, "reg-1"), (None, None)]
            await asyncio.sleep(1.5)  # polls go on; nothing asks to register again
            assert len(vtn.registrations) == 3
            assert ven.reachable
    finally:
        await vtn.stop()


async def test_vtn_loss_and_recovery_are_logged_once(
    vtn: Vtn, gateway: Gateway, tmp_path: Path
) -> None:
    with captured("adapters.openadr_ven.ven") as records:
        async with running(vtn, gateway, tmp_path) as ven:
            await vtn.stop()
            await wait_for(lambda: ven.reachable is False)
            await asyncio.sleep(0.5)  # several failed polls
            await vtn.start()
            await wait_for(lambda: ven.reachable is True, within_s=5)
            vtn.add_event("after", values=(-1000.0,))
            await wait_for(lambda: vtn.opts.get("after") == ["optIn"])
    lost = [r for r in records if "VTN lost" in r.getMessage()]
    back = [r for r in records if "reachable again" in r.getMessage()]
    assert len(lost) == 1
    assert len(back) == 1


async def test_unconfirmed_outbox_is_resubmitted_at_start(
    vtn: Vtn, gateway: Gateway, tmp_path: Path
) -> None:
    """A crash after the state was saved but before the gateway confirmed the commands."""
    config = ven_config(vtn, tmp_path)
    start = utcnow() + timedelta(minutes=5)
    raw = {
        "event_descriptor": {"event_id": "crash", "modification_number": 0, "event_status": "far"},
        "active_period": {"dtstart": start, "duration": timedelta(minutes=10)},
        "event_signals": [
            {
                "signal_name": "LOAD_DISPATCH",
                "signal_type": "delta",
                "intervals": [{"duration": timedelta(minutes=10), "signal_payload": -2.0}],
                "measurement": {"name": "powerReal", "unit": "W", "scale": "k"},
            }
        ],
        "targets": [{"ven_id": VEN_ID}],
    }
    state, commands, _ = reconcile(
        VenState(),
        parse_distribution({"events": [raw]}),
        utcnow(),
        lambda e, m: 0.0,
        config.program,
    )
    async with VenStore(config.store_path) as store:
        await store.save_state(state)
    async with running(vtn, gateway, tmp_path) as ven:
        await wait_for(lambda: not pending_commands(ven.state))
    assert gateway.submitted == commands
    assert gateway.acks["oadr-site-1-crash-m0-i0"].state is AckState.ACCEPTED


async def test_simple_levels_use_the_registry_capacity(
    vtn: Vtn, gateway: Gateway, tmp_path: Path
) -> None:
    config = ven_config(vtn, tmp_path)
    ven = OpenAdrVen(config, submit=gateway.submit, capacity=capacity_from_registry(registry()))
    task = asyncio.create_task(ven.run(), name="test:ven")
    try:
        await wait_for(lambda: ven.reachable)
        vtn.add_event("simple", values=(2,), signal_name="SIMPLE", signal_type="level")
        await wait_for(lambda: vtn.opts.get("simple") == ["optIn"])
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    (command,) = gateway.submitted
    # Level 2 is 75 % of the group's shed capacity (two 5 kW batteries) by default.
    assert isinstance(command, Dispatch)
    assert command.kw == -7.5


# --------------------------------------------------------------------------- TLS


def _fingerprint(cert_path: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from adapters.oem_vtn.vtn import fingerprint_of_der

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return fingerprint_of_der(cert.public_bytes(serialization.Encoding.DER))


async def test_tls_with_a_client_certificate_toward_the_utility_vtn(
    gateway: Gateway, tmp_path: Path
) -> None:
    from composition.certs import make_ca, make_cert

    logging.getLogger("openleadr").setLevel(logging.WARNING)
    ca = make_ca(tmp_path / "pki")
    server_cert = make_cert(ca, tmp_path / "pki", "utility-vtn", server=True)
    client = make_cert(ca, tmp_path / "pki", "site-1")
    vtn = Vtn(free_port(), tls=(server_cert.cert_path, server_cert.key_path, ca.cert_path))
    await vtn.start()
    tls = VenTlsConfig(cert_path=client.cert_path, key_path=client.key_path, ca_path=ca.cert_path)
    try:
        assert vtn.url.startswith("https://")
        async with running(vtn, gateway, tmp_path, tls=tls):
            # The VTN saw our certificate (its fingerprint is what a utility enrols).
            (registration,) = vtn.registrations
            assert registration["fingerprint"] == _fingerprint(client.cert_path)
            vtn.add_event("tls-1", values=(-2000.0,))
            await wait_for(lambda: vtn.opts.get("tls-1") == ["optIn"], 10)
            assert dispatch_ids(gateway) == ["oadr-site-1-tls-1-m0-i0"]
            await wait_for(lambda: vtn.report_values.get("RealPower:feeder:f1"), 10)
    finally:
        await vtn.stop()


async def test_a_vtn_certificate_from_another_ca_is_refused_and_nothing_is_submitted(
    gateway: Gateway, tmp_path: Path
) -> None:
    from composition.certs import make_ca, make_cert

    logging.getLogger("openleadr").setLevel(logging.WARNING)
    ours = make_ca(tmp_path / "ours", "our-ca")
    rogue = make_ca(tmp_path / "rogue", "rogue-ca")
    rogue_server = make_cert(rogue, tmp_path / "rogue", "utility-vtn", server=True)
    client = make_cert(ours, tmp_path / "ours", "site-1")
    # The rogue VTN would even accept our client certificate.
    vtn = Vtn(free_port(), tls=(rogue_server.cert_path, rogue_server.key_path, ours.cert_path))
    await vtn.start()
    tls = VenTlsConfig(cert_path=client.cert_path, key_path=client.key_path, ca_path=ours.cert_path)
    ven = OpenAdrVen(
        ven_config(vtn, tmp_path, tls), submit=gateway.submit, telemetry=gateway.telemetry
    )
    try:
        vtn.add_event("rogue-1", values=(-2000.0,))
        with captured("adapters.openadr_ven.ven") as records:
            task = asyncio.create_task(ven.run(), name="test:ven")
            try:
                await wait_for(lambda: ven.reachable is False, 10)
                await asyncio.sleep(0.5)  # several attempts with backoff
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
    finally:
        await vtn.stop()
    assert ven.registration is None
    assert vtn.registrations == []
    assert gateway.submitted == []
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "TLS certificate is not trusted" in warnings[0]


# --------------------------------------------------------------------------- report requests


def _report_request(request_id: str, specifier_id: str, r_id: str) -> tuple[str, dict[str, Any]]:
    return "oadrCreateReport", {
        "request_id": request_id,
        "report_requests": [
            {
                "report_request_id": request_id,
                "report_specifier": {
                    "report_specifier_id": specifier_id,
                    "granularity": timedelta(0),
                    "report_back_duration": timedelta(0),
                    "specifier_payloads": [{"r_id": r_id, "reading_type": "Direct Read"}],
                },
            }
        ],
    }


async def test_one_shot_report_is_sent_once_and_history_usage_is_refused(
    vtn: Vtn, gateway: Gateway, tmp_path: Path
) -> None:
    async with running(vtn, gateway, tmp_path):
        vtn.outbox.append(_report_request("once", "derms-telemetry-usage", "usage:feeder:f1"))
        vtn.outbox.append(_report_request("hist", "derms-history-usage", "history:feeder:f1"))

        def created(request_id: str) -> dict[str, Any] | None:
            """The answer naming the request (openleadr re-numbers the requestIDs we queue)."""
            return next(
                (
                    p
                    for p in vtn.received.get("oadrCreatedReport", [])
                    if request_id in [r["report_request_id"] for r in p.get("pending_reports", [])]
                    or f"{request_id} (" in p["response"].get("response_description", "")
                ),
                None,
            )

        def updates(request_id: str) -> list[dict[str, Any]]:
            return [
                r
                for p in vtn.received.get("oadrUpdateReport", [])
                for r in p.get("reports", [])
                if r.get("report_request_id") == request_id
            ]

        await wait_for(lambda: created("once") and created("hist") and updates("once"), 10)
        once = created("once")
        assert once is not None
        assert once["response"]["response_code"] == 200
        assert [p["report_request_id"] for p in once["pending_reports"]] == ["once"]
        hist = created("hist")
        assert hist is not None
        assert hist["response"]["response_code"] == 461
        assert "hist (derms-history-usage)" in hist["response"]["response_description"]
        assert hist.get("pending_reports") in (None, [])

        (report,) = updates("once")
        assert report["report_name"] == "TELEMETRY_USAGE"
        values = [i["report_payload"]["value"] for i in report["intervals"]]
        assert values == [-3.5]
        await asyncio.sleep(1.5)  # several report cycles: one-shot means one
        assert len(updates("once")) == 1
        assert updates("hist") == []


async def test_price_events_go_to_the_price_store_for_the_vens_group(
    vtn: Vtn, gateway: Gateway, tmp_path: Path
) -> None:
    """With ELECTRICITY_PRICE in the program's signals, a price event is opted in, moves no
    device, and its intervals become the group's real-time prices (per kWh)."""
    from gateway.services.prices import PriceBook
    from unified.prices import PriceSchedule

    book = PriceBook()
    put: list[PriceSchedule] = []

    async def put_prices(schedule: PriceSchedule) -> str | None:
        put.append(schedule)
        book.put(schedule)
        return None

    config = ven_config(vtn, tmp_path)
    program = config.program.model_copy(
        update={"signals": frozenset({"LOAD_DISPATCH", "SIMPLE", "ELECTRICITY_PRICE"})}
    )
    ven = OpenAdrVen(
        config.model_copy(update={"program": program}),
        submit=gateway.submit,
        rng=random.Random(1),
        prices=put_prices,
    )
    task = asyncio.create_task(ven.run(), name="test:ven-prices")
    try:
        await wait_for(lambda: ven.registration is not None and ven.reachable, 10)
        start = utcnow().replace(microsecond=0) + timedelta(seconds=60)
        vtn.add_event(
            "cpp-1",
            values=(0.12, 0.85, 0.85, 0.30),
            start=start,
            interval_s=900,
            signal_name="ELECTRICITY_PRICE",
            signal_type="price",
        )
        await wait_for(lambda: vtn.opts.get("cpp-1") == ["optIn"])
        await wait_for(lambda: len(put) == 1)
        assert gateway.submitted == []
        (schedule,) = put
        assert (schedule.scope, schedule.kind.value, schedule.step_s) == (GROUP, "real_time", 900)
        imp, _ = book.series([GROUP], start.timestamp(), 900, 5)
        assert list(imp[:4]) == [0.12, 0.85, 0.85, 0.30]
        assert imp[4] != imp[4]  # NaN: nothing priced after the event
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
