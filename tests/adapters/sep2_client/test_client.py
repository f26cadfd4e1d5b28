"""The 2030.5 client against a real (stub) 2030.5 server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from adapters.sep2_client.client import (
    BodyTooLarge,
    EffectiveControls,
    HttpStatusError,
    InvalidDocument,
    RegistrationError,
    Sep2Client,
    Sep2ClientConfig,
    ServerUnreachable,
    TelemetrySample,
    WrongMediaType,
)
from protocols.sep2 import (
    MEDIA_TYPE,
    DERCapability,
    DERControlBase,
    DERStatus,
    from_watts,
    lfdi_from_cert,
    to_watts,
)
from protocols.sep2.models import ActivePower
from protocols.sep2.scheduler import SourceKind
from tests.adapters.sep2_client.sep2_server_stub import REPLY_TO, Failure, Sep2ServerStub
from unified.model import Target

LFDI = "F0F83B2BC825E617DEBD7192F9305B4B6ABC00F5"  # envoy fixture device A
SFDI = 646847986525


def limits(exp: float | None = None, imp: float | None = None, **extra: object) -> DERControlBase:
    def w(x: float | None) -> ActivePower | None:
        return None if x is None else from_watts(x)

    return DERControlBase.model_validate(
        {"op_mod_exp_lim_w": w(exp), "op_mod_imp_lim_w": w(imp), **extra}
    )


async def eventually(
    condition: Callable[[], bool], within_s: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``condition`` until true; fail naming ``what`` after ``within_s`` seconds."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Envelopes:
    """Records every ``on_envelope`` call."""

    def __init__(self) -> None:
        self.seen: list[EffectiveControls] = []

    async def __call__(self, effective: EffectiveControls) -> None:
        self.seen.append(effective)

    @property
    def last(self) -> EffectiveControls:
        assert self.seen, "no envelope yet"
        return self.seen[-1]

    def export_kw(self) -> float | None:
        return self.last.export_limit_kw if self.seen else None


@pytest.fixture
async def stub() -> AsyncIterator[Sep2ServerStub]:
    server = Sep2ServerStub()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def config(url: str, tmp_path: Path, **overrides: object) -> Sep2ClientConfig:
    values: dict[str, object] = {
        "server_url": url,
        "lfdi": LFDI,
        "state_path": tmp_path / "sep2-state.json",
        "registration_pin": 11111,
        "poll_interval_s": 0.2,
        "request_timeout_s": 0.5,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        "page_size": 3,
    }
    values.update(overrides)
    return Sep2ClientConfig(**values)  # type: ignore[arg-type]


ClientFactory = Callable[..., Awaitable[Sep2Client]]


@pytest.fixture
async def make_client(tmp_path: Path) -> AsyncIterator[ClientFactory]:
    clients: list[Sep2Client] = []

    async def factory(
        url: str, envelopes: Envelopes, *, start: bool = False, **kwargs: object
    ) -> Sep2Client:
        client_kwargs = {
            k: kwargs.pop(k)
            for k in ("read_telemetry", "der_capability", "read_der_status", "rng", "ssl_context")
            if k in kwargs
        }
        client = Sep2Client(
            config(url, tmp_path, **kwargs),
            on_envelope=envelopes,
            **client_kwargs,  # type: ignore[arg-type]
        )
        clients.append(client)
        if start:
            await client.start()
        else:
            await client.open()
        return client

    yield factory
    for client in clients:
        await client.stop()


# --------------------------------------------------------------------------- discovery


async def test_discovery_registration_and_time_offset(
    make_client: ClientFactory,
) -> None:
    server = Sep2ServerStub(clock_offset_s=3600.0)
    await server.start()
    try:
        envelopes = Envelopes()
        client = await make_client(server.url, envelopes)
        await client.poll_once()
        # Registered in-band, found by LFDI through the hrefs the server handed out.
        assert [d.lfdi for d in server.devices] == [LFDI]
        assert server.devices[0].sfdi == SFDI
        assert client.end_device_href == "/x/edev/8"
        assert client.clock.offset_s == pytest.approx(3600.5, abs=1.0)
        # Every request but the entry point followed an href under the server's prefix.
        paths = [path for _, path, _ in server.requests]
        assert paths[0] == "/dcap"
        assert all(p.startswith("/x/") or p == "/dcap" for p in paths)
        # Bodies we sent are labelled exactly application/sep+xml, no charset.
        posted = [ct for method, _, ct in server.requests if method == "POST"]
        assert posted == [MEDIA_TYPE]
        # A second poll reuses the EndDevice: no second registration.
        await client.poll_once()
        assert len(server.devices) == 1
    finally:
        await server.stop()


async def test_wrong_registration_pin_is_refused(
    stub: Sep2ServerStub, make_client: ClientFactory
) -> None:
    stub.register(LFDI, SFDI)
    program = stub.add_program(0, default=limits(exp=1500))
    stub.add_control(program, stub.now() - 10, 600, limits(exp=100))
    envelopes = Envelopes()
    client = await make_client(stub.url, envelopes, registration_pin=22222)
    with pytest.raises(RegistrationError) as caught:
        await client.poll_once()
    assert caught.value.reason == "pin_mismatch"
    assert envelopes.export_kw() is None  # nothing taken from an unverified server


async def test_not_registered_and_registration_off(
    stub: Sep2ServerStub, make_client: ClientFactory
) -> None:
    client = await make_client(stub.url, Envelopes(), register=False)
    with pytest.raises(RegistrationError) as caught:
        await client.poll_once()
    assert caught.value.reason == "not_registered"
    stub.allow_registration = False
    client = await make_client(stub.url, Envelopes())
    with pytest.raises(RegistrationError):
        await client.poll_once()


# --------------------------------------------------------------------------- controls


async def test_controls_picked_up_as_kw_envelope_through_one_item_pages(
    make_client: ClientFactory,
) -> None:
    server = Sep2ServerStub(max_page=1)  # ignores l=: one item per page, like envoy's default
    await server.start()
    try:
        server.register(LFDI, SFDI)
        program = server.add_program(0, default=limits(exp=1500))
        now = server.now()
        active = server.add_control(program, now - 60, 600, limits(exp=2000, imp=7000))
        server.add_control(program, now + 3600, 600, limits(exp=0))
        server.add_control(program, now + 7200, 600, limits(exp=1))
        envelopes = Envelopes()
        client = await make_client(server.url, envelopes)
        schedule = await client.poll_once()
        assert len(schedule.events) == 3  # all three pages were read
        effective = envelopes.last
        assert effective.export_limit_kw == pytest.approx(2.0)
        assert effective.import_limit_kw == pytest.approx(7.0)
        assert effective.online
        source = effective.sources["op_mod_exp_lim_w"]
        assert source.kind is SourceKind.EVENT
        assert source.mrid == active.mrid
        assert "primacy 0" in effective.why("op_mod_exp_lim_w")
        assert effective.valid_until is not None
        envelope = effective.to_operating_envelope(Target(group_id="site-1"))
        assert envelope is not None
        (interval,) = envelope.intervals
        assert (interval.import_limit_kw, interval.export_limit_kw) == (7.0, 2.0)
        assert interval.end == effective.valid_until
        assert envelope.command_id.startswith("sep2-")
        # The Responses we owed went to replyTo: received, then started.
        assert server.response_statuses(active) == [1, 2]
        assert all(r.end_device_lfdi == LFDI for r in server.responses)
    finally:
        await server.stop()


async def test_event_starts_and_ends_on_time_between_polls(
    stub: Sep2ServerStub, make_client: ClientFactory
) -> None:
    stub.register(LFDI, SFDI)
    program = stub.add_program(0, default=limits(exp=1500))
    control = stub.add_control(program, stub.now() + 2, 1, limits(exp=500))
    envelopes = Envelopes()
    # Poll rarely: the start and end must come from the scheduler's timer, not from polls.
    await make_client(stub.url, envelopes, start=True, poll_interval_s=30.0)
    await eventually(lambda: envelopes.export_kw() == 1.5, what="the default")
    await eventually(lambda: envelopes.export_kw() == 0.5, what="the event to start")
    assert envelopes.last.sources["op_mod_exp_lim_w"].mrid == control.mrid
    await eventually(lambda: envelopes.export_kw() == 1.5, what="the event to end")
    assert envelopes.last.sources["op_mod_exp_lim_w"].kind is SourceKind.DEFAULT
    await eventually(lambda: stub.response_statuses(control) == [1, 2, 3], what="responses")
    # The first call (fresh state, before any answer) had nothing; after that, never an
    # instant without an export limit.
    assert envelopes.seen[0].export_limit_kw is None
    assert all(e.export_limit_kw is not None for e in envelopes.seen[1:])


async def test_higher_primacy_event_overrides_per_field(
    stub: Sep2ServerStub, make_client: ClientFactory
) -> None:
    stub.register(LFDI, SFDI)
    now = stub.now()
    first = stub.add_program(0)
    second = stub.add_program(1)
    strong = stub.add_control(first, now - 10, 600, limits(exp=1000))
    weak = stub.add_control(second, now - 10, 600, limits(exp=4000, imp=6000), created=now + 5)
    envelopes = Envelopes()
    client = await make_client(stub.url, envelopes)
    await client.poll_once()
    effective = envelopes.last
    assert effective.export_limit_kw == pytest.approx(1.0)
    assert effective.import_limit_kw == pytest.approx(6.0)
    assert effective.sources["op_mod_exp_lim_w"].mrid == strong.mrid
    assert effective.sources["op_mod_imp_lim_w"].mrid == weak.mrid


async def test_cancellation_and_supersession(
    stub: Sep2ServerStub, make_client: ClientFactory
) -> None:
    stub.register(LFDI, SFDI)
    program = stub.add_program(0, default=limits(exp=1500))
    now = stub.now()
    running = stub.add_control(program, now - 10, 600, limits(exp=800))
    later = stub.add_control(program, now + 3600, 600, limits(exp=700))
    envelopes = Envelopes()
    client = await make_client(stub.url, envelopes)
    await client.poll_once()
    assert envelopes.export_kw() == pytest.approx(0.8)

    stub.set_status(running, 2)  # cancelled: still listed, stops applying
    stub.set_status(later, 4)  # superseded
    await client.poll_once()
    assert envelopes.export_kw() == pytest.approx(1.5)
    assert envelopes.last.sources["op_mod_exp_lim_w"].kind is SourceKind.DEFAULT
    assert stub.response_statuses(running) == [1, 2, 6]
    assert stub.response_statuses(later) == [1, 7]
    await client.poll_once()  # nothing owed twice
    assert len(stub.responses) == 5


# --------------------------------------------------------------------------- telemetry


async def test_telemetry_through_mirror_usage_points_and_der_resources(
    stub: Sep2ServerStub, make_client: ClientFactory
) -> None:
    stub.register(LFDI, SFDI)

    async def read() -> TelemetrySample:
        return TelemetrySample(
            site_kw=-2.345, der_kw=3.0, timestamp=datetime.fromtimestamp(stub.now(), UTC)
        )

    async def status() -> DERStatus:
        return DERStatus(reading_time=stub.now())

    capability = DERCapability(modes_supported="00000001", rtg_max_w=from_watts(5000), type=83)
    client = await make_client(
        stub.url,
        Envelopes(),
        read_telemetry=read,
        der_capability=capability,
        read_der_status=status,
    )
    await client.poll_once()
    await client.post_telemetry_once()
    await client.post_telemetry_once()
    assert sorted(m.role_flags for m in stub.mups.values()) == ["03", "49"]
    assert all(m.device_lfdi == LFDI for m in stub.mups.values())
    values = [(mid, r.reading.value) for mid, r in stub.readings if r.reading is not None]
    site_mup = next(mid for mid, m in stub.mups.items() if m.role_flags == "03")
    der_mup = next(mid for mid, m in stub.mups.items() if m.role_flags == "49")
    assert values == [(site_mup, -2345), (der_mup, 3000)] * 2
    site_mrid = stub.mups[site_mup].mirror_meter_readings[0].mrid
    assert stub.readings[0][1].mrid == site_mrid
    assert len(stub.der_capability) == 1  # capability once, status every round
    assert to_watts(stub.der_capability[0].rtg_max_w) == 5000
    assert len(stub.der_status) == 2
    posted = {ct for method, _, ct in stub.requests if method in ("POST", "PUT")}
    assert posted == {MEDIA_TYPE}


async def test_telemetry_loop_runs_in_background(
    stub: Sep2ServerStub, make_client: ClientFactory
) -> None:
    stub.register(LFDI, SFDI)

    async def read() -> TelemetrySample:
        return TelemetrySample(site_kw=1.0)

    await make_client(
        stub.url, Envelopes(), start=True, read_telemetry=read, telemetry_interval_s=0.1
    )
    await eventually(lambda: len(stub.readings) >= 2, what="periodic readings")


# --------------------------------------------------------------------------- comms loss


async def test_persisted_default_and_draws_survive_restart_while_unreachable(
    stub: Sep2ServerStub, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stub.register(LFDI, SFDI)
    program = stub.add_program(0, default=limits(exp=1500))
    future = stub.add_control(program, stub.now() + 3600, 600, limits(exp=0), randomize_start=600)
    envelopes = Envelopes()
    client = await make_client(stub.url, envelopes, rng=lambda a, b: 123)
    await client.poll_once()
    assert envelopes.export_kw() == pytest.approx(1.5)
    assert client.schedule is not None
    first_start = client.schedule.events[future.mrid.lower()].effective_start
    assert first_start == future.interval.start + 123
    await client.stop()
    await stub.stop()  # the utility is gone: connection refused

    caplog.set_level(logging.INFO, logger="adapters.sep2_client.client")
    restarted = Envelopes()
    again = await make_client(stub.url, restarted, start=True, rng=lambda a, b: 456)
    # Before any answer from the server, the persisted default is in force.
    assert restarted.seen
    assert restarted.last.export_limit_kw == pytest.approx(1.5)
    assert not restarted.last.online
    assert restarted.last.sources["op_mod_exp_lim_w"].kind is SourceKind.DEFAULT
    await eventually(lambda: again.reachable is False, what="unreachable")
    await asyncio.sleep(0.5)  # several failed polls with backoff
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1, "logged once, not once per failed poll"
    assert restarted.last.export_limit_kw == pytest.approx(1.5)
    assert again.schedule is not None
    # The event was not re-randomized (the new RNG would have said 456).
    assert again.schedule.events[future.mrid.lower()].effective_start == first_start

    await stub.start()  # same port
    await eventually(lambda: again.reachable is True, what="recovery")
    recovered = [r for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(recovered) == 1


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (Failure.HTTP_500, HttpStatusError),
        (Failure.HANG, ServerUnreachable),
        (Failure.WRONG_MEDIA_TYPE, WrongMediaType),
        (Failure.MALFORMED, InvalidDocument),
    ],
)
async def test_bad_answers_keep_the_last_good_state(
    stub: Sep2ServerStub,
    make_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
    failure: Failure,
    error: type[Exception],
) -> None:
    stub.register(LFDI, SFDI)
    program = stub.add_program(0, default=limits(exp=1500))
    stub.add_control(program, stub.now() - 10, 600, limits(exp=900))
    envelopes = Envelopes()
    client = await make_client(stub.url, envelopes)
    await client.poll_once()
    assert envelopes.export_kw() == pytest.approx(0.9)

    stub.failure, stub.fail_path, stub.hang_s = failure, "/derc", 2.0
    stub.set_default(program, limits(exp=5000))  # would change things if half-read
    with pytest.raises(error):
        await client.poll_once()
    assert envelopes.export_kw() == pytest.approx(0.9)
    assert client.schedule is not None
    assert len(client.schedule.events) == 1

    # The background loop logs the specific problem once and keeps enforcing.
    caplog.set_level(logging.INFO, logger="adapters.sep2_client.client")
    await client.start()

    def problems() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    await eventually(lambda: len(problems()) > 0, what="a logged problem")
    await asyncio.sleep(0.6)  # several more failed polls
    assert envelopes.export_kw() == pytest.approx(0.9)
    messages = problems()
    assert len(messages) == 1, messages
    assert error.__name__ in messages[0] or "unreachable" in messages[0]


async def test_media_type_parameters_accepted(make_client: ClientFactory) -> None:
    server = Sep2ServerStub(media_type="application/sep+xml; csipaus=1.3-beta_storage")
    await server.start()
    try:
        server.register(LFDI, SFDI)
        program = server.add_program(0)
        server.add_control(program, server.now() - 10, 600, limits(imp=3000))
        envelopes = Envelopes()
        client = await make_client(server.url, envelopes)
        await client.poll_once()
        assert envelopes.last.import_limit_kw == pytest.approx(3.0)
        assert envelopes.last.to_operating_envelope(Target(group_id="s")) is not None
    finally:
        await server.stop()


async def test_responses_are_retried_after_a_failure(
    stub: Sep2ServerStub, make_client: ClientFactory
) -> None:
    stub.register(LFDI, SFDI)
    program = stub.add_program(0)
    control = stub.add_control(program, stub.now() + 3600, 600, limits(exp=1))
    stub.failure, stub.fail_path = Failure.HTTP_500, REPLY_TO
    client = await make_client(stub.url, Envelopes())
    await client.poll_once()
    assert stub.response_statuses(control) == []
    stub.failure = None
    await client.poll_once()
    assert stub.response_statuses(control) == [1]


async def test_stop_is_idempotent_and_cancellation_safe(
    stub: Sep2ServerStub, make_client: ClientFactory
) -> None:
    stub.register(LFDI, SFDI)
    stub.failure, stub.hang_s = Failure.HANG, 5.0
    client = await make_client(stub.url, Envelopes(), start=True, request_timeout_s=10.0)
    await asyncio.sleep(0.1)  # mid-request
    await asyncio.wait_for(client.stop(), timeout=2.0)
    await client.stop()


# --------------------------------------------------------------------------- mutual TLS


def _tls_material(tmp_path: Path) -> tuple[Path, Path, Path, Path, Path]:
    """A P-256 CA, a server certificate for 127.0.0.1 and a device certificate, as PEM files."""
    import ipaddress
    from datetime import timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test 2030.5 CA"))
        .issuer_name(name("test 2030.5 CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, san: x509.GeneralName | None) -> tuple[x509.Certificate, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
        )
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server_cert, server_key = leaf("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    device_cert, device_key = leaf("site device", None)
    return (
        write_cert(ca, tmp_path / "ca.pem"),
        write_cert(server_cert, tmp_path / "server.pem"),
        write_key(server_key, tmp_path / "server.key"),
        write_cert(device_cert, tmp_path / "device.pem"),
        write_key(device_key, tmp_path / "device.key"),
    )


def _tls12_ccm8(purpose: ssl.Purpose) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-ECDSA-AES128-CCM8")
    return context


async def test_mutual_tls_with_the_csip_cipher_suite(
    tmp_path: Path, make_client: ClientFactory
) -> None:
    ca, server_cert, server_key, device_cert, device_key = _tls_material(tmp_path)
    server_ctx = _tls12_ccm8(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(server_cert, server_key)
    server_ctx.load_verify_locations(ca)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = _tls12_ccm8(ssl.Purpose.SERVER_AUTH)
    client_ctx.load_cert_chain(device_cert, device_key)
    client_ctx.load_verify_locations(ca)

    lfdi = lfdi_from_cert(device_cert.read_bytes())
    server = Sep2ServerStub()
    url = await server.start(ssl_context=server_ctx)
    try:
        program = server.add_program(0, default=limits(exp=1500))
        server.add_control(program, server.now() - 10, 600, limits(exp=2500))
        envelopes = Envelopes()
        client = await make_client(url, envelopes, ssl_context=client_ctx, lfdi=lfdi)
        await client.poll_once()
        assert envelopes.export_kw() == pytest.approx(2.5)
        assert [d.lfdi for d in server.devices] == [lfdi]  # registered under its cert's LFDI
        assert set(server.peer_lfdis) == {lfdi}
        assert set(server.peer_ciphers) == {("ECDHE-ECDSA-AES128-CCM8", "TLSv1.2")}

        # Without a client certificate the handshake fails: that is "unreachable", not a crash.
        bare = _tls12_ccm8(ssl.Purpose.SERVER_AUTH)
        bare.load_verify_locations(ca)
        anonymous = await make_client(url, Envelopes(), ssl_context=bare, lfdi=lfdi)
        with pytest.raises(ServerUnreachable):
            await anonymous.poll_once()
    finally:
        await server.stop()


async def test_poll_interval_follows_the_servers_poll_rate(
    stub: Sep2ServerStub, make_client: ClientFactory
) -> None:
    stub.register(LFDI, SFDI)
    stub.poll_rate = 120
    client = await make_client(stub.url, Envelopes(), poll_interval_s=None)
    assert client.poll_interval() == 900  # 2030.5 default before the server said anything
    await client.poll_once()
    assert client.poll_interval() == 60  # the shortest rate offered (the stub's DERList)
    stub.poll_rate = 0
    await client.poll_once()
    assert client.poll_interval() == 1.0  # floored: 0 must not become a busy loop


async def test_a_failing_callback_is_offered_the_change_again(
    stub: Sep2ServerStub, tmp_path: Path
) -> None:
    stub.register(LFDI, SFDI)
    program = stub.add_program(0)
    stub.add_control(program, stub.now() - 10, 600, limits(exp=100))
    calls: list[float | None] = []

    async def flaky(effective: EffectiveControls) -> None:
        calls.append(effective.export_limit_kw)
        if len(calls) == 2:
            raise RuntimeError("site busy")

    client = Sep2Client(config(stub.url, tmp_path), on_envelope=flaky)
    await client.open()
    try:
        await client.poll_once()  # fails in the callback
        await client.poll_once()  # offered again
    finally:
        await client.stop()
    assert calls == [None, 0.1, 0.1]


async def test_oversized_bodies_are_refused(
    stub: Sep2ServerStub, make_client: ClientFactory
) -> None:
    stub.register(LFDI, SFDI)
    client = await make_client(stub.url, Envelopes(), max_body_bytes=100)
    with pytest.raises(BodyTooLarge) as caught:
        await client.poll_once()
    assert caught.value.limit == 100
