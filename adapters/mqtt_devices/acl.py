"""Per-device broker credentials: a mosquitto password file and an ACL, generated.

Each MQTT device gets its own account and may write only its own ``birth``, ``availability``,
``telemetry`` and ``result`` topics and read only its own ``command`` topic
(:mod:`protocols.mqtt.devices`); the gateway's account reaches every device topic. The broker
enforces this, so a compromised or misconfigured device cannot command its neighbour, read its
neighbour's telemetry, or speak for it.

The writers are generic over :class:`TopicRule` lists, so a deployment's whole broker (the Grid
DERMS topics too, :mod:`composition.broker_provision`) is written by this one module, and so is
the mosquitto.conf of a TLS listener (:func:`tls_listener_config`).

Passwords are hashed with PBKDF2-SHA512 in mosquitto's ``$7$`` format. Debian's
``mosquitto_passwd`` does the hashing when it is installed (fed through a private temporary file,
never the command line, where other users could read it in ``ps``); otherwise we write the same
format ourselves. The file functions block on disk and a subprocess: call them from a thread
(``asyncio.to_thread``) inside an event loop.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from protocols.mqtt.devices import DeviceTopics, MessageKind

__all__ = [
    "PBKDF2_ITERATIONS",
    "Access",
    "DeviceAccount",
    "TopicRule",
    "acl_text",
    "broker_auth_config",
    "device_rules",
    "device_username",
    "hash_password",
    "new_device_accounts",
    "password_file_text",
    "provision_broker_files",
    "rules_acl_text",
    "tls_listener_config",
    "usable_username",
    "verify_password",
    "write_acl_file",
    "write_password_file",
    "write_private_file",
]

PBKDF2_ITERATIONS: Final = 101
"""mosquitto_passwd's own default for ``$7$`` (the broker re-hashes on every CONNECT)."""
_SALT_BYTES: Final = 12
_USERNAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
_TOOL_TIMEOUT_S: Final = 30.0


@dataclass(frozen=True, slots=True)
class DeviceAccount:
    """One broker account. A device account is bound to exactly one device's topics."""

    username: str
    password: str
    device_id: str | None = None
    """None: the gateway's account (every device topic)."""

    def __post_init__(self) -> None:
        # ':' ends the user name in the password file and whitespace splits an ACL line.
        if not _USERNAME.match(self.username):
            raise ValueError(f"user name {self.username!r} is not usable in mosquitto files")
        if not self.password or any(c in self.password for c in "\r\n\0"):
            raise ValueError(f"password for {self.username!r} is empty or has line breaks")
        if self.device_id is not None and any(c in self.device_id for c in "/+#\0 "):
            raise ValueError(f"device id {self.device_id!r} cannot appear in a topic")

    def __repr__(self) -> str:  # never print a password in a log or a test report
        return f"DeviceAccount(username={self.username!r}, device_id={self.device_id!r})"


def usable_username(name: str) -> bool:
    """Whether ``name`` can stand in a mosquitto password file and ACL as it is."""
    return bool(_USERNAME.match(name))


def device_username(device_id: str) -> str:
    """A device's broker user name: its id where that is usable, else a stable ``dev-`` slug."""
    return device_id if _USERNAME.match(device_id) else f"dev-{_slug(device_id)}"


def new_device_accounts(device_ids: Iterable[str]) -> dict[str, DeviceAccount]:
    """A fresh random password per device; the user name is the device id where possible."""
    return {
        device_id: DeviceAccount(device_username(device_id), secrets.token_urlsafe(24), device_id)
        for device_id in device_ids
    }


