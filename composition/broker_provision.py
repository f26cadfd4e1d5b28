"""``derms-gateway broker provision``: the broker side of a deployment's identity model.

Who may do what (docs/security.md), with ``{root}`` = ``derms/v1/{gateway_id}``:

============  ==========================================  ========================================
identity      publishes                                   reads
============  ==========================================  ========================================
Grid DERMS    ``{root}/commands``, ``{root}/weather``,    ``{root}/acks/#``, ``telemetry/#``,
              ``{root}/prices``, ``{root}/feeds/+``,      ``performance/#``, ``status``,
              ``{root}/requests/#``                       ``errors``, ``registry/#``,
                                                          ``{reply prefix}#``
gateway       ``{root}/acks/#``, ``telemetry/#``,         ``{root}/commands``, ``weather``,
              ``performance/#``, ``status``, ``errors``,  ``prices``, ``feeds/+``,
                                                          ``requests/#``; every device
              ``registry/#``, ``{reply prefix}#``; every  topic
              device topic
device        its own birth, availability, telemetry,     its own command topic
              result
anyone else   nothing (``allow_anonymous false``)         nothing
============  ==========================================  ========================================

From the gateway's configuration this writes, per broker (one folder ``broker/`` when ``[broker]``
and ``[device_mqtt]`` name the same host and port, else ``northbound/`` and ``devices/``): the
ACL, the hashed password file (password logins), and a ``mosquitto.conf`` with a TLS listener
(loopback-only brokers may stay plain). Secrets go to ``secrets/``, one 0600 file each, and are
kept on a re-run (a device added later gets a new one; ``rotate=True`` replaces them all). With a
development CA it also issues the broker's server certificate and, for certificate logins, one
client certificate per identity whose Common Name is its user name. ``gateway-snippet.toml``
holds the settings to merge into the gateway's own configuration.

Two kinds of login, chosen per broker: ``password`` (TLS proves the broker; clients give a user
name and password) or ``certificate`` (mutual TLS; mosquitto's ``use_identity_as_username``
makes the certificate's Common Name the user name, and no password is asked).
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from adapters.broker_security import BrokerLogin, BrokerTls, is_loopback
from adapters.mqtt_devices.acl import (
    DeviceAccount,
    TopicRule,
    broker_auth_config,
    device_rules,
    device_username,
    rules_acl_text,
    tls_listener_config,
    usable_username,
    write_password_file,
    write_private_file,
)
from composition.certs import CertificateAuthority, make_cert
from composition.config import MQTT_ADAPTERS, GatewayConfig
from protocols.mqtt import Topics
from protocols.mqtt.devices import DeviceTopics

__all__ = [
    "DEFAULT_GRID_DERMS_USER",
    "AuthMode",
    "BrokerPlan",
    "ProvisionError",
    "Provisioned",
    "northbound_rules",
    "plan_brokers",
    "provision",
]

AuthMode = Literal["password", "certificate"]
DEFAULT_GRID_DERMS_USER: Final = "grid-derms"
_SECRET_BYTES: Final = 24


class ProvisionError(Exception):
    """The configuration cannot be turned into a least-privilege broker setup (said why)."""


# --------------------------------------------------------------------------- the rules


def northbound_rules(topics: Topics, reply_prefix: str) -> tuple[list[TopicRule], list[TopicRule]]:
    """The gateway's and Grid DERMS's rules on the Grid DERMS topics: (gateway, grid)."""
    if not reply_prefix.endswith("/"):
        # The gateway matches the prefix as a string; an ACL can only grant whole levels.
        raise ProvisionError(
            f"[broker] response_topic_prefix {reply_prefix!r} must end with '/' to be granted "
            "in an ACL"
        )
    root = topics.root
    grid_writes = [
        f"{root}/commands",
        f"{root}/weather",
        f"{root}/prices",
        f"{root}/feeds/+",
        f"{root}/requests/#",
    ]
    gateway_writes = [
        f"{root}/acks/#",
        f"{root}/telemetry/#",
        f"{root}/performance/#",
        f"{root}/status",
        f"{root}/errors",
        f"{root}/registry/#",
        f"{reply_prefix}#",
    ]
    gateway = [TopicRule("read", t) for t in grid_writes]
    gateway += [TopicRule("write", t) for t in gateway_writes]
    grid = [TopicRule("write", t) for t in grid_writes]
    grid += [TopicRule("read", t) for t in gateway_writes]
    return gateway, grid


@dataclass
class BrokerPlan:
    """One broker's share of the deployment: who is on it and what each may do."""

    folder: str
    sections: tuple[str, ...]
    host: str
    port: int
    tls: BrokerTls | None
    auth: AuthMode
    rules: dict[str, list[TopicRule]] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    """User name → what it is (``grid-derms``, ``gateway``, ``device t1``)."""
    gateway_users: dict[str, str] = field(default_factory=dict)
    """Section (``broker``, ``device_mqtt``) → the gateway's user name on this broker."""

    def add(self, username: str, role: str, rules: list[TopicRule]) -> None:
        if not usable_username(username):
            raise ProvisionError(
                f"user name {username!r} ({role}) cannot be used in mosquitto files: use "
                "letters, digits, '_', '.', '@', '-'"
            )
        known = self.roles.get(username)
        if known is not None and known != role:
            raise ProvisionError(f"user name {username!r} would be both {known} and {role}")
        self.roles[username] = role
        self.rules.setdefault(username, []).extend(rules)


