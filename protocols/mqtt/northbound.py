"""Topics and JSON payloads of the Grid DERMS MQTT interface, ``derms/v1/{gateway_id}/...``.

Pure functions over bytes and models: the transport lives in :mod:`adapters.grid_derms.link`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel, ValidationError

from unified.feeds import FeedValue
from unified.model import COMMAND_ADAPTER, ID_PATTERN, SCHEMA_VERSION, Command, Reason
from unified.prices import PriceSchedule
from unified.registry import REGISTRY_REQUEST_ADAPTER, RegistryRequest
from unified.weather import WeatherForecast

MAX_COMMAND_BYTES = 256 * 1024
MAX_REGISTRY_BYTES = 16 * 1024 * 1024
"""10,000 enrolments of about 1 kB each, with room to spare."""
MAX_WEATHER_BYTES = 512 * 1024
MAX_PRICES_BYTES = 1024 * 1024
"""14 days of 5-minute points, with room for whitespace."""
API_ROOT = "derms/v1"


@dataclass(frozen=True, slots=True)
class Topics:
    gateway_id: str

    @property
    def root(self) -> str:
        return f"{API_ROOT}/{self.gateway_id}"

    @property
    def commands(self) -> str:
        return f"{self.root}/commands"

    def ack(self, command_id: str) -> str:
        return f"{self.root}/acks/{command_id}"

    def group_telemetry(self, group_id: str) -> str:
        return f"{self.root}/telemetry/groups/{group_id}"

    def device_telemetry(self, device_id: str) -> str:
        return f"{self.root}/telemetry/devices/{device_id}"

    @property
    def flex_requests(self) -> str:
        return f"{self.root}/requests/flex"

    def flex_forecast(self, group_id: str) -> str:
        return f"{self.root}/telemetry/flex/{group_id}"

    @property
    def performance_requests(self) -> str:
        return f"{self.root}/requests/performance"

    def performance(self, command_id: str) -> str:
        return f"{self.root}/performance/{command_id}"

    @property
    def registry_requests(self) -> str:
        return f"{self.root}/requests/registry"

    def registry_ack(self, request_id: str) -> str:
        return f"{self.root}/registry/acks/{request_id}"

    @property
    def registry_changes(self) -> str:
        return f"{self.root}/registry/changes"

    @property
    def registry_pending(self) -> str:
        return f"{self.root}/registry/pending"

    @property
    def registry_snapshot(self) -> str:
        return f"{self.root}/registry/snapshot"

    @property
    def weather(self) -> str:
        return f"{self.root}/weather"

    @property
    def prices(self) -> str:
        return f"{self.root}/prices"

    @property
    def feeds(self) -> str:
        """The subscription filter for every feed: ``{root}/feeds/{name}``."""
        return f"{self.root}/feeds/+"

    def feed_name(self, topic: str) -> str | None:
        """The feed a topic carries, or None if it is not a feed topic."""
        prefix = f"{self.root}/feeds/"
        return topic[len(prefix) :] if topic.startswith(prefix) else None

    @property
    def status(self) -> str:
        return f"{self.root}/status"

    @property
    def errors(self) -> str:
        return f"{self.root}/errors"


class CommandDecodeError(Exception):
    """An inbound payload that is not a valid command; ``command_id`` is set when one was found."""

    def __init__(self, reason: Reason, detail: str, command_id: str | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.command_id = command_id


def _format_errors(exc: ValidationError) -> str:
    parts = []
    errors = exc.errors(include_url=False)
    if len(errors) > 1:
        errors = [e for e in errors if e["type"] != "too_short"] or errors
    for err in errors[:8]:
        # The discriminated union puts the variant name first in loc; it adds nothing for a reader.
        loc = ".".join(
            str(p) for p in err["loc"] if p not in ("dispatch", "envelope", "setpoint", "cancel")
        )
        parts.append(f"{loc or '(root)'}: {err['msg']}")
    return "; ".join(parts)


_ID_RE: Final = re.compile(ID_PATTERN)

_WINDOW_FIELDS = frozenset({"duration_s", "ramp_s", "start", "end"})
_WINDOW_MESSAGES = ("after its start", "longer than duration_s", "overlap or are out of order")


def _is_window_error(exc: ValidationError) -> bool:
    """A time window that ends before it starts (or has no length) gets its own reason, when
    that is all that is wrong with the command."""
    # A list left empty by its invalid items is a consequence, not a second problem.
    errors = [e for e in exc.errors(include_url=False) if e["type"] != "too_short"]
    return bool(errors) and all(_window_error(err) for err in errors)


def _window_error(err: Any) -> bool:
    loc = err["loc"]
    if any(m in err["msg"] for m in _WINDOW_MESSAGES):
        return True
    return bool(
        loc and loc[-1] in ("duration_s",) and err["type"] in ("greater_than", "less_than_equal")
    )


MAX_TOPIC_BYTES: Final = 512


def response_topic_problem(topic: str, prefix: str, own_root: str) -> str | None:
    """Why an MQTT 5 *Response Topic* must not be used, or None when it may.

    A response topic is chosen by whoever sent the command: pointed at the gateway's own
    ``commands`` topic, its acks would come back in as commands; pointed at a device's command
    topic, the gateway would publish there. So it must lie under the configured ``prefix``, never
    under the gateway's own tree, and be a plain topic name (no wildcard, no NUL)."""
    if len(topic.encode("utf-8", errors="replace")) > MAX_TOPIC_BYTES:
        return f"response topic longer than {MAX_TOPIC_BYTES} bytes"
    if any(c in topic for c in "+#\x00"):
        return "response topic contains a wildcard or NUL"
    if topic == own_root or topic.startswith(own_root.rstrip("/") + "/"):
        return f"response topic {topic!r} is inside the gateway's own topics"
    if not topic.startswith(prefix):
        return f"response topic {topic!r} is not under {prefix!r}"
    return None


