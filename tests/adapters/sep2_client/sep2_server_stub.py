"""A small, real IEEE 2030.5 server for client tests: aiohttp on 127.0.0.1, envoy-shaped documents.

It serves what bsgip/envoy serves (see ``shared/fixtures/sep2-envoy``): one item per page when
no ``l`` is given, ``all``/``results`` on every list, hrefs under a prefix the client cannot
guess, one ``replyTo`` for every control, cancelled controls kept in the list. Tests change its
state directly (add programs and controls, cancel them) and read back what the client posted.
It can be made to fail: HTTP 500, a hang past the client's timeout, a wrong media type,
malformed XML, or not listening at all (``stop``).
"""

from __future__ import annotations

import asyncio
import enum
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from protocols.sep2 import (
    DER,
    MEDIA_TYPE,
    DateTimeInterval,
    DefaultDERControl,
    DERCapability,
    DERControl,
    DERControlBase,
    DERControlList,
    DERControlResponse,
    DERList,
    DERProgram,
    DERProgramList,
    DERStatus,
    DeviceCapability,
    EndDevice,
    EndDeviceList,
    Error,
    EventStatus,
    FunctionSetAssignments,
    FunctionSetAssignmentsList,
    Link,
    ListLink,
    MirrorMeterReading,
    MirrorUsagePoint,
    MirrorUsagePointList,
    Registration,
    Sep2Error,
    Sep2Model,
    Time,
    check_media_type,
    decode_as,
    encode,
    lfdi_from_cert,
    same_lfdi,
)

REPLY_TO: Final = "/x/rsps/site_control/rsp"


class Failure(enum.Enum):
    HTTP_500 = "500"
    HANG = "hang"
    WRONG_MEDIA_TYPE = "media"
    MALFORMED = "malformed"


@dataclass
class StubProgram:
    id: int
    mrid: str
    primacy: int
    controls: list[DERControl] = field(default_factory=list)
    default: DERControlBase | None = None
    default_version: int = 0


@dataclass
class StubDevice:
    id: int
    lfdi: str
    sfdi: int
    device_category: str | None = None


