"""LFDI/SFDI from certificates, against PROTOCOLS.md and envoy's own EndDevice documents."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from protocols.sep2 import (
    EndDevice,
    InvalidCertificate,
    InvalidValue,
    Registration,
    decode_as,
    has_valid_check_digit,
    lfdi_from_cert,
    lfdi_from_fingerprint,
    normalize_lfdi,
    same_lfdi,
    sfdi_from_cert,
    sfdi_from_lfdi,
    with_check_digit,
)
from tests.protocols.sep2.envoy_fixtures import load

DEVICE_A_LFDI = "F0F83B2BC825E617DEBD7192F9305B4B6ABC00F5"
AGGREGATOR_LFDI = "CF03F364A0A01AF1AA0766544E8554A3359A6D59"


def test_protocols_md_example() -> None:
    assert sfdi_from_lfdi("3E4F45AB31EDFE5B67E343E5E4562E31984E23E5") == 167261211391
    assert sfdi_from_lfdi("3e4f45ab31edfe5b67e343e5e4562e31984e23e5") == 167261211391


@pytest.mark.parametrize(
    ("pem", "lfdi", "sfdi"),
    [
        ("client-cert.pem", DEVICE_A_LFDI, 646847986525),
        ("aggregator-cert.pem", AGGREGATOR_LFDI, 555702820583),
    ],
)
def test_fixture_certificates(pem: str, lfdi: str, sfdi: int) -> None:
    data = load(pem)
    assert lfdi_from_cert(data) == lfdi  # uppercase, as documented
    assert sfdi_from_cert(data) == sfdi
    der = x509.load_pem_x509_certificate(data).public_bytes(Encoding.DER)
    assert lfdi_from_cert(der) == lfdi


@pytest.mark.parametrize(
    ("document", "pem"),
    [
        ("edev.xml", "client-cert.pem"),
        ("v1.3/edev.xml", "client-cert.pem"),
        ("agg-edev-virtual.xml", "aggregator-cert.pem"),
    ],
)
def test_envoy_end_devices_agree_with_our_computation(document: str, pem: str) -> None:
    edev = decode_as(EndDevice, load(document))
    assert edev.lfdi is not None
    assert same_lfdi(edev.lfdi, lfdi_from_cert(load(pem)))
    assert edev.sfdi == sfdi_from_cert(load(pem))
    assert has_valid_check_digit(edev.sfdi)


def test_device_b_from_the_readme_fingerprint() -> None:
    fingerprint = "86441F107B66EBFE65B39FB3D5D7BAAEDA3EA6BFDEBA63EEF9AA1EF46F5EF45F"
    lfdi = lfdi_from_fingerprint(fingerprint)
    assert lfdi == "86441F107B66EBFE65B39FB3D5D7BAAEDA3EA6BF"
    assert sfdi_from_lfdi(lfdi) == 360417815113


def test_lfdi_comparison_ignores_case() -> None:
    # Envoy's error messages print device A's LFDI in lowercase.
    assert same_lfdi(DEVICE_A_LFDI, DEVICE_A_LFDI.lower())
    assert not same_lfdi(DEVICE_A_LFDI, AGGREGATOR_LFDI)
    assert normalize_lfdi(f" {DEVICE_A_LFDI.lower()} ") == DEVICE_A_LFDI
    with pytest.raises(InvalidValue):
        normalize_lfdi("F0F8")


def test_check_digits() -> None:
    assert with_check_digit(11111) == 111115  # envoy's static registration PIN
    assert decode_as(Registration, load("registration.xml")).pin == 111115
    assert has_valid_check_digit(111115)
    assert not has_valid_check_digit(2222)  # envoy seed SFDIs do not carry a valid digit
    assert with_check_digit(0) == 0
    with pytest.raises(InvalidValue):
        with_check_digit(-1)


def test_bad_input() -> None:
    with pytest.raises(InvalidCertificate):
        lfdi_from_cert(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(InvalidCertificate):
        lfdi_from_cert(b"\x30\x03\x02\x01\x00")
    with pytest.raises(InvalidValue):
        sfdi_from_lfdi("xyz")
    with pytest.raises(InvalidValue):
        lfdi_from_fingerprint("ABCD")
