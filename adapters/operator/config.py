"""``[operator]``: the endpoint operators and their tools reach the gateway on (metrics, health
checks, status), and who may read what is not public."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final, Self

from pydantic import Field

from adapters.broker_security import CredentialsUnavailable, is_loopback, read_secret_file
from unified.config import Section, rebase
from unified.model import TopologyLevel

__all__ = ["OperatorConfig"]

_ENV_NAME: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


class OperatorConfig(Section):
    """``[operator]``: Prometheus metrics on ``/metrics``, ``/health/live`` and ``/health/ready``
    (unauthenticated: what a scraper, systemd or an orchestrator probes), and ``/status`` with
    every other route behind HTTP Basic authentication as ``user`` with the password from
    ``password_file`` or ``password_env`` (without one, those routes are refused)."""

    enabled: bool = True
    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        max_length=253,
        description="Address to listen on; keep it on loopback or a management network",
    )
    port: int = Field(default=9108, ge=0, le=65535, description="0: any free port (tests)")
    user: str = Field(
        default="operator",
        min_length=1,
        max_length=64,
        pattern=r"^[^:\s]+$",
        description="The user name of HTTP Basic authentication",
    )
    password_file: Path | None = Field(
        default=None,
        description="A file holding the operator password (a trailing newline is ignored); "
        "re-read when it changes",
    )
    password_env: str | None = Field(
        default=None, pattern=_ENV_NAME, description="An environment variable holding it"
    )
    metrics_auth: bool = Field(
        default=False, description="Require the password on /metrics too (a scraper sends it)"
    )
    group_levels: tuple[TopologyLevel, ...] = Field(
        default=(TopologyLevel.SUBSTATION, TopologyLevel.FEEDER),
        description="Groups at these topology levels get series of their own (availability, "
        "estimation); [] for none. Transformers are many: add them with care",
    )
    stall_periods: float = Field(
        default=5.0,
        ge=2,
        le=1000,
        description="A loop that has not finished a cycle for this many of its periods (and at "
        "least 5 s) is stalled: not live (control) / not ready (control, telemetry)",
    )
    startup_grace_s: float = Field(
        default=120.0,
        gt=0,
        le=3600,
        description="Live before the control loop's first cycle for this long after start",
    )
    store_check_s: float = Field(
        default=5.0, gt=0, le=300, description="Check the command store is writable this often"
    )
    store_min_free_mb: float = Field(
        default=16.0, ge=0, description="Less free space than this beside the store: not ready"
    )

    def rebased(self, base: Path) -> Self:
        return self.model_copy(update=rebase(base, self, "password_file"))

    @property
    def has_password(self) -> bool:
        return self.password_file is not None or self.password_env is not None

    def password(self) -> str | None:
        """The operator password now (reads the file: blocking, small), None when none is
        configured or the variable is unset; :class:`CredentialsUnavailable` for a file that
        cannot be read."""
        if self.password_file is not None:
            return read_secret_file(self.password_file, "operator.password_file")
        if self.password_env is not None:
            return os.environ.get(self.password_env) or None
        return None

    def file_problems(self) -> list[str]:
        if self.password_file is None:
            return []
        try:
            read_secret_file(self.password_file, "operator.password_file")
        except CredentialsUnavailable as exc:
            return [str(exc)]
        return []

    def warnings(self) -> list[str]:
        """What is allowed but weak, one sentence each."""
        if not self.enabled:
            return []
        out = []
        if not self.has_password:
            out.append(
                "operator: no password_file or password_env: /status (and every route but "
                "/metrics and /health/*) is refused"
            )
        elif not is_loopback(self.host):
            out.append(
                f"operator: the password goes to {self.host}:{self.port} unencrypted (HTTP "
                "Basic); keep the endpoint on loopback or put a TLS proxy in front"
            )
        if self.password_file is not None:
            try:
                mode = self.password_file.stat().st_mode
            except OSError:
                mode = 0
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                out.append(
                    f"operator.password_file: {self.password_file} can be read by others "
                    "(chmod 600)"
                )
        return out
