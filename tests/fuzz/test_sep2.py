"""Fuzz: IEEE 2030.5 XML bodies, at the codec and at the server's PUT / POST handlers.

Codec level: :func:`protocols.sep2.decode` (safe_xml underneath) returns a model or raises a
:class:`Sep2Error`, never anything else, for envoy's captured request bodies mutated element by
element (hostile texts and attributes, huge numbers, removed, repeated, renamed and re-namespaced
elements, deep nesting), damaged at the byte level, or replaced by hostile documents (DTDs and
entity bombs, other encodings, deep nesting).

Server level: the real :class:`Sep2Server` over HTTP with an enrolled DER (envoy's device A).
Every PUT and POST body is answered with a 2xx or a 4xx in 2030.5 form, never a 500; a refused
body changes nothing the server knows about the device.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from adapters.sep2_der.der import Sep2Der, Sep2DerEndpoint
from adapters.sep2_der.server import Sep2Server
from protocols.sep2 import MEDIA_TYPE, Error, Sep2Error, decode, decode_as
from protocols.sep2.schema import CSIPAUS_NS, CSIPAUS_V13_NS, SEP_NS, XSI_NS
from tests.adapters.sep2_der.test_server import HEADER, LFDI_A, Client, _config, _controls
from tests.fuzz.common import (
    LoopBridge,
    Tally,
    corrupted,
    drive,
    fuzz_settings,
    well_formed_xml,
    xml_mutated,
)
from tests.protocols.sep2.envoy_fixtures import fixture_names, load
from tests.protocols.sep2.test_security import (
    BILLION_LAUGHS,
    EXTERNAL_DTD,
    PARAMETER_ENTITY,
    PLAIN_DTD,
    XXE,
)
from unified.model import DeviceCommand, LimitSource

HUGE_INTEGER = "9" * 5000  # past int()'s 4300-digit limit for decimal strings
SEP = f'xmlns="{SEP_NS}"'

HOSTILE_TEXTS: tuple[str, ...] = (
    HUGE_INTEGER,
    "-" + HUGE_INTEGER,
    "99999999999999999999999",
    "-9223372036854775809",
    "18446744073709551616",
    "-1",
    "0",
    "1e999",
    "NaN",
    "INF",
    "",
    "   ",
    "0x10",
    "１２",  # fullwidth digits: int() takes them, XSD does not
    "1_000",
    "+7",
    "true",
    "maybe",
    "G" * 41,
    "&amp;<&gt;",
    "\u202e\ufeff",
)

HOSTILE_DOCUMENTS: tuple[bytes, ...] = (
    BILLION_LAUGHS,
    XXE,
    PARAMETER_ENTITY,
    EXTERNAL_DTD,
    PLAIN_DTD,
    b"",
    b"<",
    b"<?xml version='1.0' encoding='UTF-16'?><DERStatus " + SEP.encode() + b"/>",
    b"<?xml version='1.0' encoding='latin-1'?><DERStatus " + SEP.encode() + b"/>",
    b"\xef\xbb\xbf<DERStatus " + SEP.encode() + b"/>",
    "<DERStatus xmlns='urn:ieee:std:2030.5:ns'>é</DERStatus>".encode("utf-16"),
    b"<DERStatus " + SEP.encode() + b">" + b"<a>" * 5000 + b"</a>" * 5000 + b"</DERStatus>",
    b"<DERStatus " + SEP.encode() + b"><![CDATA[<x/>]]><?pi data?><!-- c --></DERStatus>",
    b"<DERStatus " + SEP.encode() + b"><readingTime>" + HUGE_INTEGER.encode() + b"</readingTime>"
    b"</DERStatus>",
    b'<DERStatus xmlns="urn:example:not-sep"/>',
    b"<DERStatus/>",
    f'<csipaus:ConnectionPoint xmlns:csipaus="{CSIPAUS_NS}"/>'.encode(),
    b"<x:DERStatus xmlns:x='" + SEP_NS.encode() + b"' xmlns:x='dup'/>",
)


def request_bodies() -> list[bytes]:
    """envoy's captured client requests (the root folder and v1.3), all well-formed or not."""
    load("req-der-status.xml")  # without the captures: skipped here, failed in CI
    return [load(n) for n in fixture_names() if n.rsplit("/", 1)[-1].startswith("req-")]


# --------------------------------------------------------------------------- XML mutations

NAMESPACES = (SEP_NS, CSIPAUS_NS, CSIPAUS_V13_NS, "urn:example:not-sep", "")
ATTRIBUTES = ("href", "all", "results", f"{{{XSI_NS}}}type", "x")
LOCAL_NAMES = (
    "value",
    "mRID",
    "DERControlBase",
    "opModExpLimW",
    "Reading",
    "MirrorMeterReading",
    "ReadingType",
    "powerOfTenMultiplier",
    "timePeriod",
    "start",
    "duration",
    "lFDI",
    "status",
    "subject",
    "DERStatus",
    "unknownThing",
)


def xml_bodies(bodies: list[bytes]) -> st.SearchStrategy[bytes]:
    well_formed = st.sampled_from([b for b in bodies if well_formed_xml(b)])
    docs = st.sampled_from(bodies)
    mutated = well_formed.flatmap(
        lambda body: xml_mutated(
            body,
            texts=HOSTILE_TEXTS,
            names=LOCAL_NAMES,
            namespaces=NAMESPACES,
            attributes=ATTRIBUTES,
            nest_ns=SEP_NS,
        )
    )
    return st.one_of(
        docs,
        mutated,
        mutated,
        mutated,
        docs.flatmap(corrupted),
        st.sampled_from(HOSTILE_DOCUMENTS),
        st.binary(max_size=128),
    )