def _auth_of(login: BrokerLogin) -> AuthMode:
    has_password = any(
        v is not None for v in (login.password, login.password_file, login.password_env)
    )
    if login.tls is not None and login.tls.cert_file is not None and not has_password:
        return "certificate"
    return "password"


def _overlap(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def plan_brokers(
    config: GatewayConfig,
    *,
    grid_user: str = DEFAULT_GRID_DERMS_USER,
    gateway_user: str | None = None,
    auth: AuthMode | None = None,
) -> list[BrokerPlan]:
    """The brokers ``config`` reaches and each one's identities and rules."""
    broker = config.broker
    gateway = gateway_user or broker.username or config.gateway_id
    topics = Topics(config.gateway_id)
    gateway_rules, grid_rules = northbound_rules(topics, broker.response_topic_prefix)
    sections: list[tuple[str, BrokerLogin, str, int]] = [
        ("broker", broker, broker.host, broker.port)
    ]
    devices = config.device_mqtt
    shared = devices is not None and (devices.host, devices.port) == (broker.host, broker.port)
    if devices is not None:
        sections.append(("device_mqtt", devices, devices.host, devices.port))

    plans: dict[tuple[str, int], BrokerPlan] = {}
    for name, login, host, port in sections:
        folder = "broker" if shared else ("northbound" if name == "broker" else "devices")
        mode = auth or _auth_of(login)
        plan = plans.get((host, port))
        if plan is None:
            plan = plans[(host, port)] = BrokerPlan(folder, (name,), host, port, login.tls, mode)
        else:
            plan.sections += (name,)
            if (plan.tls is None) != (login.tls is None):
                raise ProvisionError(
                    f"[{plan.sections[0]}] and [{name}] reach the same listener {host}:{port}: "
                    "give both a tls section, or neither"
                )
            if plan.auth != mode:
                raise ProvisionError(
                    f"[{plan.sections[0]}] logs in with a {plan.auth}, [{name}] with a {mode}, "
                    f"on the same listener {host}:{port}: choose one (--auth)"
                )
        if login.tls is None and not is_loopback(host):
            raise ProvisionError(
                f"[{name}] reaches {host} without TLS: add [{name}.tls] (a broker off this "
                "host must not see passwords or commands in clear)"
            )
        if mode == "certificate" and login.tls is None:
            raise ProvisionError(f"certificate logins need TLS: add [{name}.tls]")

    northbound = plans[(broker.host, broker.port)]
    northbound.add(gateway, "gateway", gateway_rules)
    northbound.gateway_users["broker"] = gateway
    northbound.add(grid_user, "grid-derms", grid_rules)
    if devices is not None:
        device_topics = DeviceTopics(devices.topic_root)
        plan = plans[(devices.host, devices.port)]
        if shared:
            for other in (topics.root, broker.response_topic_prefix):
                if _overlap(device_topics.root, other):
                    raise ProvisionError(
                        f"[device_mqtt] topic_root {device_topics.root!r} overlaps {other!r} on "
                        "the shared broker: devices could reach Grid DERMS topics"
                    )
        plan.add(devices.username or gateway, "gateway", device_rules(device_topics, None))
        plan.gateway_users["device_mqtt"] = devices.username or gateway
        for device in config.devices:
            if device.adapter in MQTT_ADAPTERS:
                plan.add(
                    device_username(device.device_id),
                    f"device {device.device_id}",
                    device_rules(device_topics, device.device_id),
                )
    return list(plans.values())


# --------------------------------------------------------------------------- the files


@dataclass
class Provisioned:
    """What :func:`provision` wrote, for the CLI to report."""

    plans: list[BrokerPlan]
    written: list[Path] = field(default_factory=list)
    new_secrets: list[str] = field(default_factory=list)
    kept_secrets: list[str] = field(default_factory=list)
    to_supply: list[str] = field(default_factory=list)
    """Files the operator must still put in place (no development CA was given)."""


def _password(secrets_dir: Path, user: str, rotate: bool, done: Provisioned) -> str:
    path = secrets_dir / f"{user}.password"
    if user in done.new_secrets or (path.exists() and not rotate):
        # Written for the other broker just now, or kept from an earlier run.
        value = path.read_text(encoding="utf-8").rstrip("\r\n")
        if value:
            if user not in done.new_secrets and user not in done.kept_secrets:
                done.kept_secrets.append(user)
            return value
    value = secrets.token_urlsafe(_SECRET_BYTES)
    write_private_file(path, value + "\n")
    done.written.append(path)
    done.new_secrets.append(user)
    return value


def _client_certificate(
    ca: CertificateAuthority, secrets_dir: Path, user: str, rotate: bool, done: Provisioned
) -> None:
    cert = secrets_dir / f"{user}.pem"
    if user in done.new_secrets:
        return
    if cert.exists() and (secrets_dir / f"{user}.key").exists() and not rotate:
        if user not in done.kept_secrets:
            done.kept_secrets.append(user)
        return
    try:
        issued = make_cert(ca, secrets_dir, user)
    except ValueError as exc:
        raise ProvisionError(f"{user}: {exc} (a certificate identity)") from None
    done.written += [issued.cert_path, issued.key_path]
    done.new_secrets.append(user)


def _server_files(
    plan: BrokerPlan,
    tls_dir: Path,
    ca: CertificateAuthority | None,
    rotate: bool,
    done: Provisioned,
) -> None:
    ca_copy, cert, key = tls_dir / "ca.pem", tls_dir / "server.pem", tls_dir / "server.key"
    if ca is None:
        done.to_supply += [
            f"{p} ({what} for {plan.host}:{plan.port})"
            for p, what in (
                (ca_copy, "the CA that signs the broker's and the clients' certificates"),
                (cert, f"the broker's certificate, with {plan.host} in its subjectAltName"),
                (key, "the broker's private key"),
            )
            if not p.exists()
        ]
        return
    tls_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca.cert_path, ca_copy)
    done.written.append(ca_copy)
    if cert.exists() and key.exists() and not rotate:
        return
    hosts = [plan.host]
    if is_loopback(plan.host):
        hosts += [h for h in ("localhost", "127.0.0.1", "::1") if h != plan.host]
    if plan.tls is not None and plan.tls.server_hostname is not None:
        hosts.append(plan.tls.server_hostname)
    issued = make_cert(ca, tls_dir, "server", server=True, hosts=tuple(dict.fromkeys(hosts)))
    done.written += [issued.cert_path, issued.key_path]


