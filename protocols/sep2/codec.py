"""Decode and encode IEEE 2030.5 XML documents: bytes ⇄ models, no I/O.

* ``decode`` picks the model from the root element; ``decode_as`` insists on one model class;
  ``decode_document`` also reports which CSIP-AUS namespace the sender used.
* ``encode`` writes compact UTF-8 XML with no declaration, the 2030.5 namespace as the default
  namespace and the ``csipaus`` prefix for CSIP-AUS elements, bound to the URI of the version
  chosen by the caller (v1.2 ``https://csipaus.org/ns`` by default, v1.3 on request).

Decoding is tolerant where tolerance is harmless and strict where it is not: children may come in
any order (envoy itself reads in any order, so peers may too); unknown elements are skipped,
except inside ``DERControlBase`` where an unknown control is an error; CSIP-AUS elements are
accepted in either CSIP-AUS namespace; a required field that is missing or a value out of its XSD
range is an ``InvalidValue`` naming its path.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Final, Literal, TypeVar, Union, get_args, get_origin

from pydantic import ValidationError

from protocols.sep2.errors import (
    InvalidValue,
    UnexpectedElement,
    WrongNamespace,
)
from protocols.sep2.models import ROOT_MODELS
from protocols.sep2.safe_xml import DEFAULT_MAX_BYTES, XmlNode, parse_document
from protocols.sep2.schema import (
    CSIPAUS_NS,
    CSIPAUS_V13_NS,
    SEP_NS,
    XSI_NS,
    Attribute,
    CsipAusVersion,
    Element,
    NsKind,
    Sep2Model,
)

__all__ = [
    "MEDIA_TYPE",
    "Decoded",
    "check_media_type",
    "decode",
    "decode_as",
    "decode_document",
    "encode",
]

MEDIA_TYPE: Final = "application/sep+xml"

M = TypeVar("M", bound=Sep2Model)

_CSIPAUS_URIS: Final = (CSIPAUS_NS, CSIPAUS_V13_NS)
_XSI_TYPE: Final = f"{{{XSI_NS}}}type"
_INTEGER: Final = re.compile(r"^[+-]?[0-9]+$")
_MAX_INTEGER_CHARS: Final = 64
"""No 2030.5 integer is longer (UInt64 has 20 digits); a longer one is out of range without
asking ``int()``, which refuses more than 4300 digits with a bare ``ValueError``."""
# XML 1.0 forbids these characters outright; refuse to write them rather than emit bad XML.
_FORBIDDEN_CHARS: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def check_media_type(header: str | None) -> bool:
    """True if a Content-Type/Accept value is ``application/sep+xml``, with any parameters.

    Envoy v2.x labels bodies ``application/sep+xml; csipaus=1.3-beta_storage`` and a level
    parameter (``; level=-S1``) is common, so parameters are ignored; the type itself is compared
    case-insensitively as RFC 9110 requires.
    """
    if header is None:
        return False
    essence = header.split(";", 1)[0].strip().lower()
    return essence == MEDIA_TYPE


# --------------------------------------------------------------------------- field specs

_Scalar = Literal["int", "bool", "str"]


@dataclass(frozen=True, slots=True)
class _FieldSpec:
    field: str
    xml_name: str
    ns: NsKind
    is_attr: bool
    scalar: _Scalar | None  # set for scalar fields
    model: type[Sep2Model] | None  # set for (tuples of) child models
    repeated: bool
    polymorphic: bool
    aliases: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _ModelSpec:
    attrs: tuple[_FieldSpec, ...]
    elements: tuple[_FieldSpec, ...]
    by_name: dict[tuple[str, str], _FieldSpec]  # ("sep"|"csipaus", local name) → spec


def _strip_annotated(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _classify(tp: Any) -> tuple[_Scalar | None, type[Sep2Model] | None, bool]:
    tp = _strip_annotated(tp)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        if len(members) != 1:  # pragma: no cover - models never declare such unions
            raise TypeError(f"unsupported union {tp!r}")
        return _classify(members[0])
    if origin is tuple:
        _, model, _ = _classify(get_args(tp)[0])
        return None, model, True
    if isinstance(tp, type) and issubclass(tp, Sep2Model):
        return None, tp, False
    if tp is bool:
        return "bool", None, False
    if tp is int:
        return "int", None, False
    if tp is str:
        return "str", None, False
    raise TypeError(f"unsupported field type {tp!r}")  # pragma: no cover - programming error


def _ns_group(kind: NsKind) -> str:
    return "sep" if kind is NsKind.SEP else "csipaus"


@cache
def _spec(cls: type[Sep2Model]) -> _ModelSpec:
    attrs: list[_FieldSpec] = []
    elements: list[_FieldSpec] = []
    for name, info in cls.model_fields.items():
        marker = next((m for m in info.metadata if isinstance(m, Element | Attribute)), None)
        if marker is None:  # pragma: no cover - programming error caught by the fixture tests
            raise TypeError(f"{cls.__name__}.{name} has no XML marker")
        scalar, model, repeated = _classify(info.annotation)
        if isinstance(marker, Attribute):
            attrs.append(
                _FieldSpec(name, marker.name, NsKind.SEP, True, scalar, None, False, False, ())
            )
        else:
            elements.append(
                _FieldSpec(
                    name,
                    marker.name,
                    marker.ns,
                    False,
                    scalar,
                    model,
                    repeated,
                    marker.polymorphic,
                    marker.aliases,
                )
            )
    by_name: dict[tuple[str, str], _FieldSpec] = {}
    for spec in elements:
        for xml_name in (spec.xml_name, *spec.aliases):
            by_name[(_ns_group(spec.ns), xml_name)] = spec
    return _ModelSpec(tuple(attrs), tuple(elements), by_name)


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded model plus the CSIP-AUS namespace the sender used (``None`` if it used none).

    ``csipaus`` is the namespace of the CSIP-AUS elements in the document, or failing that the
    one bound on the root (envoy declares ``xmlns:csipaus`` on every root, used or not), so a
    client can tell a v1.3 server from a v1.2 one by its ``/dcap``.
    """

    model: Sep2Model
    csipaus: CsipAusVersion | None


