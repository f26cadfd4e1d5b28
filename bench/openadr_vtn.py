"""OpenADR 2.0b VTN under VENs polling every second: our ``OpenAdrVtn`` vs bare openleadr.

    python -m bench.openadr_vtn [--vens 100,300] [--seconds 10] [--json FILE] [--modes ...]

Three kinds of process, so that no side's CPU pollutes another's figures:

* the **orchestrator** (what you run) starts one *load worker* per mode, bounds it in time,
  prints the table and, at the end, times openleadr's message signing with ECDSA and RSA keys;
* a **load worker** (``--load MODE``) makes the identities (in TLS modes a development CA, a
  server certificate and one P-256 certificate per VEN), starts the two server children,
  registers every VEN with both, emulates N VENs with one ``aiohttp.ClientSession`` each,
  measures, stops both children and prints one JSON result;
* a **server child** (``--serve ours`` / ``--serve bare``) serves on 127.0.0.1 until told to quit
  (or its stdin closes, or after 15 minutes). ``ours`` is ``OpenAdrVtn`` with max(N) allowed VENs
  and a registrar stub that accepts every device; ``bare`` is a plain ``openleadr.OpenADRServer``
  whose ``on_create_party_registration`` accepts the same VENs (and, with TLS, checks their
  certificate fingerprint, as its ``ven_lookup`` does for every later message).

Modes: ``http`` (plain HTTP, unsigned), ``tls`` (mutual TLS 1.2 ``ECDHE-ECDSA-AES128-SHA256``,
P-256, unsigned) and ``signed`` (mutual TLS plus XML signatures with the same ECDSA P-256 keys
on every message both ways: the VTN verifies each VEN message and signs each answer).

The VENs use openleadr's message layer (``messaging.create_message``; schema validation and
parsing through ``protocols.openadr.decode``) over aiohttp, not ``OpenADRClient`` (an APScheduler
and a logger per VEN). Set-up (both servers at once, not measured), per VEN and server:
``oadrCreatePartyRegistration``; for every 10th VEN (the *event VENs*) on ours, an
``oadrRegisterReport`` with one METADATA resource. Each server then gets one event per event VEN
(ours: ``OpenAdrVtn.issue``; bare: ``OpenADRServer.add_event``), the event VENs poll until the
VTN has nothing more (answering the report request and the event). While a window runs, the
server child modifies the event of each of the window's event VENs every 2 s
(``modificationNumber`` + 1), so about 5 % of polls return an ``oadrDistributeEvent``, which the
VEN parses and answers with an ``oadrCreatedEvent`` (optIn) before its next poll.

Each VEN polls on a fixed 1 s schedule (staggered over the second); a poll slower than 1 s delays
the next one (no catch-up burst), so achieved < offered polls/s means the VTN could not keep up.
Latency is client-side, from sending the ``oadrPoll`` to having read the answer (the VEN's own
signing is before the clock starts). Unsigned polls are rendered once per VEN; signed ones are
signed afresh for every poll (the VTN rejects a replayed nonce). In the windows the VEN reads the
message type and response code of each answer and parses only what it must act on
(distributions, report requests); signatures on the VTN's answers are verified during set-up only.
Every loop is bounded in time and count; every process started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import re
import ssl
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    HOST,
    arg_parser,
    cpu_s,
    emit,
    fmt,
    machine_summary,
    pct,
    print_command,
    read_commands,
    run,
    run_worker,
    setup_logging,
    start_child,
    stop_child,
    write_results,
)

PREFIX = "/OpenADR2/Simple/2.0b"
MODES = ("http", "tls", "signed")
log = logging.getLogger("bench.openadr_vtn")

# Bounds: no loop in this file may run longer or more often than these.
CHILD_MAX_LIFE_S = 900.0
MAX_POLLS_PER_VEN = 100_000
MAX_DRAIN_POLLS = 10
REQUEST_TIMEOUT_S = 10.0
SETUP_CONCURRENCY = 32
POLL_PERIOD_S = 1.0
WARMUP_S = 1.0
EVENT_EVERY = 10  # every 10th VEN holds one resource and one event
CHURN_PERIOD_S = 2.0  # each event of the window's event VENs is modified this often
CHURN_TICK_S = 0.1
TARGET_P95_S = 1.0
XML = {"Content-Type": "application/xml"}
OADR_TLS_CIPHERS = "ECDHE-ECDSA-AES128-SHA256:AES128-SHA256"
_TYPE = re.compile(rb"<(?:\w+:)?oadrSignedObject[^>]*>\s*<(?:\w+:)?(\w+)")
_CODE = re.compile(rb"responseCode>\s*(\d+)\s*<")


def _quiet() -> None:
    logging.getLogger("openleadr").setLevel(logging.ERROR)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*AppKey.*")


def _resource_id() -> str:
    from protocols.openadr.vtn_events import format_resource_id
    from unified.model import DerClass, TopologyLocation

    location = TopologyLocation(substation="s1", feeder="f1")
    return format_resource_id("r1", DerClass.BATTERY, 5.0, capacity_kwh=13.5, location=location)


# =============================================================================== server children


class _AcceptingRegistrar:
    """The gateway core, reduced to what the VTN needs: accept every device."""

    def __init__(self) -> None:
        self.devices: dict[str, Any] = {}
        self.refusals = 0

    def add_device(self, device: Any, adapter: Any) -> None:
        self.devices[device.device_id] = adapter

    def report_refusal(self, command: Any, error: Any) -> None:
        self.refusals += 1


class _Vtn:
    """What the child's command loop needs from either server."""

    port: int = 0

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def issue(self, name: str) -> bool:
        """Give VEN ``name`` one event (for its resource ``r1``)."""
        raise NotImplementedError

    async def modify(self, name: str, value: float) -> None:
        """Modify the event of VEN ``name`` (modificationNumber + 1)."""
        raise NotImplementedError