def _conf_lines(plan: BrokerPlan, install: Path, gateway_id: str) -> list[str]:
    listener = f"listener {plan.port}" + (" 127.0.0.1" if is_loopback(plan.host) else "")
    identities = [f"#   {user}: {role}" for user, role in plan.roles.items()]
    lines = [
        f"# Generated by `derms-gateway broker provision` for gateway {gateway_id}",
        f"# ([{'], ['.join(plan.sections)}]). Re-run it rather than editing: secrets are kept.",
        f"# Logins: {plan.auth}s. Identities and their rights are in {install / 'acl'}:",
        *identities,
        "# mosquitto started as root reads these files as its 'mosquitto' user: chown them to it.",
        "per_listener_settings false",
        *broker_auth_config(
            install / "passwd" if plan.auth == "password" else None, install / "acl"
        ),
        listener,
    ]
    if plan.tls is not None:
        tls_dir = install / "tls"
        lines += tls_listener_config(
            ca_file=tls_dir / "ca.pem",
            cert_file=tls_dir / "server.pem",
            key_file=tls_dir / "server.key",
            identity_from_certificate=plan.auth == "certificate",
            min_version=plan.tls.min_version,
        )
    return [*lines, ""]


def _snippet(plans: list[BrokerPlan], out: Path, secrets_dir: Path) -> str:
    lines = [
        "# Generated by `derms-gateway broker provision`: the gateway's side of the broker setup.",
        "# Merge into its configuration (paths are where provision wrote them; adjust if the",
        "# files move to the gateway host).",
    ]
    for plan in plans:
        for section in plan.sections:
            user = plan.gateway_users[section]
            lines += ["", f"[{section}]"]
            if plan.auth == "password":
                lines += [
                    f'username = "{user}"',
                    f'password_file = "{secrets_dir / f"{user}.password"}"',
                ]
            if plan.tls is not None:
                lines += [f"[{section}.tls]", f'ca_file = "{out / plan.folder / "tls/ca.pem"}"']
                if plan.auth == "certificate":
                    lines += [
                        f'cert_file = "{secrets_dir / f"{user}.pem"}"',
                        f'key_file = "{secrets_dir / f"{user}.key"}"',
                    ]
    return "\n".join([*lines, ""])


