"""Hostile and broken input: each case raises its specific error and decodes nothing."""

from __future__ import annotations

import pytest

from protocols.sep2 import (
    DEFAULT_MAX_BYTES,
    DERControl,
    DocumentTooLarge,
    EndDevice,
    Error,
    InvalidEncoding,
    InvalidValue,
    MalformedXml,
    Response,
    Sep2Error,
    UnexpectedElement,
    WrongNamespace,
    XmlSecurityError,
    decode,
    decode_as,
)
from tests.protocols.sep2.envoy_fixtures import load

SEP = b'xmlns="urn:ieee:std:2030.5:ns"'

BILLION_LAUGHS = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + b"".join(
        f' <!ENTITY lol{i} "{f"&lol{i - 1};" * 10 if i > 1 else "&lol;" * 10}">\n'.encode()
        for i in range(1, 10)
    )
    + b"]>\n<Error "
    + SEP
    + b"><reasonCode>0</reasonCode><message>&lol9;</message></Error>"
)
XXE = (
    b'<?xml version="1.0"?><!DOCTYPE Error [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    b"<Error " + SEP + b"><reasonCode>0</reasonCode><message>&xxe;</message></Error>"
)
PARAMETER_ENTITY = (
    b'<!DOCTYPE Error [<!ENTITY % ext SYSTEM "file:///etc/passwd"> %ext;]>'
    b"<Error " + SEP + b"><reasonCode>0</reasonCode></Error>"
)
EXTERNAL_DTD = (
    b'<!DOCTYPE Error SYSTEM "http://127.0.0.1:9/evil.dtd">'
    b"<Error " + SEP + b"><reasonCode>0</reasonCode></Error>"
)
PLAIN_DTD = b"<!DOCTYPE Error><Error " + SEP + b"><reasonCode>0</reasonCode></Error>"


@pytest.mark.parametrize(
    "body",
    [BILLION_LAUGHS, XXE, PARAMETER_ENTITY, EXTERNAL_DTD, PLAIN_DTD],
    ids=["billion-laughs", "xxe", "parameter-entity", "external-dtd", "dtd"],
)
def test_dtd_and_entities_are_refused(body: bytes) -> None:
    with pytest.raises(XmlSecurityError) as info:
        decode(body)
    assert info.value.construct == "DTD"


def test_undeclared_entity_is_malformed() -> None:
    with pytest.raises(MalformedXml, match="undefined entity"):
        decode(b"<Error " + SEP + b"><reasonCode>0</reasonCode><message>&xxe;</message></Error>")


def test_deep_nesting_is_refused() -> None:
    body = b"<Error " + SEP + b">" + b"<x>" * 100 + b"</x>" * 100 + b"</Error>"
    with pytest.raises(XmlSecurityError) as info:
        decode(body)
    assert info.value.construct == "nesting"


def test_oversize_body_is_refused_before_parsing() -> None:
    body = b"<Error " + SEP + b"><message>" + b"a" * DEFAULT_MAX_BYTES + b"</message></Error>"
    with pytest.raises(DocumentTooLarge) as info:
        decode(body)
    assert (info.value.size, info.value.limit) == (len(body), DEFAULT_MAX_BYTES)
    # Even a body that is not XML at all is refused on size alone.
    with pytest.raises(DocumentTooLarge):
        decode(b"\xff" * 300, max_bytes=200)


def test_custom_size_limit() -> None:
    data = load("derc.xml")
    with pytest.raises(DocumentTooLarge) as info:
        decode(data, max_bytes=len(data) - 1)
    assert info.value.limit == len(data) - 1
    assert isinstance(decode(data, max_bytes=len(data)), DERControl)


@pytest.mark.parametrize(
    ("body", "found"),
    [
        (
            b'<Error xmlns="urn:example:other"><reasonCode>0</reasonCode></Error>',
            "urn:example:other",
        ),
        (b"<Error><reasonCode>0</reasonCode></Error>", ""),
        (b'<csipaus:Error xmlns:csipaus="https://csipaus.org/ns"/>', "https://csipaus.org/ns"),
        # ConnectionPoint is a csipaus root; in the 2030.5 namespace it is wrong.
        (b"<ConnectionPoint " + SEP + b"/>", "urn:ieee:std:2030.5:ns"),
    ],
)
def test_wrong_namespace(body: bytes, found: str) -> None:
    with pytest.raises(WrongNamespace) as info:
        decode(body)
    assert info.value.found == found


def test_wrong_root() -> None:
    with pytest.raises(UnexpectedElement) as info:
        decode(b"<Teapot " + SEP + b"/>")
    assert info.value.found == "Teapot"
    assert "DERControl" in info.value.expected


def test_decode_as_wrong_root_names_what_was_found() -> None:
    with pytest.raises(UnexpectedElement) as info:
        decode_as(EndDevice, load("derc.xml"))
    assert (info.value.found, info.value.expected) == ("DERControl", ("EndDevice",))
    # A subclass is acceptable where its base is asked for.
    assert isinstance(decode_as(Response, load("response.xml")), Response)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not xml",
        b"<Error " + SEP + b"><reasonCode>0</reasonCode>",
        b"<Error " + SEP + b"><reasonCode>0</reasonCode></Eror>",
        b"<Error " + SEP + b"/><Error " + SEP + b"/>",
    ],
    ids=["empty", "text", "truncated", "mismatched-tag", "two-roots"],
)
def test_malformed(body: bytes) -> None:
    with pytest.raises(MalformedXml):
        decode(body)


