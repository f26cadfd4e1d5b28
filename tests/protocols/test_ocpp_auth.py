"""HTTP Basic credentials of OCPP security profiles 1 and 2 (the pure codec)."""

from __future__ import annotations

import base64

import pytest

from protocols.ocpp import (
    accepted_passwords,
    authorization_header,
    parse_authorization,
    secret_problem,
    wire_password,
)

HEX_KEY = "0001020304050607FFFFFFFFFFFFFFFFFFFFFFFF"  # 20 bytes, as 40 hex digits


def test_a_16_authorization_key_goes_out_as_the_bytes_it_encodes() -> None:
    # The OCPP-J 1.6 example: identity AL1000 with that AuthorizationKey.
    header = authorization_header("AL1000", wire_password(HEX_KEY, "ocpp1.6"))
    assert header == "Basic QUwxMDAwOgABAgMEBQYH////////////////"


def test_a_201_password_goes_out_as_utf8() -> None:
    assert wire_password(HEX_KEY, "ocpp2.0.1") == HEX_KEY.encode()
    assert wire_password("not-hex-but-long-enough", "ocpp1.6") == b"not-hex-but-long-enough"


def test_both_forms_of_a_hex_secret_are_accepted_and_nothing_else() -> None:
    assert accepted_passwords(HEX_KEY) == (HEX_KEY.encode(), bytes.fromhex(HEX_KEY))
    assert accepted_passwords("Str0ng-pass:word|x") == (b"Str0ng-pass:word|x",)
    # 30 hex digits are 15 bytes: below the 1.6 minimum, so only the text form.
    assert accepted_passwords("ab" * 15) == (b"ab" * 15,)
    assert accepted_passwords("abc" * 11) == (b"abc" * 11,)  # odd number of digits


def test_parse_roundtrip_with_a_binary_password_containing_a_colon() -> None:
    password = b"\x00:\xff\xfe" * 5
    credentials = parse_authorization(authorization_header("CP-1", password))
    assert credentials is not None
    assert credentials.username == "CP-1"
    assert credentials.password == password
    assert "\\x00" not in repr(credentials)  # the password never shows in a repr


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Bearer abc",
        "Basic",
        "Basic !!!notbase64",
        "Basic " + base64.b64encode(b"no-colon-here").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:password").decode(),  # username not UTF-8
        "Basic " + "A" * 600,
    ],
)
def test_malformed_authorization_is_none(value: str) -> None:
    assert parse_authorization(value) is None


def test_scheme_is_case_insensitive() -> None:
    token = base64.b64encode(b"CP-1:secret").decode()
    credentials = parse_authorization(f"basic {token}")
    assert credentials is not None
    assert credentials.password == b"secret"


def test_a_username_with_a_colon_cannot_be_sent() -> None:
    with pytest.raises(ValueError, match="':'"):
        authorization_header("CP:1", b"x" * 16)


@pytest.mark.parametrize(
    ("secret", "fragment"),
    [
        ("short", "5 characters"),
        ("x" * 65, "65 characters"),
        ("sixteen chars ok", "spaces"),
        ("sixteen-chars\x00ok", "control"),
    ],
)
def test_secret_problems(secret: str, fragment: str) -> None:
    problem = secret_problem(secret)
    assert problem is not None
    assert fragment in problem


def test_good_secrets() -> None:
    assert secret_problem(HEX_KEY) is None
    assert secret_problem("a" * 16) is None
    assert secret_problem("a" * 64) is None
