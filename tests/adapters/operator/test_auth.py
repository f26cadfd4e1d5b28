"""HTTP Basic authentication: what it accepts, what it refuses, where the password comes from."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from adapters.operator.auth import BasicAuth


def header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_only_the_exact_user_and_password_pass() -> None:
    auth = BasicAuth("operator", password="pa:ss wörd")
    assert auth.verify(header("operator", "pa:ss wörd"))  # a colon in the password is fine
    assert auth.verify("basic " + header("operator", "pa:ss wörd").split()[1])
    for bad in (
        None,
        "",
        "Basic",
        "Basic !!!not-base64",
        "Bearer " + header("operator", "pa:ss wörd").split()[1],
        "Basic " + base64.b64encode(b"operator").decode(),  # no colon
        "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),  # not UTF-8
        header("operator", "pa:ss wörd "),
        header("Operator", "pa:ss wörd"),
        header("operator", ""),
        header("", "pa:ss wörd"),
        "Basic " + "A" * 5000,
    ):
        assert not auth.verify(bad), bad


def test_the_password_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("first\n")
    auth = BasicAuth("op", password_file=secret)
    assert auth.verify(header("op", "first"))
    secret.write_text("second-and-longer\n")
    assert auth.verify(header("op", "second-and-longer"))
    assert not auth.verify(header("op", "first"))
    secret.unlink()
    assert not auth.verify(header("op", "second-and-longer")), "no password: nobody gets in"
    secret.write_text("")
    assert not auth.verify(header("op", "")), "an empty file is no password"


def test_the_password_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = BasicAuth("op", password_env="DERMS_TEST_OPERATOR_PW")
    monkeypatch.delenv("DERMS_TEST_OPERATOR_PW", raising=False)
    assert not auth.verify(header("op", ""))
    monkeypatch.setenv("DERMS_TEST_OPERATOR_PW", "from-env")
    assert auth.verify(header("op", "from-env"))
    assert "from-env" not in repr(auth)
    assert os.environ["DERMS_TEST_OPERATOR_PW"] == "from-env"


def test_exactly_one_password_source_and_a_sane_user() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        BasicAuth("op")
    with pytest.raises(ValueError, match="exactly one"):
        BasicAuth("op", password="x", password_env="X")
    with pytest.raises(ValueError, match="user name"):
        BasicAuth("op:1", password="x")


async def test_protect_and_middleware_answer_401_with_a_challenge() -> None:
    refused: list[tuple[str, str, str]] = []
    auth = BasicAuth("op", password="pw", on_refused=lambda *a: refused.append(a))

    async def hello(request: web.Request) -> web.StreamResponse:
        return web.Response(text="hello")

    app = web.Application(middlewares=[auth.middleware(exempt=("/health",))])
    app.router.add_get("/health", hello)
    app.router.add_get("/private", hello)
    guarded = web.Application()
    guarded.router.add_get("/one", auth.protect(hello))
    for application in (app, guarded):
        async with TestClient(TestServer(application)) as client:
            path = "/private" if application is app else "/one"
            response = await client.get(path)
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == (
                'Basic realm="derms-gateway operator", charset="UTF-8"'
            )
            assert (
                await client.get(path, headers={"Authorization": header("op", "no")})
            ).status == 401
            ok = await client.get(path, headers={"Authorization": header("op", "pw")})
            assert ok.status == 200
            assert await ok.text() == "hello"
            if application is app:
                assert (await client.get("/health")).status == 200
    # Wrong credentials are reported (for the audit trail); a request without any is not.
    assert [(r[1], r[2]) for r in refused] == [
        ("bad_credentials", "GET /private"),
        ("bad_credentials", "GET /one"),
    ]
    assert all(r[0].startswith("http:127.0.0.1") for r in refused)
