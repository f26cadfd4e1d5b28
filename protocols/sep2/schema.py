"""How a model maps to XML: namespaces, field markers, the model base class and XSD primitives.

Models declare their XML shape with ``Annotated`` markers instead of a separate mapping table, so
the Python field and its wire name sit on one line:

    op_mod_exp_lim_w: Annotated[ActivePower | None, Element("opModExpLimW", CSIPAUS)] = None

Fields are written in declaration order, which is the XSD sequence order (2030.5 is
order-sensitive on the wire even though envoy itself reads in any order). Decoding matches children
by name, so a sender's order does not matter to us either.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, ClassVar, Final

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = [
    "CSIPAUS",
    "CSIPAUS_NS",
    "CSIPAUS_V13",
    "CSIPAUS_V13_NS",
    "SEP",
    "SEP_NS",
    "XSI_NS",
    "Attribute",
    "CsipAusVersion",
    "Element",
    "HexBinary8",
    "HexBinary16",
    "HexBinary32",
    "HexBinary48",
    "HexBinary64",
    "HexBinary128",
    "HexBinary160",
    "Int8",
    "Int16",
    "Int32",
    "Int48",
    "Int64",
    "NsKind",
    "PerCent",
    "PowerOfTenMultiplier",
    "Sep2Model",
    "SignedPerCent",
    "TimeType",
    "UInt8",
    "UInt16",
    "UInt32",
    "UInt40",
    "UInt48",
    "UInt64",
]

SEP_NS: Final = "urn:ieee:std:2030.5:ns"
CSIPAUS_NS: Final = "https://csipaus.org/ns"
CSIPAUS_V13_NS: Final = "https://csipaus.org/ns/v1.3"
XSI_NS: Final = "http://www.w3.org/2001/XMLSchema-instance"


class CsipAusVersion(enum.StrEnum):
    """Which CSIP-AUS namespace URI the ``csipaus:`` prefix is bound to on the wire."""

    V1_2 = CSIPAUS_NS
    V1_3 = CSIPAUS_V13_NS


class NsKind(enum.Enum):
    """Where an element lives. ``CSIPAUS_V13`` = CSIP-AUS element that only v1.3 defines."""

    SEP = "sep"
    CSIPAUS = "csipaus"
    CSIPAUS_V13 = "csipaus-v1.3"


SEP: Final = NsKind.SEP
CSIPAUS: Final = NsKind.CSIPAUS
CSIPAUS_V13: Final = NsKind.CSIPAUS_V13


@dataclass(frozen=True, slots=True)
class Element:
    """Marks a field as a child element ``name`` in namespace kind ``ns``.

    ``aliases`` are other local names accepted on decode (never written). ``polymorphic`` marks a
    field whose concrete model is chosen by ``xsi:type`` (Notification/Resource).
    """

    name: str
    ns: NsKind = NsKind.SEP
    aliases: tuple[str, ...] = ()
    polymorphic: bool = False


@dataclass(frozen=True, slots=True)
class Attribute:
    """Marks a field as an unqualified XML attribute ``name``."""

    name: str


class Sep2Model(BaseModel):
    """Base of every 2030.5 model: immutable, no unknown fields, hashable-by-value equality.

    ``xml_tag``/``xml_ns`` name the element when the model is a document root (or the
    ``xsi:type`` of a notification resource). ``strict_children`` makes unknown child elements an
    error instead of being ignored: used where silently dropping an element would be unsafe.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    xml_tag: ClassVar[str] = ""
    xml_ns: ClassVar[NsKind] = NsKind.SEP
    strict_children: ClassVar[bool] = False


# XSD primitives of sep.xsd as constrained types. Ranges are enforced on decode and construction.
UInt8 = Annotated[int, Field(ge=0, le=0xFF)]
UInt16 = Annotated[int, Field(ge=0, le=0xFFFF)]
UInt32 = Annotated[int, Field(ge=0, le=0xFFFF_FFFF)]
UInt40 = Annotated[int, Field(ge=0, le=0xFF_FFFF_FFFF)]
UInt48 = Annotated[int, Field(ge=0, le=0xFFFF_FFFF_FFFF)]
UInt64 = Annotated[int, Field(ge=0, le=0xFFFF_FFFF_FFFF_FFFF)]
Int8 = Annotated[int, Field(ge=-0x80, le=0x7F)]
Int16 = Annotated[int, Field(ge=-0x8000, le=0x7FFF)]
Int32 = Annotated[int, Field(ge=-0x8000_0000, le=0x7FFF_FFFF)]
Int48 = Annotated[int, Field(ge=-0x8000_0000_0000, le=0x7FFF_FFFF_FFFF)]
Int64 = Annotated[int, Field(ge=-0x8000_0000_0000_0000, le=0x7FFF_FFFF_FFFF_FFFF)]
TimeType = Int64
"""Seconds since the Unix epoch, UTC."""
PowerOfTenMultiplier = Annotated[int, Field(ge=-9, le=9)]
PerCent = Annotated[int, Field(ge=0, le=10000)]
"""Hundredths of a percent, 0..10000 (10000 = 100 %)."""
SignedPerCent = Annotated[int, Field(ge=-10000, le=10000)]
"""Hundredths of a percent, -10000..10000."""


def _hex(max_digits: int) -> object:
    # hexBinary has whiteSpace=collapse in XSD, so surrounding whitespace is not part of the value.
    # Case and length are kept exactly as received: envoy shortens values ("00" for a 32-bit
    # alarmStatus) and mixes cases (uppercase device LFDIs, lowercase seed LFDIs and mRIDs), and
    # an echo of a value (Response.subject) must be byte-identical. Compare hex with
    # ``int(x, 16)`` or case-insensitively, never as raw strings.
    return StringConstraints(
        strip_whitespace=True, pattern=r"^[0-9A-Fa-f]*$", max_length=max_digits
    )


HexBinary8 = Annotated[str, _hex(2)]
HexBinary16 = Annotated[str, _hex(4)]
HexBinary32 = Annotated[str, _hex(8)]
HexBinary48 = Annotated[str, _hex(12)]
HexBinary64 = Annotated[str, _hex(16)]
HexBinary128 = Annotated[str, _hex(32)]
HexBinary160 = Annotated[str, _hex(40)]
