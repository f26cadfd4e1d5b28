"""HTTP Basic credentials of OCPP security profiles 1 and 2 (pure: no I/O, no clock).

A charger sends ``Authorization: Basic base64(<charge point id>:<password>)`` with its websocket
upgrade (OCPP 1.6 Security Whitepaper ed. 3 and OCPP 2.0.1 Part 2, A00.FR.202-205 / .301-304).
The two versions disagree on what the password is:

* **1.6** ``AuthorizationKey``: "minimal 16 bytes ... hexadecimal represented (20 bytes maximum,
  represented as a string of up to 40 hexadecimal digits)". The bytes those digits stand for are
  the password (OCTT TC_085_CS checks the non-hex form); many chargers send the digits instead.
* **2.0.1** ``BasicAuthPassword``: a ``passwordString`` of 16 to 40 characters (the 2025-01 errata
  raise the maximum to 64), sent as UTF-8 "NOT encoded into octet string".

So one secret, as written on the charger, may reach us in two forms: the UTF-8 of its text, and,
when it is 32-40 hex digits, the bytes they encode. Both prove knowledge of the same secret (the
second has the same entropy as the first), so :func:`accepted_passwords` gives both, and a
40-hex-digit secret (``openssl rand -hex 20``) suits chargers of either version.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Final

from protocols.ocpp.primitives import OcppVersion

__all__ = [
    "MAX_SECRET_CHARS",
    "MIN_SECRET_CHARS",
    "BasicCredentials",
    "accepted_passwords",
    "authorization_header",
    "parse_authorization",
    "secret_problem",
    "wire_password",
]

#: Shortest secret accepted: 16 characters (2.0.1 A00.FR.205; 1.6 asks 16 bytes = 32 hex digits).
MIN_SECRET_CHARS: Final = 16
#: Longest: 2.0.1 allows 40 characters, 64 since its 2025-01 errata; 1.6 at most 40 hex digits.
MAX_SECRET_CHARS: Final = 64

_HEX_KEY: Final = re.compile(r"^(?:[0-9A-Fa-f]{2}){16,20}$")
_MAX_HEADER_CHARS: Final = 512  # base64 of a 48-char id, ':' and a 64-char password is ~152


@dataclass(frozen=True, slots=True)
class BasicCredentials:
    """What an ``Authorization: Basic`` header carried; the password is bytes (1.6 allows any)."""

    username: str
    password: bytes

    def __repr__(self) -> str:  # never print a password, even by accident
        return f"BasicCredentials(username={self.username!r}, password=<{len(self.password)} B>)"


def parse_authorization(value: str) -> BasicCredentials | None:
    """The credentials of an ``Authorization`` header value, or None if it is not a well-formed
    Basic one (another scheme, bad base64, no ``:``, a username that is not UTF-8)."""
    if len(value) > _MAX_HEADER_CHARS:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    # RFC 7617: the user-id cannot contain ':', the password can (and in 1.6, any byte).
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    try:
        username = user.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return BasicCredentials(username, password)


def authorization_header(username: str, password: bytes) -> str:
    """The ``Authorization`` header value a charger sends (the simulator's side)."""
    if ":" in username:
        raise ValueError("a Basic username cannot contain ':' (RFC 7617)")
    token = base64.b64encode(username.encode("utf-8") + b":" + password).decode("ascii")
    return f"Basic {token}"


def secret_problem(secret: str) -> str | None:
    """Why ``secret`` cannot be a charger's password (None: it can).

    16 to 64 printable characters with no spaces: every 2.0.1 ``passwordString`` and every 1.6
    ``AuthorizationKey`` of 16-20 bytes written as hex fit; a shorter one is guessable.
    """
    if not MIN_SECRET_CHARS <= len(secret) <= MAX_SECRET_CHARS:
        return (
            f"{len(secret)} characters; a charger password has {MIN_SECRET_CHARS} to "
            f"{MAX_SECRET_CHARS} (e.g. 40 hex digits: openssl rand -hex 20)"
        )
    if any(not ch.isprintable() or ch.isspace() for ch in secret):
        return "contains spaces or control characters"
    return None


def accepted_passwords(secret: str) -> tuple[bytes, ...]:
    """Every form of ``secret`` a charger may send: its UTF-8, and for 32-40 hex digits also
    the bytes they encode (the 1.6 whitepaper's form). Compare against all, in constant time."""
    forms = [secret.encode("utf-8")]
    if _HEX_KEY.match(secret):
        forms.append(bytes.fromhex(secret))
    return tuple(forms)


def wire_password(secret: str, version: OcppVersion) -> bytes:
    """What a charger of ``version`` sends for ``secret``: a 1.6 hex AuthorizationKey decoded
    to its bytes, anything else as UTF-8."""
    if version == "ocpp1.6" and _HEX_KEY.match(secret):
        return bytes.fromhex(secret)
    return secret.encode("utf-8")
