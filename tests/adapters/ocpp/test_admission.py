"""The security gate's parts on their own: throttling, rate-limited logging, secrets, checks."""

from __future__ import annotations

import logging
import os
from http import HTTPStatus
from pathlib import Path

import pytest

from adapters.ocpp.admission import (
    AttemptThrottle,
    ChargerSecret,
    Refusal,
    RefusalLog,
    SecurityGate,
    load_secret,
)
from protocols.ocpp import accepted_passwords, authorization_header

SECRET = "ab" * 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_backs_off_after_the_free_failures_and_forgets_on_success() -> None:
    clock = Clock()
    throttle = AttemptThrottle(free_failures=2, base_s=1.0, max_s=8.0, clock=clock)
    key = ("10.0.0.9", "CP-1")
    throttle.failed(key)
    throttle.failed(key)
    assert throttle.wait_s(key) == 0.0  # two free failures
    waits = []
    for _ in range(6):
        throttle.failed(key)
        waits.append(throttle.wait_s(key))
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert throttle.wait_s(("10.0.0.10", "CP-1")) == 0.0  # another source is not locked out
    clock.now += 8.0
    assert throttle.wait_s(key) == 0.0
    throttle.succeeded(key)
    throttle.failed(key)
    assert throttle.wait_s(key) == 0.0  # counting starts again


def test_throttle_forgets_old_failures_and_stays_bounded() -> None:
    clock = Clock()
    throttle = AttemptThrottle(free_failures=0, forget_after_s=60, max_entries=3, clock=clock)
    throttle.failed(("a", "CP-1"))
    clock.now += 61
    assert throttle.wait_s(("a", "CP-1")) == 0.0
    for source in "bcdef":
        throttle.failed((source, "CP-1"))
    assert throttle.wait_s(("b", "CP-1")) == 0.0  # evicted: oldest first
    assert throttle.wait_s(("f", "CP-1")) > 0


def test_refusal_log_one_line_per_charger_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    refusals = RefusalLog(
        logging.getLogger("test.refusals"), interval_s=300, max_ids=2, clock=clock
    )
    refusal = Refusal(HTTPStatus.UNAUTHORIZED, "wrong_password", "does not match")
    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        for _ in range(50):
            refusals.refused("CP-1", "10.0.0.9", refusal)
        assert len(caplog.records) == 1
        clock.now += 301
        refusals.refused("CP-1", "10.0.0.9", refusal)
        assert len(caplog.records) == 2
        assert "49 more refusals" in caplog.records[1].getMessage()
        # A spray of ids: beyond max_ids they share one line per interval.
        for n in range(100):
            refusals.refused(f"X-{n}", "10.0.0.66", refusal)
        assert len(caplog.records) == 4  # X-0 (its own entry), then one for all the others


def test_secret_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cp1.key"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        secret = load_secret("CP-1", path, None)
    assert caplog.records == []
    assert secret.matches(SECRET.encode())
    assert secret.matches(bytes.fromhex(SECRET))
    assert not secret.matches(b"ab" * 19 + b"ac")
    assert SECRET not in repr(secret)

    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        load_secret("CP-1", path, None)
    assert "readable by other users" in caplog.text

    monkeypatch.setenv("CP2_PASSWORD", "Str0ng-pass:word|x")
    assert load_secret("CP-2", None, "CP2_PASSWORD").matches(b"Str0ng-pass:word|x")


@pytest.mark.parametrize(
    ("content", "env", "fragment"),
    [
        (None, None, "cannot read password_file"),
        ("too-short", None, "9 characters"),
        (None, "DERMS_TEST_UNSET_VARIABLE", "is not set"),
    ],
)
def test_unusable_secrets_say_why_without_the_secret(
    tmp_path: Path, content: str | None, env: str | None, fragment: str
) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    os.environ.pop("DERMS_TEST_UNSET_VARIABLE", None)
    with pytest.raises(ValueError, match=fragment) as info:
        load_secret("CP-1", None if env else path, env)
    assert "too-short" not in str(info.value)


def test_gate_profile_1_checks_in_order() -> None:
    gate = SecurityGate(1, {"CP-1": ChargerSecret(accepted_passwords(SECRET), "test")})
    good = authorization_header("CP-1", bytes.fromhex(SECRET))

    sources = iter(range(100))

    def reason(cp_id: str, headers: list[str]) -> str | None:
        refusal = gate.check(cp_id, f"src-{next(sources)}", headers, None, known=True)
        return None if refusal is None else refusal.reason

    assert reason("CP-1", [good]) is None
    assert reason("CP-1", []) == "no_credentials"
    assert reason("CP-1", [good, good]) == "malformed_credentials"
    assert reason("CP-1", ["Basic ???"]) == "malformed_credentials"
    assert reason("CP-9", [authorization_header("CP-9", SECRET.encode())]) == "unknown_charger"
    assert reason("CP-1", [authorization_header("CP-2", SECRET.encode())]) == ("identity_mismatch")
    assert reason("CP-1", [authorization_header("CP-1", b"x" * 20)]) == "wrong_password"


def test_gate_profile_3_reads_the_certificate_subject() -> None:
    gate = SecurityGate(3, cpo_name="Example CPO")

    def cert(*rdns: tuple[str, str]) -> dict[str, object]:
        return {"subject": tuple(((name, value),) for name, value in rdns)}

    sources = iter(range(100))

    def check(cp_id: str, certificate: dict[str, object] | None, known: bool = True) -> object:
        # A new source each time: the throttle is not what is tested here.
        refusal = gate.check(cp_id, f"src-{next(sources)}", [], certificate, known=known)
        return None if refusal is None else (refusal.status, refusal.reason)

    ok = cert(("organizationName", "Example CPO"), ("commonName", "CP-1"))
    assert check("CP-1", ok) is None
    assert check("CP-1", None) == (403, "no_certificate")
    assert check("CP-2", ok) == (403, "certificate_identity")
    assert check("CP-1", cert(("commonName", "CP-1"))) == (403, "certificate_organization")
    two_cns = cert(("organizationName", "Example CPO"), ("commonName", "CP-1"), ("commonName", "X"))
    assert check("CP-1", two_cns) == (403, "certificate_identity")
    assert check("CP-1", ok, known=False) == (403, "unknown_charger")
