"""OpenADR 2.0b messages: openleadr's templates and parser behind two functions (no I/O).

openleadr's message layer (jinja templates → XML, XSD validation, xmltodict → snake_case dicts)
is sound; its client swallows every error into ``(None, {})`` and logs whole payloads at INFO.
So the VEN uses only this layer, through :func:`encode` and :func:`decode`, which raise
:class:`OadrMessageError` subclasses with the cause as attributes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from html import escape
from typing import Any, Final

from openleadr import messaging  # type: ignore[import-untyped]

__all__ = [
    "MAX_MESSAGE_BYTES",
    "InvalidMessage",
    "MessageTooLarge",
    "OadrMessageError",
    "UnsafeMessage",
    "as_list",
    "decode",
    "encode",
    "quiet_openleadr",
    "xml_text",
]

MAX_MESSAGE_BYTES: Final = 1_000_000
"""A distribution of many events with many intervals is a few hundred kB at most."""


def quiet_openleadr() -> None:
    """openleadr logs whole payloads at INFO (and its client module resets its logger to INFO
    on import): keep only its warnings."""
    logging.getLogger("openleadr").setLevel(logging.WARNING)


quiet_openleadr()


class OadrMessageError(Exception):
    """A message could not be built or read."""


class MessageTooLarge(OadrMessageError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class UnsafeMessage(OadrMessageError):
    """The body declares a DTD: OpenADR never needs one, and refusing it stops entity tricks."""

    def __init__(self, construct: str) -> None:
        super().__init__(f"forbidden XML construct {construct}")
        self.construct = construct


class InvalidMessage(OadrMessageError):
    """Not well-formed, not valid against the OpenADR 2.0b schema, or not understood."""

    def __init__(self, detail: str, message_type: str | None = None) -> None:
        super().__init__(detail if message_type is None else f"{message_type}: {detail}")
        self.detail = detail
        self.message_type = message_type


def encode(message_type: str, payload: Mapping[str, Any]) -> bytes:
    """Render ``message_type`` (e.g. ``oadrPoll``) from an openleadr-style payload, unsigned."""
    try:
        text = messaging.create_message(message_type, **payload)
    except Exception as exc:  # jinja / preflight errors: a bug on our side, say which message
        raise InvalidMessage(f"{type(exc).__name__}: {exc}", message_type) from exc
    return str(text).encode("utf-8")


def decode(body: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[str, dict[str, Any]]:
    """Validate ``body`` against the 2.0b schema and parse it: ``(message_type, payload)``."""
    if len(body) > max_bytes:
        raise MessageTooLarge(len(body), max_bytes)
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise UnsafeMessage("<!DOCTYPE")
    try:
        messaging.validate_xml_schema(body)
    except Exception as exc:
        raise InvalidMessage(f"schema validation failed: {exc}") from exc
    try:
        message_type, payload = messaging.parse_message(body)
    except Exception as exc:
        raise InvalidMessage(f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidMessage("payload is not a structure", str(message_type))
    return str(message_type), payload


def xml_text(value: object) -> str:
    """openleadr renders with jinja without autoescaping: escape anything we echo back."""
    return escape(str(value))


def as_list(value: object) -> list[Any]:
    """xmltodict gives one child as itself and several as a list: always a list."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
