"""The operator's live view: one page, its JSON snapshot, a server-sent event stream and the
report downloads, every route behind :class:`adapters.operator.auth.BasicAuth`.

``add_view(app, core, auth)`` mounts it on an aiohttp application (the operator server's, or a
test's). Routes, under ``prefix`` (default ``/view``):

* ``GET /view`` — the page: HTML with its stylesheet and script inline (no external resource, no
  CDN), served with a Content-Security-Policy that allows exactly that script and stylesheet
  (by hash) and requests to this origin only.
* ``GET /view/api/snapshot`` — what the page shows, as JSON (:class:`ViewSnapshot`).
* ``GET /view/events`` — ``text/event-stream``: a ``snapshot`` event at once, then one every
  telemetry period and as soon as an ack changes a command (bursts coalesced).
* ``GET /view/reports/{command_id}.{csv|svg}`` — a dispatch's performance or an envelope's
  compliance (:mod:`adapters.operator.reports`), as a download (``?inline=1`` to display it).

The stream never holds the gateway up: one snapshot is built per period for all clients (none
while nobody watches) and handed to each client's bounded queue without waiting; a client whose
queue is full, or whose socket takes longer than ``write_timeout_s`` to take an event, is
dropped (its browser reconnects). At most ``max_streams`` streams are open at once; one more is
answered ``503`` with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Final

from aiohttp import web

from adapters.operator.auth import BasicAuth, Handler
from adapters.operator.reports import ReportFormat, ReportUnavailable, load_report, render
from adapters.operator.snapshot import RecentCommand, build_snapshot
from gateway.audit import RefusalRecorder
from gateway.core import Gateway
from gateway.errors import CoreError
from gateway.store import StoreError
from unified.model import ID_PATTERN, TERMINAL_STATES, Ack, utcnow

__all__ = ["DEFAULT_PREFIX", "FEED", "LiveFeed", "add_view", "page_html"]

log = logging.getLogger(__name__)

DEFAULT_PREFIX: Final = "/view"
MAX_STREAMS: Final = 32
QUEUE_SIZE: Final = 4
"""Snapshots waiting for one client; a client this far behind is dropped."""
MIN_GAP_S: Final = 0.25
"""At most four snapshots a second, however many acks arrive."""
RECENT: Final = 20

_SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


# --------------------------------------------------------------------------- the page


def _asset(name: str) -> str:
    return (files("adapters.operator") / "static" / name).read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


@dataclass(frozen=True, slots=True)
class _Page:
    html: bytes
    policy: str


def page_html(prefix: str = DEFAULT_PREFIX) -> _Page:
    """The page with its stylesheet and script inline, and the policy that admits just them."""
    style, script = _asset("view.css"), _asset("view.js")
    html = (
        _asset("view.html")
        .replace("{{PREFIX}}", prefix)
        .replace("{{STYLE}}", style)
        .replace("{{SCRIPT}}", script)
    )
    policy = (
        "default-src 'none'; "
        f"script-src 'sha256-{_sha256(script)}'; style-src 'sha256-{_sha256(style)}'; "
        "connect-src 'self'; img-src 'self' blob:; form-action 'none'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    return _Page(html.encode(), policy)


# --------------------------------------------------------------------------- the feed


@dataclass(eq=False, slots=True)
class _Stream:
    peer: str
    queue: asyncio.Queue[bytes | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=QUEUE_SIZE)
    )


class LiveFeed:
    """Snapshots fanned out to every open stream: built once per period or change."""

    def __init__(
        self,
        build: Callable[[], bytes],
        *,
        period_s: float,
        max_streams: int = MAX_STREAMS,
        min_gap_s: float = MIN_GAP_S,
    ) -> None:
        self._build = build
        self.period_s = period_s
        self.max_streams = max_streams
        self.min_gap_s = min_gap_s
        self._streams: set[_Stream] = set()
        self._wake = asyncio.Event()
        self.dropped = 0
        """Clients dropped for falling behind."""
        self.refused = 0
        """Streams refused at the cap."""

    @property
    def streams(self) -> int:
        return len(self._streams)

    def subscribe(self, peer: str) -> _Stream | None:
        if len(self._streams) >= self.max_streams:
            self.refused += 1
            return None
        stream = _Stream(peer)
        self._streams.add(stream)
        return stream

    def unsubscribe(self, stream: _Stream) -> None:
        self._streams.discard(stream)

    def changed(self) -> None:
        """Something the page shows has changed: send a snapshot soon."""
        self._wake.set()

    def publish(self, payload: bytes) -> None:
        """Hand ``payload`` to every stream without waiting; drop the ones that are full."""
        for stream in list(self._streams):
            try:
                stream.queue.put_nowait(payload)
            except asyncio.QueueFull:
                self.dropped += 1
                log.warning("live view: dropping %s, %d snapshots behind", stream.peer, QUEUE_SIZE)
                self._end(stream)

    def close_all(self) -> None:
        for stream in list(self._streams):
            self._end(stream)

    def _end(self, stream: _Stream) -> None:
        self._streams.discard(stream)
        while not stream.queue.empty():
            stream.queue.get_nowait()
        stream.queue.put_nowait(None)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.period_s):
                    await self._wake.wait()
            self._wake.clear()
            if self._streams:
                try:
                    payload = self._build()
                except Exception:  # the next period tries again; the gateway goes on
                    log.exception("live view: building a snapshot failed")
                else:
                    self.publish(payload)
            await asyncio.sleep(self.min_gap_s)


FEED: Final = web.AppKey("operator_view_feed", LiveFeed)


# --------------------------------------------------------------------------- routes


class _View:
    def __init__(self, core: Gateway, prefix: str, write_timeout_s: float) -> None:
        self.core = core
        self.prefix = prefix
        self.write_timeout_s = write_timeout_s
        self.page = page_html(prefix)
        self.recent: deque[RecentCommand] = deque(maxlen=RECENT)
        self.feed = LiveFeed(self.snapshot_json, period_s=core.config.timing.telemetry_period_s)

    def snapshot_json(self) -> bytes:
        snapshot = build_snapshot(self.core, utcnow(), tuple(reversed(self.recent)))
        return snapshot.model_dump_json().encode()

    def on_ack(self, ack: Ack) -> None:
        if ack.state in TERMINAL_STATES:
            kind = next(
                (
                    e.command.type
                    for e in self.core.book.open_entries()
                    if e.command.command_id == ack.command_id
                ),
                "command",
            )
            self.recent.append(
                RecentCommand(
                    command_id=ack.command_id, type=kind, state=ack.state.value, at=ack.timestamp
                )
            )
        self.feed.changed()

    # ------------------------------------------------------------------ handlers
    async def page_handler(self, request: web.Request) -> web.StreamResponse:
        headers = {**_SECURITY_HEADERS, "Content-Security-Policy": self.page.policy}
        return web.Response(
            body=self.page.html, content_type="text/html", charset="utf-8", headers=headers
        )

    async def snapshot_handler(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=self.snapshot_json(), content_type="application/json", headers=_SECURITY_HEADERS
        )

    async def events_handler(self, request: web.Request) -> web.StreamResponse:
        stream = self.feed.subscribe(request.remote or "unknown")
        if stream is None:
            return web.Response(
                status=503,
                text=f"503: {self.feed.max_streams} live views are open already\n",
                headers={**_SECURITY_HEADERS, "Retry-After": "10"},
            )
        response = web.StreamResponse(
            headers={
                **_SECURITY_HEADERS,
                "Content-Type": "text/event-stream; charset=utf-8",
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await response.prepare(request)
            chunk = b"retry: 3000\n\n" + _event(self.snapshot_json())
            while True:
                async with asyncio.timeout(self.write_timeout_s):
                    await response.write(chunk)
                payload = await stream.queue.get()
                if payload is None:
                    break
                chunk = _event(payload)
        except TimeoutError:
            # Its socket takes no more: it must not hold a snapshot, a slot or a task.
            self.feed.dropped += 1
            log.warning("live view: %s stopped reading; closing its stream", stream.peer)
            if request.transport is not None:
                request.transport.close()
        except ConnectionResetError:
            pass  # gone; its browser reconnects if it still wants to
        finally:
            self.feed.unsubscribe(stream)
        return response

    async def report_handler(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["command_id"]
        fmt = ReportFormat(request.match_info["fmt"])
        core = self.core
        try:
            report = await load_report(
                cid, store=core.store, history=core.history, registry=core.registry, now=utcnow()
            )
        except ReportUnavailable as exc:
            status = 404 if exc.reason in ("unknown_command", "not_settled") else 409
            return web.Response(
                status=status, text=f"{status}: {exc.detail}\n", headers=_SECURITY_HEADERS
            )
        except (StoreError, CoreError) as exc:
            log.exception("live view: report of %s", cid)
            return web.Response(
                status=503, text=f"503: {type(exc).__name__}\n", headers=_SECURITY_HEADERS
            )
        rendered = render(report, fmt)
        disposition = "inline" if request.query.get("inline") == "1" else "attachment"
        return web.Response(
            body=rendered.body,
            headers={
                **_SECURITY_HEADERS,
                "Content-Type": rendered.media_type,
                "Content-Disposition": f'{disposition}; filename="{rendered.filename}"',
                # An SVG opened on its own runs nothing and loads nothing.
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            },
        )

    async def redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(self.prefix)


def _event(payload: bytes) -> bytes:
    # The payload is compact JSON: one line, so one data field.
    return b"event: snapshot\ndata: " + payload + b"\n\n"


def add_view(
    app: web.Application,
    core: Gateway,
    auth: BasicAuth,
    *,
    prefix: str = DEFAULT_PREFIX,
    max_streams: int = MAX_STREAMS,
    write_timeout_s: float | None = None,
) -> None:
    """Mount the live view on ``app``, every route behind ``auth``.

    ``core`` is the running gateway. Its feed starts and stops with the application
    (``cleanup_ctx``); open streams are ended on shutdown so they never hold it up. Wrong
    credentials go to the core's audit trail (``access.refused``) unless ``auth`` already
    reports them elsewhere.
    """
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError("prefix must start with '/' and not end with one")
    period = core.config.timing.telemetry_period_s
    view = _View(core, prefix, write_timeout_s or max(5.0, 2 * period))
    view.feed.max_streams = max_streams
    if auth.on_refused is None:
        auth.on_refused = RefusalRecorder(core.audit, "operator-view")
    app[FEED] = view.feed

    def guarded(handler: Handler) -> Handler:
        return auth.protect(handler)

    command_id = ID_PATTERN.removeprefix("^").removesuffix("$")
    app.router.add_get(prefix, guarded(view.page_handler), name="operator-view")
    app.router.add_get(prefix + "/", guarded(view.redirect))
    app.router.add_get(prefix + "/api/snapshot", guarded(view.snapshot_handler))
    app.router.add_get(prefix + "/events", guarded(view.events_handler))
    app.router.add_get(
        prefix + "/reports/{command_id:" + command_id + "}.{fmt:csv|svg}",
        guarded(view.report_handler),
    )

    async def feed_lifetime(_app: web.Application) -> AsyncIterator[None]:
        core.ack_listeners.append(view.on_ack)
        task = asyncio.create_task(view.feed.run(), name="operator-view-feed")
        try:
            yield
        finally:
            core.ack_listeners.remove(view.on_ack)
            view.feed.close_all()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def end_streams(_app: web.Application) -> None:
        view.feed.close_all()

    app.cleanup_ctx.append(feed_lifetime)
    app.on_shutdown.append(end_streams)
