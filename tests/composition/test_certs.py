"""Development certificates: which may authenticate a TLS client (2030.5 Notifications)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.sep2_der.server import Sep2TlsConfig
from composition.certs import make_ca, make_cert
from protocols.tls import allows_client_auth


def test_device_certificates_allow_client_auth_and_server_ones_do_not(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    assert allows_client_auth(make_cert(ca, tmp_path, "gateway-notify").cert_path)
    assert not allows_client_auth(make_cert(ca, tmp_path, "gateway", server=True).cert_path)
    assert allows_client_auth(ca.cert_path)  # no extended key usage at all: any use


def test_notifications_use_their_own_certificate_when_given(tmp_path: Path) -> None:
    base = {"cert_file": "s.pem", "key_file": "s.key", "ca_file": "ca.pem"}
    assert Sep2TlsConfig.model_validate(base).notification_identity() == (
        Path("s.pem"),
        Path("s.key"),
    )
    both = base | {"notify_cert_file": "n.pem", "notify_key_file": "n.key"}
    assert Sep2TlsConfig.model_validate(both).notification_identity() == (
        Path("n.pem"),
        Path("n.key"),
    )
    with pytest.raises(ValueError, match="both"):
        Sep2TlsConfig.model_validate(base | {"notify_cert_file": "n.pem"})
