"""Who may open a session as which charger: the OCPP security profiles at the websocket upgrade.

The profiles of the OCPP 1.6 Security Whitepaper (edition 3) and OCPP 2.0.1 Part 2 (A00):

* **0** (not an OCPP profile; plain OCPP-J 1.6): no authentication. Anyone who knows a charger's
  id can be that charger. Development and demos on loopback only.
* **1** Basic authentication over plain ``ws://``: the username is the charge point id and must
  equal the id in the URL (A00.FR.204), the password is the charger's own secret. "SHOULD only
  be used in trusted networks" (A00.FR.201): a VPN, a private APN.
* **2** the same Basic authentication inside TLS (``wss://``; the central's server certificate).
* **3** TLS with a client certificate chained to the configured CA, checked in the TLS handshake
  itself (a charger without one, or with one from another CA, never reaches HTTP). The
  certificate's CN must be the charge point id in the URL (A00.FR.405: the CN is the charger's
  serial number, which is its identity here), and its O the CPO's name when one is configured
  (A00.FR.404). A Basic header, if any, is not looked at.

Every refusal is an HTTP status before any websocket exists (401 with a Basic challenge for
profiles 1-2, 403 for profile 3, 429 while throttled), counted by reason, and logged at most once
per charger per :data:`LOG_INTERVAL_S`. Unknown ids get the same answer as wrong passwords, so the
answers do not say which ids exist. Failures from one source for one id are throttled
(:class:`AttemptThrottle`): a short, growing backoff, so passwords cannot be tried quickly, yet a
charger elsewhere with the same id is not locked out by someone else's guesses.

The secrets are read once, when the central is built (:func:`load_secret`); they are compared
in constant time (:func:`hmac.compare_digest`) and never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final, Literal

from protocols.ocpp import accepted_passwords, parse_authorization, secret_problem

__all__ = [
    "LOG_INTERVAL_S",
    "AttemptThrottle",
    "ChargerSecret",
    "PeerCertificate",
    "Refusal",
    "RefusalLog",
    "RefusalReason",
    "SecurityGate",
    "SecurityProfile",
    "load_secret",
]

log = logging.getLogger(__name__)

SecurityProfile = Literal[0, 1, 2, 3]

RefusalReason = Literal[
    "unknown_charger",
    "no_credentials",
    "malformed_credentials",
    "identity_mismatch",
    "wrong_password",
    "no_certificate",
    "certificate_identity",
    "certificate_organization",
    "throttled",
    "no_common_version",
]

PeerCertificate = dict[str, Any]
"""A verified peer certificate as :meth:`ssl.SSLSocket.getpeercert` gives it."""

#: A charger refused again and again costs one log line per this many seconds.
LOG_INTERVAL_S: Final = 300.0
_MAX_TRACKED: Final = 10_000
_MAX_LOGGED_IDS: Final = 1024
_OTHER_IDS: Final = "<other ids>"


# --------------------------------------------------------------------------- secrets


@dataclass(frozen=True, slots=True, repr=False)
class ChargerSecret:
    """One charger's Basic password, in every form it may arrive in."""

    forms: tuple[bytes, ...]
    origin: str
    """Where it was read (``file …`` or ``environment variable …``), never the value."""

    def matches(self, password: bytes) -> bool:
        # Every form is compared, whatever the first gave: the time does not say which matched.
        matched = False
        for form in self.forms:
            matched |= hmac.compare_digest(form, password)
        return matched

    def __repr__(self) -> str:
        return f"ChargerSecret(from {self.origin})"


# Compared against when the id is unknown, so an unknown id costs the time a known one does.
_NO_SECRET: Final = ChargerSecret(accepted_passwords("0" * 40), "nowhere")