def _load_json(payload: bytes) -> Any:
    """``json.loads``, with nesting too deep for the parser (a few hundred kB of ``[``) said as
    the ``ValueError`` every other unparseable payload is, not a ``RecursionError``."""
    try:
        return json.loads(payload)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def decode_command(payload: bytes) -> Command:
    """Parse and validate one command; raise :class:`CommandDecodeError` with a precise reason."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandDecodeError(
            Reason.PAYLOAD_TOO_LARGE, f"{len(payload)} bytes exceeds {MAX_COMMAND_BYTES}"
        )
    try:
        raw = _load_json(payload)
    except ValueError as exc:
        raise CommandDecodeError(Reason.MALFORMED_JSON, str(exc)) from None
    if not isinstance(raw, dict):
        raise CommandDecodeError(Reason.SCHEMA_VIOLATION, "a command must be a JSON object")
    command_id = raw.get("command_id")
    if not isinstance(command_id, str) or _ID_RE.fullmatch(command_id) is None:
        # Not an identifier (empty, too long, "bad id/#"): the command cannot be answered on an
        # ack topic of its own (nor must its id become part of a topic): errors, without it.
        if isinstance(command_id, str) and command_id:
            try:
                COMMAND_ADAPTER.validate_python(raw)
            except ValidationError as exc:
                detail = _format_errors(exc)
            else:  # pragma: no cover - the id alone fails validation
                detail = "command_id: not an identifier"
            raise CommandDecodeError(Reason.SCHEMA_VIOLATION, detail)
        command_id = None
    version = raw.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise CommandDecodeError(
            Reason.UNSUPPORTED_VERSION,
            f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION!r})",
            command_id,
        )
    try:
        return COMMAND_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        reason = Reason.WINDOW_INVALID if _is_window_error(exc) else Reason.SCHEMA_VIOLATION
        raise CommandDecodeError(reason, _format_errors(exc), command_id) from None


class _InboundDecodeError(Exception):
    """An inbound message that is not valid; nothing of it is used."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class WeatherDecodeError(_InboundDecodeError):
    """An inbound weather forecast that is not valid; nothing of it is used."""


class FeedDecodeError(_InboundDecodeError):
    """An inbound feed value that is not valid; nothing of it is used."""


class PricesDecodeError(_InboundDecodeError):
    """An inbound price schedule that is not valid; nothing of it is used."""


