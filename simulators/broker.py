"""A local MQTT broker for the demo, tests and benchmarks.

``mosquitto`` (Debian's package) is the real thing and is used whenever it is on PATH. The
embedded ``amqtt`` broker is only the zero-setup fallback for the demo on a machine without
mosquitto: it speaks MQTT 3.1.1 only, so clients talking to it must use that protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from adapters.mqtt_devices.acl import broker_auth_config, tls_listener_config

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    host: str
    port: int
    protocol: Literal["5", "3.1.1"]
    kind: Literal["mosquitto", "embedded"]


class MosquittoBroker:
    """A mosquitto process on 127.0.0.1 with a generated config, stopped by its PID.

    ``connection_log``: mosquitto writes who connected as whom to :attr:`log_path`
    (:meth:`connections` reads it back) instead of errors to stderr.
    """

    def __init__(
        self, port: int = 0, *, executable: str | None = None, connection_log: bool = False
    ) -> None:
        self.port = port or free_port()
        self.executable = executable or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.connection_log = connection_log
        self._process: asyncio.subprocess.Process | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("mosquitto") is not None or Path("/usr/sbin/mosquitto").exists()

    @property
    def endpoint(self) -> BrokerEndpoint:
        return BrokerEndpoint("127.0.0.1", self.port, "5", "mosquitto")

    def config_lines(self) -> list[str]:
        """The generated mosquitto.conf (subclasses add authentication and ACLs here)."""
        return [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            # Acks and commands are QoS 1: a burst must not be silently dropped for a
            # subscriber that is momentarily slow (mosquitto's default queue is small).
            "max_queued_messages 100000",
            "max_inflight_messages 1000",
            *self.log_lines(),
            "",
        ]

    def log_lines(self) -> list[str]:
        if not self.connection_log:
            return ["log_dest stderr", "log_type error", "log_type warning"]
        # Only to the file: stderr is a pipe nobody reads while mosquitto runs.
        return [
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages true",
        ]

    @property
    def log_path(self) -> Path:
        """mosquitto's log file while it runs (in its private folder, gone once stopped)."""
        if self._dir is None:
            raise RuntimeError("the broker is not running")
        return Path(self._dir.name) / "mosquitto.log"

    def connections(self) -> list[str]:
        """The user names clients connected as, in order (``connection_log`` only)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (FileNotFoundError, RuntimeError):
            return []
        return re.findall(r"New client connected from .* u'([^']*)'\)", text)

    async def start(self) -> BrokerEndpoint:
        self._dir = tempfile.TemporaryDirectory(prefix="derms-mosquitto-")
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text("\n".join(self.config_lines()))
        self._process = await asyncio.create_subprocess_exec(
            self.executable,
            "-c",
            str(conf),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await wait_for_port("127.0.0.1", self.port)
        except TimeoutError:
            err = b""
            if self._process.stderr is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        err = await self._process.stderr.read(2000)
            await self.stop()
            raise RuntimeError(f"mosquitto did not start: {err.decode(errors='replace')}") from None
        return self.endpoint

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its password file and ACL (not its listeners)."""
        if self._process is None or self._process.returncode is not None:
            raise RuntimeError("the broker is not running")
        self._process.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(5):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    async def __aenter__(self) -> BrokerEndpoint:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class EmbeddedBroker:
    """amqtt in this process: MQTT 3.1.1 only, for a demo on a machine without mosquitto."""

    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self._broker: Any = None

    @property
    def endpoint(self) -> BrokerEndpoint:
        return BrokerEndpoint("127.0.0.1", self.port, "3.1.1", "embedded")

    async def start(self) -> BrokerEndpoint:
        from amqtt.broker import Broker  # imported late: it is heavy and only a fallback

        # amqtt logs every half-open probe as an error; its noise helps nobody running a demo.
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        logging.getLogger("transitions").setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._broker = Broker(config)
        await self._broker.start()  # returns once its listener is bound
        return self.endpoint

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await broker.shutdown()

    async def __aenter__(self) -> BrokerEndpoint:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def local_broker(
    prefer: Literal["auto", "mosquitto", "embedded"] = "auto", port: int = 0
) -> MosquittoBroker | EmbeddedBroker:
    if prefer == "mosquitto" or (prefer == "auto" and MosquittoBroker.available()):
        return MosquittoBroker(port)
    return EmbeddedBroker(port)


class AuthenticatedMosquitto(MosquittoBroker):
    """:class:`MosquittoBroker` with a password file and an ACL.

    Only its configuration differs: starting and stopping are the base class's.
    """

    def __init__(
        self,
        password_file: Path | None,
        acl_file: Path,
        port: int = 0,
        *,
        executable: str | None = None,
        max_queued_messages: int = 10_000,
        connection_log: bool = False,
    ) -> None:
        super().__init__(port, executable=executable, connection_log=connection_log)
        self.password_file = password_file
        self.acl_file = acl_file
        self.max_queued_messages = max_queued_messages

    def listener_lines(self) -> list[str]:
        return [f"listener {self.port} 127.0.0.1"]

    def config_lines(self) -> list[str]:
        return [
            *self.listener_lines(),
            # Started as root, mosquitto switches to the 'mosquitto' user before it reads the
            # password file, which then cannot open our private (0600) files: stay as whoever
            # started it. (Ignored when not started as root.)
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            *broker_auth_config(self.password_file, self.acl_file),
            "persistence false",
            # Commands and results are QoS 1: size the per-client queue for a fleet's burst
            # rather than mosquitto's small default, which drops for a momentarily slow reader.
            f"max_queued_messages {self.max_queued_messages}",
            "max_inflight_messages 1000",
            *self.log_lines(),
            "",
        ]


class TlsMosquitto(AuthenticatedMosquitto):
    """:class:`AuthenticatedMosquitto` on a TLS-only listener (the lines production gets from
    ``derms-gateway broker provision``).

    ``identity_from_certificate``: mutual TLS, each client's certificate Common Name is its user
    name (no passwords).
    """

    def __init__(
        self,
        password_file: Path | None,
        acl_file: Path,
        *,
        ca_file: Path,
        cert_file: Path,
        key_file: Path,
        identity_from_certificate: bool = False,
        require_certificate: bool | None = None,
        port: int = 0,
        connection_log: bool = False,
        executable: str | None = None,
    ) -> None:
        super().__init__(
            password_file, acl_file, port, executable=executable, connection_log=connection_log
        )
        self.tls_lines = tls_listener_config(
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            identity_from_certificate=identity_from_certificate,
            require_certificate=require_certificate,
        )

    def listener_lines(self) -> list[str]:
        return [*super().listener_lines(), *self.tls_lines]


class ProvisionedMosquitto(MosquittoBroker):
    """mosquitto run from a ``mosquitto.conf`` that ``derms-gateway broker provision`` wrote, as
    is, plus only what a test run needs (no persistence, its own user, logs); its port is the
    listener's."""

    def __init__(
        self, conf_file: Path, *, executable: str | None = None, connection_log: bool = False
    ) -> None:
        self.conf = conf_file.read_text().splitlines()
        listeners = [line.split() for line in self.conf if line.startswith("listener ")]
        if len(listeners) != 1:
            raise ValueError(f"{conf_file}: expected one listener, found {len(listeners)}")
        super().__init__(int(listeners[0][1]), executable=executable, connection_log=connection_log)

    def config_lines(self) -> list[str]:
        return [
            *self.conf,
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",  # see AuthenticatedMosquitto
            "persistence false",
            "max_queued_messages 10000",
            *self.log_lines(),
            "",
        ]