def load_secret(
    charge_point_id: str, password_file: Path | None, password_env: str | None
) -> ChargerSecret:
    """Read a charger's password from its file or environment variable (blocking: start-up only).

    Raises ValueError saying what is wrong, never with the secret in the message.
    """
    if password_file is not None:
        origin = f"file {password_file}"
        try:
            text = password_file.read_text(encoding="utf-8")
            mode = password_file.stat().st_mode
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read password_file {password_file}: {exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "OCPP charger %s: password_file %s is readable by other users (chmod 600 it)",
                charge_point_id,
                password_file,
            )
        secret = text.strip()
    elif password_env is not None:
        origin = f"environment variable {password_env}"
        value = os.environ.get(password_env)
        if value is None:
            raise ValueError(f"environment variable {password_env} is not set")
        secret = value.strip()
    else:
        raise ValueError("needs password_file or password_env")
    problem = secret_problem(secret)
    if problem is not None:
        raise ValueError(f"the password in {origin}: {problem}")
    return ChargerSecret(accepted_passwords(secret), origin)


# --------------------------------------------------------------------------- throttling


@dataclass(slots=True)
class _Failures:
    count: int
    last: float
    blocked_until: float


class AttemptThrottle:
    """Backoff after failed attempts, per key (here: source address and charge point id).

    The first ``free_failures`` failures cost nothing (a charger retrying once after its
    password changed); each further one closes the key for ``base_s``, doubling up to
    ``max_s``. Attempts while closed are refused unexamined and do not extend the wait. A
    success, or ``forget_after_s`` without failures, forgets the key. At most ``max_entries``
    keys are kept (the oldest go first), so a flood of sources cannot grow memory.
    """

    def __init__(
        self,
        *,
        free_failures: int = 2,
        base_s: float = 1.0,
        max_s: float = 60.0,
        forget_after_s: float = 900.0,
        max_entries: int = _MAX_TRACKED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free_failures = free_failures
        self.base_s, self.max_s, self.forget_after_s = base_s, max_s, forget_after_s
        self.max_entries = max_entries
        self._clock = clock
        self._failures: dict[tuple[str, str], _Failures] = {}

    def wait_s(self, key: tuple[str, str]) -> float:
        """Seconds until ``key`` may try again (0: now)."""
        entry = self._failures.get(key)
        if entry is None:
            return 0.0
        now = self._clock()
        if now - entry.last > self.forget_after_s:
            del self._failures[key]
            return 0.0
        return max(0.0, entry.blocked_until - now)

    def failed(self, key: tuple[str, str]) -> None:
        now = self._clock()
        entry = self._failures.pop(key, None)  # re-inserted last: the dict stays oldest-first
        if entry is None or now - entry.last > self.forget_after_s:
            entry = _Failures(0, now, now)
        entry.count += 1
        entry.last = now
        beyond = entry.count - self.free_failures
        if beyond > 0:
            entry.blocked_until = now + min(self.max_s, self.base_s * 2 ** min(beyond - 1, 30))
        self._failures[key] = entry
        while len(self._failures) > self.max_entries:
            del self._failures[next(iter(self._failures))]

    def succeeded(self, key: tuple[str, str]) -> None:
        self._failures.pop(key, None)


# --------------------------------------------------------------------------- logging


@dataclass(slots=True)
class _Logged:
    at: float
    suppressed: int = 0


class RefusalLog:
    """One WARNING per charger per ``interval_s``, however often it is refused; the line after
    a quiet spell says how many were not logged. Ids beyond ``max_ids`` share one entry, so a
    client trying random ids costs one line per interval, not one per id."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = LOG_INTERVAL_S,
        max_ids: int = _MAX_LOGGED_IDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log, self.interval_s, self.max_ids, self._clock = logger, interval_s, max_ids, clock
        self._seen: dict[str, _Logged] = {}

    def refused(self, charge_point_id: str, source: str, refusal: Refusal) -> None:
        key = charge_point_id
        if key not in self._seen and len(self._seen) >= self.max_ids:
            key = _OTHER_IDS
        now = self._clock()
        entry = self._seen.get(key)
        if entry is not None and now - entry.at < self.interval_s:
            entry.suppressed += 1
            return
        suppressed = 0 if entry is None else entry.suppressed
        self._seen[key] = _Logged(now)
        self._log.warning(
            "OCPP charger %r refused from %s: HTTP %d, %s: %s%s",
            charge_point_id,
            source,
            refusal.status,
            refusal.reason,
            refusal.detail,
            f" ({suppressed} more refusals of {key!r} since the last line)" if suppressed else "",
        )


# --------------------------------------------------------------------------- the gate


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an upgrade is refused, and the HTTP status that says so."""

    status: HTTPStatus
    reason: RefusalReason
    detail: str
    retry_after_s: float | None = None


@dataclass(slots=True)
class SecurityGate:
    """The security profile's checks on one upgrade request; see the module docstring."""

    profile: SecurityProfile
    secrets: Mapping[str, ChargerSecret] = field(default_factory=dict)
    cpo_name: str | None = None
    throttle: AttemptThrottle = field(default_factory=AttemptThrottle)

    def check(
        self,
        charge_point_id: str,
        source: str,
        authorization: list[str],
        certificate: PeerCertificate | None,
        *,
        known: bool,
    ) -> Refusal | None:
        """None if the request may proceed as ``charge_point_id``. ``authorization`` holds the
        request's Authorization header values; ``known``: the central serves this id."""
        if self.profile == 0:
            return None
        key = (source, charge_point_id)
        wait = self.throttle.wait_s(key)
        if wait > 0:
            return Refusal(
                HTTPStatus.TOO_MANY_REQUESTS,
                "throttled",
                f"failed attempts from this source: next in {wait:.1f} s",
                retry_after_s=wait,
            )
        if self.profile in (1, 2):
            refusal = self._basic(charge_point_id, authorization)
        else:
            refusal = self._certificate(charge_point_id, certificate, known=known)
        if refusal is None:
            self.throttle.succeeded(key)
        else:
            self.throttle.failed(key)
        return refusal

    def _basic(self, charge_point_id: str, authorization: list[str]) -> Refusal | None:
        if not authorization:
            return _unauthorized("no_credentials", "no Authorization header")
        credentials = parse_authorization(authorization[0]) if len(authorization) == 1 else None
        if credentials is None:
            return _unauthorized("malformed_credentials", "not one Basic Authorization header")
        secret = self.secrets.get(charge_point_id)
        # Compared even when the answer is already known, so the time does not tell.
        matched = (secret or _NO_SECRET).matches(credentials.password)
        if credentials.username != charge_point_id:
            return _unauthorized(
                "identity_mismatch", f"username {credentials.username!r} is not the id in the URL"
            )
        if secret is None:
            return _unauthorized("unknown_charger", "not configured")
        if not matched:
            return _unauthorized("wrong_password", f"password does not match ({secret.origin})")
        return None

    def _certificate(
        self, charge_point_id: str, certificate: PeerCertificate | None, *, known: bool
    ) -> Refusal | None:
        if not certificate:
            # The handshake requires one: only a TLS context without a CA gets here.
            return _forbidden("no_certificate", "no verified client certificate")
        names = _subject(certificate, "commonName")
        if names != [charge_point_id]:
            return _forbidden(
                "certificate_identity", f"certificate CN {', '.join(names) or '-'} is not the id"
            )
        if self.cpo_name is not None:
            organizations = _subject(certificate, "organizationName")
            if self.cpo_name not in organizations:
                return _forbidden(
                    "certificate_organization",
                    f"certificate O {', '.join(organizations) or '-'} is not {self.cpo_name!r}",
                )
        if not known:
            return _forbidden("unknown_charger", "valid certificate, but not configured")
        return None


def _subject(certificate: PeerCertificate, attribute: str) -> list[str]:
    """Every value of ``attribute`` in the certificate's subject (getpeercert's nested tuples)."""
    values: list[str] = []
    for rdn in certificate.get("subject", ()):
        for name, value in rdn:
            if name == attribute:
                values.append(str(value))
    return values


def _unauthorized(reason: RefusalReason, detail: str) -> Refusal:
    return Refusal(HTTPStatus.UNAUTHORIZED, reason, detail)


def _forbidden(reason: RefusalReason, detail: str) -> Refusal:
    return Refusal(HTTPStatus.FORBIDDEN, reason, detail)
