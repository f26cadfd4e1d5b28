"""Development certificates for IEEE 2030.5 (CSIP / CSIP-AUS), OpenADR and OCPP test deployments.

The TLS policy itself (cipher suites, versions, contexts) is in :mod:`protocols.tls`.

2030.5 identifies a device by its certificate: the LFDI is the first 160 bits of the SHA-256 of
the DER certificate, the SFDI a short decimal form of it. Installers read both off a device and
hand them to the utility (or to this gateway's config), so ``describe`` prints them.

The CA made here is for development and tests only: a self-signed P-256 root that signs device and
server certificates directly. Production devices carry certificates chained to the 2030.5 / CSIP
PKI, and the gateway then only needs ``protocols.tls.sep2_server_context`` with that PKI's roots.

Everything here does blocking file I/O and key generation: call it from the CLI, at start-up, or
through ``asyncio.to_thread`` — never on a running event loop's hot path.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocols.sep2 import lfdi_from_cert, sfdi_from_lfdi

__all__ = [
    "CertificateAuthority",
    "IssuedCertificate",
    "describe",
    "describe_text",
    "load_ca",
    "make_ca",
    "make_cert",
]

_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CA_DAYS: Final = 3650
_CERT_DAYS: Final = 825


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A development CA: its certificate and key in memory and where they were written."""

    cert_path: Path
    key_path: Path
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate signed by a development CA, with the identity 2030.5 derives from it."""

    cert_path: Path
    key_path: Path
    lfdi: str
    sfdi: int


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 from the start, so the key is never readable by others even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _checked_name(name: str) -> str:
    # The name becomes a file name and a CN: refuse anything that could escape ``directory``.
    if not _NAME.match(name):
        raise ValueError(f"certificate name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def make_ca(directory: Path | str, name: str = "derms-dev-ca") -> CertificateAuthority:
    """Create a self-signed P-256 development CA as ``<name>.pem`` / ``<name>.key`` in
    ``directory`` (created if missing)."""
    name = _checked_name(name)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Edge DERMS development"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return CertificateAuthority(cert_path, key_path, cert, key)


def load_ca(cert_path: Path | str, key_path: Path | str) -> CertificateAuthority:
    """Load a CA written by ``make_ca`` (to issue more certificates later)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: not an EC private key")
    return CertificateAuthority(Path(cert_path), Path(key_path), cert, key)


def make_cert(
    ca: CertificateAuthority,
    directory: Path | str,
    name: str,
    *,
    server: bool = False,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
    organization: str | None = None,
) -> IssuedCertificate:
    """Issue a P-256 certificate ``<name>.pem`` / ``<name>.key`` signed by ``ca``.

    The subject is ``CN=<name>`` (an OCPP charger certificate's CN is its charge point id),
    with ``O=<organization>`` when given (OCPP asks the CPO's name there).
    A device (client) certificate gets the clientAuth usage; a server certificate gets serverAuth
    and subjectAltNames for ``hosts`` (DNS names or IP addresses), which TLS clients check.
    """
    name = _checked_name(name)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    if organization is not None:
        subject.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if server:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    der = cert.public_bytes(serialization.Encoding.DER)
    lfdi = lfdi_from_cert(der)
    return IssuedCertificate(cert_path, key_path, lfdi, sfdi_from_lfdi(lfdi))


def describe(cert_path: Path | str) -> tuple[str, int]:
    """The (LFDI, SFDI) of a PEM or DER certificate file: what an installer hands a utility."""
    lfdi = lfdi_from_cert(Path(cert_path).read_bytes())
    return lfdi, sfdi_from_lfdi(lfdi)


def describe_text(cert_path: Path | str) -> str:
    """``describe`` as the lines ``derms-gateway certs`` prints."""
    lfdi, sfdi = describe(cert_path)
    return f"LFDI: {lfdi}\nSFDI: {sfdi}"
