"""Issue 10: the gateway on a real mosquitto run from the files `derms-gateway broker provision`
writes — TLS only, an ACL per identity, nobody anonymous.

Only the Grid DERMS identity's dispatch reaches a thermostat: anonymous clients, wrong
passwords, foreign certificates, a device's or the gateway's own identity publishing on the
commands topic get nowhere, and a device cannot write another device's topics. Old TLS and a
wrong host name are refused, secrets never reach a log, and a rotated client certificate is used
without restarting the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiomqtt
import pytest

from composition.app import GatewayApp
from composition.broker_provision import Provisioned, provision
from composition.certs import CertificateAuthority, make_ca, make_cert
from composition.config import GatewayConfig, parse_config
from protocols.mqtt.devices import (
    DeviceCommandMessage,
    DeviceTopics,
    MessageKind,
    SetpointOffset,
    encode,
)
from protocols.tls import broker_client_context
from simulators.broker import MosquittoBroker, ProvisionedMosquitto, free_port
from simulators.grid_derms import GridDermsClient
from simulators.mqtt_devices import MqttDeviceSimulator, SimThermostat, ThermalHouse
from tests.e2e.fleet import eventually, iso
from unified.model import AckState, utcnow

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

GATEWAY_ID = "gw-sec"
DEVICES = ("t1", "t2")
TOPICS = DeviceTopics("derms/devices/v1")
ENV = "DERMS_TEST_DEVICE_LINK_PASSWORD"


@pytest.fixture(autouse=True)
def _needs_mosquitto() -> None:
    if not MosquittoBroker.available():
        if os.environ.get("CI"):
            pytest.fail("CI is set but mosquitto is not installed")
        pytest.skip("mosquitto not installed")


def gateway_config(
    tmp_path: Path, port: int, auth: Literal["password", "certificate"]
) -> GatewayConfig:
    """The gateway's config as an integrator writes it: files relative to it, under out/."""
    tls: dict[str, Any] = {"ca_file": "out/broker/tls/ca.pem"}
    northbound: dict[str, Any] = {"username": GATEWAY_ID}
    device_link: dict[str, Any] = {"username": GATEWAY_ID}
    if auth == "certificate":
        tls |= {
            "cert_file": f"out/secrets/{GATEWAY_ID}.pem",
            "key_file": f"out/secrets/{GATEWAY_ID}.key",
        }
    else:
        northbound["password_file"] = f"out/secrets/{GATEWAY_ID}.password"
        device_link["password_env"] = ENV
    common = {"host": "127.0.0.1", "port": port, "tls": tls, "rotation_check_s": 0.2}
    data: dict[str, object] = {
        "gateway_id": GATEWAY_ID,
        "broker": common | northbound,
        "device_mqtt": common
        | device_link
        | {"topic_root": TOPICS.root, "backoff_max_s": 0.5, "backoff_initial_s": 0.1},
        "store": {"path": "gw.sqlite"},
        "settlement": {"timezone": "UTC"},
        "timing": {
            "control_period_s": 0.2,
            "poll_interval_s": 0.2,
            "telemetry_period_s": 0.5,
            "stale_after_s": 3.0,
            "refresh_s": 1.0,
            "backoff_max_s": 0.5,
        },
        "devices": [
            {
                "device_id": d,
                "der_class": "thermostat",
                "adapter": "mqtt_thermostat",
                "location": {"substation": "s1", "feeder": "f1"},
                "ratings": {"max_charge_kw": 3, "max_discharge_kw": 3, "capacity_kwh": 3},
                "mqtt": {"stale_after_s": 3.0, "hold_s": 10.0, "connect_wait_s": 3.0},
            }
            for d in DEVICES
        ],
    }
    return parse_config(data).relative_to(tmp_path)


@dataclass
class Deployment:
    config: GatewayConfig
    out: Path
    ca: CertificateAuthority
    done: Provisioned
    broker: ProvisionedMosquitto
    app: GatewayApp
    sims: dict[str, MqttDeviceSimulator[SimThermostat]]
    grid: GridDermsClient
    auth: str
    running: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def ca_file(self) -> Path:
        return self.out / "broker/tls/ca.pem"

    def secret(self, user: str) -> str:
        return (self.out / "secrets" / f"{user}.password").read_text().strip()

    def login(self, user: str) -> dict[str, Any]:
        """aiomqtt arguments to log in as ``user`` over TLS, the way the deployment expects."""
        if self.auth == "certificate":
            ctx = broker_client_context(
                ca_file=self.ca_file,
                cert_file=self.out / "secrets" / f"{user}.pem",
                key_file=self.out / "secrets" / f"{user}.key",
            )
            return {"tls_context": ctx}
        return {
            "username": user,
            "password": self.secret(user),
            "tls_context": broker_client_context(ca_file=self.ca_file),
        }

    def sheds(self, device_id: str) -> list[DeviceCommandMessage]:
        return [
            m
            for m in self.sims[device_id].device.commands_seen
            if isinstance(m.body, SetpointOffset) and m.body.offset_c > 0
        ]