class _Ours(_Vtn):
    def __init__(self, mode: str, pki: Path, vens: list[dict[str, str]]) -> None:
        from adapters.oem_vtn.vtn import AllowedVen, OpenAdrVtn, OpenAdrVtnConfig, VtnTlsConfig
        from unified.model import TopologyLocation

        location = TopologyLocation(substation="s1", feeder="f1")
        allowed = [
            AllowedVen(
                ven_name=v["name"],
                fingerprint=v["fingerprint"] if mode != "http" else None,
                location=location,
            )
            for v in vens
        ]
        tls = None
        if mode != "http":
            tls = VtnTlsConfig(
                cert_path=pki / "vtn.pem",
                key_path=pki / "vtn.key",
                ca_path=pki / "ca.pem",
                sign_messages=mode == "signed",
                require_signatures=mode == "signed",
            )
        config = OpenAdrVtnConfig(
            host=HOST,
            port=0,
            tls=tls,
            allow_plain_http=mode == "http",
            vens=tuple(allowed),
            store_path=pki / "ours-vtn.sqlite",
            poll_interval_s=1,
            report_interval_s=60,
            stale_after_s=120.0,
            offline_after_s=60.0,
        )
        self.registrar = _AcceptingRegistrar()
        self.vtn = OpenAdrVtn(config, registrar=self.registrar)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.vtn.run(), name="bench:ours")
        ready = asyncio.create_task(self.vtn.ready.wait())
        await asyncio.wait({self._task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if not self.vtn.ready.is_set():
            ready.cancel()
            raise RuntimeError("our VTN did not start")
        assert self.vtn.port is not None
        self.port = self.vtn.port
        _quiet()  # the VTN resets openleadr's logger to WARNING when it starts

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, 10)

    async def _set(self, name: str, value: float) -> None:
        from unified.model import DeviceCommand

        await self.vtn.issue(DeviceCommand(device_id=f"{name}.r1", power_kw=value))

    async def issue(self, name: str) -> bool:
        if f"{name}.r1" not in self.registrar.devices:
            return False
        await self._set(name, -1.0)
        return True

    async def modify(self, name: str, value: float) -> None:
        await self._set(name, value)

    async def burst(self, names: list[str], value: float, *, batched: bool) -> float:
        """Modify every named VEN's event at once (a group dispatch re-shared); seconds until
        the last is stored. Unbatched: each event in its own transaction, one after another
        (how ``issue`` worked before group commit), for the same-run comparison."""
        vtn = self.vtn
        running = vtn._writer_running
        vtn._writer_running = running and batched
        try:
            t0 = time.perf_counter()
            await asyncio.gather(*(self._set(name, value) for name in names))
            return time.perf_counter() - t0
        finally:
            vtn._writer_running = running


class _Bare(_Vtn):
    """openleadr's VTN as its documentation shows it: registration handler, ven_lookup,
    ``add_event`` and the internal poll queue."""

    def __init__(self, mode: str, pki: Path, vens: list[dict[str, str]]) -> None:
        from openleadr import OpenADRServer  # type: ignore[import-untyped]

        self.mode = mode
        self.allowed = {v["name"]: v["fingerprint"] for v in vens}
        self.by_name: dict[str, dict[str, Any]] = {}
        self.by_id: dict[str, dict[str, Any]] = {}
        self.events: dict[str, Any] = {}
        kwargs: dict[str, Any] = {}
        if mode != "http":
            kwargs |= {
                "http_cert": str(pki / "vtn.pem"),
                "http_key": str(pki / "vtn.key"),
                "http_ca_file": str(pki / "ca.pem"),
            }
        if mode == "signed":
            kwargs |= {"cert": str(pki / "vtn.pem"), "key": str(pki / "vtn.key")}
        self.server = OpenADRServer(
            vtn_id="bare-vtn",
            http_host=HOST,
            http_port=0,
            requested_poll_freq=timedelta(seconds=1),
            show_fingerprint=False,
            ven_lookup=self.ven_lookup,
            verify_message_signatures=mode == "signed",
            **kwargs,
        )
        self.server.add_handler("on_create_party_registration", self.on_create_party_registration)

    def ven_lookup(self, ven_id: str) -> dict[str, Any] | None:
        return self.by_id.get(ven_id)

    async def on_create_party_registration(self, payload: dict[str, Any]) -> tuple[str, str] | bool:
        name = str(payload.get("ven_name"))
        if name not in self.allowed:
            return False
        if self.mode != "http" and payload.get("fingerprint") != self.allowed[name]:
            return False
        info = self.by_name.get(name)
        if info is None:
            info = {
                "ven_id": f"{name}-{uuid.uuid4().hex[:12]}",
                "ven_name": name,
                "registration_id": uuid.uuid4().hex,
                "fingerprint": self.allowed[name] if self.mode != "http" else None,
            }
            self.by_name[name] = info
            self.by_id[info["ven_id"]] = info
        return info["ven_id"], info["registration_id"]

    async def start(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # run() prints a banner
            await self.server.run()
        self.port = int(self.server.app_runner.addresses[0][1])
        _quiet()

    async def stop(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self.server.stop()

    async def issue(self, name: str) -> bool:
        from openleadr import utils

        info = self.by_name.get(name)
        if info is None:
            return False
        event_id = self.server.add_event(
            ven_id=info["ven_id"],
            signal_name="LOAD_DISPATCH",
            signal_type="delta",
            intervals=[
                {
                    "dtstart": datetime.now(UTC),
                    "duration": timedelta(hours=1),
                    "signal_payload": -1.0,
                }
            ],
            callback=_opt_callback,
            market_context="http://derms.example/programs/oem",
        )
        self.events[name] = utils.find_by(
            self.server.events[info["ven_id"]], "event_descriptor.event_id", event_id
        )
        return True

    async def modify(self, name: str, value: float) -> None:
        from openleadr import utils

        event = self.events[name]
        descriptor = utils.getmember(event, "event_descriptor")
        number = utils.getmember(descriptor, "modification_number")
        utils.setmember(descriptor, "modification_number", number + 1)
        utils.setmember(descriptor, "modification_date_time", datetime.now(UTC))
        signal = utils.getmember(event, "event_signals")[0]
        utils.setmember(utils.getmember(signal, "intervals")[0], "signal_payload", value)
        self.server.events_updated[self.by_name[name]["ven_id"]] = True


def _opt_callback(ven_id: str, event_id: str, opt_type: str) -> None:
    return None


class _Churn:
    """Modify the events of the active event VENs, each every CHURN_PERIOD_S."""

    def __init__(self, server: _Vtn) -> None:
        self.server = server
        self.active: list[str] = []
        self.modified = 0
        self.errors = 0
        self._cursor = 0
        self._credit = 0.0
        self._flip: dict[str, bool] = {}

    async def run(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(CHURN_TICK_S)
            if not self.active:
                self._credit = 0.0
                continue
            self._credit += len(self.active) * CHURN_TICK_S / CHURN_PERIOD_S
            while self._credit >= 1.0:
                self._credit -= 1.0
                name = self.active[self._cursor % len(self.active)]
                self._cursor += 1
                flip = self._flip[name] = not self._flip.get(name, False)
                try:
                    await self.server.modify(name, -2.0 if flip else -1.0)
                    self.modified += 1
                except Exception:  # counted; the bench reports it
                    self.errors += 1
                    log.exception("modifying the event of %s failed", name)


class _LoopLag:
    """How late the child's event loop wakes a 20 ms timer: above a few ms, requests wait for
    the loop (a busy loop, or a process the kernel does not run)."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    async def run(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            t0 = loop.time()
            await asyncio.sleep(0.02)
            if len(self.samples) < 1_000_000:
                self.samples.append(loop.time() - t0 - 0.02)

    def take(self) -> dict[str, float | None]:
        samples, self.samples = self.samples, []
        return {
            "loop_lag_p95_ms": _ms(pct(samples, 0.95)),
            "loop_lag_max_ms": _ms(max(samples, default=None)),
        }


async def _serve(kind: str, mode: str, pki: Path) -> None:
    _quiet()
    vens = json.loads((pki / "vens.json").read_text())
    server: _Vtn = _Ours(mode, pki, vens) if kind == "ours" else _Bare(mode, pki, vens)
    await server.start()
    churn = _Churn(server)
    deadline = time.monotonic() + CHILD_MAX_LIFE_S
    churn_task = asyncio.create_task(churn.run(deadline), name="bench:churn")
    lag = _LoopLag()
    lag_task = asyncio.create_task(lag.run(deadline), name="bench:loop-lag")
    try:
        emit({"port": server.port, "pid": os.getpid()})
        async for msg in read_commands(deadline):
            op = msg.get("op")
            if op == "issue":
                issued = 0
                for name in msg["names"]:
                    issued += bool(await server.issue(name))
                emit({"issued": issued})
            elif op == "burst" and isinstance(server, _Ours):
                names = list(msg["names"])
                out: dict[str, list[float]] = {"batched_ms": [], "unbatched_ms": []}
                for rep in range(3):  # alternate, so drift hits both alike
                    for batched in (True, False) if rep % 2 == 0 else (False, True):
                        value = -1.0 - 0.1 * (1 + len(out["batched_ms"]) + len(out["unbatched_ms"]))
                        took = await server.burst(names, value, batched=batched)
                        key = "batched_ms" if batched else "unbatched_ms"
                        out[key].append(round(1000 * took, 1))
                emit({"events": len(names), **out})
            elif op == "churn":
                before, errors = churn.modified, churn.errors
                churn.active = list(msg["names"])
                emit({"modified": before, "errors": errors, **lag.take()})
            else:
                emit({"error": f"unknown op {op!r}"})
    finally:
        for task in (churn_task, lag_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.stop()


class ServerChild:
    """A server child process, seen from the load worker."""

    def __init__(self, kind: str, mode: str, pki: Path) -> None:
        self.kind = kind
        self.args = ["--serve", kind, "--mode", mode, "--pki", str(pki)]
        self.port = 0
        self.pid = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._ps: psutil.Process | None = None

    async def __aenter__(self) -> ServerChild:
        self._proc, first = await start_child(
            "bench.openadr_vtn", self.args, ready_timeout_s=120, stop_timeout_s=15
        )
        try:
            self.port, self.pid = int(first["port"]), int(first["pid"])
            self._ps = psutil.Process(self.pid)
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def command(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send a command; the child answers with one JSON line."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(msg).encode() + b"\n")
        await self._proc.stdin.drain()
        async with asyncio.timeout(120):
            answer: dict[str, Any] = json.loads(await self._proc.stdout.readline())
        return answer

    async def _stop(self) -> None:
        if self._proc is not None:
            await stop_child(self._proc, 15)

    def cpu_s(self) -> float:
        assert self._ps is not None
        return cpu_s(self._ps)

    def runq_s(self) -> float | None:
        """Time the child's main thread waited for a CPU (kernel run queue), if the kernel says."""
        try:
            return int(Path(f"/proc/{self.pid}/schedstat").read_text().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return None

    def url(self, mode: str) -> str:
        return f"{'http' if mode == 'http' else 'https'}://{HOST}:{self.port}{PREFIX}"


# =============================================================================== load worker


@dataclass
class Ven:
    """One emulated VEN: identity, session, and what each server calls it."""

    index: int
    name: str
    session: Any  # aiohttp.ClientSession, keep-alive
    cert: bytes | None = None  # PEM, for XML signatures (the TLS certificate)
    key: bytes | None = None
    has_event: bool = False
    ven_id: dict[str, str] = field(default_factory=dict)
    poll: dict[str, bytes] = field(default_factory=dict)  # unsigned: rendered once per server


class Protocol:
    """The VEN side of OpenADR 2.0b, on openleadr's message layer."""

    def __init__(self, mode: str) -> None:
        from openleadr import messaging

        self.mode = mode
        self.signed = mode == "signed"
        self._messaging = messaging
        self._reports = self._metadata_reports()

    @staticmethod
    def _metadata_reports() -> list[Any]:
        """One METADATA_TELEMETRY_USAGE report for resource r1, as openleadr's client builds it."""
        from openleadr import OpenADRClient, objects

        client = OpenADRClient(
            ven_name="template", vtn_url="http://127.0.0.1:1/", show_fingerprint=False
        )
        _quiet()
        power = objects.Measurement(
            name="powerReal",
            description="RealPower",
            unit="W",
            scale="k",
            power_attributes=objects.PowerAttributes(hertz=50, voltage=230, ac=True),
        )
        client.add_report(
            callback=lambda: 0.0,
            resource_id=_resource_id(),
            measurement=power,
            scale="k",
            r_id="usage:r1",
            report_specifier_id="bench-usage",
            report_duration=timedelta(hours=1),
            sampling_rate=objects.SamplingRate(
                min_period=timedelta(seconds=1), max_period=timedelta(hours=1), on_change=False
            ),
        )
        reports = list(client.reports)
        for report in reports:
            report.created_date_time = datetime.now(UTC)
            report.report_request_id = 0
        return reports

    def message(self, ven: Ven, message_type: str, **payload: Any) -> bytes:
        if self.signed:
            text = self._messaging.create_message(
                message_type, cert=ven.cert, key=ven.key, **payload
            )
        else:
            text = self._messaging.create_message(message_type, **payload)
        return str(text).encode()

    def poll(self, ven: Ven, tag: str) -> bytes:
        if self.signed:
            return self.message(ven, "oadrPoll", ven_id=ven.ven_id[tag])
        return ven.poll[tag]

    def check(self, body: bytes) -> tuple[str, dict[str, Any]]:
        """Full reading of an answer: schema, signature (signed mode), parse."""
        from protocols.openadr import decode

        if self.signed:
            tree = self._messaging.validate_xml_schema(body)
            self._messaging.validate_xml_signature(tree)
        return decode(body)

    def registration(self, ven: Ven) -> bytes:
        return self.message(
            ven,
            "oadrCreatePartyRegistration",
            request_id=uuid.uuid4().hex,
            ven_name=ven.name,
            ven_id=None,
            http_pull_model=True,
            xml_signature=self.signed,
            report_only=False,
            profile_name="2.0b",
            transport_name="simpleHttp",
            transport_address=None,
            registration_id=None,
        )

    def register_report(self, ven: Ven, tag: str) -> bytes:
        return self.message(
            ven,
            "oadrRegisterReport",
            request_id=uuid.uuid4().hex,
            ven_id=ven.ven_id[tag],
            reports=self._reports,
            report_request_id=0,
        )

    def answer(
        self, ven: Ven, tag: str, message_type: str, payload: dict[str, Any]
    ) -> tuple[str, bytes] | None:
        """What a VEN sends back for a polled message: (service, body), or None."""
        request_id = payload.get("request_id") or (payload.get("response") or {}).get("request_id")
        response = {"response_code": 200, "response_description": "OK", "request_id": request_id}
        if message_type == "oadrDistributeEvent":
            responses = [
                {
                    "response_code": 200,
                    "response_description": "OK",
                    "request_id": request_id,
                    "event_id": event["event_descriptor"]["event_id"],
                    "modification_number": event["event_descriptor"]["modification_number"],
                    "opt_type": "optIn",
                }
                for event in payload.get("events") or []
                if event.get("response_required") == "always"
            ]
            if not responses:
                return None
            body = self.message(
                ven,
                "oadrCreatedEvent",
                response=response,
                event_responses=responses,
                ven_id=ven.ven_id[tag],
            )
            return "EiEvent", body
        if message_type == "oadrCreateReport":
            pending = [
                {"report_request_id": r["report_request_id"]}
                for r in payload.get("report_requests") or []
            ]
            body = self.message(
                ven,
                "oadrCreatedReport",
                response=response,
                pending_reports=pending,
                ven_id=ven.ven_id[tag],
            )
            return "EiReport", body
        raise RuntimeError(f"VEN {ven.name}: unexpected {message_type} from {tag}")


async def _post(ven: Ven, url: str, body: bytes) -> bytes:
    async with ven.session.post(url, data=body, headers=XML) as resp:
        data = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        return data


def _kind(body: bytes) -> tuple[str, int | None]:
    """Message type and first response code of an answer, without parsing it."""
    m, c = _TYPE.search(body), _CODE.search(body)
    return (m.group(1).decode() if m else "?"), (int(c.group(1)) if c else None)


async def _drain(proto: Protocol, ven: Ven, tag: str, url: str) -> int:
    """Poll (with full checks) until the VTN has nothing more; answer what it sends."""
    for i in range(MAX_DRAIN_POLLS):
        message_type, payload = proto.check(
            await _post(ven, f"{url}/OadrPoll", proto.poll(ven, tag))
        )
        if message_type == "oadrResponse":
            return i
        reply = proto.answer(ven, tag, message_type, payload)
        if reply is not None:
            kind, code = _kind(await _post(ven, f"{url}/{reply[0]}", reply[1]))
            if code != 200:
                raise RuntimeError(f"VEN {ven.name}: {reply[0]} answered {kind} {code}")
    raise RuntimeError(f"VEN {ven.name}: {tag} still has messages after {MAX_DRAIN_POLLS} polls")


async def _register(proto: Protocol, ven: Ven, tag: str, url: str) -> None:
    message_type, payload = proto.check(
        await _post(ven, f"{url}/EiRegisterParty", proto.registration(ven))
    )
    code = (payload.get("response") or {}).get("response_code")
    if message_type != "oadrCreatedPartyRegistration" or code != 200:
        raise RuntimeError(f"VEN {ven.name}: {tag} answered registration {message_type} {code}")
    if not payload.get("registration_id") or not payload.get("ven_id"):
        raise RuntimeError(f"VEN {ven.name}: {tag} refused the registration")
    ven.ven_id[tag] = str(payload["ven_id"])
    if not proto.signed:
        ven.poll[tag] = proto.message(ven, "oadrPoll", ven_id=ven.ven_id[tag])
    if tag == "ours" and ven.has_event:
        message_type, _ = proto.check(
            await _post(ven, f"{url}/EiReport", proto.register_report(ven, tag))
        )
        if message_type != "oadrRegisteredReport":
            raise RuntimeError(f"VEN {ven.name}: METADATA answered with {message_type}")


def _ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 2)


async def window(
    proto: Protocol, vens: list[Ven], tag: str, server: ServerChild, url: str, seconds: float
) -> dict[str, Any]:
    """N VENs poll ``server`` every second; figures over ``seconds`` after a warm-up."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    lags: list[float] = []
    sizes: dict[str, int] = {}
    counts = {"polls": 0, "errors": 0, "distributions": 0, "event_responses": 0, "other": 0}
    first_error: list[str] = []
    bounds = [float("inf"), float("inf")]  # measuring window, loop.time()

    def failed(what: str) -> None:
        if bounds[0] <= loop.time() < bounds[1]:
            counts["errors"] += 1
        if not first_error:
            first_error.append(what)

    async def run(ven: Ven, start: float) -> None:
        next_at = start
        poll_url, base = f"{url}/OadrPoll", url
        for _ in range(MAX_POLLS_PER_VEN):
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                lags.append(loop.time() - next_at)  # the load generator's own lateness
            now = loop.time()
            if now >= bounds[1]:
                return
            next_at = max(next_at + POLL_PERIOD_S, now)
            body = proto.poll(ven, tag)
            t0 = loop.time()
            try:
                data = await _post(ven, poll_url, body)
            except Exception as exc:
                failed(f"poll: {exc!r}"[:300])
                continue
            elapsed = loop.time() - t0
            kind, code = _kind(data)
            if code != 200:
                failed(f"poll answered {kind} {code}")
                continue
            inside = bounds[0] <= t0 < bounds[1]
            if inside:
                counts["polls"] += 1
                latencies.append(elapsed)
            sizes.setdefault(kind, len(data))
            if kind == "oadrResponse":
                continue
            try:
                message_type, payload = proto.check(data) if proto.signed else _decode(data)
                reply = proto.answer(ven, tag, message_type, payload)
                if message_type == "oadrDistributeEvent" and inside:
                    counts["distributions"] += 1
                elif inside:
                    counts["other"] += 1
                if reply is not None:
                    kind, code = _kind(await _post(ven, f"{base}/{reply[0]}", reply[1]))
                    if code != 200:
                        failed(f"{reply[0]} answered {kind} {code}")
                    elif inside:
                        counts["event_responses"] += 1
            except Exception as exc:
                failed(f"{kind}: {exc!r}"[:300])

    n = len(vens)
    t_start = loop.time() + 0.05
    tasks = [
        asyncio.create_task(run(v, t_start + POLL_PERIOD_S * i / n)) for i, v in enumerate(vens)
    ]
    try:
        await asyncio.sleep(t_start + WARMUP_S - loop.time())
        m0 = psutil.cpu_times()
        w0, p0, s0, q0 = loop.time(), time.process_time(), server.cpu_s(), server.runq_s()
        bounds[0], bounds[1] = w0, w0 + seconds
        lags.clear()
        await asyncio.sleep(seconds)
        w1, p1, s1, q1 = loop.time(), time.process_time(), server.cpu_s(), server.runq_s()
        m1 = psutil.cpu_times()
        bounds[1] = min(bounds[1], w1)
        # Let every poll started in the window finish (each is bounded by the request timeout).
        async with asyncio.timeout(REQUEST_TIMEOUT_S + 5):
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    wall = w1 - w0
    cores = psutil.cpu_count() or 1
    polls = counts["polls"]
    return {
        "offered_per_s": round(n / POLL_PERIOD_S, 1),
        "polls_per_s": round(polls / wall, 1),
        **counts,
        "first_error": first_error[0] if first_error else None,
        "p50_ms": _ms(pct(latencies, 0.5)),
        "p95_ms": _ms(pct(latencies, 0.95)),
        "p99_ms": _ms(pct(latencies, 0.99)),
        "max_ms": _ms(max(latencies) if latencies else None),
        "distributions_per_s": round(counts["distributions"] / wall, 1),
        "server_cpu_pct": round(100 * (s1 - s0) / wall, 1),
        "server_cpu_us_per_poll": round(1e6 * (s1 - s0) / polls, 1) if polls else None,
        "server_runq_pct": None if q0 is None or q1 is None else round(100 * (q1 - q0) / wall, 1),
        "load_cpu_pct": round(100 * (p1 - p0) / wall, 1),
        "load_lag_p95_ms": _ms(pct(lags, 0.95)),
        "other_cpu_pct": round(
            100 * (cores - (m1.idle - m0.idle) / wall) - 100 * (s1 - s0 + p1 - p0) / wall, 1
        ),
        "answer_bytes": sizes,
        "wall_s": round(wall, 3),
    }


def _decode(body: bytes) -> tuple[str, dict[str, Any]]:
    from protocols.openadr import decode

    return decode(body)


def make_identities(mode: str, n: int, pki: Path) -> list[dict[str, Any]]:
    """VEN names; in TLS modes a CA, the VTN's certificate and one P-256 certificate per VEN."""
    names = [f"ven-{i:04d}" for i in range(n)]
    if mode == "http":
        out = [{"name": name, "fingerprint": None} for name in names]
    else:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from adapters.oem_vtn.vtn import fingerprint_of_der
        from composition.certs import make_ca, make_cert

        ca = make_ca(pki, "ca")
        make_cert(ca, pki, "vtn", server=True, hosts=(HOST,))
        out = []
        for name in names:
            issued = make_cert(ca, pki / "vens", name)
            der = x509.load_pem_x509_certificate(issued.cert_path.read_bytes()).public_bytes(
                serialization.Encoding.DER
            )
            out.append(
                {
                    "name": name,
                    "fingerprint": fingerprint_of_der(der),
                    "cert": str(issued.cert_path),
                    "key": str(issued.key_path),
                }
            )
    (pki / "vens.json").write_text(json.dumps(out))
    return out


def make_vens(mode: str, identities: list[dict[str, Any]], pki: Path) -> list[Ven]:
    vens: list[Ven] = []
    for i, ident in enumerate(identities):
        ctx = None if mode == "http" else _client_ssl(pki, ident["cert"], ident["key"])
        ven = Ven(i, ident["name"], _session(ctx), has_event=i % EVENT_EVERY == 0)
        if mode == "signed":
            ven.cert = Path(ident["cert"]).read_bytes()
            ven.key = Path(ident["key"]).read_bytes()
        vens.append(ven)
    return vens


def _client_ssl(pki: Path, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # TLS 1.2 with the OpenADR suites, so ours and bare (whose context would take TLS 1.3)
    # negotiate the same cipher.
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(OADR_TLS_CIPHERS)
    ctx.load_verify_locations(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(cert, key)
    return ctx


def _session(ctx: ssl.SSLContext | None) -> Any:
    import aiohttp

    connector = aiohttp.TCPConnector(
        ssl=ctx if ctx is not None else False, limit=4, keepalive_timeout=120.0
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    )


async def _gated(items: list[Any], fn: Callable[[Any], Awaitable[object]]) -> None:
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def one(item: Any) -> None:
        async with gate:
            await fn(item)

    await asyncio.gather(*(one(i) for i in items))


async def _load_main(mode: str, sizes: list[int], seconds: float) -> dict[str, Any]:
    _quiet()
    n_max = max(sizes)
    result: dict[str, Any] = {"mode": mode, "vens": sizes, "seconds": seconds, "rows": []}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-oadr-") as tmp:
        pki = Path(tmp)
        t0 = time.monotonic()
        vens = make_vens(mode, make_identities(mode, n_max, pki), pki)
        result["identities_s"] = round(time.monotonic() - t0, 2)
        proto = Protocol(mode)
        try:
            async with (
                ServerChild("ours", mode, pki) as ours,
                ServerChild("bare", mode, pki) as bare,
            ):
                servers = {"ours": ours, "bare": bare}
                urls = {tag: s.url(mode) for tag, s in servers.items()}
                event_names = [v.name for v in vens if v.has_event]
                result["setup_s"] = {}

                async def set_up(tag: str) -> None:
                    """Register every VEN, give the event VENs their event, poll it out."""
                    t0 = time.monotonic()
                    await _gated(vens, lambda v: _register(proto, v, tag, urls[tag]))
                    answer = await servers[tag].command({"op": "issue", "names": event_names})
                    if answer["issued"] != len(event_names):
                        raise RuntimeError(f"{tag}: {answer} for {len(event_names)} event VENs")
                    # The other VENs' first polls (in a warm-up) fetch what is left: ours
                    # sends each an empty distribution after its registration.
                    await _gated(
                        [v for v in vens if v.has_event],
                        lambda v: _drain(proto, v, tag, urls[tag]),
                    )
                    result["setup_s"][tag] = round(time.monotonic() - t0, 2)

                # Both at once (set-up is not measured): each VTN is its own process.
                await asyncio.gather(set_up("ours"), set_up("bare"))
                result["issue_burst"] = await ours.command({"op": "burst", "names": event_names})
                sys.stderr.write(f"    {mode}: {n_max} VENs set up {result['setup_s']}\n")
                for cell, n in enumerate(sizes):
                    group = vens[:n]
                    names = [v.name for v in group if v.has_event]
                    order = ["ours", "bare"] if cell % 2 == 0 else ["bare", "ours"]
                    row: dict[str, Any] = {"vens": n, "event_vens": len(names)}
                    for tag in order:
                        server = servers[tag]
                        before = (await server.command({"op": "churn", "names": names}))["modified"]
                        row[tag] = await window(proto, group, tag, server, urls[tag], seconds)
                        after = await server.command({"op": "churn", "names": []})
                        row[tag]["events_modified"] = after["modified"] - before
                        row[tag]["server_loop_lag_p95_ms"] = after["loop_lag_p95_ms"]
                        row[tag]["server_loop_lag_max_ms"] = after["loop_lag_max_ms"]
                        row[tag]["modify_errors"] = after["errors"]
                    result["rows"].append(row)
                    at = time.monotonic() - t_start
                    sys.stderr.write(f"    {mode} N={n}: done at {at:.1f} s\n")
        finally:
            await asyncio.gather(*(v.session.close() for v in vens))
    return result


# =============================================================================== orchestrator


def _serves(w: dict[str, Any]) -> bool:
    """Polls keep up with the offer and p95 stays under the target, without errors."""
    p95 = w["p95_ms"]
    return (
        p95 is not None
        and p95 < 1000 * TARGET_P95_S
        and w["polls_per_s"] >= 0.97 * w["offered_per_s"]
        and not w["errors"]
    )


def print_table(results: list[dict[str, Any]]) -> None:
    print()
    head = (
        f"{'mode':<6}  {'VENs':>5}  {'server':<6}  {'offered/s':>9}  {'polls/s':>7}  "
        f"{'p50 ms':>7}  {'p95 ms':>7}  {'p99 ms':>7}  {'server CPU%':>11}  "
        f"{'CPU µs/poll':>11}  {'CPU ratio':>9}  {'dist/s':>6}  {'errors':>6}  "
        f"{'load CPU%':>9}  {'load lag p95':>12}  {'VTN lag p95/max':>15}  {'VTN runq%':>9}  "
        f"{'other CPU%':>10}"
    )
    print(head)
    print("-" * len(head))
    for res in results:
        if "error" in res:
            continue
        for row in res["rows"]:
            uo = row["ours"]["server_cpu_us_per_poll"]
            ub = row["bare"]["server_cpu_us_per_poll"]
            for tag in ("ours", "bare"):
                w = row[tag]
                ratio = uo / ub if tag == "ours" and uo and ub else None
                lag = (
                    f"{fmt(w['server_loop_lag_p95_ms'], '.0f')}/"
                    f"{fmt(w['server_loop_lag_max_ms'], '.0f')}"
                )
                print(
                    f"{res['mode']:<6}  {row['vens']:>5}  {tag:<6}  {w['offered_per_s']:>9.0f}  "
                    f"{w['polls_per_s']:>7.1f}  {fmt(w['p50_ms'], '.1f'):>7}  "
                    f"{fmt(w['p95_ms'], '.1f'):>7}  {fmt(w['p99_ms'], '.1f'):>7}  "
                    f"{w['server_cpu_pct']:>11.0f}  "
                    f"{fmt(w['server_cpu_us_per_poll'], '.0f'):>11}  "
                    f"{fmt(ratio, '.2f') if tag == 'ours' else '':>9}  "
                    f"{w['distributions_per_s']:>6.1f}  {w['errors']:>6}  "
                    f"{w['load_cpu_pct']:>9.0f}  {fmt(w['load_lag_p95_ms'], '.1f'):>12}  "
                    f"{lag:>15}  {fmt(w['server_runq_pct'], '.0f'):>9}  "
                    f"{w['other_cpu_pct']:>10.0f}"
                )
    print(
        "offered = N polls/s (each VEN polls every 1 s on a fixed schedule; a late answer delays "
        "its next poll); latency from sending oadrPoll to reading the answer (client side). "
        "server CPU = the VTN child (psutil), per poll all-in (incl. the oadrCreatedEvent answers "
        "to distributions and issuing the modified events); CPU ratio = ours/bare per poll. "
        "load CPU% = the load generator (one process, all VENs); load lag = how late its event "
        "loop woke a VEN for a scheduled poll (large = the load generator is the limit; n/a = no "
        "VEN ever waited: every answer came after the next poll was due). VTN lag = how late the "
        "VTN's event loop woke a 20 ms timer (warm-up included); VTN runq% = time its loop "
        "thread waited for a CPU (kernel run queue: other processes had the cores). "
        "other CPU% = busy CPU that is neither VTN nor load generator (out of 100 × cores)."
    )
    for res in results:
        if "error" in res:
            print(f"{res['mode']}: FAILED: {res['error']}")
            continue
        errs = [
            f"N={row['vens']} {tag}: {row[tag]['errors']} ({row[tag]['first_error']})"
            for row in res["rows"]
            for tag in ("ours", "bare")
            if row[tag]["errors"] or row[tag]["modify_errors"]
        ]
        setup = ", ".join(f"{k} {v} s" for k, v in res["setup_s"].items())
        last = res["rows"][-1]
        sizes = "; ".join(
            f"{tag} "
            + ", ".join(f"{k} {v} B" for k, v in sorted(last[tag]["answer_bytes"].items()))
            for tag in ("ours", "bare")
        )
        burst = res.get("issue_burst")
        if burst:
            print(
                f"{res['mode']}: modifying {burst['events']} events at once (OpenAdrVtn.issue, "
                f"3 reps): group commit {burst['batched_ms']} ms, one transaction per event "
                f"{burst['unbatched_ms']} ms"
            )
        print(
            f"{res['mode']}: identities {res['identities_s']} s; registration + events for "
            f"{max(res['vens'])} VENs: {setup}; answers: {sizes}; "
            f"errors: {'; '.join(errs) if errs else 'none'}"
        )


def capacity_lines(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"VENs at 1 s one VTN process serves at p95 < {TARGET_P95_S:g} s (measured: the largest "
        "N tried that kept up without errors; CPU ceiling: N at which the VTN process would be "
        "100% busy = 1 s / server CPU per poll, taken at the largest N that kept up, else the "
        "smallest N):"
    ]
    for res in results:
        if "error" in res:
            continue
        for tag in ("ours", "bare"):
            ok = [row for row in res["rows"] if _serves(row[tag])]
            basis = max(ok, key=lambda r: r["vens"]) if ok else res["rows"][0]
            per_poll = basis[tag]["server_cpu_us_per_poll"]
            ceiling = f"~{1e6 / per_poll:,.0f}" if per_poll else "n/a"
            failed = [row["vens"] for row in res["rows"] if not _serves(row[tag])]
            measured = f">= {max(r['vens'] for r in ok)}" if ok and not failed else "none tried"
            if ok and failed:
                measured = f"{max(r['vens'] for r in ok)} (not {min(failed)})"
            elif failed and not ok:
                measured = f"< {min(failed)}"
            starved = [
                f"N={row['vens']} waited for a CPU {row[tag]['server_runq_pct']:.0f}% of the time"
                for row in res["rows"]
                if not _serves(row[tag]) and (row[tag]["server_runq_pct"] or 0) > 20
            ]
            lines.append(
                f"  {res['mode']:<6} {tag}: measured {measured}; CPU ceiling {ceiling} "
                f"({fmt(per_poll, '.0f')} µs/poll at N={basis['vens']})"
                + (f" [contended: {', '.join(starved)}]" if starved else "")
            )
    windows = [
        (res["mode"], row["vens"], tag, row[tag])
        for res in results
        if "error" not in res
        for row in res["rows"]
        for tag in ("ours", "bare")
    ]
    if windows:
        busiest = max(windows, key=lambda w: w[3]["load_cpu_pct"])
        late = [
            f"{mode} N={n} {tag} (lag {w['load_lag_p95_ms'] or 0:.0f} ms, load CPU "
            f"{w['load_cpu_pct']:.0f}%, machine busy "
            f"{w['load_cpu_pct'] + w['server_cpu_pct'] + w['other_cpu_pct']:.0f}% of "
            f"{100 * (psutil.cpu_count() or 1)}%)"
            for mode, n, tag, w in windows
            if (w["load_lag_p95_ms"] or 0) > 50 or w["load_lag_p95_ms"] is None
        ]
        lines.append(
            f"  load generator: at most {busiest[3]['load_cpu_pct']:.0f}% of a core "
            f"({busiest[0]} N={busiest[1]} {busiest[2]}); "
            + (
                "its loop woke VENs late (p95 > 50 ms) in: " + "; ".join(late)
                if late
                else "its loop never woke VENs late (p95 <= 50 ms): not the limit"
            )
        )
    return lines


def signing_micro(repeat_ec: int = 100, repeat_rsa: int = 10) -> dict[str, float]:
    """openleadr's create_message (render + XML signature) and its verification, per message,
    with a P-256 key and with an RSA-2048 key (each message re-parses the key, as openleadr
    does)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    from openleadr import messaging

    from composition.certs import make_ca, make_cert

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-oadr-sig-") as tmp:
        ca = make_ca(tmp, "ca")
        ec_cert = make_cert(ca, tmp, "ec")
        ec_pair = (ec_cert.cert_path.read_bytes(), ec_cert.key_path.read_bytes())
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa")])
        now = dt.datetime.now(dt.UTC)
        rsa_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(rsa_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(rsa_key, hashes.SHA256())
        )
        rsa_pair = (
            rsa_cert.public_bytes(serialization.Encoding.PEM),
            rsa_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        t0 = time.perf_counter()
        for _ in range(repeat_ec):
            messaging.create_message("oadrPoll", ven_id="ven-0000")
        out["unsigned_ms"] = 1000 * (time.perf_counter() - t0) / repeat_ec
        for label, (cert, key), reps in (
            ("ecdsa", ec_pair, repeat_ec),
            ("rsa", rsa_pair, repeat_rsa),
        ):
            t0 = time.perf_counter()
            msgs = [
                messaging.create_message("oadrPoll", ven_id="ven-0000", cert=cert, key=key)
                for _ in range(reps)
            ]
            out[f"{label}_sign_ms"] = 1000 * (time.perf_counter() - t0) / reps
            t0 = time.perf_counter()
            for msg in msgs:
                messaging.validate_xml_signature(messaging.validate_xml_schema(msg))
            out[f"{label}_verify_ms"] = 1000 * (time.perf_counter() - t0) / reps
    return {k: round(v, 2) for k, v in out.items()}


def orchestrate(args: argparse.Namespace) -> int:
    sizes = sorted({int(x) for x in args.vens.split(",") if x.strip()})
    modes = [m for m in args.modes.split(",") if m]
    print_command("bench.openadr_vtn")
    from importlib.metadata import version

    import aiohttp

    print(
        f"machine: {machine_summary()}; openleadr {version('openleadr')}, "
        f"signxml {version('signxml')}, "
        f"aiohttp {aiohttp.__version__}; {ssl.OPENSSL_VERSION}"
    )
    print(
        f"VENs {sizes} polling every {POLL_PERIOD_S:g} s, modes {modes}, {args.seconds:g} s "
        f"measured per server per row (+{WARMUP_S:g} s warm-up); VTN (ours: OpenAdrVtn with "
        f"{max(sizes)} allowed VENs + accepting registrar; bare: openleadr.OpenADRServer) in a "
        "child process each, load generator (openleadr message layer, one aiohttp session per "
        f"VEN) in a worker process; every {EVENT_EVERY}th VEN has an event modified every "
        f"{CHURN_PERIOD_S:g} s; tls = mutual TLS 1.2 ECDHE-ECDSA-AES128-SHA256, P-256; signed "
        "= tls + XML signatures (ECDSA P-256, same keys) on every message both ways",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    for mode in modes:
        bound = 150 + len(sizes) * 2 * (args.seconds + WARMUP_S + REQUEST_TIMEOUT_S + 5)
        bound += 0.2 * max(sizes) * (3 if mode == "signed" else 1)
        cmd = [
            sys.executable,
            "-m",
            "bench.openadr_vtn",
            "--load",
            mode,
            "--vens",
            ",".join(map(str, sizes)),
            "--seconds",
            str(args.seconds),
        ]
        print(f"... {mode}", flush=True)
        result = run_worker(cmd, bound, "load worker")
        results.append({"mode": mode, **result} if "error" in result else result)
    print_table(results)
    print()
    for line in capacity_lines(results):
        print(line)
    micro = signing_micro()
    print(
        f"\nopenleadr 0.5.36 message signing, per oadrPoll (this process, one core): render "
        f"unsigned {micro['unsigned_ms']:.2f} ms; render + sign ECDSA P-256 "
        f"{micro['ecdsa_sign_ms']:.2f} ms, RSA-2048 {micro['rsa_sign_ms']:.2f} ms; schema + "
        f"signature check ECDSA {micro['ecdsa_verify_ms']:.2f} ms, RSA "
        f"{micro['rsa_verify_ms']:.2f} ms"
    )
    if args.json:
        write_results(args.json, results, cpu=True, signing=micro)
    return 0 if all("error" not in r for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser("bench.openadr_vtn", __doc__)
    parser.add_argument("--vens", default="100,300", help="comma-separated fleet sizes")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured per server per row")
    parser.add_argument("--modes", default=",".join(MODES), help="http, tls, signed")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--load", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--serve", choices=["ours", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.vens.split(",") if x.strip()]
    if not 0 < args.seconds <= 120 or not sizes or not all(1 <= n <= 2000 for n in sizes):
        parser.error("--seconds must be in (0, 120] and each of --vens in [1, 2000]")
    if not set(args.modes.split(",")) <= set(MODES):
        parser.error(f"--modes: any of {', '.join(MODES)}")
    setup_logging()
    if args.serve is not None:
        run(_serve(args.serve, args.mode, args.pki))
        return 0
    if args.load is not None:
        emit(run(_load_main(args.load, sizes, args.seconds)))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