class _DecodeContext:
    def __init__(self) -> None:
        self.csipaus_seen: list[str] = []


def _parse_scalar(kind: _Scalar, text: str, path: str) -> int | bool | str:
    if kind == "str":
        return text
    stripped = text.strip()
    if kind == "int":
        # Not int(): it accepts "1_000" and non-ASCII digits, which XSD integers do not.
        if not _INTEGER.match(stripped):
            raise InvalidValue(path, text, "not an integer")
        if len(stripped) > _MAX_INTEGER_CHARS:
            shown = f"{stripped[:24]}... ({len(stripped)} characters)"
            raise InvalidValue(path, shown, "out of range")
        return int(stripped)
    if stripped in ("true", "1"):
        return True
    if stripped in ("false", "0"):
        return False
    raise InvalidValue(path, text, "not a boolean (true/false/1/0)")


def _group_of(uri: str) -> str | None:
    if uri == SEP_NS:
        return "sep"
    if uri in _CSIPAUS_URIS:
        return "csipaus"
    return None


def _decode_model(cls: type[M], node: XmlNode, path: str, ctx: _DecodeContext) -> M:
    spec = _spec(cls)
    values: dict[str, Any] = {}
    for attr in spec.attrs:
        raw = node.attrs.get(attr.xml_name)
        if raw is not None and attr.scalar is not None:
            values[attr.field] = _parse_scalar(attr.scalar, raw, f"{path}/@{attr.xml_name}")

    repeated: dict[str, list[Any]] = {}
    source: dict[str, str] = {}  # singular field → the element name that supplied it
    for child in node.children:
        group = _group_of(child.ns)
        field = spec.by_name.get((group, child.name)) if group is not None else None
        if field is None:
            if cls.strict_children:
                expected = [f.xml_name for f in spec.elements]
                raise UnexpectedElement(child.name, expected, path)
            continue  # unknown or foreign-namespace element: 2030.5 extensibility, skip it
        if group == "csipaus":
            ctx.csipaus_seen.append(child.ns)
        child_path = f"{path}/{child.name}"
        value = _decode_child(field, child, child_path, ctx)
        if field.repeated:
            repeated.setdefault(field.field, []).append(value)
            continue
        previous = source.get(field.field)
        if previous is not None:
            # A legacy alias never overrides the current name (ConnectionPoint: <csipaus:id>
            # vs <csipaus:connectionPointId>); two of one element is an error, not "last wins".
            if previous == field.xml_name and child.name != field.xml_name:
                continue
            if previous == child.name:
                raise InvalidValue(child_path, child.name, "element may appear only once")
        values[field.field] = value
        source[field.field] = child.name
    for name, items in repeated.items():
        values[name] = tuple(items)

    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise _invalid(cls, exc, path, values) from None


