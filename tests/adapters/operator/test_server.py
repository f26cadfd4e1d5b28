"""The operator endpoint on a real aiohttp server: who may read what, and what the health checks
say when a loop stalls or the store cannot be written (a core that is built but not run)."""

from __future__ import annotations

import asyncio
import base64
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from adapters.operator.health import StoreProbe, probe_store_dir
from adapters.operator.server import OPERATOR_SERVER, OperatorServer, basic_auth_matches
from composition.app import GatewayApp
from composition.config import parse_config
from gateway.cycles import CycleStats


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def app_config(tmp_path: Path, **operator: Any) -> dict[str, Any]:
    return {
        "gateway_id": "gw-op",
        "store": {"path": str(tmp_path / "store" / "gw.sqlite")},
        "operator": {"port": 0, **operator},
        "settlement": {"timezone": "America/New_York"},
        "devices": [
            {
                "device_id": "b1",
                "der_class": "battery",
                "adapter": "sunspec_battery",
                "location": {"substation": "s1", "feeder": "f1"},
                "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 10},
                "sunspec": {"port": 5020},
            }
        ],
    }


def hello(app: web.Application) -> None:
    """An extension, as the composition root hands them over."""

    async def page(request: web.Request) -> web.Response:
        server = request.app[OPERATOR_SERVER]
        return web.Response(text=f"hello from {server.core.config.gateway_id}")

    async def login(request: web.Request) -> web.Response:
        return web.Response(text="login page")

    app.router.add_get("/hello", page)
    app.router.add_get("/hello/login", login)
    app[OPERATOR_SERVER].allow_anonymous("/hello/login")