@contextlib.asynccontextmanager
async def deployment(
    tmp_path: Path, auth: Literal["password", "certificate"], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Deployment]:
    config = gateway_config(tmp_path, free_port(), auth)
    ca = make_ca(tmp_path / "pki", "utility-ca")
    out = tmp_path / "out"
    done = provision(config, out, ca=ca, use_tool=False)
    assert config.file_problems() == []  # the config names exactly what provision wrote
    if auth == "password":
        monkeypatch.setenv(ENV, (out / "secrets" / f"{GATEWAY_ID}.password").read_text().strip())
    broker = ProvisionedMosquitto(out / "broker/mosquitto.conf", connection_log=True)
    async with broker, contextlib.AsyncExitStack() as stack:
        app = GatewayApp(config)
        grid = GridDermsClient("127.0.0.1", broker.port, GATEWAY_ID)  # replaced below
        dep = Deployment(config, out, ca, done, broker, app, {}, grid, auth)
        for i, device_id in enumerate(DEVICES):
            sim = MqttDeviceSimulator(
                SimThermostat(device_id, house=ThermalHouse(indoor_c=21.6 + 0.2 * i, on=True)),
                host="127.0.0.1",
                port=broker.port,
                topics=TOPICS,
                report_interval_s=0.1,
                time_scale=30,
                **dep.login(device_id),
            )
            dep.sims[device_id] = sim
            stack.push_async_callback(_stop, asyncio.create_task(sim.run(), name=device_id))
        dep.grid = await stack.enter_async_context(
            GridDermsClient("127.0.0.1", broker.port, GATEWAY_ID, **dep.login("grid-derms"))
        )
        dep.running = asyncio.create_task(app.run(), name="gateway")
        stack.push_async_callback(_stop, dep.running)
        await eventually(
            lambda: (
                len(app.core.supervisors) == len(DEVICES)
                and all(s.available for s in app.core.supervisors.values())
            ),
            15,
            "thermostats online through the TLS device link",
        )
        await dep.grid.wait_for(lambda o: o.status is not None and o.status.state == "online", 10)
        yield dep


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def dispatch(command_id: str) -> dict[str, Any]:
    return {
        "type": "dispatch",
        "command_id": command_id,
        "kw": -3.0,
        "target": {"group_id": "feeder:f1"},
        "start": iso(0.1),
        "duration_s": 30.0,
    }


def forged_command(device_id: str, command_id: str) -> bytes:
    body = SetpointOffset(offset_c=3.0)
    message = DeviceCommandMessage(
        command_id=command_id, device_id=device_id, issued_at=utcnow(), hold_s=60, body=body
    )
    return encode(message)


async def refused(**kwargs: Any) -> str:
    """Connect and publish a dispatch; the refusal's text (the test fails if it is accepted)."""
    try:
        async with aiomqtt.Client("127.0.0.1", timeout=3, **kwargs) as client:
            await client.publish(f"derms/v1/{GATEWAY_ID}/commands", b"{}", qos=1)
    except aiomqtt.MqttError as exc:
        return str(exc)
    raise AssertionError(f"a client with {sorted(kwargs)} was let in")


async def publishes(dep: Deployment, login: dict[str, Any], topic: str, payload: bytes) -> None:
    """Connect as an identity the broker knows and publish (the ACL decides where it goes)."""
    async with aiomqtt.Client(
        "127.0.0.1", dep.port, timeout=3, protocol=aiomqtt.ProtocolVersion.V5, **login
    ) as client:
        await client.publish(topic, payload, qos=1)


async def no_shed_for(dep: Deployment, seconds: float) -> None:
    end = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < end:
        assert not any(dep.sheds(d) for d in DEVICES), "a device was commanded"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- password logins


