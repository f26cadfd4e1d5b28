"""Errors of the IEEE 2030.5 codec. Each carries what went wrong as attributes, not only text.

A server maps these to HTTP statuses at its boundary (``DocumentTooLarge`` → 413, the rest of the
decode errors → 400), so every one names the offending thing in a field a caller can log or echo.
"""

# The names say what went wrong (``WrongNamespace``, ``DocumentTooLarge``); an ``Error`` suffix on
# each would add nothing, as in protocols.sunspec.errors.

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "DocumentTooLarge",
    "InvalidCertificate",
    "InvalidEncoding",
    "InvalidValue",
    "MalformedXml",
    "Sep2Error",
    "UnexpectedElement",
    "WrongNamespace",
    "XmlSecurityError",
]


class Sep2Error(Exception):
    """Base class of every IEEE 2030.5 codec error."""


class XmlSecurityError(Sep2Error):
    """The document uses an XML feature we refuse outright (DTD, entities, absurd nesting).

    2030.5 documents never need a DTD, so any ``<!DOCTYPE`` is rejected before an entity can be
    declared: that one rule stops billion-laughs, external entities (XXE) and parameter entities.
    """

    def __init__(self, construct: str, detail: str = "") -> None:
        super().__init__(
            f"forbidden XML construct: {construct}" + (f" ({detail})" if detail else "")
        )
        self.construct = construct
        self.detail = detail


class DocumentTooLarge(Sep2Error):
    """The body is larger than the caller's limit; nothing was parsed."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"document of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class InvalidEncoding(Sep2Error):
    """The body is not UTF-8 (2030.5 allows nothing else)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"not a UTF-8 document: {reason}")
        self.reason = reason


class MalformedXml(Sep2Error):
    """The body is not well-formed XML."""

    def __init__(self, reason: str, line: int = 0, column: int = 0) -> None:
        super().__init__(f"malformed XML at line {line}, column {column}: {reason}")
        self.reason = reason
        self.line = line
        self.column = column


class WrongNamespace(Sep2Error):
    """An element that should be in ``expected`` namespace(s) is in ``found`` ('' = none)."""

    def __init__(self, found: str, expected: str | Sequence[str], element: str = "") -> None:
        wanted = (expected,) if isinstance(expected, str) else tuple(expected)
        where = f" on <{element}>" if element else ""
        super().__init__(f"namespace {found!r}{where}, expected {' or '.join(map(repr, wanted))}")
        self.found = found
        self.expected = wanted
        self.element = element


class UnexpectedElement(Sep2Error):
    """An element that is not allowed where it was found (wrong root, unknown control, ...)."""

    def __init__(self, found: str, expected: Sequence[str], path: str = "") -> None:
        shown = ", ".join(expected[:12]) + (", ..." if len(expected) > 12 else "")
        where = f" in {path}" if path else ""
        super().__init__(f"unexpected element <{found}>{where}; expected one of: {shown}")
        self.found = found
        self.expected = tuple(expected)
        self.path = path


class InvalidValue(Sep2Error):
    """A value at ``path`` (e.g. ``DERControl/DERControlBase/opModExpLimW/value``) is not valid."""

    def __init__(self, path: str, value: object, reason: str) -> None:
        super().__init__(f"invalid value {value!r} at {path}: {reason}")
        self.path = path
        self.value = value
        self.reason = reason


class InvalidCertificate(Sep2Error):
    """Bytes given as a certificate are neither a PEM nor a DER X.509 certificate."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"not an X.509 certificate: {reason}")
        self.reason = reason
