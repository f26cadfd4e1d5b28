"""The operator endpoint: metrics, health checks and status over HTTP (aiohttp).

Routes:

* ``GET /metrics``: Prometheus text exposition (:mod:`adapters.operator.metrics`);
  public unless ``[operator] metrics_auth``.
* ``GET /health/live``, ``GET /health/ready``: 200 or 503 with a JSON body naming each check
  (:mod:`adapters.operator.health`); public, for systemd, orchestrators and load balancers.
* ``GET /status``: what ``derms-gateway status`` prints (version, uptime, links, devices,
  open commands, readiness), as JSON.

Every route but the public ones needs HTTP Basic authentication as ``[operator] user`` with the
configured password, compared in constant time; that includes routes that extensions add (the
composition root hands the server callables that add routes to its application, e.g. a live
view), unless they declare a path public with :meth:`OperatorServer.allow_anonymous`. Refused
attempts go into the audit trail (one record per source and reason a minute).

The server reads the core through its API and attributes (never the other way round) and the
links through the views of :mod:`adapters.operator.peers`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from adapters.broker_security import CredentialsUnavailable
from adapters.operator.config import OperatorConfig
from adapters.operator.health import Check, StoreProbe, Verdict, loop_check
from adapters.operator.metrics import GatewayCollector, metrics_registry
from adapters.operator.peers import Peers
from gateway.aio import wait_inside_task_group
from gateway.audit import RefusalRecorder
from unified.model import TERMINAL_STATES, DerClass

if TYPE_CHECKING:
    from gateway.core import Gateway

__all__ = [
    "OPERATOR_SERVER",
    "Extension",
    "OperatorServer",
    "basic_auth_matches",
]

log = logging.getLogger(__name__)

Extension = Callable[[web.Application], None]
"""Adds routes (and what else it needs) to the operator application before it starts; the
server is at ``app[OPERATOR_SERVER]``."""

_PASSWORD_RECHECK_S: Final = 2.0
_RETRY_BIND_S: Final = 30.0
_REALM: Final = 'Basic realm="derms-gateway", charset="UTF-8"'


def basic_auth_matches(header: str | None, user: str, password: str) -> bool:
    """Whether an ``Authorization`` header carries exactly ``user`` and ``password`` (HTTP
    Basic). Both are compared in constant time, and both always, so the answer's timing says
    nothing of which one was wrong."""
    if header is None:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given_user, sep, given_password = (
            base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
        )
    except (binascii.Error, UnicodeDecodeError):
        return False
    user_ok = hmac.compare_digest(given_user.encode(), user.encode())
    password_ok = hmac.compare_digest(given_password.encode(), password.encode())
    return bool(sep) and user_ok and password_ok


class _Password:
    """The configured password, re-read when its file changes (checked every few seconds)."""

    def __init__(self, config: OperatorConfig, monotonic: Callable[[], float]) -> None:
        self._config = config
        self._monotonic = monotonic
        self._value: str | None = None
        self._problem: str | None = None
        self._checked: float | None = None

    def current(self) -> tuple[str | None, str | None]:
        """(password, None), or (None, why there is none)."""
        now = self._monotonic()
        if self._checked is None or now - self._checked >= _PASSWORD_RECHECK_S:
            self._checked = now
            try:
                self._value, self._problem = self._config.password(), None
            except CredentialsUnavailable as exc:
                if self._problem != str(exc):
                    log.error("operator password unavailable: %s", exc)
                self._value, self._problem = None, str(exc)
            if self._value is None and self._problem is None:
                self._problem = (
                    f"{self._config.password_env} is not set"
                    if self._config.password_env is not None
                    else "no operator password is configured ([operator] password_file or "
                    "password_env)"
                )
        return self._value, self._problem


class _OperatorCounts:
    """The endpoint's own refusals, as a metric family."""

    def __init__(self, refused: Counter[str]) -> None:
        self._refused = refused

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "derms_operator_requests_refused_total",
            "Requests to the operator endpoint refused, by reason",
            labels=("reason",),
        )
        for reason in ("unauthenticated", "no_password"):
            family.add_metric([reason], float(self._refused[reason]))
        yield family