Serve = Callable[..., Any]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """Start an operator server over an unstarted core; returns (server, base url)."""
    tasks: list[asyncio.Task[None]] = []

    async def start(**operator: Any) -> tuple[OperatorServer, str]:
        gateway = GatewayApp(
            parse_config(app_config(tmp_path, **operator)), operator_extensions=[hello]
        )
        server = gateway.operator
        assert server is not None
        tasks.append(asyncio.create_task(server.run()))
        await asyncio.wait_for(server.ready.wait(), 5)
        return server, f"http://127.0.0.1:{server.port}"

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def get(url: str, **headers: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.text()


def test_basic_auth_needs_both_user_and_password() -> None:
    assert basic_auth_matches(basic("operator", "pw"), "operator", "pw")
    assert not basic_auth_matches(basic("operator", "pw2"), "operator", "pw")
    assert not basic_auth_matches(basic("admin", "pw"), "operator", "pw")
    assert not basic_auth_matches(None, "operator", "pw")
    assert not basic_auth_matches("Bearer pw", "operator", "pw")
    assert not basic_auth_matches("Basic !!!", "operator", "pw")
    token = base64.b64encode(b"operatorpw").decode()  # no colon
    assert not basic_auth_matches(f"Basic {token}", "operator", "pw")


async def test_status_and_extensions_need_the_password_metrics_and_health_do_not(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPERATOR_TEST_PW", "correct horse")
    server, url = await serve(password_env="OPERATOR_TEST_PW")
    status, body = await get(url + "/status")
    assert status == 401
    assert "unauthorized" in body
    status, _ = await get(url + "/status", Authorization=basic("operator", "wrong"))
    assert status == 401
    status, _ = await get(url + "/hello")
    assert status == 401  # an extension's route is protected unless it says otherwise
    status, body = await get(url + "/hello", Authorization=basic("operator", "correct horse"))
    assert (status, body) == (200, "hello from gw-op")
    # With a password the live view is mounted too, behind the same login.
    assert (await get(url + "/view"))[0] == 401
    status, body = await get(url + "/view", Authorization=basic("operator", "correct horse"))
    assert status == 200
    assert "live view" in body
    assert (await get(url + "/hello/login"))[0] == 200
    status, body = await get(url + "/status", Authorization=basic("operator", "correct horse"))
    assert status == 200
    assert '"gateway_id": "gw-op"' in body
    assert (await get(url + "/metrics"))[0] == 200
    assert (await get(url + "/health/live"))[0] == 200
    assert server.refused["unauthenticated"] == 4
    _, metrics = await get(url + "/metrics")
    assert 'derms_operator_requests_refused_total{reason="unauthenticated"} 4.0' in metrics


async def test_metrics_auth_and_no_password(serve: Serve) -> None:
    _, url = await serve(metrics_auth=True)
    assert (await get(url + "/metrics"))[0] == 403  # no password configured: nobody may
    status, body = await get(url + "/status", Authorization=basic("operator", ""))
    assert status == 403
    assert "no operator password" in body
    assert (await get(url + "/health/ready"))[0] == 503  # still public


async def test_liveness_follows_the_control_loop_and_readiness_names_what_failed(
    serve: Serve,
) -> None:
    server, url = await serve()
    core = server.core
    status, body = await get(url + "/health/live")
    assert status == 200  # within the start-up grace, before the first cycle
    assert "starting" in body
    core.control_cycles.observe(0.002)
    core.telemetry_cycles.observe(0.004)
    assert (await get(url + "/health/live"))[0] == 200
    assert core.control_cycles.last_end is not None
    core.control_cycles.last_end -= 60.0  # no cycle for 60 s: 300 periods
    status, body = await get(url + "/health/live")
    assert status == 503
    assert "stalled" in body
    status, body = await get(url + "/health/ready")
    assert status == 503
    verdict = server.readiness()
    assert set(verdict.failed) >= {"broker", "control_loop", "core"}
    assert "telemetry_loop" not in verdict.failed


async def test_readiness_fails_when_the_store_folder_cannot_be_written(tmp_path: Path) -> None:
    store = tmp_path / "data" / "gw.sqlite"
    store.parent.mkdir()
    probe = StoreProbe(store, every_s=5.0, min_free_bytes=0)
    assert not probe.result().ok  # not checked yet
    assert (await probe.check_once()).ok
    assert probe.result().ok
    shutil.rmtree(store.parent)  # even root cannot write into a folder that is gone
    check = await probe.check_once()
    assert not check.ok
    assert "cannot write" in check.detail
    assert not probe_store_dir(tmp_path / "x.sqlite", min_free_bytes=2**62).ok  # disk "full"


async def test_a_hung_store_check_counts_as_failed(tmp_path: Path) -> None:
    now = [0.0]
    probe = StoreProbe(
        tmp_path / "gw.sqlite", every_s=5.0, min_free_bytes=0, monotonic=lambda: now[0]
    )
    assert (await probe.check_once()).ok
    now[0] = 9.0
    assert probe.result().ok
    now[0] = 11.0  # two periods (at least 10 s) without an answer
    assert not probe.result().ok
    assert "not answered" in probe.result().detail


async def test_a_taken_port_does_not_stop_the_gateway(serve: Serve, tmp_path: Path) -> None:
    first, _ = await serve()
    gateway = GatewayApp(parse_config(app_config(tmp_path, port=first.port)))
    assert gateway.operator is not None
    task = asyncio.create_task(gateway.operator.run())
    await asyncio.sleep(0.3)
    assert not task.done()  # waiting to try again, not failed
    assert not gateway.operator.ready.is_set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_cycle_stats_histogram() -> None:
    stats = CycleStats(1.0, buckets=(0.01, 0.1), monotonic=lambda: 5.0)
    assert stats.age_s() is None
    stats.observe(0.005)
    stats.observe(0.05)
    stats.observe(0.05, failed=True)
    stats.observe(3.0)
    assert stats.counts == [1, 2, 1]
    assert stats.count == 4
    assert stats.sum_s == pytest.approx(3.105)
    assert stats.failed == 1
    assert stats.age_s() == 0.0