def _inbound_object(
    payload: bytes, max_bytes: int, what: str, error: type[_InboundDecodeError]
) -> dict[str, Any]:
    """The JSON object of one inbound message, size, syntax and schema version checked."""
    if len(payload) > max_bytes:
        raise error(Reason.PAYLOAD_TOO_LARGE, f"{len(payload)} bytes exceeds {max_bytes}")
    try:
        raw = _load_json(payload)
    except ValueError as exc:
        raise error(Reason.MALFORMED_JSON, str(exc)) from None
    if not isinstance(raw, dict):
        raise error(Reason.SCHEMA_VIOLATION, f"{what} must be an object")
    version = raw.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise error(
            Reason.UNSUPPORTED_VERSION,
            f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION!r})",
        )
    return raw


def decode_weather(payload: bytes) -> WeatherForecast:
    """Parse and validate one weather forecast; raise :class:`WeatherDecodeError`."""
    raw = _inbound_object(payload, MAX_WEATHER_BYTES, "a weather forecast", WeatherDecodeError)
    try:
        # json.loads lets NaN and Infinity through; the model rejects them (not finite).
        return WeatherForecast.model_validate(raw)
    except ValidationError as exc:
        raise WeatherDecodeError(Reason.SCHEMA_VIOLATION, _format_errors(exc)) from None


MAX_FEED_BYTES: Final = 4096


def decode_feed(payload: bytes, name: str) -> FeedValue:
    """Parse and validate one feed value published on ``feeds/{name}``: a JSON object
    (``value``, ``timestamp``, optional ``valid_s``, ``unit``); a ``name`` in it must be the
    topic's. Raise :class:`FeedDecodeError`."""
    raw = _inbound_object(payload, MAX_FEED_BYTES, "a feed value", FeedDecodeError)
    if raw.setdefault("name", name) != name:
        raise FeedDecodeError(
            Reason.SCHEMA_VIOLATION, f"name {raw['name']!r} is not the topic's {name!r}"
        )
    try:
        return FeedValue.model_validate(raw)
    except ValidationError as exc:
        raise FeedDecodeError(Reason.SCHEMA_VIOLATION, _format_errors(exc)) from None


def decode_prices(payload: bytes) -> PriceSchedule:
    """Parse and validate one price schedule; raise :class:`PricesDecodeError`."""
    raw = _inbound_object(payload, MAX_PRICES_BYTES, "a price schedule", PricesDecodeError)
    try:
        return PriceSchedule.model_validate(raw)
    except ValidationError as exc:
        raise PricesDecodeError(Reason.SCHEMA_VIOLATION, _format_errors(exc)) from None


class RegistryDecodeError(Exception):
    """An inbound registry request that is not valid; ``request_id`` is set when one was
    found (the refusal then goes to that request's ack topic)."""

    def __init__(self, reason: Reason, detail: str, request_id: str | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.request_id = request_id


def decode_registry_request(payload: bytes) -> RegistryRequest:
    """Parse and validate one registry request; raise :class:`RegistryDecodeError`."""
    if len(payload) > MAX_REGISTRY_BYTES:
        raise RegistryDecodeError(
            Reason.PAYLOAD_TOO_LARGE, f"{len(payload)} bytes exceeds {MAX_REGISTRY_BYTES}"
        )
    try:
        raw = _load_json(payload)
    except ValueError as exc:
        raise RegistryDecodeError(Reason.MALFORMED_JSON, str(exc)) from None
    if not isinstance(raw, dict):
        raise RegistryDecodeError(Reason.SCHEMA_VIOLATION, "a registry request must be an object")
    request_id = raw.get("request_id")
    if not isinstance(request_id, str) or _ID_RE.fullmatch(request_id) is None:
        request_id = None
    version = raw.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise RegistryDecodeError(
            Reason.UNSUPPORTED_VERSION,
            f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION!r})",
            request_id,
        )
    try:
        return REGISTRY_REQUEST_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise RegistryDecodeError(
            Reason.SCHEMA_VIOLATION, _format_errors(exc), request_id
        ) from None


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json(exclude_none=True).encode()
