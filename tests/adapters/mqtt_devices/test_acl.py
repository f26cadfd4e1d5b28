"""Per-device broker accounts: the files, then proof against a real mosquitto that one device
can neither command nor read nor impersonate another."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt
import pytest

from adapters.mqtt_devices.acl import (
    DeviceAccount,
    acl_text,
    hash_password,
    new_device_accounts,
    password_file_text,
    provision_broker_files,
    verify_password,
    write_password_file,
)
from protocols.mqtt.devices import (
    DeviceCommandMessage,
    DeviceTopics,
    EndEvent,
    HvacMode,
    HvacState,
    MessageKind,
    ThermostatTelemetry,
    decode_command,
    decode_telemetry,
    encode,
)
from simulators.broker import AuthenticatedMosquitto, BrokerEndpoint, MosquittoBroker
from unified.model import utcnow

TOPICS = DeviceTopics("acl/devices/v1")
GATEWAY = DeviceAccount("gateway", "gw-pass")


# --------------------------------------------------------------------------- files


def test_hash_matches_mosquitto_format() -> None:
    hashed = hash_password("secret", salt=b"0123456789ab")
    kind, iterations, salt, digest = hashed.split("$")[1:]
    assert (kind, iterations, salt) == ("7", "101", "MDEyMzQ1Njc4OWFi")
    assert len(digest) == 88  # 64 bytes of SHA-512, base64
    assert verify_password("secret", hashed)
    assert not verify_password("Secret", hashed)
    assert not verify_password("secret", "$6$abc$def")


def test_tool_hashes_verify_and_no_plain_text_is_left(tmp_path: Path) -> None:
    if shutil.which("mosquitto_passwd") is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but mosquitto_passwd (Debian's mosquitto) is not installed")
        pytest.skip("mosquitto_passwd not installed")
    accounts = [GATEWAY, DeviceAccount("t1", "pw-t1", "t1")]
    path = tmp_path / "passwd"
    write_password_file(path, accounts, use_tool=True)
    lines = dict(line.split(":", 1) for line in path.read_text().splitlines())
    assert verify_password("gw-pass", lines["gateway"])
    assert verify_password("pw-t1", lines["t1"])
    assert "pw-t1" not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["passwd"]  # temporary file gone


def test_own_hashes_and_account_validation(tmp_path: Path) -> None:
    text = password_file_text([GATEWAY])
    user, hashed = text.strip().split(":", 1)
    assert user == "gateway"
    assert verify_password("gw-pass", hashed)
    with pytest.raises(ValueError, match="not usable"):
        DeviceAccount("bad:name", "x")
    with pytest.raises(ValueError, match="line breaks"):
        DeviceAccount("ok", "two\nlines")
    with pytest.raises(ValueError, match="twice"):
        password_file_text([GATEWAY, GATEWAY])
    assert "gw-pass" not in repr(GATEWAY)
    accounts = new_device_accounts(["t1", "site:7"])
    assert accounts["t1"].username == "t1"
    assert accounts["site:7"].username.startswith("dev-")  # ':' cannot be in a user name
    assert accounts["t1"].password != accounts["site:7"].password


def test_acl_gives_each_device_only_its_own_topics() -> None:
    text = acl_text(TOPICS, [GATEWAY, DeviceAccount("t1", "x", "t1")])
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in text.split("\n\n") if "user" in b}
    assert blocks["user gateway"] == ["topic readwrite acl/devices/v1/#"]
    assert blocks["user t1"] == [
        "topic write acl/devices/v1/t1/birth",
        "topic write acl/devices/v1/t1/availability",
        "topic write acl/devices/v1/t1/telemetry",
        "topic write acl/devices/v1/t1/result",
        "topic read acl/devices/v1/t1/command",
    ]
    assert "pattern" not in text
    assert "#" not in "".join(blocks["user t1"])


# --------------------------------------------------------------------------- the broker


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[BrokerEndpoint]:
    if not MosquittoBroker.available():
        if os.environ.get("CI"):
            pytest.fail("CI is set but mosquitto is not installed")
        pytest.skip("mosquitto not installed")
    accounts = [GATEWAY, DeviceAccount("t1", "pw-t1", "t1"), DeviceAccount("t2", "pw-t2", "t2")]
    # Hash here (not with mosquitto_passwd) so the broker proves it accepts our own hashes.
    passwd, acl = provision_broker_files(tmp_path, TOPICS, accounts, use_tool=False)
    async with AuthenticatedMosquitto(passwd, acl) as endpoint:
        yield endpoint


def client(endpoint: BrokerEndpoint, user: str | None, password: str | None) -> aiomqtt.Client:
    return aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        username=user,
        password=password,
        identifier=f"acl-test-{user}-{time.monotonic_ns()}",
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=3,
    )


async def collect(c: aiomqtt.Client, into: list[aiomqtt.Message]) -> None:
    async for message in c.messages:
        into.append(message)


async def eventually(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


def payload(message: aiomqtt.Message) -> bytes:
    assert isinstance(message.payload, bytes)
    return message.payload


def indoor(data: bytes) -> float:
    telemetry = decode_telemetry(data)
    assert isinstance(telemetry, ThermostatTelemetry)
    return telemetry.indoor_c


def command(device_id: str, command_id: str) -> bytes:
    return encode(
        DeviceCommandMessage(
            command_id=command_id,
            device_id=device_id,
            issued_at=utcnow(),
            hold_s=60,
            body=EndEvent(),
        )
    )


def telemetry(device_id: str, indoor_c: float) -> bytes:
    return encode(
        ThermostatTelemetry(
            device_id=device_id,
            timestamp=utcnow(),
            mode=HvacMode.COOL,
            hvac_state=HvacState.IDLE,
            setpoint_c=22,
            indoor_c=indoor_c,
            power_kw=0,
        )
    )


@pytest.mark.broker
@pytest.mark.timeout(30)
async def test_a_device_cannot_command_another(broker: BrokerEndpoint) -> None:
    got_t2: list[aiomqtt.Message] = []
    async with (
        client(broker, "t1", "pw-t1") as t1,
        client(broker, "t2", "pw-t2") as t2,
        client(broker, GATEWAY.username, GATEWAY.password) as gw,
        asyncio.TaskGroup() as tg,
    ):
        await t2.subscribe(TOPICS.topic("t2", MessageKind.COMMAND), qos=1)
        readers = [tg.create_task(collect(t2, got_t2), name="t2-commands")]
        # t1 forges a command for t2, then the gateway sends a real one. Messages from one
        # broker to one subscriber keep their order, so once the real one is in, the forged one
        # would have been too.
        await t1.publish(TOPICS.topic("t2", MessageKind.COMMAND), command("t2", "forged"), qos=1)
        await t1.publish(TOPICS.topic("t2", MessageKind.COMMAND), command("t2", "forged-0"), qos=0)
        await gw.publish(TOPICS.topic("t2", MessageKind.COMMAND), command("t2", "real"), qos=1)
        await eventually(lambda: bool(got_t2), 5, "the gateway's command")
        await asyncio.sleep(0.2)
        ids = [decode_command(payload(m), "t2").command_id for m in got_t2]
        assert ids == ["real"]
        # Nor may t1 command itself: devices only read their command topic.
        got_t1: list[aiomqtt.Message] = []
        await t1.subscribe(TOPICS.topic("t1", MessageKind.COMMAND), qos=1)
        readers.append(tg.create_task(collect(t1, got_t1), name="t1-commands"))
        await t1.publish(TOPICS.topic("t1", MessageKind.COMMAND), command("t1", "self"), qos=1)
        await gw.publish(TOPICS.topic("t1", MessageKind.COMMAND), command("t1", "real-1"), qos=1)
        await eventually(lambda: bool(got_t1), 5, "the gateway's command to t1")
        await asyncio.sleep(0.2)
        assert [decode_command(payload(m)).command_id for m in got_t1] == ["real-1"]
        for task in readers:
            task.cancel()


@pytest.mark.broker
@pytest.mark.timeout(30)
async def test_a_device_cannot_read_or_impersonate_another(broker: BrokerEndpoint) -> None:
    spied: list[aiomqtt.Message] = []
    seen_by_gateway: list[aiomqtt.Message] = []
    async with (
        client(broker, "t1", "pw-t1") as t1,
        client(broker, "t2", "pw-t2") as t2,
        client(broker, GATEWAY.username, GATEWAY.password) as gw,
        asyncio.TaskGroup() as tg,
    ):
        granted = await t1.subscribe(
            [
                (TOPICS.topic("t2", MessageKind.TELEMETRY), 1),
                (TOPICS.wildcard(MessageKind.TELEMETRY), 1),
                (f"{TOPICS.root}/#", 1),
            ]
        )
        spy = tg.create_task(collect(t1, spied), name="t1-spy")
        await gw.subscribe(TOPICS.wildcard(MessageKind.TELEMETRY), qos=1)
        watch = tg.create_task(collect(gw, seen_by_gateway), name="gw-telemetry")

        for i in range(5):
            await t2.publish(TOPICS.topic("t2", MessageKind.TELEMETRY), telemetry("t2", 22 + i), 1)
        # t1 speaks for t2 (forged), then for itself (allowed) as an ordering marker.
        await t1.publish(TOPICS.topic("t2", MessageKind.TELEMETRY), telemetry("t2", 33.3), 1)
        await t1.publish(TOPICS.topic("t1", MessageKind.TELEMETRY), telemetry("t1", 21.0), 1)
        await eventually(
            lambda: any(str(m.topic).endswith("t1/telemetry") for m in seen_by_gateway),
            5,
            "t1's own telemetry at the gateway",
        )
        await asyncio.sleep(0.2)

        assert spied == [], f"t1 read {[str(m.topic) for m in spied]} (granted {granted})"
        at_gateway = [(str(m.topic).split("/")[-2], indoor(payload(m))) for m in seen_by_gateway]
        assert at_gateway == [("t2", 22 + i) for i in range(5)] + [("t1", 21.0)]
        spy.cancel()
        watch.cancel()


@pytest.mark.broker
@pytest.mark.timeout(30)
async def test_unknown_wrong_or_missing_credentials_are_refused(broker: BrokerEndpoint) -> None:
    for user, password in (("t1", "wrong"), ("nobody", "x"), (None, None)):
        with pytest.raises(aiomqtt.MqttError):
            async with client(broker, user, password):
                pass


def test_rules_are_checked_and_written_one_block_per_user() -> None:
    from adapters.mqtt_devices.acl import TopicRule, rules_acl_text, tls_listener_config

    text = rules_acl_text(
        {"grid": [TopicRule("write", "a/commands"), TopicRule("read", "a/acks/#")]}, ["hi"]
    )
    assert text == "# hi\n\nuser grid\ntopic write a/commands\ntopic read a/acks/#\n"
    for bad in ("a b", "a/#/b", "a/x#", "a/x+", ""):
        with pytest.raises(ValueError, match="topic"):
            TopicRule("read", bad)
    with pytest.raises(ValueError, match="not usable"):
        rules_acl_text({"bad user": []})
    lines = tls_listener_config(
        ca_file=Path("ca.pem"),
        cert_file=Path("s.pem"),
        key_file=Path("s.key"),
        identity_from_certificate=True,
    )
    assert "tls_version tlsv1.2" in lines
    assert "require_certificate true" in lines
    assert "use_identity_as_username true" in lines
    with pytest.raises(ValueError, match="require_certificate"):
        tls_listener_config(
            ca_file=Path("ca.pem"),
            cert_file=Path("s.pem"),
            key_file=Path("s.key"),
            identity_from_certificate=True,
            require_certificate=False,
        )
