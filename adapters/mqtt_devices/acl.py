"""Per-device broker credentials: a mosquitto password file and an ACL, generated.

Each MQTT device gets its own account and may write only its own ``birth``, ``availability``,
``telemetry`` and ``result`` topics and read only its own ``command`` topic
(:mod:`protocols.mqtt.devices`); the gateway's account reaches every device topic. The broker
enforces this, so a compromised or misconfigured device cannot command its neighbour, read its
neighbour's telemetry, or speak for it.

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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from protocols.mqtt.devices import DeviceTopics, MessageKind

__all__ = [
    "PBKDF2_ITERATIONS",
    "DeviceAccount",
    "acl_text",
    "broker_auth_config",
    "hash_password",
    "new_device_accounts",
    "password_file_text",
    "provision_broker_files",
    "verify_password",
    "write_acl_file",
    "write_password_file",
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


def new_device_accounts(device_ids: Iterable[str]) -> dict[str, DeviceAccount]:
    """A fresh random password per device; the user name is the device id where possible."""
    accounts = {}
    for device_id in device_ids:
        username = device_id if _USERNAME.match(device_id) else f"dev-{_slug(device_id)}"
        accounts[device_id] = DeviceAccount(username, secrets.token_urlsafe(24), device_id)
    return accounts


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


_DEVICE_WRITES: Final = (
    MessageKind.BIRTH,
    MessageKind.AVAILABILITY,
    MessageKind.TELEMETRY,
    MessageKind.RESULT,
)


def acl_text(topics: DeviceTopics, accounts: Iterable[DeviceAccount]) -> str:
    """A mosquitto ``acl_file``: explicit per-user rules, nothing for anyone else.

    No ``pattern`` lines (``%u``) are used: the rules stay correct when a user name differs from
    its device id, and an auditor can read exactly what each account may do.
    """
    lines = [
        "# Generated by adapters.mqtt_devices.acl: one block per account. Do not edit by hand.",
        "# Devices write only their own birth/availability/telemetry/result topics and read only",
        "# their own command topic; the gateway reaches all device topics.",
        "",
    ]
    for account in _unique(accounts):
        lines.append(f"user {account.username}")
        if account.device_id is None:
            lines.append(f"topic readwrite {topics.root}/#")
        else:
            lines.extend(
                f"topic write {topics.topic(account.device_id, kind)}" for kind in _DEVICE_WRITES
            )
            lines.append(f"topic read {topics.topic(account.device_id, MessageKind.COMMAND)}")
        lines.append("")
    return "\n".join(lines)


def write_acl_file(path: Path, topics: DeviceTopics, accounts: Iterable[DeviceAccount]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".acl-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(acl_text(topics, accounts))
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


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


def broker_auth_config(password_file: Path, acl_file: Path) -> list[str]:
    """mosquitto.conf lines that turn the two files on (and anonymous access off)."""
    return [
        "allow_anonymous false",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
    ]
