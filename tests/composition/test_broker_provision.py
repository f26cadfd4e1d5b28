"""`derms-gateway broker provision`: identities, least-privilege rules, secrets and the listener
written from a gateway's configuration. (Against a real mosquitto:
tests/e2e/test_broker_security.py.)"""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from adapters.mqtt_devices.acl import verify_password
from composition.broker_provision import ProvisionError, plan_brokers, provision
from composition.certs import make_ca
from composition.cli import main
from composition.config import GatewayConfig, load_config, parse_config


def thermostat(device_id: str) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "der_class": "thermostat",
        "adapter": "mqtt_thermostat",
        "location": {"substation": "s1", "feeder": "f1"},
        "ratings": {"max_charge_kw": 3, "max_discharge_kw": 3, "capacity_kwh": 3},
    }


def config(**over: Any) -> GatewayConfig:
    tls = {"ca_file": "ca.pem"}
    data: dict[str, Any] = {
        "gateway_id": "gw-7",
        "broker": {"host": "mqtt.utility.example", "port": 8883, "username": "gw-7", "tls": tls},
        "device_mqtt": {"host": "127.0.0.1", "port": 1883, "username": "gateway"},
        "devices": [thermostat("t1"), thermostat("site:9")],
        "settlement": {"timezone": "UTC"},
    }
    return parse_config(data | over)


def rules(plan: Any, user: str) -> list[str]:
    return [rule.line() for rule in plan.rules[user]]


def test_each_identity_gets_only_its_own_topics() -> None:
    northbound, devices = plan_brokers(config())
    assert (northbound.folder, devices.folder) == ("northbound", "devices")
    assert northbound.roles == {"gw-7": "gateway", "grid-derms": "grid-derms"}
    root = "derms/v1/gw-7"
    assert rules(northbound, "grid-derms") == [
        f"topic write {root}/commands",
        f"topic write {root}/weather",
        f"topic write {root}/prices",
        f"topic write {root}/feeds/+",
        f"topic write {root}/requests/#",
        f"topic read {root}/acks/#",
        f"topic read {root}/telemetry/#",
        f"topic read {root}/performance/#",
        f"topic read {root}/status",
        f"topic read {root}/errors",
        f"topic read {root}/registry/#",
        "topic read derms/v1/replies/#",
    ]
    # The exact mirror image: what one writes, the other reads, and nothing else.
    mirror = {"write": "read", "read": "write"}
    assert rules(northbound, "gw-7") == [
        " ".join([w, mirror[a], t])
        for w, a, t in (line.split() for line in rules(northbound, "grid-derms"))
    ]
    slug = next(u for u, role in devices.roles.items() if role == "device site:9")
    assert slug.startswith("dev-")  # ':' cannot be in a user name
    assert devices.roles == {"gateway": "gateway", "t1": "device t1", slug: "device site:9"}
    assert rules(devices, "gateway") == ["topic readwrite derms/devices/v1/#"]
    assert rules(devices, "t1") == [
        "topic write derms/devices/v1/t1/birth",
        "topic write derms/devices/v1/t1/availability",
        "topic write derms/devices/v1/t1/telemetry",
        "topic write derms/devices/v1/t1/result",
        "topic read derms/devices/v1/t1/command",
    ]


def test_a_shared_broker_gets_one_merged_setup() -> None:
    shared = {"host": "127.0.0.1", "port": 1883}
    (plan,) = plan_brokers(
        config(broker=shared | {"username": "gw-7"}, device_mqtt=shared), grid_user="dso"
    )
    assert plan.folder == "broker"
    assert plan.sections == ("broker", "device_mqtt")
    assert {"gw-7", "dso", "t1"} < set(plan.roles)
    assert rules(plan, "gw-7")[-1] == "topic readwrite derms/devices/v1/#"  # one user, both


TLS = {"ca_file": "ca.pem"}
SHARED = {"host": "127.0.0.1", "port": 8883, "username": "gw-7", "tls": TLS}


@pytest.mark.parametrize(
    ("over", "grid_user", "fragment"),
    [
        ({"broker": {"host": "10.0.0.5"}}, "grid-derms", "without TLS: add [broker.tls]"),
        (
            {"broker": SHARED | {"response_topic_prefix": "derms/v1/replies"}},
            "grid-derms",
            "must end with '/'",
        ),
        ({"broker": SHARED, "device_mqtt": SHARED}, "t1", "both grid-derms and device t1"),
        ({}, "bad user", "cannot be used in mosquitto files"),
        (
            {"broker": SHARED, "device_mqtt": SHARED | {"topic_root": "derms/v1"}},
            "grid-derms",
            "overlaps",
        ),
        (
            {"broker": SHARED, "device_mqtt": SHARED | {"tls": None}},
            "grid-derms",
            "give both a tls section, or neither",
        ),
        (
            {
                "broker": SHARED | {"tls": TLS | {"cert_file": "gw.pem"}},
                "device_mqtt": SHARED | {"password_env": "X"},
            },
            "grid-derms",
            "choose one (--auth)",
        ),
    ],
)
def test_unsafe_setups_are_refused(over: dict[str, Any], grid_user: str, fragment: str) -> None:
    with pytest.raises(ProvisionError, match=re.escape(fragment)):
        plan_brokers(config(**over), grid_user=grid_user)


