"""The edge box at a glance, served by the operator endpoint.

``GET /healthz`` (public, like ``/health/live``): 200 while the site is being held safely (the
site loop stepped within its last few periods and could read the site), 503 otherwise, with the
whole view as JSON so an installer's ``curl`` shows why. ``GET /status`` (authenticated) carries
the same view under ``"edge"``. The view: each uplink's state and since when, the outbox's depth,
the devices online, the site loop's last step and timing, and the limits in force with where each
comes from (an envelope, or the configured fallback).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Literal

from aiohttp import web
from pydantic import Field

from adapters.operator.server import OperatorServer
from unified.config import Section

__all__ = [
    "EdgeHealth",
    "LimitsHealth",
    "LinkHealth",
    "SiteLoopHealth",
    "add_health_routes",
]

LinkState = Literal["up", "down", "unknown"]


class LinkHealth(Section):
    state: LinkState
    since: datetime | None = Field(default=None, description="When it last changed state")
    last_error: str | None = None
    losses: int = Field(default=0, description="Times an established link went down")


class LimitsHealth(Section):
    """The site's limits in force now (kW, load convention) and where each comes from:
    ``envelope`` (a command in force), ``fallback`` (the configured default), or None."""

    import_limit_kw: float | None = None
    export_limit_kw: float | None = None
    import_source: str | None = None
    export_source: str | None = None


class SiteLoopHealth(Section):
    period_s: float
    latency_s: dict[str, float] = Field(description="Loop step duration percentiles")
    last_error: str | None = None
    export_limit_kw: float | None = None
    import_limit_kw: float | None = None
    last_step_at: datetime | None = None
    last_step_age_s: float | None = None
    net_kw: float | None = Field(default=None, description="At the meter, last step")
    battery_kw: float | None = None
    pv_cap_kw: float | None = None


class EdgeHealth(Section):
    """The box at a glance: uplink, outbox, the site loop's timing, device availability."""

    ok: bool = Field(description="The site is held: the loop steps and can read the site")
    problems: list[str] = Field(default_factory=list)
    uplink: LinkState = Field(description="All uplinks up: up; any down: down")
    uplinks: dict[str, LinkHealth] = Field(default_factory=dict)
    outbox_depth: int | None = Field(default=None, description="None: no outbox configured")
    outbox_dropped: int = 0
    site_loop: SiteLoopHealth | None = None
    limits: LimitsHealth = Field(default_factory=LimitsHealth)
    devices_online: int = 0
    devices_total: int = 0
    devices_available: dict[str, bool]


def add_health_routes(operator: OperatorServer, view: Callable[[], EdgeHealth]) -> None:
    """``/healthz`` on the operator endpoint (public) and the view in its ``/status``."""

    async def healthz(request: web.Request) -> web.Response:
        health = view()
        return web.json_response(
            health.model_dump(mode="json"), status=200 if health.ok else 503
        )

    operator.app.router.add_get("/healthz", healthz)
    operator.allow_anonymous("/healthz")
    operator.status_sections["edge"] = lambda: view().model_dump(mode="json")
