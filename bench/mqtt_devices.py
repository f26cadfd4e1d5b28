"""MQTT device fleet benchmark: how many thermostats one gateway process ingests, and how fast a
Grid DERMS dispatch fans out to all of them, against a raw aiomqtt subscriber in the same run.

    python -m bench.mqtt_devices [--devices 500,2000] [--interval 5] [--seconds 10] [--json FILE]

Processes (127.0.0.1 only; a fresh set per fleet size N, all stopped at the end of each size):

* the **orchestrator** (what you run) starts mosquitto (anonymous, sized for the fleet), the
  children below, drives the phases over their stdin/stdout (JSON lines), runs the Grid DERMS
  client (``simulators.grid_derms.GridDermsClient``, northbound root ``derms/v1/{gateway}`` on the
  same mosquitto) and prints the table;
* the **load** child emulates N thermostats with a few aiomqtt clients (``--pub-clients``, 4 by
  default) publishing on the N devices' own topics, not one client per device: N per-device
  clients with keep-alives would cost the load process more CPU than the gateway under test on a
  2-core machine. Each device publishes its birth and ``online`` availability (retained, QoS 1)
  first, then telemetry (QoS 0) every ``--interval`` s, spread evenly over the interval. Payloads
  are ``SimThermostat.telemetry()`` encodings (the protocol module's own encoder) with a fresh
  ``timestamp`` per batch: the thermal model is not stepped, the bench measures transport and
  decoding. A separate client subscribes to every device's ``command`` topic, stamps each
  receipt with ``time.time()`` and answers ``accepted`` on the device's ``result`` topic.
  Not emulated: per-device accounts and ACL (``mqtt_devices.acl``) and per-device last wills;
* the **gateway** child runs a real gateway (``composition.app.GatewayApp``) with N
  ``mqtt_thermostat`` devices (config built in code; ``poll_interval_s = interval / 2``, see
  below) and counts DeviceStates through ``Gateway.state_listeners``;
* the **raw** child is one plain aiomqtt client subscribed to the same wildcard
  (``derms/devices/v1/+/telemetry``, QoS 1, MQTT 3.1.1 and the same 50,000-message inbound
  queue as the gateway's link) that ``json.loads`` every payload: the floor of what any Python
  MQTT consumer pays on this machine.

Phases per N: raw flat-out window, gateway start, paced window (telemetry every ``--interval``),
3 dispatch/cancel repetitions, gateway flat-out window, gateway stop, raw flat-out window again
(raw before/after brackets the machine's drift). Then, unless ``--no-step``, larger fleets
(doubling) get a gateway and a paced window only, to find the largest N whose readings the
gateway still turns into DeviceStates (>= 99 % of offered).

"Ingested" readings: a reading counts when a DeviceState carries it, i.e. a state whose arrival
time differs from the previous state of that device. The supervisor reads the adapter's latest
telemetry every ``poll_interval_s``; at half the report interval every reading is seen at least
once unless the gateway falls behind. Offered and ingested are both counted by the reading's
*publish* timestamp (the ``timestamp`` field the load wrote), over the same window, after a grace
period, so readings in flight at the window's end are not counted as lost.

Every loop is bounded in time and count; children exit when their stdin closes, on ``quit``, or
after 15 minutes at most.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import itertools
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    HOST,
    arg_parser,
    cpu_model,
    cpu_s,
    emit,
    fmt,
    pct,
    print_command,
    read_commands,
    rss_bytes,
    run,
    setup_logging,
    start_child,
    stop_child,
    write_results,
)

ROOT = "derms/devices/v1"
log = logging.getLogger("bench.mqtt_devices")

# Bounds: no loop in this file may run longer or more often than these.
CHILD_MAX_LIFE_S = 900.0
MAX_BATCH = 20_000
TICK_S = 0.01
WATCH_TIMEOUT_S = 20.0
MAX_STEP_N = 64_000
KEEPS_UP = 0.99
FLAT_RATE = 5000.0  # default messages/s offered in the "flat out" windows (--flat-rate)
REPS = 3
RATED_KW = 3.0  # SimThermostat's default house


def device_ids(n: int) -> list[str]:
    return [f"th-{i:05d}" for i in range(n)]


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat().replace("+00:00", "Z")


def _pcts(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    p99 = pct(ordered, 0.99)
    assert p99 is not None
    return {
        "p50": round(scale * statistics.median(ordered), 1),
        "p99": round(scale * p99, 1),
        "max": round(scale * ordered[-1], 1),
    }


# =============================================================================== child protocol

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def serve(handlers: dict[str, Handler], ready: dict[str, Any]) -> None:
    """Answer JSON-line requests on stdin until ``quit``, stdin closing, or the life bound."""
    tasks: set[asyncio.Task[None]] = set()

    async def handle(msg: dict[str, Any]) -> None:
        try:
            out = await handlers[msg["op"]](msg)
        except Exception as exc:  # report, do not die: the orchestrator decides
            log.exception("op %s failed", msg.get("op"))
            out = {"error": f"{type(exc).__name__}: {exc}"}
        emit({"id": msg["id"], **out})

    emit({"ready": True, "pid": os.getpid(), **ready})
    async for msg in read_commands(time.monotonic() + CHILD_MAX_LIFE_S):
        task = asyncio.create_task(handle(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Child:
    """One child process seen from the orchestrator: ``call(op)`` → its JSON reply."""

    def __init__(self, role: str, args: list[str]) -> None:
        self.role = role
        self.args = args
        self.pid = 0
        self.ready: dict[str, Any] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)

    async def start(self, timeout_s: float) -> dict[str, Any]:
        self._proc, self.ready = await start_child(
            "bench.mqtt_devices",
            ["--role", self.role, *self.args],
            ready_timeout_s=timeout_s,
            stop_timeout_s=20,
            limit=2**24,
            name=self.role,
        )
        self.pid = self._proc.pid
        self._reader = asyncio.create_task(self._read(), name=f"{self.role}-reader")
        return self.ready

    async def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            msg = json.loads(line)
            fut = self._waiters.pop(str(msg.get("id")), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(RuntimeError(f"{self.role} child went away"))

    async def call(self, op: str, timeout_s: float = 60.0, **kwargs: Any) -> dict[str, Any]:
        assert self._proc is not None
        assert self._proc.stdin is not None
        rid = str(next(self._ids))
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        self._proc.stdin.write(json.dumps({"id": rid, "op": op, **kwargs}).encode() + b"\n")
        await self._proc.stdin.drain()
        async with asyncio.timeout(timeout_s):
            reply = await fut
        if "error" in reply:
            raise RuntimeError(f"{self.role} {op}: {reply['error']}")
        return reply

    def cpu_s(self) -> float:
        return cpu_s(self.pid)

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await stop_child(proc, 20)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None


# =============================================================================== load child


@dataclass
class Watch:
    """Waits for every device to receive a command with ``action`` at or after ``after``."""

    action: str
    after: float
    n: int
    got: set[str] = field(default_factory=set)
    t_last: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def hit(self, device_id: str, action: str, t: float) -> None:
        if action == self.action and t >= self.after and device_id not in self.got:
            self.got.add(device_id)
            self.t_last = max(self.t_last, t)
            if len(self.got) >= self.n:
                self.done.set()


async def _load_main(port: int, n: int, interval: float, k: int) -> None:
    import aiomqtt

    from protocols.mqtt.devices import (
        Availability,
        DeviceTopics,
        MessageKind,
        decode_result,
        decode_telemetry,
        encode,
    )
    from simulators.mqtt_devices import SimThermostat, ThermalHouse

    # aiomqtt warns on every publish beyond 10 in flight: that is the point of a flat-out run.
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    topics = DeviceTopics(ROOT)
    ids = device_ids(n)
    tel_topics = [topics.topic(d, MessageKind.TELEMETRY) for d in ids]
    templates: list[tuple[bytes, bytes]] = []
    births: list[tuple[str, bytes, str, bytes]] = []
    for i, d in enumerate(ids):
        sim = SimThermostat(d, house=ThermalHouse(indoor_c=21.5 + 0.1 * (i % 10), on=i % 2 == 0))
        body = encode(sim.telemetry())
        stamp = sim.telemetry().timestamp  # any: only its position in the JSON matters
        head, _, rest = body.partition(b'"timestamp":"')
        _, _, tail = rest.partition(b'"')
        templates.append((head + b'"timestamp":"', b'"' + tail))
        del stamp
        online = Availability(device_id=d, timestamp=datetime.now(UTC), online=True)
        births.append(
            (
                topics.topic(d, MessageKind.BIRTH),
                encode(sim.birth()),
                topics.topic(d, MessageKind.AVAILABILITY),
                encode(online),
            )
        )
    # Self-check: what we send is what a device sends (the gateway's own decoders accept it).
    head, tail = templates[0]
    decode_telemetry(head + _iso(time.time()).encode() + tail, ids[0])
    decode_result(_result(ids[0], "gw1-x", time.time()), ids[0])

    def client(name: str) -> aiomqtt.Client:
        return aiomqtt.Client(
            HOST,
            port,
            identifier=f"bench-load-{name}-{uuid.uuid4().hex[:6]}",
            protocol=aiomqtt.ProtocolVersion.V5,
            keepalive=60,
            timeout=30,
            max_queued_incoming_messages=0,
        )

    pubs = [client(f"pub{j}") for j in range(k)]
    cmd = client("cmd")
    offered: list[tuple[float, int]] = []  # (publish timestamp, messages with it)
    published = 0
    commands = 0
    watches: dict[str, Watch] = {}
    flat_on = False
    result_tasks: set[asyncio.Task[None]] = set()

    async def birth_all() -> float:
        t0 = time.monotonic()
        for start in range(0, n, 500):
            chunk = range(start, min(n, start + 500))
            await asyncio.gather(
                *(pubs[i % k].publish(births[i][0], births[i][1], 1, True) for i in chunk),
                *(pubs[i % k].publish(births[i][2], births[i][3], 1, True) for i in chunk),
            )
        return time.monotonic() - t0

    async def paced() -> None:
        nonlocal published
        rate = n / interval
        sent = 0
        t0 = time.monotonic()
        while True:
            if flat_on:
                await asyncio.sleep(0.05)
                t0 = time.monotonic() - sent / rate  # resume without a catch-up burst
                continue
            due = min(int((time.monotonic() - t0) * rate) - sent, MAX_BATCH)
            if due > 0:
                wall = time.time()
                stamp = _iso(wall).encode()
                for j in range(sent, sent + due):
                    i = j % n
                    head, tail = templates[i]
                    await pubs[i % k].publish(tel_topics[i], head + stamp + tail, 0)
                sent += due
                published += due
                offered.append((datetime.fromisoformat(stamp.decode()).timestamp(), due))
            await asyncio.sleep(TICK_S)

    replies_in_flight = asyncio.Semaphore(64)

    async def answer_one(topic: str, reply: bytes) -> None:
        async with replies_in_flight:
            await cmd.publish(topic, reply, 1)

    async def answer() -> None:
        nonlocal commands
        prefix = len(ROOT) + 1
        async for message in cmd.messages:
            t = time.time()
            topic = message.topic.value
            device_id = topic[prefix : topic.rindex("/")]
            payload = message.payload
            data = json.loads(payload if isinstance(payload, bytes | bytearray) else b"{}")
            commands += 1
            action = str(data.get("body", {}).get("action"))
            for w in watches.values():
                w.hit(device_id, action, t)
            reply = _result(device_id, str(data.get("command_id")), time.time())
            # Not awaited inline: a QoS 1 publish waits for its PUBACK, and the next command's
            # receipt must not wait behind it. Bounded: aiomqtt scans every pending call on each
            # publish, so N results in flight at once would cost this one client O(N^2) (real
            # devices each have their own client and answer one command each).
            task = asyncio.create_task(
                answer_one(topics.topic(device_id, MessageKind.RESULT), reply)
            )
            result_tasks.add(task)
            task.add_done_callback(result_tasks.discard)

    async def op_counters(_: dict[str, Any]) -> dict[str, Any]:
        return {"published": published, "commands": commands, "cpu_s": time.process_time()}

    async def op_offered(msg: dict[str, Any]) -> dict[str, Any]:
        t0, t1 = msg["t0"], msg["t1"]
        return {"offered": sum(c for ts, c in offered if t0 <= ts < t1)}

    async def op_arm(msg: dict[str, Any]) -> dict[str, Any]:
        wid = uuid.uuid4().hex[:8]
        watches[wid] = Watch(msg["action"], float(msg["after"]), n)
        return {"wid": wid}

    async def op_wait(msg: dict[str, Any]) -> dict[str, Any]:
        w = watches[msg["wid"]]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(float(msg["wait_s"])):
                await w.done.wait()
        watches.pop(msg["wid"], None)
        return {"ok": w.done.is_set(), "t_last": w.t_last, "got": len(w.got)}

    async def op_flat(msg: dict[str, Any]) -> dict[str, Any]:
        """Publish telemetry as fast as the clients go, for ``seconds``."""
        nonlocal flat_on, published
        flat_on = True
        count = [0] * k
        deadline = time.monotonic() + float(msg["seconds"])
        c0, w0 = time.process_time(), time.monotonic()

        async def blast(j: int) -> None:
            # paho's own publish, not aiomqtt's: aiomqtt keeps a future per message, which
            # made the load, not the consumer, the limit. paho queues the packet and writes
            # what the socket takes; its queue (private ``_out_packet``) is kept under 2,000.
            paho = pubs[j]._client
            mine = list(range(j, n, k))
            per_batch_s = 256 * k / float(msg["rate"])
            start = time.monotonic()
            for rnd in itertools.count():
                if time.monotonic() >= deadline or rnd > 10_000_000:
                    return
                # Capped at --flat-rate: well above what a consumer takes, but without the load
                # taking every cycle the consumer under test needs on a small machine.
                ahead = start + rnd * per_batch_s - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
                stamp = _iso(time.time()).encode()
                for x in range(256):
                    i = mine[(rnd * 256 + x) % len(mine)]
                    info = paho.publish(tel_topics[i], templates[i][0] + stamp + templates[i][1])
                    count[j] += info.rc == 0
                for _ in range(100_000):
                    if len(paho._out_packet) <= 2000 or time.monotonic() >= deadline:
                        break
                    await asyncio.sleep(0.001)
                await asyncio.sleep(0)

        try:
            await asyncio.gather(*(blast(j) for j in range(k)))
        finally:
            flat_on = False
        total = sum(count)
        published += total
        wall = time.monotonic() - w0
        return {"published": total, "wall_s": wall, "cpu_s": time.process_time() - c0}

    async with contextlib.AsyncExitStack() as stack:
        for c in (*pubs, cmd):
            await stack.enter_async_context(c)
        await cmd.subscribe(topics.wildcard(MessageKind.COMMAND), qos=1)
        births_s = await birth_all()
        async with asyncio.TaskGroup() as tg:
            t_paced = tg.create_task(paced(), name="paced")
            t_answer = tg.create_task(answer(), name="answer")
            await serve(
                {
                    "counters": op_counters,
                    "offered": op_offered,
                    "arm": op_arm,
                    "wait": op_wait,
                    "flat": op_flat,
                },
                {"births_s": round(births_s, 3)},
            )
            t_paced.cancel()
            t_answer.cancel()
        for task in list(result_tasks):
            task.cancel()


def _result(device_id: str, command_id: str, wall: float) -> bytes:
    return json.dumps(
        {
            "schema_version": "1",
            "device_id": device_id,
            "timestamp": _iso(wall),
            "command_id": command_id,
            "status": "accepted",
        },
        separators=(",", ":"),
    ).encode()


# =============================================================================== raw child


async def _raw_main(port: int) -> None:
    import aiomqtt

    count = 0

    async def consume(client: aiomqtt.Client) -> None:
        nonlocal count
        async for message in client.messages:
            str(message.topic)
            payload = message.payload
            json.loads(payload if isinstance(payload, bytes | bytearray) else b"null")
            count += 1

    async def op_counters(_: dict[str, Any]) -> dict[str, Any]:
        return {"consumed": count, "cpu_s": time.process_time()}

    async with aiomqtt.Client(
        HOST,
        port,
        identifier=f"bench-raw-{uuid.uuid4().hex[:6]}",
        # As the gateway's device link (DeviceMqttConfig.protocol and .max_queued_incoming).
        protocol=aiomqtt.ProtocolVersion.V311,
        max_queued_incoming_messages=50_000,
    ) as client:
        await client.subscribe(f"{ROOT}/+/telemetry", qos=1)
        task = asyncio.create_task(consume(client))
        try:
            await serve({"counters": op_counters}, {})
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


# =============================================================================== gateway child


def gateway_config(port: int, n: int, interval: float, gateway_id: str, store: Path) -> Any:
    from composition.config import parse_config

    stale = max(15.0, 3 * interval)
    devices = [
        {
            "device_id": d,
            "der_class": "thermostat",
            "adapter": "mqtt_thermostat",
            "location": {"substation": "s1", "feeder": f"f{i % 4 + 1}"},
            "ratings": {"max_charge_kw": RATED_KW, "max_discharge_kw": RATED_KW, "capacity_kwh": 3},
            "mqtt": {
                "stale_after_s": stale,
                "connect_wait_s": min(60.0, interval + 2.0),
                "result_timeout_s": 5.0,
            },
        }
        for i, d in enumerate(device_ids(n))
    ]
    return parse_config(
        {
            "gateway_id": gateway_id,
            "broker": {"host": HOST, "port": port, "protocol": "5"},
            "store": {"path": str(store)},
            "settlement": {"timezone": "UTC"},
            "timing": {
                "poll_interval_s": interval / 2,
                "control_period_s": 1.0,
                "telemetry_period_s": 5.0,
                "stale_after_s": stale,
                "io_timeout_s": 5.0,
                "backoff_max_s": 2.0,
            },
            "device_mqtt": {"host": HOST, "port": port, "topic_root": ROOT, "backoff_max_s": 2.0},
            "devices": devices,
        }
    )


class WarningCounter(logging.Handler):
    """Counts log records per logger; prints only the first few (N devices = N warnings)."""

    def __init__(self, show: int = 5) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}
        self.show = show

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.name] = self.counts.get(record.name, 0) + 1
        self.first.setdefault(record.name, record.getMessage()[:200])
        if record.name != "mqtt" and sum(self.counts.values()) <= self.show:
            sys.stderr.write(f"[gateway child] {record.levelname} {record.getMessage()}\n")


async def _gateway_main(port: int, n: int, interval: float, gateway_id: str) -> None:
    from composition.app import GatewayApp
    from composition.runtime import settle_heap

    warnings = WarningCounter()
    logging.getLogger().handlers[:] = [warnings]
    logging.getLogger().setLevel(logging.WARNING)

    states = 0
    last: dict[str, datetime] = {}
    pubs: list[float] = []  # publish timestamps of readings that reached a DeviceState
    arrival_lag: list[float] = []  # publish → delivered to the adapter by the link
    state_lag: list[float] = []  # publish → DeviceState

    gc_time = [0.0, 0.0]  # total seconds in the collector; start of the current collection

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_time[1] = time.perf_counter()
        else:
            gc_time[0] += time.perf_counter() - gc_time[1]

    gc.callbacks.append(on_gc)

    with tempfile.TemporaryDirectory(prefix="bench-mqtt-gw-") as tmp:
        config = gateway_config(port, n, interval, gateway_id, Path(tmp) / "gw.sqlite")
        gc.collect()
        rss0 = rss_bytes()
        app = GatewayApp(config)
        gateway = app.core
        if not os.environ.get("BENCH_NO_SETTLE_HEAP"):
            settle_heap()  # as `derms-gateway run` does
        adapters = {k: s.adapter for k, s in gateway.supervisors.items()}

        def on_state(state: Any) -> None:
            nonlocal states
            states += 1
            if last.get(state.device_id) == state.timestamp:
                return  # the same reading, polled again
            last[state.device_id] = state.timestamp
            # The reading's own timestamp (set by the load at publish) is not in DeviceState:
            # read it from the adapter's cache (private; see README "hooks").
            telemetry = adapters[state.device_id]._seen.telemetry  # type: ignore[attr-defined]
            pub = telemetry.timestamp.timestamp()
            pubs.append(pub)
            arrival_lag.append(state.timestamp.timestamp() - pub)
            state_lag.append(time.time() - pub)

        gateway.state_listeners.append(on_state)
        t0 = time.monotonic()
        task = asyncio.create_task(app.run(), name="gateway-under-bench")
        deadline = t0 + 60 + 0.01 * n
        while not all(s.available for s in gateway.supervisors.values()):
            if task.done():
                task.result()
                raise RuntimeError("gateway stopped before all devices were online")
            if time.monotonic() > deadline:
                up = sum(s.available for s in gateway.supervisors.values())
                stats = app.device_mqtt.stats if app.device_mqtt else None
                raise TimeoutError(
                    f"only {up}/{n} devices online; link {stats}; warnings {warnings.counts}"
                )
            await asyncio.sleep(0.05)
        connect_s = time.monotonic() - t0
        await asyncio.sleep(1.0)
        gc.collect()
        rss1 = rss_bytes()
        link = app.device_mqtt
        assert link is not None

        async def op_counters(_: dict[str, Any]) -> dict[str, Any]:
            st = link.stats
            return {
                "states": states,
                "new": len(pubs),
                "link_ok": st.received - st.dropped_unknown - st.dropped_invalid,
                "link_dropped": st.dropped_unknown + st.dropped_invalid,
                "cpu_s": time.process_time(),
                "gc_s": gc_time[0],
                "rss": rss_bytes(),
                "available": sum(s.available for s in gateway.supervisors.values()),
                "warnings": warnings.counts,
                "first_warnings": warnings.first,
            }

        async def op_ingested(msg: dict[str, Any]) -> dict[str, Any]:
            t0, t1 = msg["t0"], msg["t1"]
            idx = [i for i, p in enumerate(pubs) if t0 <= p < t1]
            return {
                "ingested": len(idx),
                "arrival_lag_ms": _pcts([arrival_lag[i] for i in idx]),
                "state_lag_ms": _pcts([state_lag[i] for i in idx]),
            }

        async def op_profile(msg: dict[str, Any]) -> dict[str, Any]:
            profiler = cProfile.Profile()
            profiler.enable()
            await asyncio.sleep(float(msg["seconds"]))
            profiler.disable()
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("tottime").print_stats(25)
            sys.stderr.write(f"---- cProfile, gateway child, N={n}: {msg.get('what')}\n")
            sys.stderr.write(out.getvalue())
            return {}

        try:
            await serve(
                {"counters": op_counters, "ingested": op_ingested, "profile": op_profile},
                {
                    "connect_s": round(connect_s, 2),
                    "rss_before_mib": round(rss0 / 2**20, 1),
                    "rss_after_mib": round(rss1 / 2**20, 1),
                },
            )
        finally:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=15)
            if done:
                with contextlib.suppress(asyncio.CancelledError):
                    task.result()


# =============================================================================== orchestrator


class BenchBroker:
    """mosquitto for the bench: anonymous, queues sized for the fleet, ``$SYS`` every second."""

    def __init__(self, n: int) -> None:
        from simulators.broker import MosquittoBroker

        queued = max(100_000, 50 * n)
        self._dir = tempfile.TemporaryDirectory(prefix="bench-mqtt-broker-")
        logfile = Path(self._dir.name) / "mosquitto.log"
        self.logfile = logfile

        class Sized(MosquittoBroker):
            def config_lines(self) -> list[str]:
                return [
                    f"listener {self.port} 127.0.0.1",
                    "allow_anonymous true",  # bench only: devices do not authenticate here
                    "persistence false",
                    # Telemetry is QoS 0 and commands/results QoS 1: mosquitto 2.0 drops either
                    # for a subscriber whose queue is full, so size it for a flat-out burst.
                    f"max_queued_messages {queued}",
                    "max_queued_bytes 0",
                    "max_inflight_messages 1000",
                    "sys_interval 1",
                    f"log_dest file {logfile}",
                    "log_type error",
                    "log_type warning",
                    "",
                ]

        self.broker = Sized()
        self.port = self.broker.port
        self.queued = queued

    async def __aenter__(self) -> BenchBroker:
        await self.broker.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.broker.stop()
        self._dir.cleanup()

    @property
    def pid(self) -> int:
        proc = self.broker._process
        return proc.pid if proc is not None else 0


class SysDropped:
    """mosquitto's ``$SYS/broker/publish/messages/dropped`` (updated every second)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.value: int | None = None
        self._stack = contextlib.AsyncExitStack()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SysDropped:
        import aiomqtt

        client = await self._stack.enter_async_context(
            aiomqtt.Client(HOST, self.port, identifier=f"bench-sys-{uuid.uuid4().hex[:6]}")
        )
        await client.subscribe("$SYS/broker/publish/messages/dropped")

        async def read() -> None:
            async for message in client.messages:
                with contextlib.suppress(ValueError, TypeError):
                    self.value = int(message.payload)  # type: ignore[arg-type]

        self._task = asyncio.create_task(read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            await self._stack.aclose()


@dataclass
class Size:
    n: int
    interval: float
    seconds: float
    full: bool
    profile: bool
    flat_rate: float
    result: dict[str, Any] = field(default_factory=dict)


async def _flat_window(
    load: Child, consumer: Child, key: str, broker: BenchBroker, seconds: float, rate: float
) -> dict[str, Any]:
    """Load publishes flat out; rate at which ``consumer`` takes messages over ``seconds``."""
    warm = min(1.0, seconds / 4)
    flat = asyncio.create_task(
        load.call("flat", seconds=warm + seconds, rate=rate, timeout_s=seconds + 60)
    )
    await asyncio.sleep(warm)
    c0 = await consumer.call("counters")
    w0, b0, l0 = time.monotonic(), cpu_s(broker.pid), load.cpu_s()
    await asyncio.sleep(seconds)
    c1 = await consumer.call("counters")
    w1, b1, l1 = time.monotonic(), cpu_s(broker.pid), load.cpu_s()
    published = await flat
    wall = w1 - w0
    got = c1[key] - c0[key]
    cpu = c1["cpu_s"] - c0["cpu_s"]
    return {
        "msgs_per_s": round(got / wall, 1),
        "offered_per_s": round(published["published"] / published["wall_s"], 1),
        "cpu_pct": round(100 * cpu / wall, 1),
        "cpu_us_per_msg": round(1e6 * cpu / got, 1) if got else None,
        "broker_cpu_pct": round(100 * (b1 - b0) / wall, 1),
        "load_cpu_pct": round(100 * (l1 - l0) / wall, 1),
    }


async def _paced_window(
    load: Child, gw: Child, broker: BenchBroker, drops: SysDropped, size: Size
) -> dict[str, Any]:
    t0 = time.time()
    g0, _ = await asyncio.gather(gw.call("counters"), load.call("counters"))
    w0, b0, l0, d0 = time.monotonic(), cpu_s(broker.pid), load.cpu_s(), drops.value
    await asyncio.sleep(size.seconds)
    g1, _ = await asyncio.gather(gw.call("counters"), load.call("counters"))
    w1, b1, l1, d1 = time.monotonic(), cpu_s(broker.pid), load.cpu_s(), drops.value
    t1 = time.time()
    # Grace: a reading published just before t1 reaches a DeviceState within one poll interval.
    await asyncio.sleep(size.interval / 2 + 1.5)
    ing = await gw.call("ingested", t0=t0, t1=t1)
    off = await load.call("offered", t0=t0, t1=t1)
    span = t1 - t0
    wall = w1 - w0
    offered, ingested = off["offered"], ing["ingested"]
    return {
        "offered_per_s": round(offered / span, 1),
        "ingested_per_s": round(ingested / span, 1),
        "ideal_per_s": round(size.n / size.interval, 1),
        "ingest_ratio": round(ingested / offered, 4) if offered else None,
        "link_per_s": round((g1["link_ok"] - g0["link_ok"]) / wall, 1),
        "states_per_s": round((g1["states"] - g0["states"]) / wall, 1),
        "gw_cpu_pct": round(100 * (g1["cpu_s"] - g0["cpu_s"]) / wall, 1),
        "gw_gc_pct": round(100 * (g1["gc_s"] - g0["gc_s"]) / wall, 1),
        "broker_cpu_pct": round(100 * (b1 - b0) / wall, 1),
        "load_cpu_pct": round(100 * (l1 - l0) / wall, 1),
        "broker_dropped": None if d0 is None or d1 is None else d1 - d0,
        "arrival_lag_ms": ing["arrival_lag_ms"],
        "state_lag_ms": ing["state_lag_ms"],
        "available": g1["available"],
    }


async def _dispatch_latency(
    load: Child, gw: Child, port: int, gateway_id: str, size: Size
) -> dict[str, Any]:
    from simulators.grid_derms import GridDermsClient
    from unified.model import AckState, utcnow

    n = size.n
    dispatch_s: list[float] = []
    release_s: list[float] = []
    ack_s: list[float] = []
    failures: list[str] = []
    allocated: list[int] = []
    async with GridDermsClient(HOST, port, gateway_id) as grid:
        await asyncio.sleep(0.5)
        c0 = await gw.call("counters")
        for rep in range(REPS):
            cid = grid.new_id("bench")
            after = time.time()
            armed = await load.call("arm", action="setpoint_offset", after=after)
            if rep == REPS - 1 and size.profile:
                prof = asyncio.create_task(gw.call("profile", seconds=2.0, what="dispatch"))
            else:
                prof = None
            t0 = time.time()
            await grid.send(
                {
                    "type": "dispatch",
                    "command_id": cid,
                    "program": "bench",
                    "target": {"group_id": "substation:s1"},
                    "kw": -RATED_KW * n,  # every house sheds its whole compressor
                    "start": utcnow().isoformat(),
                    "duration_s": 120,
                }
            )
            res = await load.call("wait", wid=armed["wid"], wait_s=WATCH_TIMEOUT_S)
            if res["ok"]:
                dispatch_s.append(res["t_last"] - t0)
            else:
                failures.append(f"{cid}: only {res['got']}/{n} devices got their command")
            with contextlib.suppress(TimeoutError):
                ack = await grid.wait_for_state(cid, AckState.ACTIVE, 10)
                ack_s.append(grid_ack_time(grid, cid) - t0)
                allocated.append(sum(1 for a in ack.allocations if a.commanded_kw < -0.1))
            if prof is not None:
                await prof
            armed = await load.call("arm", action="end_event", after=time.time())
            t0 = time.time()
            await grid.send({"type": "cancel", "command_id": grid.new_id("cancel"), "cancels": cid})
            res = await load.call("wait", wid=armed["wid"], wait_s=WATCH_TIMEOUT_S)
            if res["ok"]:
                release_s.append(res["t_last"] - t0)
            else:
                failures.append(f"cancel {cid}: only {res['got']}/{n} devices released")
            await asyncio.sleep(0.5)
        c1 = await gw.call("counters")
    return {
        "gw_cpu_s": round(c1["cpu_s"] - c0["cpu_s"], 2),
        "gw_gc_s": round(c1["gc_s"] - c0["gc_s"], 2),
        "dispatch_ms": _pcts(dispatch_s),
        "release_ms": _pcts(release_s),
        "active_ack_ms": _pcts(ack_s),
        "dispatch_s": [round(x, 3) for x in dispatch_s],
        "release_s": [round(x, 3) for x in release_s],
        "allocated": allocated,
        "failures": failures,
    }


def grid_ack_time(grid: Any, command_id: str) -> float:
    """Arrival of the ``active`` ack: the client keeps acks, not times, so use the ack's own
    timestamp (stamped by the gateway when it published it, same machine clock)."""
    from unified.model import AckState

    acks = grid.observed.acks.get(command_id, [])
    return next(a.timestamp.timestamp() for a in acks if a.state is AckState.ACTIVE)


async def run_size(size: Size, pub_clients: int) -> dict[str, Any]:
    n, interval = size.n, size.interval
    res: dict[str, Any] = {"devices": n, "interval_s": interval, "full": size.full}
    gateway_id = f"bench-{uuid.uuid4().hex[:6]}"
    async with BenchBroker(n) as broker, SysDropped(broker.port) as drops:
        res["broker_max_queued"] = broker.queued
        common = ["--port", str(broker.port), "--n", str(n), "--interval", str(interval)]
        load = Child("load", [*common, "--pub-clients", str(pub_clients)])
        gw = Child("gateway", [*common, "--gateway-id", gateway_id])
        raw = Child("raw", ["--port", str(broker.port)])
        try:
            ready = await load.start(60 + 0.01 * n)
            res["births_s"] = ready["births_s"]
            half = size.seconds / 2
            if size.full:
                await raw.start(30)
                res["raw_before"] = await _flat_window(
                    load, raw, "consumed", broker, half, size.flat_rate
                )
                await raw.stop()
            ready = await gw.start(120 + 0.02 * n)
            res["connect_s"] = ready["connect_s"]
            res["rss_before_mib"] = ready["rss_before_mib"]
            res["rss_after_mib"] = ready["rss_after_mib"]
            res["rss_per_device_kib"] = round(
                1024 * (ready["rss_after_mib"] - ready["rss_before_mib"]) / n, 1
            )
            await asyncio.sleep(interval)  # one full report interval before measuring
            res["paced"] = await _paced_window(load, gw, broker, drops, size)
            if size.full:
                res["latency"] = await _dispatch_latency(load, gw, broker.port, gateway_id, size)
                if size.profile:
                    prof = asyncio.create_task(
                        gw.call("profile", seconds=half, what="flat-out ingest", timeout_s=120)
                    )
                res["gw_flat"] = await _flat_window(
                    load, gw, "link_ok", broker, half, size.flat_rate
                )
                if size.profile:
                    await prof
                counters = await gw.call("counters")
                res["warnings"] = counters["warnings"]
                res["first_warnings"] = counters["first_warnings"]
            await gw.stop()
            if size.full:
                await raw.start(30)
                res["raw_after"] = await _flat_window(
                    load, raw, "consumed", broker, half, size.flat_rate
                )
                await raw.stop()
                raw_rate = statistics.fmean(
                    [res["raw_before"]["msgs_per_s"], res["raw_after"]["msgs_per_s"]]
                )
                raw_cpu = statistics.fmean(
                    [
                        x
                        for x in (
                            res["raw_before"]["cpu_us_per_msg"],
                            res["raw_after"]["cpu_us_per_msg"],
                        )
                        if x is not None
                    ]
                    or [0.0]
                )
                res["raw_msgs_per_s"] = round(raw_rate, 1)
                res["raw_cpu_us_per_msg"] = round(raw_cpu, 1)
                res["ratio"] = (
                    round(res["gw_flat"]["msgs_per_s"] / raw_rate, 3) if raw_rate else None
                )
        finally:
            await gw.stop()
            await raw.stop()
            await load.stop()
    return res


def _f(value: object, spec: str = ".0f") -> str:
    return fmt(value, spec)


def print_table(results: list[dict[str, Any]], interval: float, flat_rate: float) -> None:
    full = [r for r in results if "error" not in r and r["full"]]
    print()
    print(f"Paced: every device reports every {interval:g} s (gateway poll_interval_s = "
          f"{interval / 2:g}); dispatch/cancel to all N, {REPS} reps")  # fmt: skip
    head = (
        f"{'devices':>7}  {'offered/s':>9}  {'ingested/s':>10}  {'loss %':>6}  {'gw CPU%':>7}  "
        f"{'lag p50/p99 ms':>14}  {'RSS/dev KiB':>11}  {'connect s':>9}  "
        f"{'dispatch p50/max ms':>19}  {'release p50/max ms':>18}"
    )
    print(head)
    print("-" * len(head))
    for r in full:
        p, lat = r["paced"], r["latency"]
        loss = 100 * (1 - p["ingest_ratio"]) if p["ingest_ratio"] is not None else None
        lag = f"{_f(p['state_lag_ms']['p50'])}/{_f(p['state_lag_ms']['p99'])}"
        disp = f"{_f(lat['dispatch_ms']['p50'])}/{_f(lat['dispatch_ms']['max'])}"
        rel = f"{_f(lat['release_ms']['p50'])}/{_f(lat['release_ms']['max'])}"
        print(
            f"{r['devices']:>7}  {p['offered_per_s']:>9.1f}  {p['ingested_per_s']:>10.1f}  "
            f"{_f(loss, '.2f'):>6}  {p['gw_cpu_pct']:>7.1f}  {lag:>14}  "
            f"{r['rss_per_device_kib']:>11.1f}  {r['connect_s']:>9.1f}  {disp:>19}  {rel:>18}"
        )
    print()
    print(
        f"Flat out: the load offers {flat_rate:g} telemetry msgs/s (more than either consumer "
        "takes); msgs/s each consumer takes"
    )
    head = (
        f"{'devices':>7}  {'raw msg/s':>9}  {'raw before/after':>16}  {'gateway msg/s':>13}  "
        f"{'ratio':>5}  {'CPU µs/msg raw/gw':>17}  {'gw CPU%':>7}  {'offered/s':>9}  "
        f"{'broker CPU%':>11}  {'load CPU%':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in full:
        g = r["gw_flat"]
        spread = f"{r['raw_before']['msgs_per_s']:.0f}/{r['raw_after']['msgs_per_s']:.0f}"
        cpu = f"{r['raw_cpu_us_per_msg']:.0f}/{_f(g['cpu_us_per_msg'])}"
        print(
            f"{r['devices']:>7}  {r['raw_msgs_per_s']:>9.0f}  {spread:>16}  "
            f"{g['msgs_per_s']:>13.0f}  {_f(r['ratio'], '.2f'):>5}  {cpu:>17}  "
            f"{g['cpu_pct']:>7.0f}  {g['offered_per_s']:>9.0f}  {g['broker_cpu_pct']:>11.0f}  "
            f"{g['load_cpu_pct']:>9.0f}"
        )
    print()
    for r in full:
        p, lat = r["paced"], r["latency"]
        print(
            f"N={r['devices']}: arrival lag p50/p99/max {p['arrival_lag_ms']['p50']}/"
            f"{p['arrival_lag_ms']['p99']}/{p['arrival_lag_ms']['max']} ms; states/s "
            f"{p['states_per_s']}; gateway GC {p['gw_gc_pct']}% of a core; "
            f"broker CPU {p['broker_cpu_pct']}%, load CPU "
            f"{p['load_cpu_pct']}%, broker dropped {p['broker_dropped']}; dispatch s "
            f"{lat['dispatch_s']}, release s {lat['release_s']}, active ack ms "
            f"{lat['active_ack_ms']['p50']}, devices shedding {lat['allocated']}, gateway CPU "
            f"{lat['gw_cpu_s']} s of which GC {lat['gw_gc_s']} s over the dispatch reps; "
            f"births {r['births_s']} s; RSS {r['rss_before_mib']} -> {r['rss_after_mib']} MiB; "
            f"gateway warnings {r.get('warnings')} (first of each: {r.get('first_warnings')})"
        )
        for failure in lat["failures"]:
            print(f"  FAILURE: {failure}")
    if len(full) >= 2:
        lo, hi = min(full, key=lambda r: r["devices"]), max(full, key=lambda r: r["devices"])
        grow = (hi["rss_after_mib"] - hi["rss_before_mib"]) - (
            lo["rss_after_mib"] - lo["rss_before_mib"]
        )
        print(
            f"marginal RSS per device (N={lo['devices']} -> {hi['devices']}): "
            f"{1024 * grow / (hi['devices'] - lo['devices']):.1f} KiB"
        )
    steps = sorted((r for r in results if "error" not in r), key=lambda r: r["devices"])
    if steps:
        print()
        print(f"Stepping N at {interval:g} s (keeps up = ingested >= {KEEPS_UP:.0%} of offered)")
        for r in steps:
            p = r["paced"]
            ok = p["ingest_ratio"] is not None and p["ingest_ratio"] >= KEEPS_UP
            print(
                f"  N={r['devices']:>6}: offered {p['offered_per_s']:>7.1f}/s, ingested "
                f"{p['ingested_per_s']:>7.1f}/s ({_f(p['ingest_ratio'], '.3f')}), gw CPU "
                f"{p['gw_cpu_pct']:.0f}%, lag p99 {_f(p['state_lag_ms']['p99'])} ms, "
                f"connect {r['connect_s']} s, RSS/dev {r['rss_per_device_kib']} KiB -> "
                f"{'keeps up' if ok else 'FALLS BEHIND'}"
            )
        good = [
            r["devices"]
            for r in steps
            if r["paced"]["ingest_ratio"] is not None and r["paced"]["ingest_ratio"] >= KEEPS_UP
        ]
        bad = [r["devices"] for r in steps if r["devices"] not in good]
        best = max(good, default=None)
        first_bad = min((b for b in bad if best is None or b > best), default=None)
        if first_bad is None:
            print(f"max N kept up at {interval:g} s: >= {best} (no step fell behind)")
        else:
            print(f"max N kept up at {interval:g} s: {best} (N={first_bad} fell behind)")
    for r in results:
        if "error" in r:
            print(f"N={r['devices']}: FAILED: {r['error']}")


async def orchestrate(args: argparse.Namespace) -> int:
    devices = [int(x) for x in args.devices.split(",") if x.strip()]
    print_command("bench.mqtt_devices")
    import aiomqtt
    import paho.mqtt
    import pydantic

    mosq = "mosquitto"
    with contextlib.suppress(Exception):
        out = await asyncio.create_subprocess_exec(
            "mosquitto", "-h", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        first = (await out.stdout.readline()).decode().strip() if out.stdout else ""
        await out.wait()
        mosq = first or mosq
    print(
        f"machine: nproc={os.cpu_count()} {cpu_model('?')} python={platform.python_version()} "
        f"{platform.system()} {platform.machine()}; {mosq}; aiomqtt {aiomqtt.__version__}, "
        f"paho-mqtt {paho.mqtt.__version__}, pydantic {pydantic.VERSION}"
    )
    print(
        f"per N: {args.seconds:g} s paced window, {args.seconds / 2:g} s flat-out windows; "
        f"load = {args.pub_clients} publishing clients + 1 command client; fresh mosquitto, "
        f"load, gateway and raw processes per N",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    t_start = time.monotonic()

    async def one(n: int, full: bool) -> dict[str, Any]:
        print(f"... N={n} ({'full' if full else 'step: paced window only'})", flush=True)
        t0 = time.monotonic()
        bound = 150 + 6 * args.seconds + 0.03 * n + (8 * args.interval if full else 0)
        size = Size(n, args.interval, args.seconds, full, args.profile and full, args.flat_rate)
        try:
            async with asyncio.timeout(bound):
                res = await run_size(size, args.pub_clients)
        except Exception as exc:
            log.exception("N=%d failed", n)
            res = {"devices": n, "full": full, "error": f"{type(exc).__name__}: {exc}"}
        res["wall_s"] = round(time.monotonic() - t0, 1)
        print(f"    done in {res['wall_s']} s", flush=True)
        return res

    for n in devices:
        results.append(await one(n, True))
    if not args.no_step:
        ok = [r for r in results if "error" not in r]
        n = max(devices) * 2
        keeps = all(
            r["paced"]["ingest_ratio"] >= KEEPS_UP for r in ok if r["paced"]["ingest_ratio"]
        )
        budget_end = t_start + args.budget_s
        while keeps and n <= MAX_STEP_N:
            # Each step costs about its windows plus start-up (births, connect): stop in budget.
            need = args.seconds + args.interval * 2 + 10 + 0.002 * n
            if time.monotonic() + need > budget_end:
                print(f"... stepping stops: N={n} would exceed the --budget-s", flush=True)
                break
            res = await one(n, False)
            results.append(res)
            ratio = res.get("paced", {}).get("ingest_ratio")
            keeps = "error" not in res and ratio is not None and ratio >= KEEPS_UP
            n *= 2
    print_table(results, args.interval, args.flat_rate)
    if args.json:
        write_results(args.json, results, cpu=False)
    print(f"total {time.monotonic() - t_start:.0f} s")
    return 0 if all("error" not in r for r in results[: len(devices)]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser("bench.mqtt_devices", __doc__)
    parser.add_argument("--devices", default="500,2000", help="comma-separated fleet sizes")
    parser.add_argument("--interval", type=float, default=5.0, help="telemetry report interval s")
    parser.add_argument("--seconds", type=float, default=10.0, help="paced window length")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--pub-clients", type=int, default=4, help="load's publishing clients")
    parser.add_argument(
        "--flat-rate", type=float, default=FLAT_RATE, help="offered msgs/s when flat out"
    )
    parser.add_argument("--no-step", action="store_true", help="skip the max-N stepping")
    parser.add_argument(
        "--budget-s", type=float, default=175.0, help="no new step starts past this run time"
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the gateway (dispatch, flat out)"
    )
    parser.add_argument("--role", choices=("load", "gateway", "raw"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--gateway-id", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 120 or not 0.5 <= args.interval <= 60:
        parser.error("--seconds must be in (0, 120] and --interval in [0.5, 60]")
    if not 1 <= args.pub_clients <= 64:
        parser.error("--pub-clients must be in [1, 64]")
    setup_logging()
    if args.role == "load":
        run(_load_main(args.port, args.n, args.interval, args.pub_clients))
        return 0
    if args.role == "raw":
        run(_raw_main(args.port))
        return 0
    if args.role == "gateway":
        run(_gateway_main(args.port, args.n, args.interval, args.gateway_id))
        return 0
    return int(run(orchestrate(args)))


if __name__ == "__main__":
    sys.exit(main())