class OperatorServer:
    """The operator endpoint of one gateway. ``await run()`` until cancelled."""

    def __init__(
        self,
        config: OperatorConfig,
        core: Gateway,
        *,
        peers: Peers,
        extensions: Sequence[Extension] = (),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.core = core
        self.peers = peers
        self._monotonic = monotonic
        self.started_at = time.time()
        self._started = monotonic()
        self.store_probe = StoreProbe(
            core.config.store.path,
            every_s=config.store_check_s,
            min_free_bytes=config.store_min_free_mb * 2**20,
            monotonic=monotonic,
        )
        self.refused: Counter[str] = Counter()
        """Requests refused, by reason: ``unauthenticated`` (401), ``no_password`` (403)."""
        self._on_refused = RefusalRecorder(core.audit, "operator")
        self._password = _Password(config, monotonic)
        self.registry = metrics_registry(
            GatewayCollector(
                core,
                peers,
                group_levels=config.group_levels,
                readiness=self.readiness,
                started_at=self.started_at,
            )
        )
        self.registry.register(_OperatorCounts(self.refused))
        self._anonymous = {"/health/live", "/health/ready"}
        if not config.metrics_auth:
            self._anonymous.add("/metrics")
        self.status_sections: dict[str, Callable[[], object]] = {}
        """More of ``/status``, by key (JSON values): e.g. the edge agent's site view."""
        self.app = self._make_app(extensions)
        self.port: int | None = None
        """The port bound (useful with ``port = 0``), once listening."""
        self.ready = asyncio.Event()
        """Set once listening."""

    # ------------------------------------------------------------------ application
    def allow_anonymous(self, path: str) -> None:
        """Serve ``path`` (exactly) without authentication: for an extension's login page."""
        self._anonymous.add(path)

    def _make_app(self, extensions: Sequence[Extension]) -> web.Application:
        app = web.Application(client_max_size=64 * 1024, middlewares=[self._auth_middleware])
        app[OPERATOR_SERVER] = self
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health/live", self._live)
        app.router.add_get("/health/ready", self._ready)
        app.router.add_get("/status", self._status)
        for extend in extensions:
            extend(app)
        return app

    def authorized(self, request: web.Request) -> bool:
        """Whether ``request`` carries the operator's credentials (for extensions that check
        by themselves, e.g. on a route they made public)."""
        password, _ = self._password.current()
        if password is None:
            return False
        header = request.headers.get("Authorization")
        return basic_auth_matches(header, self.config.user, password)

    @web.middleware
    async def _auth_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in self._anonymous:
            return await handler(request)
        password, problem = self._password.current()
        source = f"http:{request.remote}"
        if password is None:
            self.refused["no_password"] += 1
            self._on_refused(source, "no_password", f"{request.method} {request.path[:200]}")
            return web.json_response(
                {"error": "forbidden", "detail": problem or "no operator password"}, status=403
            )
        if basic_auth_matches(request.headers.get("Authorization"), self.config.user, password):
            return await handler(request)
        self.refused["unauthenticated"] += 1
        self._on_refused(source, "unauthenticated", f"{request.method} {request.path[:200]}")
        return web.json_response(
            {"error": "unauthorized", "detail": "HTTP Basic authentication required"},
            status=401,
            headers={"WWW-Authenticate": _REALM},
        )

    # ------------------------------------------------------------------ checks
    def _since_start(self) -> float:
        return self._monotonic() - self._started

    def liveness(self) -> Verdict:
        """Live: the control loop finished a cycle lately (the event loop runs, or nothing
        would answer)."""
        return Verdict(
            {
                "control_loop": loop_check(
                    "control",
                    self.core.control_cycles,
                    self.config.stall_periods,
                    started_for_s=self._since_start(),
                    grace_s=self.config.startup_grace_s,
                )
            }
        )

    def readiness(self) -> Verdict:
        """Ready: broker link up, command store writable, control and telemetry loops ticking."""
        link = self.peers.grid.link
        since = self._since_start()
        core = self.core
        started = core.ready.is_set()
        broker = (
            Check(True, "connected")
            if link.connected.is_set()
            else Check(False, "the Grid DERMS broker link is down")
        )
        checks = {
            "broker": broker,
            "store": self.store_probe.result(),
            "control_loop": loop_check(
                "control",
                core.control_cycles,
                self.config.stall_periods,
                started_for_s=since,
            ),
            "telemetry_loop": loop_check(
                "telemetry",
                core.telemetry_cycles,
                self.config.stall_periods,
                started_for_s=since,
            ),
        }
        if not started:
            checks["core"] = Check(False, "the core is starting (loading the command store)")
        return Verdict(checks)

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, object]:
        """What ``derms-gateway status`` shows, as plain JSON values."""
        core = self.core
        now = datetime.now(UTC)
        states = core.device_states(now)
        classes: dict[str, dict[str, int]] = {}
        for device in core.registry.devices():
            entry = classes.setdefault(device.der_class.value, {"online": 0, "total": 0})
            entry["total"] += 1
            entry["online"] += states.get(device.device_id) is not None
        ordered = {c.value: classes[c.value] for c in DerClass if c.value in classes}
        by_state: Counter[str] = Counter(
            e.state.value for e in core.book.open_entries() if e.state not in TERMINAL_STATES
        )
        links: dict[str, object] = {
            "grid_derms": {
                "connected": self.peers.grid.link.connected.is_set(),
                "pending_acks": self.peers.grid.link.pending_acks,
                "pending_telemetry": self.peers.grid.link.pending_telemetry,
            }
        }
        if self.peers.device_mqtt is not None:
            links["device_mqtt"] = {"connected": self.peers.device_mqtt.connected.is_set()}
        if self.peers.openadr_ven is not None:
            links["openadr_ven"] = {"connected": bool(self.peers.openadr_ven.reachable)}
        audit = core.audit_log
        extra = {key: section() for key, section in self.status_sections.items()}
        return extra | {
            "gateway_id": core.config.gateway_id,
            "version": core.version,
            "time": now.isoformat(),
            "started_at": datetime.fromtimestamp(self.started_at, UTC).isoformat(),
            "uptime_s": round(self._since_start(), 1),
            "live": self.liveness().as_json(),
            "ready": self.readiness().as_json(),
            "links": links,
            "devices": {
                "total": sum(c["total"] for c in ordered.values()),
                "online": sum(c["online"] for c in ordered.values()),
                "by_class": ordered,
            },
            "commands": {
                "open": sum(by_state.values()),
                "by_state": dict(sorted(by_state.items())),
            },
            "clock_steps": core.clock.steps,
            "history_pending": None if core.history is None else core.history.pending,
            "audit": None
            if audit is None
            else {
                "written": audit.written,
                "dropped": audit.dropped,
                "lost": audit.lost,
                "failing": audit.failing,
            },
        }

    # ------------------------------------------------------------------ handlers
    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _live(self, request: web.Request) -> web.Response:
        verdict = self.liveness()
        return web.json_response(verdict.as_json(), status=200 if verdict.ok else 503)

    async def _ready(self, request: web.Request) -> web.Response:
        verdict = self.readiness()
        return web.json_response(verdict.as_json(), status=200 if verdict.ok else 503)

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Serve until cancelled (a task in the gateway's TaskGroup); the listening socket is
        closed on the way out, even when cancelled.

        A port that cannot be bound (taken, not allowed) is logged and tried again every
        ``_RETRY_BIND_S``: the endpoint is for watching the gateway, and must never be why it
        stops serving the grid."""
        # Open requests get 2 s to finish on a stop: a scraper's kept-alive connection must
        # not hold up the gateway's shutdown.
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await runner.setup()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.store_probe.run(), name="operator:store-check")
                await self._listen(runner)
                await wait_inside_task_group()
        finally:
            self.ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await asyncio.shield(runner.cleanup())

    async def _listen(self, runner: web.AppRunner) -> None:
        for warning in self.config.warnings():
            log.warning("%s", warning)
        failures = 0
        while True:
            site = web.TCPSite(runner, self.config.host, self.config.port)
            try:
                await site.start()
            except OSError as exc:
                failures += 1
                if failures == 1:
                    log.error(
                        "operator endpoint cannot listen on %s:%d (%s); the gateway runs "
                        "without it and tries again every %g s",
                        self.config.host,
                        self.config.port,
                        exc.strerror or exc,
                        _RETRY_BIND_S,
                    )
                await asyncio.sleep(_RETRY_BIND_S)
                continue
            break
        self.port = _bound_port(runner, self.config.port)
        log.info("operator endpoint on http://%s:%d", self.config.host, self.port)
        self.ready.set()


def _bound_port(runner: web.AppRunner, configured: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return configured


OPERATOR_SERVER: Final = web.AppKey("operator_server", OperatorServer)
"""Where an extension finds the server (its core, peers and :meth:`authorized`)."""