class Sep2ServerStub:
    """Mutable 2030.5 server state plus the aiohttp app serving it."""

    def __init__(
        self,
        *,
        prefix: str = "/x",
        allow_registration: bool = True,
        pin: int = 111115,
        poll_rate: int = 300,
        clock_offset_s: float = 0.0,
        media_type: str = MEDIA_TYPE,
        max_page: int | None = None,
    ) -> None:
        self.prefix = prefix
        self.allow_registration = allow_registration
        self.pin = pin
        self.poll_rate = poll_rate
        self.clock_offset_s = clock_offset_s
        self.media_type = media_type
        self.max_page = max_page
        """Cap every page at this many items whatever ``l`` asks (None: honour ``l``)."""
        self.devices: list[StubDevice] = []
        self.programs: list[StubProgram] = []
        self.failure: Failure | None = None
        self.fail_path: str = ""
        """Fail only requests whose path contains this ('' = all)."""
        self.hang_s = 5.0
        self.responses: list[DERControlResponse] = []
        self.mups: dict[int, MirrorUsagePoint] = {}
        self.readings: list[tuple[int, MirrorMeterReading]] = []
        self.der_status: list[DERStatus] = []
        self.der_capability: list[DERCapability] = []
        self.requests: list[tuple[str, str, str | None]] = []
        """(method, path with query, request Content-Type) of every request."""
        self.peer_lfdis: list[str] = []
        self.peer_ciphers: list[tuple[str, str]] = []
        """(cipher, protocol) of every TLS request."""
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._ssl: ssl.SSLContext | None = None
        self._next_control = 1

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def start(self, *, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> str:
        """Listen on 127.0.0.1 (a free port unless ``port`` is given, e.g. to restart)."""
        self._ssl = ssl_context if ssl_context is not None else self._ssl
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 20)
        self._routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port, ssl_context=self._ssl)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None)
        assert sockets
        self.port = sockets[0].getsockname()[1]
        return self.url

    async def stop(self) -> None:
        """Stop listening: the client now sees connection refused."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ state helpers

    def now(self) -> int:
        """The server's clock (ours plus the configured offset)."""
        return int(time.time() + self.clock_offset_s)

    def register(self, lfdi: str, sfdi: int = 0) -> StubDevice:
        device = StubDevice(id=len(self.devices) + 8, lfdi=lfdi, sfdi=sfdi)
        self.devices.append(device)
        return device

    def add_program(self, primacy: int, default: DERControlBase | None = None) -> StubProgram:
        pid = len(self.programs) + 1
        program = StubProgram(id=pid, mrid=f"2{pid:031x}", primacy=primacy, default=default)
        self.programs.append(program)
        return program

    def set_default(self, program: StubProgram, default: DERControlBase | None) -> None:
        program.default = default
        program.default_version += 1

    def add_control(
        self,
        program: StubProgram,
        start: int,
        duration: int,
        base: DERControlBase,
        *,
        randomize_start: int | None = None,
        created: int | None = None,
        status: int = 0,
    ) -> DERControl:
        n = self._next_control
        self._next_control += 1
        created = self.now() if created is None else created
        control = DERControl(
            href=f"{self.prefix}/derp/{program.id}/derc/{n}",
            reply_to=REPLY_TO,
            response_required="03",
            mrid=f"3{n:023x}00000000",
            version=1,
            creation_time=created,
            event_status=EventStatus(
                current_status=status, date_time=created, potentially_superseded=False
            ),
            interval=DateTimeInterval(start=start, duration=duration),
            randomize_start=randomize_start,
            der_control_base=base,
        )
        program.controls.append(control)
        program.controls.sort(key=lambda c: (c.interval.start, -c.creation_time))
        return control

    def set_status(self, control: DERControl, status: int) -> DERControl:
        """Cancel (2, or 3 with randomization) or supersede (4) a control, as envoy does:
        the control stays listed and its creationTime becomes the time of the change."""
        now = self.now()
        changed = control.model_copy(
            update={
                "creation_time": now,
                "event_status": EventStatus(
                    current_status=status, date_time=now, potentially_superseded=False
                ),
            }
        )
        for program in self.programs:
            program.controls = [changed if c.mrid == control.mrid else c for c in program.controls]
        return changed

    def response_statuses(self, control: DERControl) -> list[int]:
        return [r.status or 0 for r in self.responses if r.subject.lower() == control.mrid.lower()]

    # ------------------------------------------------------------------ HTTP plumbing

    @web.middleware
    async def _middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs, request.headers.get("Content-Type")))
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            if der is None:
                return self._error(403, "no client certificate")
            self.peer_lfdis.append(lfdi_from_cert(der))
            cipher, protocol, _ = ssl_object.cipher()
            self.peer_ciphers.append((cipher, protocol))
        if self.failure is not None and self.fail_path in request.path:
            if self.failure is Failure.HTTP_500:
                return self._error(500, "injected failure", reason_code=16384)
            if self.failure is Failure.HANG:
                await asyncio.sleep(self.hang_s)
            if self.failure is Failure.WRONG_MEDIA_TYPE:
                return web.Response(body=b'{"detail": "json"}', content_type="application/json")
            if self.failure is Failure.MALFORMED:
                return web.Response(
                    body=b"<DERControlList xmlns='urn:ieee:std:2030.5:ns' all=",
                    headers={"Content-Type": self.media_type},
                )
        return await handler(request)

    def _doc(self, model: Sep2Model, status: int = 200) -> web.Response:
        # Set the header ourselves: aiohttp's content_type= would append a charset.
        return web.Response(
            status=status,
            body=encode(model, declare_all_namespaces=True),
            headers={"Content-Type": self.media_type},
        )

    def _error(self, status: int, message: str, reason_code: int = 0) -> web.Response:
        return self._doc(Error(reason_code=reason_code, message=message), status)

    @staticmethod
    def _page(request: web.Request, default_limit: int = 1) -> tuple[int, int]:
        start = int(request.query.get("s", "0"))
        limit = int(request.query.get("l", str(default_limit)))
        return start, limit

    def _slice(self, request: web.Request, items: list[object]) -> list[object]:
        start, limit = self._page(request)
        if self.max_page is not None:
            limit = min(limit, self.max_page)
        return items[start : start + limit]

    async def _body(self, request: web.Request, cls: type[Sep2Model]) -> Sep2Model | web.Response:
        if not check_media_type(request.headers.get("Content-Type")):
            return self._error(415, "wrong media type")
        try:
            return decode_as(cls, await request.read())
        except Sep2Error as exc:
            return self._error(400, str(exc))

    def _device(self, request: web.Request) -> StubDevice | None:
        eid = int(request.match_info["e"])
        return next((d for d in self.devices if d.id == eid), None)

    # ------------------------------------------------------------------ routes

    def _routes(self, app: web.Application) -> None:
        p = self.prefix
        app.router.add_get("/dcap", self._dcap)
        app.router.add_get(f"{p}/tm", self._tm)
        app.router.add_get(f"{p}/edev", self._edev_list)
        app.router.add_post(f"{p}/edev", self._edev_post)
        app.router.add_get(p + "/edev/{e}", self._edev)
        app.router.add_get(p + "/edev/{e}/rg", self._registration)
        app.router.add_get(p + "/edev/{e}/fsa", self._fsa_list)
        app.router.add_get(p + "/edev/{e}/fsa/1/derp", self._derp_list)
        app.router.add_get(p + "/derp/{p}/derc", self._derc_list)
        app.router.add_get(p + "/derp/{p}/dderc", self._dderc)
        app.router.add_post(REPLY_TO, self._response)
        app.router.add_get(f"{p}/mup", self._mup_list)
        app.router.add_post(f"{p}/mup", self._mup_post)
        app.router.add_get(p + "/mup/{m}", self._mup)
        app.router.add_post(p + "/mup/{m}", self._mmr_post)
        app.router.add_get(p + "/edev/{e}/der", self._der_list)
        app.router.add_put(p + "/edev/{e}/der/1/dercap", self._dercap_put)
        app.router.add_put(p + "/edev/{e}/der/1/ders", self._ders_put)

    async def _dcap(self, request: web.Request) -> web.Response:
        p = self.prefix
        return self._doc(
            DeviceCapability(
                href="/dcap",
                poll_rate=self.poll_rate if self.devices else None,
                time_link=Link(href=f"{p}/tm"),
                end_device_list_link=ListLink(href=f"{p}/edev", all=len(self.devices)),
                mirror_usage_point_list_link=ListLink(href=f"{p}/mup", all=len(self.mups)),
            )
        )

    async def _tm(self, request: web.Request) -> web.Response:
        return self._doc(
            Time(
                href=f"{self.prefix}/tm",
                current_time=self.now(),
                dst_end_time=0,
                dst_offset=0,
                dst_start_time=0,
                quality=4,
                tz_offset=0,
            )
        )

    def _end_device(self, device: StubDevice) -> EndDevice:
        base = f"{self.prefix}/edev/{device.id}"
        return EndDevice(
            href=base,
            subscribable=1,
            der_list_link=ListLink(href=f"{base}/der", all=1),
            device_category=device.device_category,
            lfdi=device.lfdi,
            sfdi=device.sfdi,
            changed_time=self.now(),
            enabled=True,
            function_set_assignments_list_link=ListLink(href=f"{base}/fsa", all=1),
            registration_link=Link(href=f"{base}/rg"),
        )

    async def _edev_list(self, request: web.Request) -> web.Response:
        items = [self._end_device(d) for d in self.devices]
        page = self._slice(request, list(items))
        return self._doc(
            EndDeviceList(
                href=f"{self.prefix}/edev",
                subscribable=1,
                all=len(items),
                results=len(page),
                poll_rate=self.poll_rate,
                items=tuple(e for e in page if isinstance(e, EndDevice)),
            )
        )

    async def _edev_post(self, request: web.Request) -> web.Response:
        body = await self._body(request, EndDevice)
        if isinstance(body, web.Response):
            return body
        assert isinstance(body, EndDevice)
        if not self.allow_registration:
            return self._error(403, "registration disabled")
        if body.lfdi is None:
            return self._error(400, "lFDI required")
        if any(same_lfdi(d.lfdi, body.lfdi) for d in self.devices):
            return self._error(409, "already registered")
        device = self.register(body.lfdi, body.sfdi)
        device.device_category = body.device_category
        return web.Response(status=201, headers={"Location": f"{self.prefix}/edev/{device.id}"})

    async def _edev(self, request: web.Request) -> web.Response:
        device = self._device(request)
        if device is None:
            return self._error(403, "not your site")
        return self._doc(self._end_device(device))

    async def _registration(self, request: web.Request) -> web.Response:
        device = self._device(request)
        if device is None:
            return self._error(403, "not your site")
        return self._doc(
            Registration(
                href=f"{self.prefix}/edev/{device.id}/rg",
                date_time_registered=self.now(),
                pin=self.pin,
            )
        )

    async def _fsa_list(self, request: web.Request) -> web.Response:
        device = self._device(request)
        if device is None:
            return self._error(403, "not your site")
        base = f"{self.prefix}/edev/{device.id}/fsa"
        fsa = FunctionSetAssignments(
            href=f"{base}/1",
            der_program_list_link=ListLink(href=f"{base}/1/derp", all=len(self.programs)),
            time_link=Link(href=f"{self.prefix}/tm"),
            mrid="40000000000000080000000100000000",
            description="",
        )
        page = self._slice(request, [fsa])
        return self._doc(
            FunctionSetAssignmentsList(
                href=base,
                subscribable=1,
                all=1,
                results=len(page),
                poll_rate=self.poll_rate,
                items=tuple(f for f in page if isinstance(f, FunctionSetAssignments)),
            )
        )

    async def _derp_list(self, request: web.Request) -> web.Response:
        device = self._device(request)
        if device is None:
            return self._error(403, "not your site")
        items = [
            DERProgram(
                href=f"{self.prefix}/derp/{p.id}",
                mrid=p.mrid,
                description=f"Dynamic Operating Envelopes #{p.id}",
                default_der_control_link=Link(href=f"{self.prefix}/derp/{p.id}/dderc"),
                der_control_list_link=ListLink(
                    href=f"{self.prefix}/derp/{p.id}/derc", all=len(p.controls)
                ),
                primacy=p.primacy,
            )
            for p in self.programs
        ]
        page = self._slice(request, list(items))
        return self._doc(
            DERProgramList(
                href=f"{self.prefix}/edev/{device.id}/fsa/1/derp",
                subscribable=1,
                all=len(items),
                results=len(page),
                poll_rate=self.poll_rate,
                items=tuple(d for d in page if isinstance(d, DERProgram)),
            )
        )

    def _program(self, request: web.Request) -> StubProgram | None:
        pid = int(request.match_info["p"])
        return next((p for p in self.programs if p.id == pid), None)

    async def _derc_list(self, request: web.Request) -> web.Response:
        program = self._program(request)
        if program is None:
            return self._error(404, "no such program")
        page = self._slice(request, list(program.controls))
        return self._doc(
            DERControlList(
                href=f"{self.prefix}/derp/{program.id}/derc",
                subscribable=1,
                all=len(program.controls),
                results=len(page),
                items=tuple(c for c in page if isinstance(c, DERControl)),
            )
        )

    async def _dderc(self, request: web.Request) -> web.Response:
        program = self._program(request)
        if program is None:
            return self._error(404, "no such program")
        # Envoy: always 200, with an empty DERControlBase when the program has no default.
        return self._doc(
            DefaultDERControl(
                href=f"{self.prefix}/derp/{program.id}/dderc",
                subscribable=1,
                mrid=f"1{program.id:031x}",
                version=program.default_version,
                der_control_base=program.default or DERControlBase(),
            )
        )

    async def _response(self, request: web.Request) -> web.Response:
        body = await self._body(request, DERControlResponse)
        if isinstance(body, web.Response):
            return body
        assert isinstance(body, DERControlResponse)
        self.responses.append(body)
        n = len(self.responses)
        return web.Response(status=201, headers={"Location": f"{REPLY_TO}/{n}"})

    async def _mup_list(self, request: web.Request) -> web.Response:
        items = list(self.mups.values())
        page = self._slice(request, list(items))
        return self._doc(
            MirrorUsagePointList(
                href=f"{self.prefix}/mup",
                all=len(items),
                results=len(page),
                poll_rate=60,
                items=tuple(m for m in page if isinstance(m, MirrorUsagePoint)),
            )
        )

    async def _mup_post(self, request: web.Request) -> web.Response:
        body = await self._body(request, MirrorUsagePoint)
        if isinstance(body, web.Response):
            return body
        assert isinstance(body, MirrorUsagePoint)
        for mid, existing in self.mups.items():  # envoy: same body again → 204 + Location
            if existing.mrid.lower() == body.mrid.lower():
                return web.Response(status=204, headers={"Location": f"{self.prefix}/mup/{mid}"})
        mid = len(self.mups) + 7
        self.mups[mid] = body.model_copy(update={"href": f"{self.prefix}/mup/{mid}"})
        return web.Response(status=201, headers={"Location": f"{self.prefix}/mup/{mid}"})

    async def _mup(self, request: web.Request) -> web.Response:
        mup = self.mups.get(int(request.match_info["m"]))
        if mup is None:
            return self._error(404, "no such mirror usage point")
        return self._doc(mup.model_copy(update={"post_rate": 60}))

    async def _mmr_post(self, request: web.Request) -> web.Response:
        mid = int(request.match_info["m"])
        if mid not in self.mups:
            return self._error(404, "no such mirror usage point")
        body = await self._body(request, MirrorMeterReading)
        if isinstance(body, web.Response):
            return body
        assert isinstance(body, MirrorMeterReading)
        self.readings.append((mid, body))
        return web.Response(status=201)

    async def _der_list(self, request: web.Request) -> web.Response:
        device = self._device(request)
        if device is None:
            return self._error(403, "not your site")
        base = f"{self.prefix}/edev/{device.id}/der/1"
        der = DER(
            href=base,
            der_capability_link=Link(href=f"{base}/dercap"),
            der_status_link=Link(href=f"{base}/ders"),
        )
        return self._doc(
            DERList(
                href=f"{self.prefix}/edev/{device.id}/der",
                all=1,
                results=1,
                poll_rate=60,
                items=(der,),
            )
        )

    async def _dercap_put(self, request: web.Request) -> web.Response:
        body = await self._body(request, DERCapability)
        if isinstance(body, web.Response):
            return body
        assert isinstance(body, DERCapability)
        self.der_capability.append(body)
        return web.Response(status=204)

    async def _ders_put(self, request: web.Request) -> web.Response:
        body = await self._body(request, DERStatus)
        if isinstance(body, web.Response):
            return body
        assert isinstance(body, DERStatus)
        self.der_status.append(body)
        return web.Response(status=204)