@pytest.mark.parametrize(
    "body",
    [
        "<Error xmlns='urn:ieee:std:2030.5:ns'><message>café</message></Error>".encode("latin-1"),
        "<Error xmlns='urn:ieee:std:2030.5:ns'><reasonCode>0</reasonCode></Error>".encode("utf-16"),
        b'<?xml version="1.0" encoding="ISO-8859-1"?><Error '
        + SEP
        + b"><reasonCode>0</reasonCode></Error>",
    ],
    ids=["latin-1-bytes", "utf-16", "declared-latin-1"],
)
def test_non_utf8(body: bytes) -> None:
    with pytest.raises(InvalidEncoding):
        decode(body)


def test_utf8_declaration_and_bom_are_fine() -> None:
    body = b'\xef\xbb\xbf<?xml version="1.0" encoding="UTF-8"?><Error ' + SEP
    error = decode_as(Error, body + b"><reasonCode>1</reasonCode></Error>")
    assert error.reason_code == 1


def test_unknown_control_is_an_error_not_dropped() -> None:
    body = (
        b"<DefaultDERControl " + SEP + b"><mRID>01</mRID><DERControlBase>"
        b"<opModSomethingNew>1</opModSomethingNew></DERControlBase></DefaultDERControl>"
    )
    with pytest.raises(UnexpectedElement) as info:
        decode(body)
    assert info.value.found == "opModSomethingNew"
    assert info.value.path == "DefaultDERControl/DERControlBase"


def test_unknown_elements_elsewhere_are_skipped() -> None:
    body = (
        b"<Error " + SEP + b' xmlns:v="urn:vendor"><reasonCode>0</reasonCode>'
        b"<futureThing>1</futureThing><v:extra/></Error>"
    )
    assert decode_as(Error, body) == Error(reason_code=0)


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b"<Error " + SEP + b"></Error>", "Error/reasonCode"),
        (b"<Error " + SEP + b"><reasonCode>70000</reasonCode></Error>", "Error/reasonCode"),
        (b"<Error " + SEP + b"><reasonCode>1_0</reasonCode></Error>", "Error/reasonCode"),
        (b"<Error " + SEP + b"><reasonCode>x</reasonCode></Error>", "Error/reasonCode"),
        (
            b"<Error " + SEP + b"><reasonCode>0</reasonCode><reasonCode>1</reasonCode></Error>",
            "Error/reasonCode",
        ),
        (
            b"<EndDevice " + SEP + b"><lFDI>XYZ</lFDI><sFDI>1</sFDI>"
            b"<changedTime>0</changedTime></EndDevice>",
            "EndDevice/lFDI",
        ),
        (
            b"<EndDevice " + SEP + b"><sFDI>1</sFDI><changedTime>0</changedTime>"
            b"<enabled>yes</enabled></EndDevice>",
            "EndDevice/enabled",
        ),
        (
            b"<EndDeviceList " + SEP + b' all="x" results="0"/>',
            "EndDeviceList/@all",
        ),
    ],
    ids=["missing", "range", "underscore", "text", "duplicate", "hex", "bool", "attribute"],
)
def test_invalid_values_name_their_path(body: bytes, path: str) -> None:
    with pytest.raises(InvalidValue) as info:
        decode(body)
    assert info.value.path == path


def test_active_power_outside_int16_is_refused() -> None:
    data = load("derc.xml").replace(b"<value>15000</value>", b"<value>40000</value>")
    with pytest.raises(InvalidValue) as info:
        decode(data)
    assert info.value.path == "DERControl/DERControlBase/opModExpLimW/value"
    assert info.value.value == 40000


def test_notification_resource_needs_a_known_xsi_type() -> None:
    data = load("notification-dderc.xml")
    with pytest.raises(InvalidValue, match="unknown resource type"):
        decode(data.replace(b'xsi:type="DefaultDERControl"', b'xsi:type="Bogus"'))
    with pytest.raises(InvalidValue, match="without xsi:type"):
        decode(data.replace(b' xsi:type="DefaultDERControl"', b""))


def test_every_error_is_a_sep2_error() -> None:
    for exc in (
        XmlSecurityError,
        DocumentTooLarge,
        InvalidEncoding,
        MalformedXml,
        WrongNamespace,
        UnexpectedElement,
        InvalidValue,
    ):
        assert issubclass(exc, Sep2Error)


def test_csipaus_limit_in_the_2030_5_namespace_is_an_error() -> None:
    # A limit we would otherwise drop silently: the sender put it in the wrong namespace.
    data = load("dderc.xml").replace(b"csipaus:opModExpLimW", b"opModExpLimW")
    with pytest.raises(UnexpectedElement) as info:
        decode(data)
    assert info.value.found == "opModExpLimW"
