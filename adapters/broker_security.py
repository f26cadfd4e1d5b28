"""How the gateway logs in to an MQTT broker: TLS, secrets, and rotated files picked up live.

Both MQTT links, to Grid DERMS (``[broker]``) and to the devices (``[device_mqtt]``), take their
identity from :class:`BrokerLogin`, so the two cannot drift apart in what they accept:

* **TLS** (``[broker.tls]``): the broker's certificate is verified against ``ca_file`` (or the
  system's trust store) and its host name is always checked — there is no switch to turn either
  off; ``server_hostname`` names the certificate when ``host`` is an address. TLS 1.2 at least.
  ``cert_file`` / ``key_file`` add our client certificate (mutual TLS).
* **Secrets** come from a file (``password_file``, ``tls.key_password_file``) or the environment
  (``password_env``); an inline ``password`` is for development and never shown in a repr, a log
  or a dump.
* **Rotation**: every connect reads the files afresh, and while connected the link checks their
  modification stamps every ``rotation_check_s``; when one changed it ends the session (a clean
  DISCONNECT, so no last will) and reconnects with the new files — no restart.

Reading files blocks: :meth:`BrokerLogin.credentials` is called through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NoReturn, Self

from pydantic import Field, SecretStr, model_validator

from protocols.tls import TlsVersion, broker_client_context
from unified.config import Section, rebase

__all__ = [
    "BrokerLogin",
    "BrokerTls",
    "Credentials",
    "CredentialsRotated",
    "CredentialsUnavailable",
    "FileStamps",
    "is_loopback",
    "raise_session_end",
    "read_secret_file",
    "watch_rotation",
]

_ENV_NAME: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
_SETTLE_S: Final = 1.0
"""After a change is seen, wait this long before reconnecting: a rotation writes several files."""


class CredentialsUnavailable(Exception):
    """A secret or TLS file named in the configuration cannot be used right now.

    ``setting`` is where it is configured (``broker.tls.cert_file``), ``reason`` what is wrong;
    neither ever holds a secret.
    """

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{setting}: {reason}")
        self.setting = setting
        self.reason = reason


def raise_session_end(group: ExceptionGroup[Exception], lost: type[Exception]) -> NoReturn:
    """A link session's task group has ended. A lost link ends its loops with ``lost`` (the MQTT
    client's error), a rotated file the watch with :class:`CredentialsRotated`: raise one plain
    exception of those so the link reconnects (a rotation first, since it is the reason). Anything
    else is a bug and propagates as it is."""
    ends = [e for e in group.exceptions if isinstance(e, lost | CredentialsRotated)]
    if len(ends) == len(group.exceptions):
        rotated = [e for e in ends if isinstance(e, CredentialsRotated)]
        raise (rotated or ends)[0] from None
    raise group


class CredentialsRotated(Exception):
    """A watched secret or TLS file changed: the session ends so the link reconnects with it."""

    def __init__(self, settings: tuple[str, ...]) -> None:
        super().__init__(f"changed: {', '.join(settings)}")
        self.settings = settings


# --------------------------------------------------------------------------- configuration


class BrokerTls(Section):
    """``[broker.tls]`` / ``[device_mqtt.tls]``: TLS, and mutual TLS with ``cert_file``."""

    ca_file: Path | None = Field(
        default=None,
        description="CA certificate(s), PEM, the broker's certificate must chain to; "
        "None: the system's trust store",
    )
    cert_file: Path | None = Field(
        default=None, description="Our client certificate (PEM) for mutual TLS"
    )
    key_file: Path | None = Field(
        default=None, description="Its private key (PEM); None: cert_file holds both"
    )
    key_password_file: Path | None = Field(
        default=None, description="A file holding the private key's passphrase, if it has one"
    )
    server_hostname: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="The name the broker's certificate must carry when it is not 'host' (a "
        "broker reached by IP address or through a tunnel). The check itself is always on",
    )
    min_version: TlsVersion = Field(default="1.2", description="Lowest TLS version accepted")

    @model_validator(mode="after")
    def _client_certificate(self) -> BrokerTls:
        if self.cert_file is None and (
            self.key_file is not None or self.key_password_file is not None
        ):
            raise ValueError("key_file and key_password_file need a cert_file")
        return self

    def files(self) -> dict[str, Path]:
        """The files this section names, by setting name."""
        named = {
            "ca_file": self.ca_file,
            "cert_file": self.cert_file,
            "key_file": self.key_file,
            "key_password_file": self.key_password_file,
        }
        return {name: path for name, path in named.items() if path is not None}


class BrokerLogin(Section):
    """Who a link is on its broker: the fields ``[broker]`` and ``[device_mqtt]`` share."""

    username: str | None = Field(default=None, min_length=1, max_length=256)
    password: SecretStr | None = Field(
        default=None,
        repr=False,
        description="Development only: in production use password_file or password_env",
    )
    password_file: Path | None = Field(
        default=None, description="A file holding the password (a trailing newline is ignored)"
    )
    password_env: str | None = Field(
        default=None,
        pattern=_ENV_NAME,
        description="An environment variable holding the password",
    )
    tls: BrokerTls | None = Field(
        default=None, description="TLS to the broker (required for any broker off this host)"
    )
    rotation_check_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How often the password and TLS files are checked; when one changed the "
        "link reconnects to use it",
    )

    @model_validator(mode="after")
    def _one_password_source(self) -> Self:
        given = [
            name
            for name, value in (
                ("password", self.password),
                ("password_file", self.password_file),
                ("password_env", self.password_env),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give one of {', '.join(given)}, not several")
        if given and self.username is None:
            raise ValueError(f"{given[0]} needs a username")
        return self

    # ------------------------------------------------------------------ files
    def rebased(self, base: Path) -> Self:
        """Relative file paths resolved against ``base`` (the configuration file's folder)."""
        update: dict[str, object] = dict(rebase(base, self, "password_file"))
        if self.tls is not None:
            fields = ("ca_file", "cert_file", "key_file", "key_password_file")
            update["tls"] = self.tls.model_copy(update=rebase(base, self.tls, *fields))
        return self.model_copy(update=update)

    def files(self, section: str) -> dict[str, Path]:
        """Every file this login reads, by its place in the configuration."""
        out = {}
        if self.password_file is not None:
            out[f"{section}.password_file"] = self.password_file
        if self.tls is not None:
            out |= {f"{section}.tls.{name}": path for name, path in self.tls.files().items()}
        return out

    def file_problems(self, section: str) -> list[str]:
        """Files that are missing or unreadable, one sentence each (for loading and
        ``check-config``)."""
        problems = []
        for setting, path in self.files(section).items():
            if not path.exists():
                problems.append(f"{setting}: {path} does not exist")
            elif not path.is_file():
                problems.append(f"{setting}: {path} is not a file")
            elif not os.access(path, os.R_OK):
                problems.append(f"{setting}: {path} is not readable by this user")
        return problems

    def warnings(self, section: str, host: str) -> list[str]:
        """What is allowed but weak, one sentence each."""
        out = []
        has_password = any(
            v is not None for v in (self.password, self.password_file, self.password_env)
        )
        if has_password and self.tls is None and not is_loopback(host):
            out.append(
                f"{section}: the password goes to {host} unencrypted; configure [{section}.tls]"
            )
        if self.password is not None:
            out.append(f"{section}.password is in the config file: prefer password_file or env")
        if self.tls is None and not is_loopback(host):
            out.append(f"{section}: no TLS to {host}; anyone on the path can read and forge")
        private = {}
        if self.password_file is not None:
            private[f"{section}.password_file"] = self.password_file
        if self.tls is not None:
            private |= {
                f"{section}.tls.{name}": path
                for name, path in self.tls.files().items()
                if name in ("key_file", "key_password_file")
            }
        for setting, path in private.items():
            try:
                mode = path.stat().st_mode
            except OSError:
                continue
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                out.append(f"{setting}: {path} is readable by others (chmod 600 it)")
        return out

    # ------------------------------------------------------------------ connect time
    def credentials(self, section: str) -> Credentials:
        """Read the password and build the TLS context now, from the files as they are.

        Blocking (file reads, certificate parsing): call it in a thread. The files' stamps are
        taken *before* they are read, so a change racing this read shows as a change later
        (one extra reconnect) rather than being missed.
        """
        stamps = FileStamps.take(self.files(section))
        password = self._password(section)
        context = None
        if self.tls is not None:
            context = self._tls_context(section, self.tls)
        return Credentials(self.username, password, context, stamps)

    def _password(self, section: str) -> str | None:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return read_secret_file(self.password_file, f"{section}.password_file")
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if not value:
                raise CredentialsUnavailable(
                    f"{section}.password_env",
                    f"environment variable {self.password_env} is not set or empty",
                )
            return value
        return None

    def _tls_context(self, section: str, tls: BrokerTls) -> ssl.SSLContext:
        where = f"{section}.tls"
        for name, path in tls.files().items():
            if not path.is_file():
                raise CredentialsUnavailable(f"{where}.{name}", f"{path} does not exist")
        key_password = None
        if tls.key_password_file is not None:
            key_password = read_secret_file(tls.key_password_file, f"{where}.key_password_file")
        try:
            return broker_client_context(
                ca_file=tls.ca_file,
                cert_file=tls.cert_file,
                key_file=tls.key_file,
                key_password=key_password,
                server_hostname=tls.server_hostname,
                min_version=tls.min_version,
            )
        except ssl.SSLError as exc:
            # OpenSSL's reason (a key that does not match its certificate, a wrong passphrase,
            # a file that is not PEM) is what the operator needs; it never holds the passphrase.
            raise CredentialsUnavailable(where, f"cannot load the TLS files: {exc}") from None
        except OSError as exc:
            raise CredentialsUnavailable(where, f"cannot read the TLS files: {exc}") from None


def read_secret_file(path: Path, setting: str) -> str:
    """A secret file's content without its trailing line break; never empty."""
    try:
        value = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise CredentialsUnavailable(setting, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CredentialsUnavailable(setting, f"{path} is not UTF-8 text") from None
    if not value:
        raise CredentialsUnavailable(setting, f"{path} is empty")
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- connect time


_Stamp = tuple[int, int, int, int]


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    # The inode too: an atomic replace (write aside, rename) may keep the mtime and size.
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


@dataclass(frozen=True, slots=True)
class FileStamps:
    """The files one connect read, and what they looked like before it read them."""

    stamps: dict[str, tuple[Path, _Stamp | None]] = field(default_factory=dict)

    @classmethod
    def take(cls, files: dict[str, Path]) -> FileStamps:
        return cls({setting: (path, _stamp(path)) for setting, path in files.items()})

    def changed(self) -> tuple[str, ...]:
        """The settings whose file changed (or appeared, or vanished) since."""
        return tuple(
            setting for setting, (path, before) in self.stamps.items() if _stamp(path) != before
        )


@dataclass(frozen=True, slots=True)
class Credentials:
    """What one connect presents: read from the configuration's sources just before it."""

    username: str | None
    password: str | None = field(repr=False)
    tls_context: ssl.SSLContext | None
    stamps: FileStamps

    def client_kwargs(self) -> dict[str, object]:
        """The matching ``aiomqtt.Client`` arguments."""
        return {
            "username": self.username,
            "password": self.password,
            "tls_context": self.tls_context,
        }


async def watch_rotation(stamps: FileStamps, every_s: float) -> NoReturn:
    """Raise :class:`CredentialsRotated` once a file in ``stamps`` changed (and stayed still
    for a moment, so a certificate and its key written one after the other arrive together).

    With nothing to watch it waits forever; run it beside the session's other loops.
    """
    if not stamps.stamps:
        await asyncio.get_running_loop().create_future()  # never done: cancelled with the session
    while True:
        await asyncio.sleep(every_s)
        changed = stamps.changed()
        if changed:
            await asyncio.sleep(min(_SETTLE_S, every_s))
            raise CredentialsRotated(changed)
