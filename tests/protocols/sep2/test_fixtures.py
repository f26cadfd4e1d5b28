"""Every envoy capture decodes, round-trips, and re-encodes to envoy's exact bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from protocols.sep2 import (
    CsipAusVersion,
    MalformedXml,
    decode,
    decode_document,
    encode,
)
from tests.protocols.sep2.envoy_fixtures import (
    FIXTURE_DIR,
    MALFORMED,
    fixture_names,
    load,
    well_formed_names,
)


def test_fixture_folder_present() -> None:
    if not FIXTURE_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"envoy fixtures missing in CI: {FIXTURE_DIR}")
        pytest.skip(f"envoy fixtures not available at {FIXTURE_DIR}")
    names = fixture_names()
    assert len(names) > 100
    assert any(n.startswith("v1.3/") for n in names)


@pytest.mark.parametrize("name", fixture_names())
def test_every_fixture_decodes(name: str) -> None:
    data = load(name)
    if Path(name).name in MALFORMED:
        # A deliberately truncated request body: the one capture that must *not* decode.
        with pytest.raises(MalformedXml):
            decode(data)
        return
    model = decode(data)
    assert type(model).xml_tag


@pytest.mark.parametrize("name", well_formed_names())
def test_round_trip_gives_equal_model(name: str) -> None:
    decoded = decode_document(load(name))
    version = decoded.csipaus or CsipAusVersion.V1_2
    assert decode(encode(decoded.model, csipaus=version)) == decoded.model


@pytest.mark.parametrize(
    "name", [n for n in well_formed_names() if not Path(n).name.startswith("req-")]
)
def test_envoy_response_reencodes_byte_for_byte(name: str) -> None:
    # Envoy's responses are compact, declare all three prefixes on the root and write fields in
    # XSD order, so with the same options our encoder must reproduce them exactly.
    data = load(name)
    decoded = decode_document(data)
    assert decoded.csipaus is not None
    assert encode(decoded.model, csipaus=decoded.csipaus, declare_all_namespaces=True) == data


@pytest.mark.parametrize("name", well_formed_names())
def test_csipaus_version_is_reported(name: str) -> None:
    decoded = decode_document(load(name))
    if name.startswith("v1.3/"):
        assert decoded.csipaus is CsipAusVersion.V1_3
    elif b"csipaus" in load(name):
        assert decoded.csipaus is CsipAusVersion.V1_2
    else:
        assert decoded.csipaus is None