def _decode_child(field: _FieldSpec, child: XmlNode, path: str, ctx: _DecodeContext) -> Any:
    if field.scalar is not None:
        return _parse_scalar(field.scalar, child.text, path)
    if field.polymorphic:
        raw_type = child.attrs.get(_XSI_TYPE)
        if raw_type is None:
            raise InvalidValue(f"{path}/@xsi:type", None, "polymorphic element without xsi:type")
        # The prefix of a QName value cannot be resolved after parsing; 2030.5 resources all
        # live in one namespace, so the local part names the type. Envoy sends no prefix.
        local = raw_type.strip().rpartition(":")[2]
        model = ROOT_MODELS.get(local)
        if model is None:
            raise InvalidValue(f"{path}/@xsi:type", raw_type, "unknown resource type")
        return _decode_model(model, child, path, ctx)
    assert field.model is not None
    return _decode_model(field.model, child, path, ctx)


def _invalid(
    cls: type[Sep2Model], exc: ValidationError, path: str, values: dict[str, Any]
) -> InvalidValue:
    error = exc.errors()[0]
    loc = error["loc"]
    field_name = str(loc[0]) if loc else ""
    spec = _spec(cls)
    xml_name = field_name
    for f in (*spec.attrs, *spec.elements):
        if f.field == field_name:
            xml_name = f"@{f.xml_name}" if f.is_attr else f.xml_name
    if error["type"] == "missing":
        return InvalidValue(f"{path}/{xml_name}", None, "required but missing")
    return InvalidValue(f"{path}/{xml_name}", values.get(field_name), error["msg"])


def _expected_roots(cls: type[Sep2Model] | None) -> list[str]:
    if cls is None:
        return sorted(ROOT_MODELS)
    return sorted(tag for tag, model in ROOT_MODELS.items() if issubclass(model, cls))


def _decode_root(
    data: bytes, cls: type[Sep2Model] | None, max_bytes: int
) -> tuple[Sep2Model, CsipAusVersion | None]:
    document = parse_document(data, max_bytes=max_bytes)
    root = document.root
    model = ROOT_MODELS.get(root.name)
    group = _group_of(root.ns)
    if model is not None:
        wanted = SEP_NS if model.xml_ns is NsKind.SEP else _CSIPAUS_URIS
        if _group_of(root.ns) != _ns_group(model.xml_ns):
            raise WrongNamespace(root.ns, wanted, root.name)
    elif group is None:
        raise WrongNamespace(root.ns, SEP_NS, root.name)
    if model is None or (cls is not None and not issubclass(model, cls)):
        raise UnexpectedElement(root.name, _expected_roots(cls))
    ctx = _DecodeContext()
    if group == "csipaus":
        ctx.csipaus_seen.append(root.ns)
    decoded = _decode_model(model, root, root.name, ctx)
    used = ctx.csipaus_seen or [u for u in document.declared_namespaces if u in _CSIPAUS_URIS]
    return decoded, (CsipAusVersion(used[0]) if used else None)


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Sep2Model:
    """Decode any supported 2030.5 document; the root element picks the model."""
    return _decode_root(data, None, max_bytes)[0]


