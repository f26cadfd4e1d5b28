"""TLS policy of the protocols the gateway speaks: cipher suites, versions and contexts.

IEEE 2030.5 mandates one suite (TLS 1.2 ``ECDHE-ECDSA-AES128-CCM8`` over P-256); OpenADR 2.0b
allows two (TLS 1.2 ``ECDHE-ECDSA-AES128-SHA256`` or ``AES128-SHA256``); OCPP security profiles 2
and 3 ask TLS 1.2 or later with AES-GCM suites; MQTT names none, so the broker links take
OpenSSL's defaults above a minimum version. Every endpoint and uplink takes its constants and
contexts from here, so one protocol has one policy. Building a context reads the certificate
files (blocking): do it at start-up or in a thread, not on a hot path.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Final, Literal

__all__ = [
    "OCPP_TLS12_CIPHERS",
    "OPENADR_TLS_CIPHERS",
    "SEP2_CURVE",
    "SEP2_TLS_CIPHER",
    "TlsVersion",
    "allows_client_auth",
    "broker_client_context",
    "client_ssl_context",
    "ocpp_client_ssl_context",
    "ocpp_server_ssl_context",
    "pin_openadr_tls",
    "server_ssl_context",
]

#: The one cipher suite 2030.5 mandates (TLS 1.2, ECDHE with P-256, ECDSA, AES-128-CCM, 8-byte tag).
SEP2_TLS_CIPHER: Final = "ECDHE-ECDSA-AES128-CCM8"
SEP2_CURVE: Final = "prime256v1"  # OpenSSL's name for P-256 / secp256r1

#: The suites OpenADR 2.0b names (TLS 1.2): ECDSA certificates, or RSA ones.
OPENADR_TLS_CIPHERS: Final = "ECDHE-ECDSA-AES128-SHA256:AES128-SHA256"

#: OCPP's TLS 1.2 suites. A central system "SHALL support at least" the first two (ECDSA
#: certificate) and the last two (RSA certificate) (1.6 Security Whitepaper ed. 3 A00.FR.317,
#: 2.0.1 A00.FR.318); the ECDHE-RSA pair gives an RSA certificate forward secrecy. OpenSSL offers
#: those its certificate can sign. TLS 1.3 suites (all AEAD) stay as OpenSSL has them.
OCPP_TLS12_CIPHERS: Final = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "AES128-GCM-SHA256",
        "AES256-GCM-SHA384",
    )
)


def pin_openadr_tls(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Pin ``ctx`` to TLS 1.2 and the OpenADR suites (under TLS 1.3 OpenSSL ignores
    ``set_ciphers()``, so a peer could otherwise negotiate a suite OpenADR does not name)."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(OPENADR_TLS_CIPHERS)
    return ctx


def _tls12_ccm8(ctx: ssl.SSLContext) -> ssl.SSLContext:
    # Pinning both ends to TLS 1.2 matters: under TLS 1.3 OpenSSL ignores set_ciphers(), so a
    # peer could otherwise negotiate a suite 2030.5 devices are not required to support.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(SEP2_TLS_CIPHER)
    ctx.set_ecdh_curve(SEP2_CURVE)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def server_ssl_context(
    cert_file: Path | str, key_file: Path | str, ca_file: Path | str
) -> ssl.SSLContext:
    """A server context for 2030.5: TLS 1.2, ECDHE-ECDSA-AES128-CCM8, P-256, and a client
    certificate chained to ``ca_file`` required (the certificate *is* the client's identity)."""
    ctx = _tls12_ccm8(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert_file), str(key_file))
    ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


def allows_client_auth(cert_file: Path | str) -> bool:
    """Whether a PEM certificate may authenticate a TLS client: no extended key usage at all
    (the 2030.5 device profile has none), or one that lists clientAuth."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.CLIENT_AUTH in usage


def client_ssl_context(
    cert_file: Path | str,
    key_file: Path | str,
    ca_file: Path | str,
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """The matching client context: presents the device certificate, verifies the server's."""
    ctx = _tls12_ccm8(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert_file), str(key_file))
    ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


def _ocpp_tls(ctx: ssl.SSLContext) -> ssl.SSLContext:
    # TLS 1.0/1.1 "not allowed in OCPP 2.0.1", and for 1.6 only for legacy chargers that
    # cannot do better (A00.FR.312): none here. No compression (A00.FR.320).
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(OCPP_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def ocpp_server_ssl_context(
    cert_file: Path | str, key_file: Path | str, ca_file: Path | str | None = None
) -> ssl.SSLContext:
    """An OCPP central system's context: security profile 2 without ``ca_file``, profile 3
    (a client certificate chained to ``ca_file`` required in the handshake) with it."""
    ctx = _ocpp_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(str(cert_file), str(key_file))
    if ca_file is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


def ocpp_client_ssl_context(
    ca_file: Path | str,
    cert_file: Path | str | None = None,
    key_file: Path | str | None = None,
) -> ssl.SSLContext:
    """A charger's context: verifies the central's certificate (and host name) against
    ``ca_file``; presents ``cert_file`` for security profile 3."""
    ctx = _ocpp_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_verify_locations(cafile=str(ca_file))
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), None if key_file is None else str(key_file))
    return ctx


TlsVersion = Literal["1.2", "1.3"]
_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class _FixedServerName(ssl.SSLContext):
    """A client context that checks the server against one configured name, whatever host name
    the socket library passes in. paho dials ``host`` and checks the certificate against that
    same string; a broker reached by IP address or through a tunnel has a certificate for its
    real name, which this context checks instead (and sends as SNI)."""

    server_name: str = ""

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        del server_hostname  # replaced, never added to: the check stays on
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=self.server_name,
            session=session,
        )


def broker_client_context(
    *,
    ca_file: Path | str | None,
    cert_file: Path | str | None = None,
    key_file: Path | str | None = None,
    key_password: str | None = None,
    server_hostname: str | None = None,
    min_version: TlsVersion = "1.2",
) -> ssl.SSLContext:
    """A client context for an MQTT broker: the server's certificate verified against
    ``ca_file`` (None: the system's trust store) and its host name always checked; a client
    certificate presented when ``cert_file`` is given (mutual TLS; ``key_file`` None when the
    PEM holds both). ``server_hostname`` replaces the dialled host in the name check.

    There is deliberately no way to turn verification off: a broker with a certificate for
    another name gets ``server_hostname``, a development broker a certificate for its address
    (``derms-gateway certs issue --server --host 127.0.0.1``).
    """
    ctx: ssl.SSLContext
    if server_hostname is not None:
        named = _FixedServerName(ssl.PROTOCOL_TLS_CLIENT)
        named.server_name = server_hostname
        ctx = named
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if ca_file is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.load_verify_locations(cafile=str(ca_file))
    if cert_file is not None:
        ctx.load_cert_chain(
            str(cert_file), None if key_file is None else str(key_file), password=key_password
        )
    return ctx
