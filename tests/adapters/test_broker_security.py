"""The MQTT links' login: one password source, secrets never shown, TLS that always verifies,
and files re-read on every connect and watched for rotation. (Against a real broker:
tests/e2e/test_broker_security.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from pydantic import ValidationError

from adapters.broker_security import (
    BrokerLogin,
    BrokerTls,
    CredentialsRotated,
    CredentialsUnavailable,
    FileStamps,
    watch_rotation,
)
from adapters.grid_derms.config import BrokerConfig
from adapters.mqtt_devices.acl import DeviceAccount, write_acl_file, write_password_file
from adapters.mqtt_devices.devices import DeviceMqttConfig, DeviceMqttLink
from composition.certs import CertificateAuthority, make_ca, make_cert
from protocols.mqtt.devices import DeviceTopics, MessageKind
from protocols.tls import broker_client_context
from simulators.broker import MosquittoBroker, TlsMosquitto

SECRET = "s3cr3t-Pa55word-never-shown"


@pytest.mark.parametrize("model", [BrokerConfig, DeviceMqttConfig])
def test_one_password_source_and_it_needs_a_user(model: type[BrokerLogin]) -> None:
    with pytest.raises(ValidationError, match="give one of password, password_file"):
        model.model_validate(
            {"username": "gw", "password": "x", "password_file": "p", "password_env": "P"}
        )
    with pytest.raises(ValidationError, match="password_env needs a username"):
        model.model_validate({"password_env": "GW_PASSWORD"})
    with pytest.raises(ValidationError, match="password_env"):
        model.model_validate({"username": "gw", "password_env": "not a name"})
    with pytest.raises(ValidationError, match="need a cert_file"):
        model.model_validate({"tls": {"key_file": "k.pem"}})


@pytest.mark.parametrize("model", [BrokerConfig, DeviceMqttConfig])
def test_an_inline_password_is_never_shown(model: type[BrokerLogin]) -> None:
    config = model.model_validate({"username": "gw", "password": SECRET})
    for text in (repr(config), str(config), config.model_dump_json(), repr(config.model_dump())):
        assert SECRET not in text
    credentials = config.credentials("broker")
    assert credentials.password == SECRET
    assert SECRET not in repr(credentials)


def test_password_file_is_read_at_every_connect(tmp_path: Path) -> None:
    secret = tmp_path / "gw.password"
    secret.write_text(SECRET + "\n")
    config = BrokerConfig(username="gw", password_file=secret)
    assert config.credentials("broker").password == SECRET  # the trailing newline is not in it
    secret.write_text("rotated\r\n")
    assert config.credentials("broker").password == "rotated"
    secret.write_text("\n")
    with pytest.raises(CredentialsUnavailable, match=r"broker.password_file: .* is empty"):
        config.credentials("broker")
    secret.unlink()
    with pytest.raises(CredentialsUnavailable) as info:
        config.credentials("broker")
    assert info.value.setting == "broker.password_file"


def test_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = DeviceMqttConfig(username="gw", password_env="DERMS_TEST_DEVICE_PASSWORD")
    monkeypatch.setenv("DERMS_TEST_DEVICE_PASSWORD", SECRET)
    assert config.credentials("device_mqtt").password == SECRET
    monkeypatch.delenv("DERMS_TEST_DEVICE_PASSWORD")
    with pytest.raises(CredentialsUnavailable) as info:
        config.credentials("device_mqtt")
    assert info.value.setting == "device_mqtt.password_env"
    assert "DERMS_TEST_DEVICE_PASSWORD is not set" in str(info.value)


def test_relative_files_are_resolved_against_the_config_folder(tmp_path: Path) -> None:
    config = BrokerConfig.model_validate(
        {
            "username": "gw",
            "password_file": "secrets/gw.password",
            "tls": {"ca_file": "pki/ca.pem", "cert_file": "/abs/gw.pem", "key_file": "gw.key"},
        }
    ).rebased(tmp_path)
    assert config.password_file == tmp_path / "secrets/gw.password"
    assert config.tls is not None
    assert config.tls.ca_file == tmp_path / "pki/ca.pem"
    assert config.tls.cert_file == Path("/abs/gw.pem")
    assert config.tls.key_file == tmp_path / "gw.key"
    assert config.file_problems("broker") == [
        f"broker.password_file: {tmp_path / 'secrets/gw.password'} does not exist",
        f"broker.tls.ca_file: {tmp_path / 'pki/ca.pem'} does not exist",
        "broker.tls.cert_file: /abs/gw.pem does not exist",
        f"broker.tls.key_file: {tmp_path / 'gw.key'} does not exist",
    ]


def test_weak_settings_are_warned_about(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text(SECRET)
    secret.chmod(0o644)
    config = BrokerConfig(host="10.1.2.3", username="gw", password_file=secret)
    warnings = config.warnings("broker", config.host)
    assert any("unencrypted" in w for w in warnings)
    assert any("readable by others" in w for w in warnings)
    assert BrokerConfig().warnings("broker", "127.0.0.1") == []
    assert all(SECRET not in w for w in warnings)


# --------------------------------------------------------------------------- TLS contexts


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CertificateAuthority]:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "test-ca")
    make_cert(ca, folder, "broker", server=True, hosts=("broker.example",))
    make_cert(ca, folder, "local", server=True, hosts=("localhost", "127.0.0.1"))
    make_cert(ca, folder, "gw")
    return folder, ca


def test_the_context_always_verifies_and_refuses_old_tls(
    pki: tuple[Path, CertificateAuthority],
) -> None:
    folder, ca = pki
    config = BrokerConfig.model_validate(
        {"tls": {"ca_file": ca.cert_path, "cert_file": folder / "gw.pem", "key_file": "gw.key"}}
    ).rebased(folder)
    ctx = config.credentials("broker").tls_context
    assert ctx is not None
    assert ctx.check_hostname
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    strict = BrokerConfig.model_validate({"tls": {"min_version": "1.3"}})
    strict_ctx = strict.credentials("broker").tls_context
    assert strict_ctx is not None
    assert strict_ctx.minimum_version is ssl.TLSVersion.TLSv1_3
    assert "check_hostname" not in BrokerConfig.model_fields  # no switch to turn it off


def test_unusable_tls_files_are_said_clearly(pki: tuple[Path, CertificateAuthority]) -> None:
    folder, ca = pki
    mismatched = BrokerConfig.model_validate(
        {"tls": {"ca_file": ca.cert_path, "cert_file": "gw.pem", "key_file": "broker.key"}}
    ).rebased(folder)
    with pytest.raises(CredentialsUnavailable, match=r"broker.tls: cannot load the TLS files"):
        mismatched.credentials("broker")
    missing = BrokerConfig.model_validate({"tls": {"ca_file": folder / "nope.pem"}})
    with pytest.raises(CredentialsUnavailable, match=r"broker.tls.ca_file: .* does not exist"):
        missing.credentials("broker")


@contextlib.asynccontextmanager
async def tls_server(
    cert: Path, key: Path, *, version: ssl.TLSVersion | None = None
) -> AsyncIterator[tuple[int, list[str]]]:
    """A TLS listener that records each handshake's outcome (no MQTT behind it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if version is not None:
        if version < ssl.TLSVersion.TLSv1_2:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 allows TLS 1.1 only so
        ctx.minimum_version = ctx.maximum_version = version
    outcomes: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        outcomes.append("handshake")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port, outcomes