def _slug(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- passwords


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """``$7$iterations$salt$hash`` (base64), as mosquitto_passwd writes it."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Check a ``$7$`` hash (used in tests and to audit a password file)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return secrets.compare_digest(digest, expected)


def password_file_text(accounts: Iterable[DeviceAccount]) -> str:
    """Hashed password file content, computed here (no external tool)."""
    return "".join(f"{a.username}:{hash_password(a.password)}\n" for a in _unique(accounts))


def _unique(accounts: Iterable[DeviceAccount]) -> list[DeviceAccount]:
    seen: dict[str, DeviceAccount] = {}
    for account in accounts:
        if account.username in seen:
            raise ValueError(f"user name {account.username!r} appears twice")
        seen[account.username] = account
    return list(seen.values())


def write_password_file(
    path: Path, accounts: Iterable[DeviceAccount], *, use_tool: bool | None = None
) -> None:
    """Write a hashed mosquitto password file (mode 0600), replacing ``path`` atomically.

    ``use_tool``: None uses ``mosquitto_passwd`` if it is installed, True requires it, False
    hashes here. The plain-text stage exists only in a 0600 temporary file next to ``path``.
    """
    accounts = _unique(accounts)
    tool = shutil.which("mosquitto_passwd")
    if use_tool and tool is None:
        raise FileNotFoundError("mosquitto_passwd is not installed")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".passwd-", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w") as out:  # mkstemp creates it 0600
            if tool is not None and use_tool is not False:
                out.write("".join(f"{a.username}:{a.password}\n" for a in accounts))
            else:
                out.write(password_file_text(accounts))
        if tool is not None and use_tool is not False:
            done = subprocess.run(
                [tool, "-U", str(tmp)],
                capture_output=True,
                timeout=_TOOL_TIMEOUT_S,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"mosquitto_passwd -U failed ({done.returncode}): "
                    f"{done.stderr.decode(errors='replace')[:500]}"
                )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- ACL


Access = Literal["read", "write", "readwrite"]
"""mosquitto's words: ``read`` is subscribe and receive, ``write`` is publish."""


@dataclass(frozen=True, slots=True)
class TopicRule:
    """One ``topic`` line of an ACL block."""

    access: Access
    topic: str

    def __post_init__(self) -> None:
        # Whitespace would split the ACL line; '#' anywhere but a whole last level, or '+'
        # inside a level, is not a filter mosquitto reads the way it looks.
        levels = self.topic.split("/")
        if not self.topic or any(c.isspace() or c == "\0" for c in self.topic):
            raise ValueError(f"topic {self.topic!r} cannot appear in an ACL")
        if any(("#" in lv and (lv != "#" or i != len(levels) - 1)) for i, lv in enumerate(levels)):
            raise ValueError(f"topic {self.topic!r}: '#' only as the whole last level")
        if any("+" in lv and lv != "+" for lv in levels):
            raise ValueError(f"topic {self.topic!r}: '+' only as a whole level")

    def line(self) -> str:
        return f"topic {self.access} {self.topic}"


_DEVICE_WRITES: Final = (
    MessageKind.BIRTH,
    MessageKind.AVAILABILITY,
    MessageKind.TELEMETRY,
    MessageKind.RESULT,
)


def device_rules(topics: DeviceTopics, device_id: str | None) -> list[TopicRule]:
    """A device's own topics (it writes its reports and reads its commands); ``None``: the
    gateway's, every device topic."""
    if device_id is None:
        return [TopicRule("readwrite", f"{topics.root}/#")]
    return [
        *(TopicRule("write", topics.topic(device_id, kind)) for kind in _DEVICE_WRITES),
        TopicRule("read", topics.topic(device_id, MessageKind.COMMAND)),
    ]


def rules_acl_text(rules: Mapping[str, Sequence[TopicRule]], header: Sequence[str] = ()) -> str:
    """A mosquitto ``acl_file``: one explicit block per user name, nothing for anyone else.

    No ``pattern`` lines (``%u``) are used: the rules stay correct when a user name differs from
    its device id, and an auditor can read exactly what each account may do.
    """
    lines = [*(f"# {h}" if h else "#" for h in header), ""]
    for username, user_rules in rules.items():
        if not _USERNAME.match(username):
            raise ValueError(f"user name {username!r} is not usable in mosquitto files")
        lines.append(f"user {username}")
        lines.extend(rule.line() for rule in user_rules)
        lines.append("")
    return "\n".join(lines)


def acl_text(topics: DeviceTopics, accounts: Iterable[DeviceAccount]) -> str:
    """The device broker's ACL: each device its own topics, the gateway every device topic."""
    header = [
        "Generated by adapters.mqtt_devices.acl: one block per account. Do not edit by hand.",
        "Devices write only their own birth/availability/telemetry/result topics and read only",
        "their own command topic; the gateway reaches all device topics.",
    ]
    rules = {a.username: device_rules(topics, a.device_id) for a in _unique(accounts)}
    return rules_acl_text(rules, header)


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by this user only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:  # mkstemp creates it 0600
            out.write(text)
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def write_acl_file(path: Path, topics: DeviceTopics, accounts: Iterable[DeviceAccount]) -> None:
    write_private_file(path, acl_text(topics, accounts))


def provision_broker_files(
    directory: Path,
    topics: DeviceTopics,
    accounts: Iterable[DeviceAccount],
    *,
    use_tool: bool | None = None,
) -> tuple[Path, Path]:
    """Write ``passwd`` and ``acl`` into ``directory``; returns their paths."""
    accounts = _unique(accounts)
    password_file, acl_file = directory / "passwd", directory / "acl"
    write_password_file(password_file, accounts, use_tool=use_tool)
    write_acl_file(acl_file, topics, accounts)
    return password_file, acl_file


def broker_auth_config(password_file: Path | None, acl_file: Path) -> list[str]:
    """mosquitto.conf lines that turn the two files on (and anonymous access off). No password
    file: clients are known by their certificate (:func:`tls_listener_config`)."""
    return [
        "allow_anonymous false",
        *([] if password_file is None else [f"password_file {password_file}"]),
        f"acl_file {acl_file}",
    ]


def tls_listener_config(
    *,
    ca_file: Path,
    cert_file: Path,
    key_file: Path,
    identity_from_certificate: bool = False,
    require_certificate: bool | None = None,
    min_version: Literal["1.2", "1.3"] = "1.2",
) -> list[str]:
    """mosquitto.conf lines that make the listener above them TLS only.

    ``identity_from_certificate``: every client must present a certificate chained to
    ``ca_file`` and its Common Name is its user name for the ACL (mutual TLS; passwords are then
    not asked). Otherwise the broker proves itself and clients log in with passwords;
    ``require_certificate`` may still demand a client certificate as a second factor.
    """
    required = identity_from_certificate if require_certificate is None else require_certificate
    if identity_from_certificate and not required:
        raise ValueError("a certificate identity needs require_certificate")
    return [
        f"cafile {ca_file}",
        f"certfile {cert_file}",
        f"keyfile {key_file}",
        f"tls_version tlsv{min_version}",  # mosquitto 2: the lowest version accepted
        f"require_certificate {str(required).lower()}",
        *(["use_identity_as_username true"] if identity_from_certificate else []),
    ]