def test_decode_raises_only_sep2_errors() -> None:
    bodies = request_bodies()
    assert bodies
    tally = Tally("sep2.decode")

    @fuzz_settings(800)
    @given(xml_bodies(bodies))
    @example(HOSTILE_DOCUMENTS[13])  # readingTime of 5000 digits
    @example(
        b"<Reading " + SEP.encode() + b"><value>-" + HUGE_INTEGER.encode() + b"</value></Reading>"
    )
    @example(b"<DERStatus " + SEP.encode() + b' href="x" all="' + HUGE_INTEGER.encode() + b'"/>')
    def one(body: bytes) -> None:
        try:
            model = decode(body)
        except Sep2Error as exc:
            tally(type(exc).__name__)
            return
        tally(f"decoded:{type(model).__name__}")

    one()
    tally.check(600)


# --------------------------------------------------------------------------- server level


@dataclass
class Target:
    method: str
    path: str
    body: bytes


@dataclass
class ServerRig:
    server: Sep2Server
    session: aiohttp.ClientSession
    targets: list[Target]


@pytest.fixture
async def rig() -> AsyncIterator[ServerRig]:
    server = Sep2Server(_config())
    der = Sep2Der(
        "bat-a",
        Sep2DerEndpoint(lfdi=LFDI_A, pin=11111, supports_target_w=True),
        server=server,
        groups=("substation:s1", "feeder:f1"),
    )
    await der.connect()
    edev = server.edev_href("bat-a")
    headers = {HEADER: LFDI_A, "Content-Type": MEDIA_TYPE}
    async with aiohttp.ClientSession(
        base_url=server.url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        try:
            # A control to answer, and a mirror usage point to post readings to.
            provenance = (LimitSource(command_id="env-1", kind="envelope"),)
            await der.apply(DeviceCommand(device_id="bat-a", power_kw=-1.5, provenance=provenance))
            control = (await _controls(Client(session, "", LFDI_A), edev)).items[0]
            assert control.reply_to is not None
            rsp = control.reply_to
            async with session.post("/mup", data=load("req-mup-site.xml")) as r:
                assert r.status == 201
                mup = r.headers["Location"]
            response = load("req-derc-response-started.xml").replace(
                b"30000000000000000000000600000000", control.mrid.encode()
            )
            targets = [
                Target("PUT", f"{edev}/der/1/ders", load("req-der-status.xml")),
                Target("PUT", f"{edev}/der/1/dercap", load("req-der-capability.xml")),
                Target("PUT", f"{edev}/der/1/derg", load("req-der-settings.xml")),
                Target("PUT", f"{edev}/der/1/dera", load("req-der-availability.xml")),
                Target("POST", "/mup", load("req-mup-der.xml")),
                Target("POST", mup, load("req-mmr.xml")),
                Target("POST", mup, load("req-mmr-list.xml")),
                Target("POST", rsp, response),
                Target("POST", f"{edev}/sub", load("req-agg-subscription-derc.xml")),
                Target("POST", "/edev", load("req-edev-registration.xml")),
            ]
            yield ServerRig(server, session, targets)
        finally:
            await server.stop()


def _knowledge(server: Sep2Server) -> tuple[Any, ...]:
    """What the server knows about the device from what it was sent (not when it last asked)."""
    snap = server.snapshot("bat-a")
    return (
        snap.status,
        snap.capability,
        snap.settings,
        snap.availability,
        snap.der_power,
        snap.site_power,
        len(server.responses("bat-a")),
    )


CONTENT_TYPES = st.sampled_from(
    (MEDIA_TYPE, MEDIA_TYPE, MEDIA_TYPE, f"{MEDIA_TYPE}; level=-S1", "application/xml", "")
)


async def _send(rig: ServerRig, target: Target, body: bytes, content_type: str) -> str:
    before = _knowledge(rig.server)
    async with rig.session.request(
        target.method, target.path, data=body, headers={"Content-Type": content_type}
    ) as resp:
        status, got_type, data = resp.status, resp.headers.get("Content-Type"), await resp.read()
    assert status < 500, (target.method, target.path, status, data[:300], body[:300])
    if status >= 400:
        assert got_type == MEDIA_TYPE, (status, got_type)
        assert decode_as(Error, data).message
        assert _knowledge(rig.server) == before, "a refused body changed what the server knows"
    return str(status)


async def test_server_answers_every_body_with_2xx_or_4xx(rig: ServerRig) -> None:
    bridge = LoopBridge(asyncio.get_running_loop())
    tally = Tally("sep2.server")
    targets = rig.targets

    any_body = xml_bodies(request_bodies())
    bodies = [xml_bodies([t.body]) | any_body for t in targets]

    @st.composite
    def requests(draw: st.DrawFn) -> tuple[int, bytes, str]:
        index = draw(st.integers(0, len(targets) - 1))
        return index, draw(bodies[index]), draw(CONTENT_TYPES)

    @fuzz_settings(500)
    @given(requests())
    @example((0, HOSTILE_DOCUMENTS[13], MEDIA_TYPE))
    @example(
        (
            5,
            b"<MirrorMeterReading "
            + SEP.encode()
            + b"><mRID>A</mRID><Reading><value>"
            + HUGE_INTEGER.encode()
            + b"</value></Reading></MirrorMeterReading>",
            MEDIA_TYPE,
        )
    )
    def one(request: tuple[int, bytes, str]) -> None:
        index, body, content_type = request
        target = targets[index]
        tally(
            f"{target.method} {target.path.rsplit('/', 1)[-1]}: "
            + bridge.run(_send(rig, target, body, content_type))
        )

    await drive(one)
    tally.check(400)