async def test_over_tls_only_grid_derms_reaches_a_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with deployment(tmp_path, "password", monkeypatch) as dep:
        commands = f"derms/v1/{GATEWAY_ID}/commands"
        grid_password = dep.secret("grid-derms")
        ca = broker_client_context(ca_file=dep.ca_file)
        port = dep.port
        # Not let in at all: anonymous, a wrong password, no TLS, old TLS, the wrong host name.
        assert "Not authorized" in await refused(port=port, tls_context=ca)
        wrong = await refused(port=port, username="grid-derms", password="guess", tls_context=ca)
        assert "Not authorized" in wrong or "Bad user name or password" in wrong
        await refused(port=port, username="grid-derms", password=grid_password)  # plain TCP
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(dep.ca_file)
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.warns(DeprecationWarning, match="TLSv1_1"):
            old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        assert (
            "version"
            in (
                await refused(
                    port=port, username="grid-derms", password=grid_password, tls_context=old
                )
            ).lower()
        )
        elsewhere = broker_client_context(ca_file=dep.ca_file, server_hostname="mqtt.example")
        assert (
            "hostname"
            in (
                await refused(
                    port=port, username="grid-derms", password=grid_password, tls_context=elsewhere
                )
            ).lower()
        )

        # Let in, but not allowed to command: a device, and the gateway's own identity.
        await publishes(dep, dep.login("t1"), commands, json.dumps(dispatch("by-t1")).encode())
        await publishes(
            dep, dep.login(GATEWAY_ID), commands, json.dumps(dispatch("by-gateway")).encode()
        )
        # Nor may a device command (or speak for) another device.
        await publishes(
            dep,
            dep.login("t1"),
            TOPICS.topic("t2", MessageKind.COMMAND),
            forged_command("t2", "forged"),
        )
        await no_shed_for(dep, 1.5)
        assert not dep.grid.observed.acks
        assert not dep.grid.observed.errors

        await dep.grid.send(dispatch("by-grid-derms"))
        await dep.grid.wait_for_state("by-grid-derms", AckState.ACTIVE, 5)
        await eventually(lambda: any(dep.sheds(d) for d in DEVICES), 5, "a thermostat shed")
        assert set(dep.grid.observed.acks) == {"by-grid-derms"}
        assert "forged" not in {m.command_id for m in dep.sims["t2"].device.commands_seen}

        secrets = {u: dep.secret(u) for u in (GATEWAY_ID, "grid-derms", *DEVICES)}
        config_text = repr(dep.config) + dep.config.model_dump_json()
    logged = caplog.text
    assert "MQTT link up" in logged
    assert "device link up" in logged
    for user, secret in secrets.items():
        assert secret not in logged, f"{user}'s password is in the log"
        assert secret not in config_text


# --------------------------------------------------------------------------- certificate logins


async def test_mutual_tls_identities_and_a_rotated_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with deployment(tmp_path, "certificate", monkeypatch) as dep:
        commands = f"derms/v1/{GATEWAY_ID}/commands"
        ca = broker_client_context(ca_file=dep.ca_file)
        # No certificate, or one from another CA with the Grid DERMS name in it: refused in
        # the handshake, whatever user name and password come with it.
        await refused(port=dep.port, tls_context=ca, username="grid-derms", password="x")
        rogue_ca = make_ca(tmp_path / "rogue", "rogue-ca")
        rogue = make_cert(rogue_ca, tmp_path / "rogue", "grid-derms")
        impostor = broker_client_context(
            ca_file=dep.ca_file, cert_file=rogue.cert_path, key_file=rogue.key_path
        )
        await refused(port=dep.port, tls_context=impostor)
        # A device's own certificate: let in, but its dispatch goes nowhere.
        await publishes(dep, dep.login("t1"), commands, json.dumps(dispatch("by-t1")).encode())
        await no_shed_for(dep, 1.0)
        assert not dep.grid.observed.acks
        assert "grid-derms" in dep.broker.connections()
        assert dep.broker.connections().count(GATEWAY_ID) == 2  # the two links

        await dep.grid.send(dispatch("by-grid-derms"))
        await dep.grid.wait_for_state("by-grid-derms", AckState.ACTIVE, 5)
        await eventually(lambda: any(dep.sheds(d) for d in DEVICES), 5, "a thermostat shed")
        assert set(dep.grid.observed.acks) == {"by-grid-derms"}

        # Rotation: a new key and certificate (here with a new name, so the broker's log shows
        # which one it saw) replace the files; both links reconnect with them, no restart.
        renewed = make_cert(dep.ca, tmp_path / "renewed", f"{GATEWAY_ID}-r2")
        secrets = dep.out / "secrets"
        os.replace(renewed.key_path, secrets / f"{GATEWAY_ID}.key")
        os.replace(renewed.cert_path, secrets / f"{GATEWAY_ID}.pem")
        await eventually(
            lambda: dep.broker.connections().count(f"{GATEWAY_ID}-r2") == 2,
            5,
            "both links back with the renewed certificate",
        )
        assert dep.broker.connections().count(GATEWAY_ID) == 2  # never with the old one again
        assert dep.running is not None
        assert not dep.running.done()  # the same gateway process throughout
