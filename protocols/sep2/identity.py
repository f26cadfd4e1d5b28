"""Device identity from certificates: LFDI and SFDI (IEEE 2030.5 §6.3.4).

* LFDI = the first 160 bits of the SHA-256 fingerprint of the DER-encoded certificate, as 40 hex
  digits. We produce **uppercase** (as 2030.5's examples and envoy's EndDevice documents show),
  but peers differ (envoy computes lowercase internally and keeps whatever case a registration
  used), so always compare with ``same_lfdi``.
* SFDI = the first 36 bits of the fingerprint as a decimal integer, followed by one check digit
  that makes the sum of all digits ≡ 0 (mod 10). It is not always 12 digits long.

The same check digit rule makes a registration PIN (``with_check_digit(11111) == 111115``).
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from protocols.sep2.errors import InvalidCertificate, InvalidValue

__all__ = [
    "has_valid_check_digit",
    "lfdi_from_cert",
    "lfdi_from_fingerprint",
    "normalize_lfdi",
    "same_lfdi",
    "sfdi_from_cert",
    "sfdi_from_lfdi",
    "with_check_digit",
]

_HEX: Final = re.compile(r"^[0-9A-Fa-f]+$")
_LFDI_DIGITS: Final = 40
_SFDI_HEX_DIGITS: Final = 9  # 36 bits


def _der_bytes(der_or_pem: bytes) -> bytes:
    try:
        if der_or_pem.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(der_or_pem)
        else:
            cert = x509.load_der_x509_certificate(der_or_pem)
    except ValueError as exc:
        raise InvalidCertificate(str(exc)) from None
    # Re-serialise rather than hash the input: a PEM's base64 decodes to the same DER, and
    # this also normalises a DER that arrived with trailing bytes.
    return cert.public_bytes(Encoding.DER)


def lfdi_from_fingerprint(fingerprint: str) -> str:
    """The LFDI (uppercase) of a SHA-256 fingerprint given as hex (colons allowed)."""
    digits = fingerprint.replace(":", "").strip()
    if len(digits) < _LFDI_DIGITS or not _HEX.match(digits):
        raise InvalidValue("fingerprint", fingerprint, "need at least 40 hex digits")
    return digits[:_LFDI_DIGITS].upper()


def lfdi_from_cert(der_or_pem: bytes) -> str:
    """The LFDI (40 uppercase hex digits) of a PEM or DER X.509 certificate."""
    return lfdi_from_fingerprint(hashlib.sha256(_der_bytes(der_or_pem)).hexdigest())


def with_check_digit(number: int) -> int:
    """``number`` followed by the digit that makes the digit sum ≡ 0 (mod 10)."""
    if number < 0:
        raise InvalidValue("number", number, "must not be negative")
    digit_sum = sum(int(d) for d in str(number))
    return number * 10 + (10 - digit_sum % 10) % 10


def has_valid_check_digit(number: int) -> bool:
    """True if ``number``'s last digit is its check digit (SFDI or registration PIN)."""
    return number >= 0 and sum(int(d) for d in str(number)) % 10 == 0


def sfdi_from_lfdi(lfdi: str) -> int:
    """The SFDI of an LFDI (or of a full fingerprint): first 36 bits + check digit."""
    digits = lfdi.strip()
    if len(digits) < _SFDI_HEX_DIGITS or not _HEX.match(digits):
        raise InvalidValue("lfdi", lfdi, "need at least 9 hex digits")
    return with_check_digit(int(digits[:_SFDI_HEX_DIGITS], 16))


def sfdi_from_cert(der_or_pem: bytes) -> int:
    """The SFDI of a PEM or DER X.509 certificate."""
    return sfdi_from_lfdi(lfdi_from_cert(der_or_pem))


def normalize_lfdi(lfdi: str) -> str:
    """An LFDI as 40 uppercase hex digits; ``InvalidValue`` if it is not one."""
    digits = lfdi.strip()
    if len(digits) != _LFDI_DIGITS or not _HEX.match(digits):
        raise InvalidValue("lfdi", lfdi, "an LFDI is exactly 40 hex digits")
    return digits.upper()


def same_lfdi(a: str, b: str) -> bool:
    """True if two LFDIs name the same device, ignoring case (peers disagree on it)."""
    return a.strip().casefold() == b.strip().casefold()