async def connect(config: BrokerConfig, port: int) -> None:
    kwargs = config.credentials("broker").client_kwargs()
    async with aiomqtt.Client("127.0.0.1", port, timeout=1, **kwargs):  # type: ignore[arg-type]
        pass


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_old_tls_and_the_wrong_host_name_are_refused(
    pki: tuple[Path, CertificateAuthority],
) -> None:
    folder, ca = pki
    plain = BrokerConfig.model_validate({"tls": {"ca_file": ca.cert_path}})
    # A server speaking only TLS 1.1: refused before any MQTT byte.
    async with tls_server(
        folder / "local.pem", folder / "local.key", version=ssl.TLSVersion.TLSv1_1
    ) as (port, outcomes):
        with pytest.raises(aiomqtt.MqttError, match=r"(?i)protocol|version"):
            await connect(plain, port)
        assert outcomes == []
    # A TLS 1.2 server, with min_version = "1.3" configured: refused too.
    strict = BrokerConfig.model_validate({"tls": {"ca_file": ca.cert_path, "min_version": "1.3"}})
    async with tls_server(
        folder / "local.pem", folder / "local.key", version=ssl.TLSVersion.TLSv1_2
    ) as (port, outcomes):
        with pytest.raises(aiomqtt.MqttError, match=r"(?i)protocol|version"):
            await connect(strict, port)
        assert outcomes == []
    # A certificate for broker.example, dialled as 127.0.0.1: the name check refuses it ...
    async with tls_server(folder / "broker.pem", folder / "broker.key") as (port, outcomes):
        with pytest.raises(aiomqtt.MqttError, match=r"(?i)hostname|IP address mismatch"):
            await connect(plain, port)
        assert outcomes == []
        # ... unless server_hostname names it; then the handshake completes (the stub server
        # then hangs up, as it speaks no MQTT).
        named = BrokerConfig.model_validate(
            {"tls": {"ca_file": ca.cert_path, "server_hostname": "broker.example"}}
        )
        with pytest.raises(aiomqtt.MqttError):
            await connect(named, port)
        assert outcomes == ["handshake"]
        wrong = BrokerConfig.model_validate(
            {"tls": {"ca_file": ca.cert_path, "server_hostname": "other.example"}}
        )
        with pytest.raises(aiomqtt.MqttError, match=r"(?i)hostname"):
            await connect(wrong, port)
        assert outcomes == ["handshake"]


