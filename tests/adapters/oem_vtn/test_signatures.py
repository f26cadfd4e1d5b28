"""The VTN and an OEM cloud VEN over mutual TLS with XML signatures on every message.

ECDSA P-256 certificates from ``composition.certs``. The VTN signs what it sends and requires a
valid signature from the VEN's registered certificate on what it receives; the VEN checks the
VTN's signatures against the VTN certificate's fingerprint.
"""

from __future__ import annotations

import logging
import ssl
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from adapters.oem_vtn.vtn import AllowedVen, VtnTlsConfig, fingerprint_of_der
from composition.certs import make_ca, make_cert
from protocols.tls import OPENADR_TLS_CIPHERS as TLS_CIPHERS
from tests.adapters.oem_vtn.test_vtn import (
    LOC,
    OEM,
    Registrar,
    cmd,
    enrolled,
    fleet,
    free_port,
    power_of,
    running_oem,
    running_vtn,
    vtn_config,
    wait_for,
)
from unified.model import utcnow

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning")


def fingerprint(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return fingerprint_of_der(cert.public_bytes(serialization.Encoding.DER))


async def test_signed_messages_both_ways_and_unsigned_or_tampered_ones_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logging.getLogger("openleadr").setLevel(logging.WARNING)
    caplog.set_level(logging.WARNING, logger="adapters.oem_vtn.vtn")
    pki = tmp_path / "pki"
    ca = make_ca(pki)
    server = make_cert(ca, pki, "vtn", server=True)
    oem_cert = make_cert(ca, pki, "oem-a")
    registrar = Registrar()
    port = free_port()
    config = vtn_config(
        tmp_path,
        port,
        allow_plain_http=False,
        tls=VtnTlsConfig(
            cert_path=server.cert_path,
            key_path=server.key_path,
            ca_path=ca.cert_path,
            sign_messages=True,
            require_signatures=True,
        ),
        vens=[AllowedVen(ven_name=OEM, location=LOC, fingerprint=fingerprint(oem_cert.cert_path))],
    )
    async with (
        running_vtn(config, registrar) as vtn,
        running_oem(
            port,
            fleet(),
            cert_path=str(oem_cert.cert_path),
            key_path=str(oem_cert.key_path),
            ca_path=str(ca.cert_path),
            sign_messages=True,
            vtn_fingerprint=fingerprint(server.cert_path),
        ) as oem,
    ):
        # Registration, METADATA, report requests and telemetry all went through signed.
        await enrolled(oem, registrar, vtn)
        # An event reaches the battery (the VEN verified the VTN's signature) and its
        # telemetry comes back as a signed report.
        await registrar.resource("b1").apply(cmd("b1", -1.5))
        await wait_for(lambda: oem.devices["b1"].power_kw == -1.5, 15, "event delivered")
        await wait_for(lambda: power_of(vtn, f"{OEM}.b1") == -1.5, 15, "report received")
        await wait_for(lambda: vtn.current_event(f"{OEM}.b1").opt == "optIn", 15)  # type: ignore[union-attr]
        # A signed EiOpt goes through the same checks.
        assert (await oem.opt_out("t1", utcnow(), timedelta(hours=1), opt_id="signed")).ok

        # The same VEN, same TLS session credentials, but messages not signed or altered.
        context = ssl.create_default_context(cafile=str(ca.cert_path))
        context.check_hostname = False
        context.set_ciphers(TLS_CIPHERS)
        context.load_cert_chain(str(oem_cert.cert_path), str(oem_cert.key_path))
        url = f"https://127.0.0.1:{port}/OpenADR2/Simple/2.0b/EiOpt"
        headers = {"Content-Type": "application/xml"}

        def opt_message(opt_id: str, *, signed: bool) -> str:
            create = oem.client._create_message
            if not signed:
                create = create.func  # openleadr's create_message without cert and key
            return str(
                create(
                    "oadrCreateOpt",
                    request_id="r",
                    ven_id=oem.client.ven_id,
                    opt_id=opt_id,
                    opt_type="optOut",
                    opt_reason="economic",
                    created_date_time=utcnow(),
                    targets=[{"resource_id": oem.devices["b1"].resource_id()}],
                    vavailability={
                        "components": [{"dtstart": utcnow(), "duration": timedelta(hours=1)}]
                    },
                )
            )

        unsigned = opt_message("unsigned", signed=False)
        tampered = opt_message("tampered", signed=True).replace(
            "<ei:optType>optOut</ei:optType>", "<ei:optType>optIn</ei:optType>"
        )
        assert "optIn" in tampered
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context),
            timeout=aiohttp.ClientTimeout(total=15),
        ) as http:
            async with http.post(url, data=unsigned, headers=headers) as r:
                assert r.status == 403
                assert "not signed" in await r.text()
            async with http.post(url, data=tampered, headers=headers) as r:
                assert r.status == 403
                assert "Invalid Signature" in await r.text()
            # A valid signed message is taken once; the very same bytes again are a replay.
            replayed = opt_message("replayed", signed=True)
            async with http.post(url, data=replayed, headers=headers) as r:
                assert r.status == 200
                assert "<ei:responseCode>200</ei:responseCode>" in await r.text()
            async with http.post(url, data=replayed, headers=headers) as r:
                body = await r.text()
                assert r.status == 200
                assert "<ei:responseCode>463</ei:responseCode>" in body
                assert "oadrCreatedOpt" not in body
        assert set(vtn.opts) == {(OEM, "signed"), (OEM, "replayed")}
        assert vtn.opts[(OEM, "replayed")].opt_type == "optOut"
    assert any("not signed" in r.getMessage() for r in caplog.records)