def decode_as(cls: type[M], data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> M:
    """Decode a document that must be a ``cls`` (or a subclass, e.g. DERControlResponse for
    Response); any other root is ``UnexpectedElement``."""
    model, _ = _decode_root(data, cls, max_bytes)
    assert isinstance(model, cls)
    return model


def decode_document(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Decoded:
    """Like ``decode``, also reporting the CSIP-AUS namespace version the sender used."""
    model, version = _decode_root(data, None, max_bytes)
    return Decoded(model, version)


# --------------------------------------------------------------------------- encoding


class _EncodeContext:
    def __init__(self, csipaus: CsipAusVersion) -> None:
        self.csipaus = csipaus
        self.uses_csipaus = False
        self.uses_xsi = False


def _escape_text(text: str, path: str) -> str:
    if _FORBIDDEN_CHARS.search(text):
        raise InvalidValue(path, text, "contains a character XML 1.0 cannot carry")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _escape_attr(text: str, path: str) -> str:
    escaped = _escape_text(text, path).replace('"', "&quot;")
    return escaped.replace("\t", "&#9;").replace("\n", "&#10;").replace("\r", "&#13;")


def _format_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _qname(kind: NsKind, name: str, ctx: _EncodeContext, path: str, value: object) -> str:
    if kind is NsKind.SEP:
        return name
    if kind is NsKind.CSIPAUS_V13 and ctx.csipaus is not CsipAusVersion.V1_3:
        raise InvalidValue(
            path, value, f"element exists only in CSIP-AUS v1.3 ({CsipAusVersion.V1_3.value})"
        )
    ctx.uses_csipaus = True
    return f"csipaus:{name}"


def _encode_model(
    model: Sep2Model,
    qname: str,
    out: list[str],
    ctx: _EncodeContext,
    path: str,
    extra_attrs: str = "",
) -> None:
    spec = _spec(type(model))
    attrs = [extra_attrs] if extra_attrs else []
    for attr in spec.attrs:
        value = getattr(model, attr.field)
        if value is not None:
            text = _escape_attr(_format_scalar(value), f"{path}/@{attr.xml_name}")
            attrs.append(f' {attr.xml_name}="{text}"')
    body: list[str] = []
    for element in spec.elements:
        value = getattr(model, element.field)
        if value is None or (element.repeated and not value):
            continue
        child_path = f"{path}/{element.xml_name}"
        child_qname = _qname(element.ns, element.xml_name, ctx, child_path, value)
        if element.scalar is not None:
            text = _escape_text(_format_scalar(value), child_path)
            # Scalars always get an end tag, so an empty string stays visibly "present but
            # empty" (<description></description>, as envoy writes it).
            body.append(f"<{child_qname}>{text}</{child_qname}>")
        elif element.repeated:
            for item in value:
                _encode_model(item, child_qname, body, ctx, child_path)
        elif element.polymorphic:
            ctx.uses_xsi = True
            xsi = f' xsi:type="{type(value).xml_tag}"'
            _encode_model(value, child_qname, body, ctx, child_path, xsi)
        else:
            _encode_model(value, child_qname, body, ctx, child_path)
    start = f"<{qname}{''.join(attrs)}"
    if body:
        out.append(f"{start}>{''.join(body)}</{qname}>")
    else:
        out.append(f"{start}/>")


def encode(
    model: Sep2Model,
    *,
    csipaus: CsipAusVersion = CsipAusVersion.V1_2,
    declare_all_namespaces: bool = False,
) -> bytes:
    """Encode a root model as compact UTF-8 XML with no declaration.

    ``csipaus`` binds the ``csipaus`` prefix; a v1.3-only element (e.g. opModStorageTargetW)
    with ``csipaus=V1_2`` is an ``InvalidValue`` rather than a document a v1.2 peer would
    misread. By default only the namespaces in use are declared; ``declare_all_namespaces``
    declares ``xmlns``, ``xmlns:csipaus`` and ``xmlns:xsi`` on every root, as envoy does, which
    makes our output byte-identical to envoy's for the same content.
    """
    cls = type(model)
    if not cls.xml_tag or ROOT_MODELS.get(cls.xml_tag) is not cls:
        raise InvalidValue(cls.__name__, model, "not a 2030.5 document root model")
    ctx = _EncodeContext(csipaus)
    root_qname = cls.xml_tag
    if cls.xml_ns is not NsKind.SEP:
        root_qname = _qname(cls.xml_ns, cls.xml_tag, ctx, cls.xml_tag, model)
    out: list[str] = []
    # Encode with a placeholder for the namespace declarations: whether csipaus/xsi are needed
    # is only known once the whole tree has been walked.
    _encode_model(model, root_qname, out, ctx, cls.xml_tag, "\x00")
    namespaces = f' xmlns="{SEP_NS}"'
    if ctx.uses_csipaus or declare_all_namespaces:
        namespaces += f' xmlns:csipaus="{csipaus.value}"'
    if ctx.uses_xsi or declare_all_namespaces:
        namespaces += f' xmlns:xsi="{XSI_NS}"'
    document = out[0].replace("\x00", namespaces, 1)
    return document.encode("utf-8")