def provision(
    config: GatewayConfig,
    out_dir: Path,
    *,
    grid_user: str = DEFAULT_GRID_DERMS_USER,
    gateway_user: str | None = None,
    auth: AuthMode | None = None,
    ca: CertificateAuthority | None = None,
    install_dir: Path | None = None,
    rotate: bool = False,
    use_tool: bool | None = None,
) -> Provisioned:
    """Write every broker's files and the deployment's secrets into ``out_dir``.

    ``install_dir``: where ``out_dir`` will live on the broker host (the paths in
    mosquitto.conf); default ``out_dir`` itself. Blocking: call it from the CLI or a thread.
    """
    plans = plan_brokers(config, grid_user=grid_user, gateway_user=gateway_user, auth=auth)
    out = out_dir.resolve()
    install = install_dir or out
    secrets_dir = out / "secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True)
    secrets_dir.chmod(0o700)
    done = Provisioned(plans)
    for plan in plans:
        folder = out / plan.folder
        folder.mkdir(parents=True, exist_ok=True)
        header = [
            f"Generated by `derms-gateway broker provision` for gateway {config.gateway_id}.",
            "One block per identity; anyone else may do nothing. Re-run it rather than editing.",
        ]
        write_private_file(folder / "acl", rules_acl_text(plan.rules, header))
        done.written.append(folder / "acl")
        if plan.auth == "password":
            accounts = [
                DeviceAccount(user, _password(secrets_dir, user, rotate, done))
                for user in plan.roles
            ]
            write_password_file(folder / "passwd", accounts, use_tool=use_tool)
            done.written.append(folder / "passwd")
        elif ca is not None:
            for user in plan.roles:
                _client_certificate(ca, secrets_dir, user, rotate, done)
        else:
            done.to_supply += [
                f"{secrets_dir / user}.pem/.key (a client certificate with CN={user}, {role})"
                for user, role in plan.roles.items()
                if not (secrets_dir / f"{user}.pem").exists()
            ]
        if plan.tls is not None:
            _server_files(plan, folder / "tls", ca, rotate, done)
        conf = folder / "mosquitto.conf"
        conf.write_text("\n".join(_conf_lines(plan, install / plan.folder, config.gateway_id)))
        done.written.append(conf)
    snippet = out / "gateway-snippet.toml"
    write_private_file(snippet, _snippet(plans, out, secrets_dir))
    done.written.append(snippet)
    return done