def test_secrets_are_private_kept_on_a_rerun_and_rotated_on_request(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki")
    out = tmp_path / "out"
    done = provision(config(), out, ca=ca, use_tool=False)
    secrets = out / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    users = {"gw-7", "grid-derms", "gateway", "t1"}
    assert users <= set(done.new_secrets)
    first = {u: (secrets / f"{u}.password").read_text() for u in users}
    for user, text in first.items():
        path = secrets / f"{user}.password"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert text.endswith("\n")
        assert len(text.strip()) >= 32
    passwd = dict(
        line.split(":", 1) for line in (out / "northbound/passwd").read_text().splitlines()
    )
    assert set(passwd) == {"gw-7", "grid-derms"}
    assert verify_password(first["grid-derms"].strip(), passwd["grid-derms"])
    for path in (out / "northbound/passwd", out / "northbound/acl", out / "devices/acl"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    conf = (out / "northbound/mosquitto.conf").read_text().splitlines()
    assert "allow_anonymous false" in conf
    assert "listener 8883" in conf
    assert "tls_version tlsv1.2" in conf
    assert "require_certificate false" in conf
    assert (out / "northbound/tls/server.pem").exists()
    devices_conf = (out / "devices/mosquitto.conf").read_text().splitlines()
    assert "listener 1883 127.0.0.1" in devices_conf  # plain only on loopback
    assert not any(line.startswith("cafile") for line in devices_conf)
    snippet = (out / "gateway-snippet.toml").read_text()
    assert f'password_file = "{secrets / "gw-7.password"}"' in snippet
    assert all(text.strip() not in snippet for text in first.values())

    # A device added later: everyone keeps their secret, the newcomer gets one.
    with_t2 = config(devices=[thermostat("t1"), thermostat("site:9"), thermostat("t2")])
    again = provision(with_t2, out, ca=ca, use_tool=False)
    assert again.new_secrets == ["t2"]
    assert {u: (secrets / f"{u}.password").read_text() for u in users} == first
    rotated = provision(with_t2, out, ca=ca, rotate=True, use_tool=False)
    assert not rotated.kept_secrets
    assert all((secrets / f"{u}.password").read_text() != first[u] for u in users)


def test_certificate_identities(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    tls = {"ca_file": "ca.pem", "cert_file": "gw.pem", "key_file": "gw.key"}
    shared = {"host": "127.0.0.1", "port": 8883, "tls": tls}
    cert_config = config(broker=shared | {"username": "gw-7"}, device_mqtt=shared)
    without_ca = provision(cert_config, tmp_path / "a")
    assert any("CN=grid-derms" in item for item in without_ca.to_supply)
    assert any("server.pem" in item for item in without_ca.to_supply)
    ca = make_ca(tmp_path / "pki")
    done = provision(cert_config, tmp_path / "b", ca=ca)
    out = tmp_path / "b"
    assert not (out / "broker/passwd").exists()
    conf = (out / "broker/mosquitto.conf").read_text().splitlines()
    assert "use_identity_as_username true" in conf
    assert not any(line.startswith("password_file") for line in conf)
    for user in ("gw-7", "grid-derms", "t1"):
        cert = x509.load_pem_x509_certificate((out / f"secrets/{user}.pem").read_bytes())
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert cn == user
        assert stat.S_IMODE((out / f"secrets/{user}.key").stat().st_mode) == 0o600
    assert set(done.new_secrets) >= {"gw-7", "grid-derms", "t1"}


def test_cli_provision(tmp_path: Path) -> None:
    toml = tmp_path / "gw.toml"
    toml.write_text(
        'gateway_id = "gw-9"\n'
        '[broker]\nhost = "127.0.0.1"\nport = 8883\nusername = "gw-9"\n'
        'password_file = "out/secrets/gw-9.password"\n'
        '[settlement]\ntimezone = "UTC"\n'
        '[broker.tls]\nca_file = "out/northbound/tls/ca.pem"\n'
        '[[devices]]\ndevice_id = "b1"\nder_class = "battery"\nadapter = "sunspec_battery"\n'
        'location = { substation = "s", feeder = "f" }\n'
        "ratings = { max_charge_kw = 5, max_discharge_kw = 5, capacity_kwh = 10 }\n"
        "sunspec = { port = 5020 }\n"
    )

    def cli(*args: str) -> Result:
        return CliRunner().invoke(main, list(args))

    assert cli("certs", "ca", str(tmp_path / "pki")).exit_code == 0
    done = cli(
        "broker", "provision", str(tmp_path / "out"), "--config", str(toml), "--ca-dir",
        str(tmp_path / "pki"),
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "gw-9: gateway" in done.output
    assert "grid-derms: grid-derms" in done.output
    assert "new secrets: gw-9, grid-derms" in done.output
    # The gateway's config now names files that exist.
    assert load_config(toml).broker.password_file == tmp_path / "out/secrets/gw-9.password"
    refused = cli(
        "broker", "provision", str(tmp_path / "x"), "--config", str(toml),
        "--grid-derms-user", "gw-9",
    )  # fmt: skip
    assert refused.exit_code != 0
    assert "would be both" in refused.output
