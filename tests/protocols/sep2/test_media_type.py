"""``check_media_type`` accepts application/sep+xml with any parameters, nothing else."""

from __future__ import annotations

import pytest

from protocols.sep2 import MEDIA_TYPE, check_media_type


@pytest.mark.parametrize(
    "header",
    [
        "application/sep+xml",
        "application/sep+xml; level=-S1",
        "application/sep+xml; csipaus=1.3-beta_storage",  # envoy v2.x
        "application/sep+xml;charset=utf-8",
        " Application/SEP+XML ",
    ],
)
def test_accepted(header: str) -> None:
    assert check_media_type(header)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "application/xml",
        "text/xml",
        "application/json",
        "application/sep-exi",
        "application/sep+xmlx",
        "application/sep",
    ],
)
def test_rejected(header: str | None) -> None:
    assert not check_media_type(header)


def test_constant() -> None:
    assert MEDIA_TYPE == "application/sep+xml"
