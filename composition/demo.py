"""The self-contained demo: everything on loopback, nothing to configure.

A broker (mosquitto if installed, else the embedded one), a fleet of simulated SunSpec batteries
on Modbus TCP in two feeders of one substation, the gateway, and a scripted Grid DERMS that:

0. an OEM cloud (an OpenADR 2.0b VEN fronting two smart thermostats and a home battery on
   ``north-f1``) joins the gateway's VTN: its resources become devices beside the Modbus ones,
1. asks feeder ``north-f1`` to discharge 12 kW for 20 s with a 4 s ramp (shared by the Modbus
   batteries and the OEM cloud's devices, each through its own protocol),
2. caps feeder ``north-f2``'s export at 4 kW with an envelope, then asks it for 10 kW of discharge
   (the envelope wins: the batteries deliver 4 kW),
3. sends one command for a feeder that does not exist (rejected with ``unknown_group``).

It prints every ack and the group power as they arrive, and exits after ``duration_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from composition.app import GatewayApp
from composition.config import parse_config
from gateway.core import Gateway
from simulators.broker import free_port, local_broker
from simulators.ev_charger import EvChargerSim, EvChargerSimConfig, EvVisit
from simulators.grid_derms import GridDermsClient
from simulators.mqtt_devices import MqttDeviceSimulator, SimWaterHeater, ThermalHouse
from simulators.mqtt_devices import SimThermostat as MqttThermostatSim
from simulators.oem_cloud import OemCloud, SimBattery, SimThermostat
from simulators.sunspec_battery import SunSpecBatterySimulator
from unified.model import Ack, AckState, ErrorMessage, GroupTelemetry, TopologyLocation, utcnow

GATEWAY_ID = "demo-gw"
FEEDERS = ("north-f1", "north-f2")


OEM = "oem-demo"
MQTT_DEVICES = {"tstat-m1": "thermostat", "tstat-m2": "thermostat", "wh-m1": "water_heater"}
CHARGER = "CP-1"


def oem_fleet() -> list[SimThermostat | SimBattery]:
    where = TopologyLocation(substation="north", feeder="north-f1")
    return [
        SimThermostat("tstat-1", location=where, indoor_c=22.3),
        SimThermostat("tstat-2", location=where, indoor_c=21.8),
        SimBattery("home-bat-1", location=where, rated_kw=5.0, capacity_kwh=13.5, soc_pct=65),
    ]


def mqtt_device(device_id: str, kind: str) -> dict[str, Any]:
    rated = 3.0 if kind == "thermostat" else 4.5
    return {
        "device_id": device_id,
        "der_class": kind,
        "adapter": f"mqtt_{kind}",
        "location": {"substation": "north", "feeder": "north-f1"},
        "ratings": {"max_charge_kw": rated, "max_discharge_kw": rated, "capacity_kwh": 3.0},
        "mqtt": {
            "comfort_min_c": 20.0,
            "comfort_max_c": 25.0,
            "stale_after_s": 5.0,
            "hold_s": 120.0,
            "connect_wait_s": 3.0,
        },
    }


def demo_config(
    ports: list[int],
    store: Path,
    broker_port: int,
    protocol: str,
    vtn_port: int,
    ocpp_port: int,
) -> dict[str, Any]:
    devices = []
    for i, port in enumerate(ports):
        feeder = FEEDERS[i % len(FEEDERS)]
        devices.append(
            {
                "device_id": f"bat-{i + 1:03d}",
                "der_class": "battery",
                "location": {
                    "substation": "north",
                    "feeder": feeder,
                    "transformer": f"{feeder}-t{i // 4 + 1}",
                },
                "adapter": "sunspec_battery",
                "ratings": {"max_charge_kw": 5.0, "max_discharge_kw": 5.0, "capacity_kwh": 13.5},
                "constraints": {"reserve_soc_pct": 20.0},
                "sunspec": {"port": port},
            }
        )
    return {
        "gateway_id": GATEWAY_ID,
        "broker": {"port": broker_port, "protocol": protocol},
        "store": {"path": str(store)},
        # The demo is watched on its own output; a machine may run one on 9108 already.
        "operator": {"enabled": False},
        "timing": {
            "control_period_s": 0.5,
            "poll_interval_s": 1.0,
            "telemetry_period_s": 2.0,
            "stale_after_s": 5.0,
        },
        # Seconds, not the field's 5 min / 1 h: each dispatch is settled within the demo (with
        # no history yet, against the pre-event mean, flagged as such).
        "history": {"interval_s": 1},
        "settlement": {
            "timezone": "UTC",
            "baseline": {"interval_s": 2, "adjustment_offset_s": 0, "lookback_days": 1},
            "delay_s": 1.0,
            "fallback_window_s": 4,
        },
        "devices": devices + [mqtt_device(d, k) for d, k in MQTT_DEVICES.items()],
        # Thermostats and water heaters talk MQTT directly (here: the same local broker, on
        # their own topic root; in the field a device broker with per-device accounts).
        "device_mqtt": {"port": broker_port, "protocol": protocol, "backoff_max_s": 2.0},
        "ocpp_central": {
            "port": ocpp_port,
            "heartbeat_interval_s": 30,
            "stale_after_s": 5.0,
            "chargers": [
                {
                    "charge_point_id": CHARGER,
                    "location": {"substation": "north", "feeder": "north-f2"},
                    "max_kw": 11.0,
                }
            ],
        },
        "openadr_vtn": {
            "port": vtn_port,
            "allow_plain_http": True,  # loopback demo only; the field needs TLS + fingerprints
            "store_path": str(store.with_name("demo-vtn.sqlite")),
            "poll_interval_s": 1,
            "report_interval_s": 1,
            "stale_after_s": 5.0,
            "offline_after_s": 5.0,
            "vens": [
                {
                    "ven_name": OEM,
                    "location": {"substation": "north", "feeder": "north-f1"},
                    "programs": {"battery": {"signal": "setpoint"}},
                }
            ],
        },
    }


class Printer:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def line(self, text: str) -> None:
        click.echo(f"[{time.monotonic() - self.t0:6.1f}s] {text}")

    def ack(self, ack: Ack) -> None:
        extra = ""
        if ack.reason:
            extra = f" reason={ack.reason.value}: {ack.detail}"
        elif ack.detail:
            extra = f" ({ack.detail})"
        if ack.allocations and ack.state in (AckState.ACTIVE, AckState.COMPLETED):
            total = sum(a.commanded_kw for a in ack.allocations)
            limited = {x for a in ack.allocations for x in a.limited_by}
            extra += f" devices={len(ack.allocations)} commanded={total:+.1f} kW"
            if limited:
                extra += f" limited_by={','.join(sorted(limited))}"
            if ack.shortfall_kw:
                extra += f" shortfall={ack.shortfall_kw:.1f} kW"
        self.line(
            click.style(f"ACK   {ack.command_id:<22} {ack.state.value:<10}", bold=True) + extra
        )

    def group(self, group: GroupTelemetry) -> None:
        if not group.group_id.startswith("feeder:"):
            return
        env = ""
        if group.envelope is not None and group.envelope.export_limit_kw is not None:
            env = f" envelope export<= {group.envelope.export_limit_kw:g} kW"
        self.line(
            f"GROUP {group.group_id:<17} power={group.power_kw:+7.2f} kW "
            f"setpoint={group.setpoint_kw:+7.2f} kW reporting={group.devices_reporting}/"
            f"{group.devices_total} quality={group.quality.value} "
            f"energy>reserve={group.energy_available_kwh:.1f} kWh{env}"
        )

    def error(self, error: ErrorMessage) -> None:
        self.line(click.style(f"ERROR {error.reason.value}: {error.detail}", fg="red"))


async def run_demo(duration_s: float = 40.0, batteries: int = 6, broker: str = "auto") -> bool:
    printer = Printer()
    broker_impl = local_broker(broker)  # type: ignore[arg-type]
    sims = [
        SunSpecBatterySimulator(
            port=0,
            capacity_kwh=13.5,
            max_charge_kw=5.0,
            max_discharge_kw=5.0,
            initial_soc_pct=50.0 + 5 * (i % 5),
            time_scale=20.0,
        )
        for i in range(batteries)
    ]
    with tempfile.TemporaryDirectory(prefix="derms-demo-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            endpoint = await stack.enter_async_context(broker_impl)
            printer.line(
                f"broker: {endpoint.kind} on 127.0.0.1:{endpoint.port} (MQTT {endpoint.protocol})"
            )
            for sim in sims:
                await stack.enter_async_context(sim)
            printer.line(
                f"{len(sims)} SunSpec batteries on Modbus TCP ports "
                f"{', '.join(str(s.port) for s in sims)}"
            )
            vtn_port, ocpp_port = free_port(), free_port()
            config = parse_config(
                demo_config(
                    [s.port for s in sims],
                    Path(tmp) / "demo.sqlite",
                    endpoint.port,
                    endpoint.protocol,
                    vtn_port,
                    ocpp_port,
                )
            )
            app = GatewayApp(config)
            gateway = app.core
            gateway_task = asyncio.create_task(app.run(), name="gateway")
            oem = OemCloud(
                OEM,
                f"http://127.0.0.1:{vtn_port}/OpenADR2/Simple/2.0b",
                oem_fleet(),
                poll_interval_s=0.5,
                time_scale=20.0,
                seed=1,
            )
            oem_task = asyncio.create_task(oem.run(), name="oem-cloud")
            device_tasks = [oem_task]
            for i, (device_id, kind) in enumerate(MQTT_DEVICES.items()):
                if kind == "thermostat":
                    logic = MqttThermostatSim(
                        device_id, house=ThermalHouse(indoor_c=22.0 + 0.3 * i, on=i % 2 == 0)
                    )
                    runner = _simulate(logic, endpoint.host, endpoint.port, endpoint.protocol)
                else:
                    runner = _simulate(
                        SimWaterHeater(device_id), endpoint.host, endpoint.port, endpoint.protocol
                    )
                device_tasks.append(asyncio.create_task(runner, name=f"sim:{device_id}"))
            charger = EvChargerSim(
                EvChargerSimConfig(
                    charge_point_id=CHARGER,
                    url=f"ws://127.0.0.1:{ocpp_port}/ocpp",
                    meter_interval_s=0.5,
                    visits=(EvVisit(energy_needed_kwh=30.0, ev_max_kw=11.0),),
                )
            )
            try:
                client = await stack.enter_async_context(
                    GridDermsClient(
                        endpoint.host,
                        endpoint.port,
                        GATEWAY_ID,
                        protocol=endpoint.protocol,
                        on_ack=printer.ack,
                        on_group=printer.group,
                        on_error=printer.error,
                    )
                )
                await asyncio.wait_for(app.northbound.connected.wait(), 15)
                assert app.ocpp_central is not None
                await asyncio.wait_for(app.ocpp_central.ready.wait(), 15)
                device_tasks.append(asyncio.create_task(charger.run(), name="ev-charger"))
                printer.line(
                    f"gateway {GATEWAY_ID} online; groups: "
                    f"{', '.join(sorted(gateway.registry.groups()))}"
                )
                ok = await _script(client, gateway, oem, printer, duration_s)
            finally:
                for task in (*device_tasks, gateway_task):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
    printer.line("demo finished: " + ("all checks passed" if ok else "SOME CHECKS FAILED"))
    return ok


async def _script(
    client: GridDermsClient, gateway: Gateway, oem: OemCloud, printer: Printer, duration_s: float
) -> bool:
    deadline = time.monotonic() + duration_s
    # Let the first polls land so the planner knows every battery's state of charge, and the
    # OEM cloud register and report its resources.
    oem_ids = {f"{OEM}.{name}" for name in oem.devices}
    others = {*MQTT_DEVICES, CHARGER}

    def online(ids: set[str]) -> list[str]:
        return sorted(
            d for d in ids if (s := gateway.supervisors.get(d)) is not None and s.available
        )

    def joined() -> list[str]:
        return online(oem_ids)

    polled = asyncio.Event()
    gateway.state_listeners.append(lambda _state: polled.set())
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(min(10.0, duration_s / 3)):
            while len(joined()) < len(oem_ids) or len(online(others)) < len(others):
                await polled.wait()
                polled.clear()
    printer.line(
        f"OEM cloud {OEM} joined over OpenADR 2.0b with {len(joined())} resources: "
        f"{', '.join(joined())}"
    )
    printer.line(
        "MQTT thermostats / water heater and OCPP charger online: " + ", ".join(online(others))
    )
    now = utcnow()
    event_s = max(8.0, min(20.0, duration_s - 12))
    start = now + timedelta(seconds=1)
    commands: list[dict[str, Any]] = [
        {
            "type": "dispatch",
            "command_id": "shed-north-f1",
            "program": "peak-shave",
            "target": {"group_id": "feeder:north-f1"},
            "mode": "delta",
            "kw": -12.0,
            "start": start.isoformat(),
            "duration_s": event_s,
            "ramp_s": 4,
        },
        {
            "type": "envelope",
            "command_id": "doe-north-f2",
            "program": "doe",
            "target": {"group_id": "feeder:north-f2"},
            "intervals": [
                {
                    "start": now.isoformat(),
                    "end": (start + timedelta(seconds=event_s + 2)).isoformat(),
                    "export_limit_kw": 4.0,
                    # ... and import: the EV charging at 11 kW on this feeder gets a site cap.
                    "import_limit_kw": 6.0,
                }
            ],
        },
        {
            "type": "dispatch",
            "command_id": "shed-north-f2",
            "program": "peak-shave",
            "target": {"group_id": "feeder:north-f2"},
            "kw": -10.0,
            "start": start.isoformat(),
            "duration_s": event_s,
        },
        {
            "type": "dispatch",
            "command_id": "shed-nowhere",
            "target": {"group_id": "feeder:south-9"},
            "kw": -5.0,
            "start": start.isoformat(),
            "duration_s": 10,
        },
    ]
    for command in commands:
        printer.line(f"SEND  {command['command_id']} ({command['type']})")
        await client.send(command)
    remaining = deadline - time.monotonic()
    with contextlib.suppress(TimeoutError):
        await client.wait_for(
            lambda o: all(
                any(a.state in (AckState.COMPLETED, AckState.REJECTED) for a in o.acks.get(c, []))
                for c in ("shed-north-f1", "shed-north-f2", "shed-nowhere")
            ),
            timeout_s=max(0.1, remaining),
        )
    await asyncio.sleep(max(0.0, min(2.5, deadline - time.monotonic())))
    f1 = next(
        (a for a in reversed(client.observed.acks.get("shed-north-f1", [])) if a.allocations),
        None,
    )
    oem_share = [a for a in (f1.allocations if f1 else ()) if a.device_id.startswith(OEM)]
    if oem_share:
        printer.line(
            "OEM share of the f1 dispatch: "
            + ", ".join(f"{a.device_id} {a.commanded_kw:+.1f} kW" for a in oem_share)
        )
    with contextlib.suppress(TimeoutError):
        await client.wait_for(
            lambda o: "shed-north-f1" in o.performance,
            timeout_s=max(0.1, min(8.0, deadline + 8.0 - time.monotonic())),
        )
    report = client.observed.performance.get("shed-north-f1")
    if report is not None:
        printer.line(
            f"SETTLED shed-north-f1: baseline {report.baseline_method}, delivered "
            f"{_num(report.delivered_kwh, '.3f')} kWh, mean "
            f"{_num(report.mean_delivered_kw, '+.1f')} kW of {report.requested_kw:+.1f} kW "
            f"requested ({_num(report.performance_ratio, '.0%')}), {len(report.devices)} "
            f"devices, quality {report.quality.value}; flags "
            f"{', '.join(sorted({str(f.code) for f in report.flags})) or 'none'}"
        )
    checks = {
        "OEM cloud resources joined": len(joined()) == len(oem_ids),
        "MQTT devices and EV charger online": len(online(others)) == len(others),
        "f1 dispatch completed": AckState.COMPLETED in client.states("shed-north-f1"),
        "f2 dispatch completed": AckState.COMPLETED in client.states("shed-north-f2"),
        "unknown group rejected": AckState.REJECTED in client.states("shed-nowhere"),
        "f1 performance report published": report is not None and bool(report.devices),
    }
    for name, passed in checks.items():
        printer.line(f"CHECK {name}: {'ok' if passed else 'FAILED'}")
    return all(checks.values())


_Sim = TypeVar("_Sim", MqttThermostatSim, SimWaterHeater)


async def _simulate(device: _Sim, host: str, port: int, protocol: str) -> None:
    sim = MqttDeviceSimulator(
        device,
        host=host,
        port=port,
        protocol=protocol,  # type: ignore[arg-type]
        report_interval_s=0.5,
        time_scale=60.0,
    )
    await sim.run()


def _num(value: float | None, spec: str) -> str:
    return "?" if value is None else format(value, spec)
