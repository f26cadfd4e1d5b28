"""OCPP security profiles 1-3: the real central, the charger simulator, real TLS on loopback.

A development PKI (``composition.certs``) is made once for the module: a CA with the central's
server certificate and chargers' client certificates, and a second, rogue CA. For each profile
the right charger connects and obeys a limit; every impostor is refused before any websocket
exists, leaves no session and enrols nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from adapters.ocpp.central import OcppCentral, OcppCentralConfig, OcppChargerConfig
from adapters.ocpp.charger import OcppCharger
from composition.certs import make_ca, make_cert
from composition.config import parse_config
from protocols.ocpp import authorization_header
from protocols.tls import OCPP_TLS12_CIPHERS, ocpp_client_ssl_context, ocpp_server_ssl_context
from simulators.ev_charger import ChargerRefused, EvChargerSim
from tests.adapters.ocpp.test_central import (
    LOCATION,
    FakeRegistrar,
    Harness,
    central_config,
    running,
    setpoint,
)
from unified.config import ConfigError

pytestmark = pytest.mark.timeout(30)

CP1_KEY = "00112233445566778899aabbccddeeff01234567"  # a 1.6 AuthorizationKey: 40 hex digits
CP2_PASSWORD = "Str0ng-pass:word|for@CP2"  # a 2.0.1 passwordString
CPO = "Example CPO"


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: Path
    server_cert: Path
    server_key: Path
    rogue: Path

    def client(self, name: str, *, folder: str = "") -> tuple[Path, Path]:
        where = self.folder / folder if folder else self.folder
        return where / f"{name}.pem", where / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "ocpp-ca")
    server = make_cert(ca, folder, "central", server=True, hosts=("127.0.0.1",))
    for name in ("CP-1", "CP-2", "NEW-1"):
        make_cert(ca, folder, name, organization=CPO)
    make_cert(ca, folder / "no-org", "CP-1")  # right CA and CN, no O
    rogue = make_ca(folder / "rogue", "rogue-ca")
    for name in ("CP-1", "NEW-2"):
        make_cert(rogue, folder / "rogue", name, organization=CPO)
    return Pki(folder, ca.cert_path, server.cert_path, server.key_path, rogue.cert_path)


@pytest.fixture
def secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    key_file = tmp_path / "CP-1.key"
    key_file.write_text(CP1_KEY + "\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("DERMS_TEST_CP2_PASSWORD", CP2_PASSWORD)
    return {
        "CP-1": {"password_file": key_file},
        "CP-2": {"password_env": "DERMS_TEST_CP2_PASSWORD"},
    }


def chargers(**per_charger: dict[str, Any]) -> tuple[OcppChargerConfig, ...]:
    ratings = {"CP-1": 11.0, "CP-2": 7.4}
    return tuple(
        OcppChargerConfig(
            charge_point_id=cp_id, location=LOCATION, max_kw=kw, **per_charger.get(cp_id, {})
        )
        for cp_id, kw in ratings.items()
    )


def basic_config(profile: int, secrets: dict[str, Any], pki: Pki, **over: Any) -> OcppCentralConfig:
    tls = {"cert_file": pki.server_cert, "key_file": pki.server_key} if profile == 2 else {}
    return central_config(security_profile=profile, chargers=chargers(**secrets), **tls, **over)


def mtls_config(pki: Pki, **over: Any) -> OcppCentralConfig:
    values: dict[str, Any] = {
        "security_profile": 3,
        "cert_file": pki.server_cert,
        "key_file": pki.server_key,
        "ca_file": pki.ca,
        "cpo_name": CPO,
        "chargers": chargers(),
    }
    return central_config(**(values | over))


async def refused(sim: EvChargerSim) -> ChargerRefused:
    with pytest.raises(ChargerRefused) as info:
        await asyncio.wait_for(sim.run(), 5)
    return info.value


def assert_no_session(h: Harness, registrar: FakeRegistrar, *cp_ids: str) -> None:
    for cp_id in cp_ids:
        snap = h.central.snapshot(cp_id)
        if snap is None:
            continue
        assert not snap.connected
        assert snap.generation == 0  # no session was ever opened
        assert snap.vendor is None  # never booted
    assert set(registrar.devices) == {"CP-1", "CP-2"}  # the configured ones, nothing more


async def obeys_a_limit(h: Harness, sim: EvChargerSim, cp_id: str = "CP-1") -> None:
    await h.start(sim)
    adapter = await h.adapter(cp_id)
    command = setpoint(4.0).model_copy(update={"device_id": cp_id})
    await adapter.apply(command)
    assert sim.limit_kw == pytest.approx(4.0)


# --------------------------------------------------------------------------- profile 1


@pytest.mark.parametrize("version", ["ocpp1.6", "ocpp2.0.1"])
async def test_profile_1_the_right_charger_connects_and_obeys_a_limit(
    pki: Pki, secrets: dict[str, Any], version: str
) -> None:
    registrar = FakeRegistrar()
    async with running(basic_config(1, secrets, pki), registrar) as h:
        # CP-1's 1.6 key goes out as 20 bytes (1.6) or as its 40 digits (2.0.1): both accepted.
        await obeys_a_limit(h, h.sim("CP-1", version=version, password=CP1_KEY))
        await obeys_a_limit(h, h.sim("CP-2", version=version, password=CP2_PASSWORD), "CP-2")
        assert h.central.refusals == {}


@pytest.mark.parametrize(
    ("cp_id", "over", "reason"),
    [
        ("CP-1", {"password": "ff" * 20}, "wrong_password"),
        ("CP-1", {"password": CP1_KEY[:-1] + "8"}, "wrong_password"),
        ("CP-1", {}, "no_credentials"),
        ("STRANGER", {"password": CP1_KEY}, "unknown_charger"),
        # CP-2's own, right credentials, presented on CP-1's URL.
        ("CP-1", {"password": CP2_PASSWORD, "basic_auth_username": "CP-2"}, "identity_mismatch"),
    ],
)
async def test_profile_1_impostors_are_refused_with_401(
    pki: Pki, secrets: dict[str, Any], cp_id: str, over: dict[str, Any], reason: str
) -> None:
    registrar = FakeRegistrar()
    async with running(basic_config(1, secrets, pki), registrar) as h:
        refusal = await refused(h.sim(cp_id, **over))
        assert refusal.http_status == 401
        assert_no_session(h, registrar, "CP-1", "CP-2")
        assert h.central.refusals == {reason: 1}
        assert h.central.refused == {cp_id: 1}


async def test_unknown_id_and_wrong_password_get_the_same_answer(
    pki: Pki, secrets: dict[str, Any]
) -> None:
    async with running(basic_config(1, secrets, pki)) as h:
        answers = []
        for cp_id, password in (("CP-1", b"x" * 20), ("STRANGER", b"x" * 20)):
            with pytest.raises(InvalidStatus) as info:
                async with connect(
                    f"{h.central.url()}/{cp_id}",
                    subprotocols=[Subprotocol("ocpp1.6")],
                    additional_headers={"Authorization": authorization_header(cp_id, password)},
                ):
                    pass
            response = info.value.response
            answers.append(
                (response.status_code, response.body, response.headers["WWW-Authenticate"])
            )
        assert answers[0] == answers[1]
        assert answers[0][0] == 401
        assert answers[0][2].startswith("Basic realm=")


async def test_failed_attempts_are_throttled_and_logged_once(
    pki: Pki, secrets: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    registrar = FakeRegistrar()
    with caplog.at_level(logging.WARNING, logger="adapters.ocpp.central"):
        async with running(basic_config(1, secrets, pki), registrar) as h:
            told: list[tuple[str, str, str]] = []
            h.central.on_refused = lambda *refusal: told.append(refusal)
            for _ in range(3):  # two free failures, the third closes CP-1 from here for 1 s
                assert (await refused(h.sim("CP-1", password="ff" * 20))).http_status == 401
            # Even the right password is not examined while closed: guesses cost time.
            assert (await refused(h.sim("CP-1", password=CP1_KEY))).http_status == 429
            assert_no_session(h, registrar, "CP-1")
            await asyncio.sleep(1.05)
            await h.start(h.sim("CP-1", password=CP1_KEY))
            assert h.central.refusals == {"wrong_password": 3, "throttled": 1}
            # Every refusal reaches the audit hook, with who and why (never the password).
            assert [reason for _, reason, _ in told] == ["wrong_password"] * 3 + ["throttled"]
            assert all(source.startswith("ocpp:CP-1@127.0.0.1") for source, _, _ in told)
            assert not any("ff" * 20 in detail for _, _, detail in told)
    lines = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1  # four refusals of CP-1, one log line
    assert "CP-1" in lines[0].getMessage()
    assert CP1_KEY not in caplog.text


# --------------------------------------------------------------------------- profile 2


@pytest.mark.parametrize("version", ["ocpp1.6", "ocpp2.0.1"])
async def test_profile_2_tls_with_basic_auth(
    pki: Pki, secrets: dict[str, Any], version: str
) -> None:
    registrar = FakeRegistrar()
    async with running(basic_config(2, secrets, pki), registrar) as h:
        assert h.central.url().startswith("wss://")
        wrong = h.sim("CP-1", version=version, password="ff" * 20, ca_file=pki.ca)
        assert (await refused(wrong)).http_status == 401
        # Plain ws to the TLS port: no TLS, no HTTP, no session.
        plain = h.sim(
            "CP-1",
            version=version,
            password=CP1_KEY,
            url="ws://" + h.central.url().removeprefix("wss://"),
        )
        with pytest.raises((ChargerRefused, OSError)):
            await asyncio.wait_for(plain.run(), 5)
        # A charger that does not trust the central's certificate will not talk to it.
        doubting = h.sim("CP-1", version=version, password=CP1_KEY, ca_file=pki.rogue)
        with pytest.raises(ChargerRefused, match="TLS"):
            await asyncio.wait_for(doubting.run(), 5)
        assert_no_session(h, registrar, "CP-1")
        await obeys_a_limit(h, h.sim("CP-1", version=version, password=CP1_KEY, ca_file=pki.ca))


async def _handshake(port: int, context: ssl.SSLContext) -> tuple[str, str]:
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
    )
    ssl_object = writer.get_extra_info("ssl_object")
    negotiated = (str(ssl_object.version()), str(ssl_object.cipher()[0]))
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return negotiated


def _tls11_client(pki: Pki) -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is deprecated: the point
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.load_verify_locations(cafile=str(pki.ca))
    return context


async def test_tls_below_1_2_is_refused_and_the_suites_are_ocpps(
    pki: Pki, secrets: dict[str, Any]
) -> None:
    # Control: this client really speaks TLS 1.1 to a server that allows it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        lax.minimum_version = ssl.TLSVersion.TLSv1
    lax.set_ciphers("ALL:@SECLEVEL=0")
    lax.load_cert_chain(pki.server_cert, pki.server_key)
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0, ssl=lax)
    async with server:
        port = server.sockets[0].getsockname()[1]
        assert (await _handshake(port, _tls11_client(pki)))[0] == "TLSv1.1"

    async with running(basic_config(2, secrets, pki)) as h:
        # An alert or a reset, depending on who notices first: no TLS session either way.
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await _handshake(h.central.port, _tls11_client(pki))
        tls12 = ocpp_client_ssl_context(pki.ca)
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        version, cipher = await _handshake(h.central.port, tls12)
        assert version == "TLSv1.2"
        assert cipher in OCPP_TLS12_CIPHERS.split(":")
        assert cipher.startswith("ECDHE-ECDSA-AES")  # the development certificate is P-256
        assert (await _handshake(h.central.port, ocpp_client_ssl_context(pki.ca)))[0] == "TLSv1.3"
        # A TLS 1.2 suite OCPP does not name (one OpenSSL would otherwise pick) is not taken.
        chacha = ocpp_client_ssl_context(pki.ca)
        chacha.maximum_version = ssl.TLSVersion.TLSv1_2
        chacha.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305")
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await _handshake(h.central.port, chacha)
        assert h.central.snapshot("CP-1").generation == 0  # type: ignore[union-attr]


def test_the_central_tls_policy(pki: Pki) -> None:
    # OpenSSL's defaults already refuse TLS 1.1 today: the policy must not depend on them.
    for ca_file, verify in ((None, ssl.CERT_NONE), (pki.ca, ssl.CERT_REQUIRED)):
        context = ocpp_server_ssl_context(pki.server_cert, pki.server_key, ca_file)
        assert context.minimum_version is ssl.TLSVersion.TLSv1_2
        tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert tls12 == set(OCPP_TLS12_CIPHERS.split(":"))
        assert context.options & ssl.OP_NO_COMPRESSION
        assert context.verify_mode is verify


# --------------------------------------------------------------------------- profile 3


@pytest.mark.parametrize("version", ["ocpp1.6", "ocpp2.0.1"])
async def test_profile_3_the_certificate_is_the_identity(pki: Pki, version: str) -> None:
    registrar = FakeRegistrar()
    async with running(mtls_config(pki), registrar) as h:
        cert, key = pki.client("CP-1")
        sim = h.sim("CP-1", version=version, ca_file=pki.ca, cert_file=cert, key_file=key)
        await obeys_a_limit(h, sim)
        assert h.central.refusals == {}


@pytest.mark.parametrize(
    ("certificate", "status", "reason"),
    [
        (None, None, None),  # no client certificate: the TLS handshake fails
        (("CP-1", "rogue"), None, None),  # CN=CP-1, from another CA: the handshake fails
        (("CP-2", ""), 403, "certificate_identity"),  # CP-2's certificate on CP-1's URL
        (("CP-1", "no-org"), 403, "certificate_organization"),  # no O=<cpo_name>
    ],
)
async def test_profile_3_impostors_are_refused(
    pki: Pki, certificate: tuple[str, str] | None, status: int | None, reason: str | None
) -> None:
    registrar = FakeRegistrar()
    async with running(mtls_config(pki), registrar) as h:
        files: dict[str, Any] = {}
        if certificate is not None:
            cert, key = pki.client(certificate[0], folder=certificate[1])
            files = {"cert_file": cert, "key_file": key}
        # A password does not stand in for a certificate.
        sim = h.sim("CP-1", ca_file=pki.ca, password=CP1_KEY, **files)
        refusal = await refused(sim)
        assert refusal.http_status == status
        assert_no_session(h, registrar, "CP-1", "CP-2")
        assert h.central.refusals == ({reason: 1} if reason else {})


async def test_profile_3_auto_registers_only_chargers_our_ca_vouches_for(pki: Pki) -> None:
    registrar = FakeRegistrar()
    config = mtls_config(
        pki,
        chargers=(),
        auto_register=True,
        auto_register_defaults={"location": LOCATION, "max_kw": 22.0},
    )
    async with running(config, registrar) as h:
        cert, key = pki.client("NEW-2", folder="rogue")
        rogue = h.sim("NEW-2", ca_file=pki.ca, cert_file=cert, key_file=key)
        await refused(rogue)
        cert, key = pki.client("CP-1")
        posing = h.sim("NEW-9", ca_file=pki.ca, cert_file=cert, key_file=key)
        assert (await refused(posing)).http_status == 403
        assert registrar.devices == {}
        cert, key = pki.client("NEW-1")
        await h.start(h.sim("NEW-1", ca_file=pki.ca, cert_file=cert, key_file=key))
        assert set(registrar.devices) == {"NEW-1"}


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("over", "fragment"),
    [
        ({"security_profile": 1, "host": "0.0.0.0"}, "trusted_network"),
        ({"security_profile": 1}, "exactly one of password_file and password_env"),
        ({"security_profile": 2}, "needs cert_file and key_file"),
        ({"security_profile": 3, "cert_file": "c", "key_file": "k"}, "needs ca_file"),
        ({"cert_file": "c", "key_file": "k"}, "for security_profile 2 or 3"),
        ({"ca_file": "ca"}, "for security_profile 3"),
        ({"cpo_name": "X"}, "for security_profile 3"),
    ],
)
def test_security_configuration_is_checked(over: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        central_config(**over)


def test_passwords_only_with_basic_profiles_and_ids_without_colons(tmp_path: Path) -> None:
    key = {"password_file": tmp_path / "k"}
    with pytest.raises(ValueError, match="are for security_profile 1 or 2"):
        central_config(chargers=chargers(**{"CP-1": key}))
    with pytest.raises(ValueError, match="cannot contain ':'"):
        central_config(
            security_profile=1,
            chargers=(OcppChargerConfig(charge_point_id="CP:1", location=LOCATION, **key),),
        )
    with pytest.raises(ValueError, match="auto_register cannot work"):
        central_config(
            security_profile=1,
            chargers=(),
            auto_register=True,
            auto_register_defaults={"location": LOCATION},
        )
    # Profile 1 beyond loopback only on a network declared trusted.
    trusted = central_config(
        security_profile=1,
        host="0.0.0.0",
        trusted_network=True,
        chargers=chargers(**{"CP-1": key, "CP-2": key}),
    )
    assert trusted.security_profile == 1


def test_unusable_secrets_and_tls_files_stop_the_central_before_it_starts(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DERMS_TEST_NOT_SET", raising=False)
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    config = central_config(
        security_profile=2,
        cert_file=pki.server_cert,
        key_file=tmp_path / "missing.key",
        chargers=chargers(
            **{"CP-1": {"password_file": short}, "CP-2": {"password_env": "DERMS_TEST_NOT_SET"}}
        ),
    )
    with pytest.raises(ConfigError) as info:
        OcppCentral(config, charger_factory=OcppCharger)
    text = "\n".join(info.value.problems)
    assert "chargers[0] (CP-1)" in text
    assert "3 characters" in text
    assert "abc" not in text
    assert "DERMS_TEST_NOT_SET is not set" in text
    assert "cannot use the TLS files" in text


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    data = {
        "settlement": {"timezone": "UTC"},
        "ocpp_central": {
            "security_profile": 2,
            "cert_file": "tls/central.pem",
            "key_file": "/etc/derms/central.key",
            "chargers": [
                {
                    "charge_point_id": "CP-1",
                    "location": {"substation": "s1", "feeder": "f1"},
                    "password_file": "secrets/CP-1.key",
                },
                {
                    "charge_point_id": "CP-2",
                    "location": {"substation": "s1", "feeder": "f1"},
                    "password_env": "CP2_PASSWORD",
                },
            ],
        },
    }
    central = parse_config(data).relative_to(tmp_path).ocpp_central
    assert central is not None
    assert central.cert_file == tmp_path / "tls/central.pem"
    assert central.key_file == Path("/etc/derms/central.key")
    assert central.chargers[0].password_file == tmp_path / "secrets/CP-1.key"
    assert central.chargers[1].password_file is None


def test_cli_check_config_reads_the_secrets_and_certs_issue_sets_the_o(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from composition.cli import main

    runner = CliRunner()
    config = tmp_path / "gw.toml"
    config.write_text(
        '[settlement]\ntimezone = "UTC"\n'
        "[ocpp_central]\nsecurity_profile = 1\n"
        '[[ocpp_central.chargers]]\ncharge_point_id = "CP-1"\npassword_file = "CP-1.key"\n'
        'location = { substation = "s1", feeder = "f1" }\n'
    )
    missing = runner.invoke(main, ["check-config", "--config", str(config)])
    assert missing.exit_code != 0
    assert "cannot read password_file" in missing.output
    assert str(tmp_path / "CP-1.key") in missing.output  # resolved against the config's folder
    (tmp_path / "CP-1.key").write_text(CP1_KEY)
    assert runner.invoke(main, ["check-config", "--config", str(config)]).exit_code == 0

    assert runner.invoke(main, ["certs", "ca", str(tmp_path)]).exit_code == 0
    issued = runner.invoke(main, ["certs", "issue", str(tmp_path), "CP-1", "--org", CPO])
    assert issued.exit_code == 0, issued.output
    subject = x509.load_pem_x509_certificate((tmp_path / "CP-1.pem").read_bytes()).subject
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == CPO
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "CP-1"