# --------------------------------------------------------------------------- rotation


async def test_a_changed_file_ends_the_watch(tmp_path: Path) -> None:
    cert, key = tmp_path / "gw.pem", tmp_path / "gw.key"
    cert.write_text("one")
    key.write_text("one")
    stamps = FileStamps.take({"broker.tls.cert_file": cert, "broker.tls.key_file": key})
    watch = asyncio.create_task(watch_rotation(stamps, 0.05))
    await asyncio.sleep(0.2)
    assert not watch.done()
    # An atomic replace, as certificate tools do: same size, maybe the same mtime.
    fresh = tmp_path / "gw.pem.new"
    fresh.write_text("two")
    os.replace(fresh, cert)
    with pytest.raises(CredentialsRotated) as info:
        await asyncio.wait_for(watch, 3)
    assert info.value.settings == ("broker.tls.cert_file",)
    idle = asyncio.create_task(watch_rotation(FileStamps.take({}), 0.01))
    await asyncio.sleep(0.05)
    assert not idle.done()
    idle.cancel()


# --------------------------------------------------------------------------- on mosquitto


@pytest.mark.broker
@pytest.mark.timeout(30)
async def test_device_link_with_a_certificate_and_a_rotated_password(
    pki: tuple[Path, CertificateAuthority], tmp_path: Path
) -> None:
    """Both factors (a client certificate *and* a password), and a password changed on the
    broker, then in the gateway's file: the running link logs in again with the new one."""
    if not MosquittoBroker.available():
        pytest.skip("mosquitto not installed")
    folder, ca = pki
    topics = DeviceTopics("sec/devices/v1")
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    write_password_file(passwd, [DeviceAccount("gateway", "first-pw")], use_tool=False)
    write_acl_file(acl, topics, [DeviceAccount("gateway", "first-pw")])
    secret = tmp_path / "gateway.password"
    secret.write_text("first-pw\n")
    broker = TlsMosquitto(
        passwd,
        acl,
        ca_file=ca.cert_path,
        cert_file=folder / "local.pem",
        key_file=folder / "local.key",
        require_certificate=True,
        connection_log=True,
    )
    async with broker:
        config = DeviceMqttConfig(
            port=broker.port,
            username="gateway",
            password_file=secret,
            topic_root=topics.root,
            rotation_check_s=0.1,
            backoff_initial_s=0.1,
            backoff_max_s=0.3,
            tls=BrokerTls(
                ca_file=ca.cert_path, cert_file=folder / "gw.pem", key_file=folder / "gw.key"
            ),
        )
        link = DeviceMqttLink(config)
        task = asyncio.create_task(link.run())
        try:
            await asyncio.wait_for(link.connected.wait(), 5)
            # Without the certificate the same password is not enough.
            with pytest.raises(aiomqtt.MqttError):
                async with aiomqtt.Client(
                    "127.0.0.1",
                    broker.port,
                    username="gateway",
                    password="first-pw",
                    tls_context=broker_client_context(ca_file=ca.cert_path),
                    timeout=2,
                ) as sneaky:
                    await sneaky.publish(topics.topic("t1", MessageKind.COMMAND), b"{}", qos=1)

            async def logged_in(times: int) -> None:
                deadline = asyncio.get_running_loop().time() + 5
                while broker.connections().count("gateway") < times or not link.connected.is_set():
                    assert asyncio.get_running_loop().time() < deadline, broker.connections()
                    await asyncio.sleep(0.05)

            # The file rewritten (a redeployment): the watch notices and the link logs in anew.
            secret.write_text("first-pw\n")
            await logged_in(2)
            # A new password: on the broker (which drops the session at once), then in the file.
            write_password_file(passwd, [DeviceAccount("gateway", "second-pw")], use_tool=False)
            broker.reload()
            secret.write_text("second-pw\n")
            await logged_in(3)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
