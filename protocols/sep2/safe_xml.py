"""A deliberately small, safe XML reader: bytes → a tree of ``XmlNode``, nothing more.

Why not ``xml.etree`` or lxml: we want one place that *refuses* every XML feature 2030.5 never
uses, instead of configuring a general parser and hoping every option is right. The reader is built
on the stdlib expat binding with these rules:

* a size limit is checked before a single byte is parsed;
* the body must be UTF-8 (strictly decoded first) and any declared encoding must say UTF-8;
* any ``<!DOCTYPE`` is an error, so no entity can ever be declared: billion-laughs, external
  entities (XXE), parameter entities and external DTD fetches all die at the first token;
  entity/notation declarations and external entity references are also refused in case expat
  ever reports one without a DOCTYPE event;
* nesting deeper than ``MAX_DEPTH`` is refused (no 2030.5 document is deeper than ~8).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, NoReturn
from xml.parsers import expat

from protocols.sep2.errors import (
    DocumentTooLarge,
    InvalidEncoding,
    MalformedXml,
    XmlSecurityError,
)

__all__ = ["DEFAULT_MAX_BYTES", "MAX_DEPTH", "ParsedDocument", "XmlNode", "parse_document"]

DEFAULT_MAX_BYTES: Final = 256 * 1024
MAX_DEPTH: Final = 32

_UTF8_NAMES: Final = frozenset({"utf-8", "utf8"})
_DECL_ENCODING: Final = re.compile(rb"""^\s*<\?xml[^>]*?encoding\s*=\s*["']([^"']*)["']""")


@dataclass(slots=True)
class XmlNode:
    """One element: namespace URI ('' when none), local name, attributes and children.

    Attribute keys are the local name for unqualified attributes and ``{uri}local`` (Clark
    notation) for qualified ones such as ``xsi:type``. ``text`` is all character data directly
    inside the element, concatenated.
    """

    ns: str
    name: str
    attrs: dict[str, str]
    children: list[XmlNode] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    """The root element and every namespace URI the document declared (for version sniffing)."""

    root: XmlNode
    declared_namespaces: tuple[str, ...]


def _split(name: str) -> tuple[str, str]:
    # expat with namespace_separator=" " reports "uri local", or just "local" when unqualified.
    uri, sep, local = name.rpartition(" ")
    return (uri, local) if sep else ("", name)


class _Builder:
    def __init__(self) -> None:
        self.stack: list[XmlNode] = []
        self.root: XmlNode | None = None
        self.declared: list[str] = []

    def start(self, name: str, attributes: dict[str, str]) -> None:
        if len(self.stack) >= MAX_DEPTH:
            raise XmlSecurityError("nesting", f"deeper than {MAX_DEPTH} elements")
        ns, local = _split(name)
        attrs: dict[str, str] = {}
        for key, value in attributes.items():
            a_ns, a_local = _split(key)
            attrs[f"{{{a_ns}}}{a_local}" if a_ns else a_local] = value
        node = XmlNode(ns, local, attrs)
        if self.stack:
            self.stack[-1].children.append(node)
        else:
            self.root = node
        self.stack.append(node)

    def end(self, _name: str) -> None:
        self.stack.pop()

    def chars(self, data: str) -> None:
        if self.stack:
            self.stack[-1].text_parts.append(data)

    def namespace(self, _prefix: str | None, uri: str) -> None:
        self.declared.append(uri)


def _refuse(construct: str) -> Callable[..., NoReturn]:
    def handler(*_args: object) -> NoReturn:
        raise XmlSecurityError(construct)

    return handler


def _check_declared_encoding(data: bytes) -> None:
    match = _DECL_ENCODING.match(data[:200].removeprefix(b"\xef\xbb\xbf"))
    if match is not None and match.group(1).decode("ascii", "replace").lower() not in _UTF8_NAMES:
        raise InvalidEncoding(f"declared encoding {match.group(1).decode('ascii', 'replace')!r}")


def parse_document(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> ParsedDocument:
    """Parse ``data`` safely, or raise a ``Sep2Error`` subclass saying why not."""
    if len(data) > max_bytes:
        raise DocumentTooLarge(len(data), max_bytes)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEncoding(f"byte 0x{data[exc.start]:02X} at offset {exc.start}") from None
    _check_declared_encoding(data)

    builder = _Builder()
    # The encoding argument overrides whatever the document declares: we already checked it is
    # UTF-8, and this way expat can never switch to another decoder.
    parser = expat.ParserCreate(encoding="utf-8", namespace_separator=" ")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse("DTD")
    parser.EntityDeclHandler = _refuse("entity declaration")
    parser.UnparsedEntityDeclHandler = _refuse("unparsed entity declaration")
    parser.NotationDeclHandler = _refuse("notation declaration")
    parser.ExternalEntityRefHandler = _refuse("external entity reference")
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.chars
    parser.StartNamespaceDeclHandler = builder.namespace
    parser.buffer_text = True
    parser.ordered_attributes = False
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        reason = expat.errors.messages.get(exc.code, str(exc))
        raise MalformedXml(reason, exc.lineno, exc.offset) from None
    if builder.root is None:  # pragma: no cover - expat reports "no element found" first
        raise MalformedXml("no element found")
    return ParsedDocument(builder.root, tuple(dict.fromkeys(builder.declared)))
