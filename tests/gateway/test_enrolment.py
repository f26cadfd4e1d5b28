"""The durable registry: enrolment, updates, retirement and topology patches through the core's
registry API, kept across restarts and merged with the config file by the documented rule."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from composition.config import parse_config
from gateway.core import Gateway
from tests.gateway.test_audit_core import Acks
from unified.model import (
    BatteryRatings,
    DerClass,
    Device,
    DeviceCommand,
    DeviceState,
    Reason,
    TopologyLocation,
    utcnow,
)
from unified.registry import REGISTRY_REQUEST_ADAPTER, PendingEnrolment, RegistryChange


class QuietAdapter:
    """A device that is never reached (the tests here do not run the loops)."""

    def __init__(self, device_id: str, reach: Mapping[str, Any]) -> None:
        self._id = device_id
        self.reach = dict(reach)

    @property
    def device_id(self) -> str:
        return self._id

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def read(self) -> DeviceState:
        raise NotImplementedError

    async def apply(self, command: DeviceCommand) -> None:
        pass


def factory(device: Device, reach: Mapping[str, Any]) -> QuietAdapter:
    if "port" not in reach:
        raise ValueError("reach.port: required")
    return QuietAdapter(device.device_id, reach)


def battery(device_id: str, feeder: str = "f1", section: str | None = None) -> dict[str, Any]:
    location: dict[str, Any] = {"substation": "s1", "feeder": feeder}
    if section is not None:
        location["feeder_section"] = section
    return {
        "device_id": device_id,
        "der_class": "battery",
        "adapter": "sunspec_battery",
        "location": location,
        "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 10},
    }


def configured(*ids: str) -> list[dict[str, Any]]:
    return [battery(i) | {"sunspec": {"port": 5020 + n}} for n, i in enumerate(ids)]


class Core:
    def __init__(
        self,
        tmp_path: Path,
        devices: list[dict[str, Any]],
        programs: list[dict[str, Any]] | None = None,
    ) -> None:
        config = parse_config(
            {
                "store": {"path": str(tmp_path / "gw.sqlite")},
                "history": {"enabled": False},
                "audit": {"enabled": False},
                "devices": devices,
                "programs": programs or [],
            }
        )
        self.changes: list[RegistryChange] = []
        self.gateway = Gateway(
            config,
            devices=[d.as_device() for d in config.devices],
            adapters={},
            publisher=Acks(),
            adapter_factory=factory,
        )
        self.gateway.registry_changes.append(self.changes.append)

    async def __aenter__(self) -> Gateway:
        await self.gateway.enrolment.store.open()
        merged = await self.gateway.enrolment.load(utcnow())
        if merged is not None:
            self.changes.append(merged)
        return self.gateway

    async def __aexit__(self, *exc: object) -> None:
        await self.gateway.enrolment.store.close()


async def send(gateway: Gateway, request: dict[str, Any]) -> Any:
    ack, _ = await gateway.registry_request(REGISTRY_REQUEST_ADAPTER.validate_python(request))
    return ack


def enrol(rid: str, *devices: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"request_id": rid, "op": "enrol", "devices": list(devices), **extra}


async def test_enrol_is_applied_once_and_kept_across_a_restart(tmp_path: Path) -> None:
    async with Core(tmp_path, configured("bat-1")) as gw:
        assert gw.enrolment.version == 1  # the config's seed
        new = battery("bat-9") | {"reach": {"port": 1502}, "programs": ["summer"]}
        new["rate_class"] = "tou-a"
        ack = await send(gw, enrol("r1", new))
        assert (ack.state, ack.version, ack.devices) == ("applied", 2, ("bat-9",))
        assert "bat-9" in gw.registry
        assert "bat-9" in gw.supervisors
        assert gw.registry.members("feeder:f1")[-1].rate_class == "tou-a"
        # A redelivery: the same ack, nothing applied twice.
        assert await send(gw, enrol("r1", new)) == ack
        assert gw.enrolment.version == 2
        # The id reused for something else is refused.
        other = await send(gw, enrol("r1", battery("bat-8") | {"reach": {"port": 1}}))
        assert other.reason is Reason.DUPLICATE_ID_CONFLICT
        assert "bat-8" not in gw.registry
    async with Core(tmp_path, configured("bat-1")) as gw:
        assert gw.enrolment.version == 2
        assert "bat-9" in gw.registry
        adapter = gw.supervisors["bat-9"].adapter
        assert isinstance(adapter, QuietAdapter)
        assert adapter.reach == {"port": 1502}
        entry = gw.enrolment.snapshot(utcnow()).devices[-1]
        assert entry.origin == "api"
        assert [p.program_id for p in entry.programs] == ["summer"]
        assert entry.device.rate_class == "tou-a"
        assert await send(gw, enrol("r1", new)) == ack  # still the same answer


async def test_a_bulk_request_is_applied_whole_or_not_at_all(tmp_path: Path) -> None:
    async with Core(tmp_path, configured("bat-1")) as gw:
        good = battery("bat-7") | {"reach": {"port": 1}}
        bad = battery("bat-8")  # no port: its adapter cannot be built
        ack = await send(gw, enrol("bulk", good, bad))
        assert ack.reason is Reason.ADAPTER_INVALID
        assert "bat-8" in (ack.detail or "")
        assert "bat-7" not in gw.registry
        assert gw.enrolment.version == 1
        ack = await send(gw, enrol("bulk-2", good, battery("bat-1") | {"reach": {"port": 2}}))
        assert ack.reason is Reason.ALREADY_ENROLLED
        ack = await send(gw, enrol("bulk-3", good, good))
        assert ack.reason is Reason.ALREADY_ENROLLED
        assert "bat-7" not in gw.registry


async def test_expected_version_guards_against_a_stale_sender(tmp_path: Path) -> None:
    async with Core(tmp_path, configured("bat-1")) as gw:
        move = {
            "op": "topology",
            "moves": [{"device_id": "bat-1", "location": {"substation": "s1", "feeder": "f2"}}],
        }
        ack = await send(gw, {"request_id": "p1", "expected_version": 0, **move})
        assert ack.reason is Reason.VERSION_CONFLICT
        assert ack.version == 1
        assert gw.registry.device("bat-1").location.feeder == "f1"
        ack = await send(gw, {"request_id": "p2", "expected_version": 1, **move})
        assert (ack.state, ack.version) == ("applied", 2)
        assert gw.registry.device("bat-1").location.feeder == "f2"


async def test_a_feeder_section_moves_whole_and_stays_moved(tmp_path: Path) -> None:
    devices = [
        battery("a", section="sec-1") | {"sunspec": {"port": 1}},
        battery("b", section="sec-1") | {"sunspec": {"port": 2}},
        battery("c", section="sec-2") | {"sunspec": {"port": 3}},
    ]
    async with Core(tmp_path, devices) as gw:
        patch = {
            "request_id": "switching-1",
            "op": "topology",
            "section_moves": [{"feeder_section": "sec-1", "feeder": "f9", "substation": "s2"}],
        }
        ack = await send(gw, patch)
        assert ack.state == "applied"
        assert set(ack.devices) == {"a", "b"}
        assert [d.device_id for d in gw.registry.members("feeder:f9")] == ["a", "b"]
        assert [d.device_id for d in gw.registry.members("feeder:f1")] == ["c"]
        assert gw.registry.members("feeder_section:sec-1")[0].location.substation == "s2"
        assert gw.enrolment.version == 2
        # Screening and estimation compare the moved devices with their new feeder's peers
        # from the next reading on (not their old feeder's until a restart).
        peers = {p.device_id: p.peer_group for p in gw._fleet_index.profiles}
        assert peers == {"a": "feeder:f9", "b": "feeder:f9", "c": "feeder:f1"}
        assert gw._classifier.index is gw._fleet_index
        assert gw._estimator.index is gw._fleet_index
        change = await send(gw, patch | {"request_id": "switching-2", "section_moves": []})
        assert change.state == "applied"  # an empty patch is a no-op with a version
        unknown = {"feeder_section": "nowhere", "feeder": "f1", "substation": "s1"}
        ack = await send(gw, patch | {"request_id": "s3", "section_moves": [unknown]})
        assert ack.reason is Reason.UNKNOWN_GROUP
    # The API moved them: the stored record wins over the config file after a restart.
    async with Core(tmp_path, devices) as gw:
        assert [d.device_id for d in gw.registry.members("feeder:f9")] == ["a", "b"]


async def test_the_config_file_and_the_api_merge_by_the_documented_rule(tmp_path: Path) -> None:
    async with Core(tmp_path, configured("bat-1", "bat-2", "bat-3")) as gw:
        assert await send(gw, {"request_id": "ret", "op": "retire", "device_ids": ["bat-2"]})
        assert "bat-2" not in gw.registry
        assert "bat-2" not in gw.supervisors
    # bat-2 was retired through the API: still listed in the config, it stays retired. bat-3
    # is no longer in the config: retired. bat-1's entry changed in the config: refreshed.
    devices = configured("bat-1", "bat-2")
    devices[0]["location"] = {"substation": "s1", "feeder": "f5"}
    core = Core(tmp_path, devices)
    async with core as gw:
        assert gw.registry.device("bat-1").location.feeder == "f5"
        assert "bat-2" not in gw.registry
        assert "bat-3" not in gw.registry
        change = core.changes[-1]
        assert (change.op, change.updated, change.retired) == ("config", ("bat-1",), ("bat-3",))
        assert sorted(e.device.device_id for e in gw.enrolment.snapshot(utcnow()).devices) == [
            "bat-1"
        ]


async def test_updates_keep_programs_enrolment_dates_and_refuse_a_new_adapter(
    tmp_path: Path,
) -> None:
    async with Core(tmp_path, configured("bat-1")) as gw:
        first = battery("bat-1") | {"programs": ["p1"]}
        assert (await send(gw, {"request_id": "u1", "op": "update", "devices": [first]})).state == (
            "applied"
        )
        since = gw.enrolment.entries["bat-1"].programs[0].enrolled_at
        second = first | {"programs": ["p1", "p2"], "constraints": {"reserve_soc_pct": 40}}
        ack = await send(gw, {"request_id": "u2", "op": "update", "devices": [second]})
        assert ack.state == "applied"
        programs = gw.enrolment.entries["bat-1"].programs
        assert [(p.program_id, p.enrolled_at == since) for p in programs] == [
            ("p1", True),
            ("p2", False),
        ]
        assert gw.registry.device("bat-1").constraints.reserve_soc_pct == 40
        assert gw.registry.device("bat-1").programs == ("p1", "p2")
        moved = first | {"adapter": "sep2_der"}
        ack = await send(gw, {"request_id": "u3", "op": "update", "devices": [moved]})
        assert ack.reason is Reason.ADAPTER_INVALID
        ack = await send(gw, {"request_id": "u4", "op": "update", "devices": [battery("zz")]})
        assert ack.reason is Reason.UNKNOWN_DEVICE


def test_locations_still_nest() -> None:
    with pytest.raises(ValueError, match="without a feeder"):
        TopologyLocation(substation="s1", feeder_section="x")


async def test_program_rules_and_the_customer_systems_decision_set_eligibility(
    tmp_path: Path,
) -> None:
    rules = [
        {"program_id": "summer", "der_classes": ["battery"], "groups": ["feeder:f1"]},
        {"program_id": "tou", "rate_classes": ["tou-a"], "customer_check": True},
    ]
    core = Core(tmp_path, configured("bat-1"), programs=rules)
    async with core as gw:
        on_f1 = battery("a") | {"reach": {"port": 1}, "programs": ["summer", "tou", "free"]}
        on_f1["rate_class"] = "tou-a"
        on_f2 = battery("b", feeder="f2") | {"reach": {"port": 2}, "programs": ["summer", "tou"]}
        assert (await send(gw, enrol("e", on_f1, on_f2))).state == "applied"

        def states(did: str) -> dict[str, str]:
            return {p.program_id: p.eligibility for p in gw.enrolment.entries[did].programs}

        assert states("a") == {"summer": "eligible", "tou": "pending", "free": "eligible"}
        assert states("b") == {"summer": "ineligible", "tou": "ineligible"}
        assert "outside" in (gw.enrolment.entries["b"].programs[0].reason or "")
        assert gw.registry.may_serve("a", "summer")
        assert not gw.registry.may_serve("b", "summer")
        assert not gw.registry.may_serve("a", "tou")  # pending: not yet
        assert gw.registry.may_serve("b", "free")  # no rule: any device
        decide = {
            "request_id": "crm-1",
            "op": "eligibility",
            "decisions": [{"device_id": "a", "program_id": "tou", "eligibility": "eligible"}],
        }
        ack = await send(gw, decide)
        assert (ack.state, ack.devices) == ("applied", ("a",))
        assert states("a")["tou"] == "eligible"
        assert gw.registry.may_serve("a", "tou")
        overrule = {
            "request_id": "crm-2",
            "op": "eligibility",
            "decisions": [{"device_id": "b", "program_id": "tou", "eligibility": "eligible"}],
        }
        assert (await send(gw, overrule)).reason is Reason.NOT_ELIGIBLE  # fails the rule
        # Moved off f1: no longer eligible in summer; the customer system's word on tou stays.
        move = {
            "request_id": "m",
            "op": "topology",
            "moves": [{"device_id": "a", "location": {"substation": "s1", "feeder": "f2"}}],
        }
        assert (await send(gw, move)).state == "applied"
        assert states("a") == {"summer": "ineligible", "tou": "eligible", "free": "eligible"}
        assert not gw.registry.may_serve("a", "summer")
    async with Core(tmp_path, configured("bat-1"), programs=rules) as gw:
        assert gw.registry.may_serve("a", "tou")  # restored from the store
        assert not gw.registry.may_serve("b", "summer")


async def test_participation_left_open_by_a_stop_ends_at_the_next_start(tmp_path: Path) -> None:
    async with Core(tmp_path, configured("bat-1")) as gw:
        t0 = utcnow()
        await gw.enrolment.store.record_participation([("bat-1", "d1")], [], t0)
    async with Core(tmp_path, configured("bat-1")) as gw:
        [record] = await gw.enrolment.store.participation("bat-1")
        assert record.ended_at is not None  # closed at start, not counted for ever
        assert gw.registry.called_s["bat-1"] >= 0.0
        # The command still in force reopens it, keeping its start.
        await gw.enrolment.store.record_participation([("bat-1", "d1")], [], utcnow())
        [record] = await gw.enrolment.store.participation("bat-1")
        assert (record.started_at, record.ended_at) == (t0, None)


async def test_a_pending_enrolment_waits_for_approval_across_a_restart(tmp_path: Path) -> None:
    def announced(device_id: str) -> PendingEnrolment:
        return PendingEnrolment(
            device_id=device_id,
            der_class=DerClass.BATTERY,
            adapter="sunspec_battery",
            ratings=BatteryRatings(max_charge_kw=5, max_discharge_kw=5, capacity_kwh=10),
            seen_at=utcnow(),
            source="sunspec scan",
            reach={"port": 1502},
        )

    async with Core(tmp_path, configured("bat-1")) as gw:
        for device_id in ("scan-1", "scan-2"):
            assert gw.enrolment.propose(announced(device_id))
            await gw.enrolment.store.save_pending(announced(device_id))
        approve = {
            "request_id": "a1",
            "op": "approve",
            "devices": [{"device_id": "scan-1", "location": {"substation": "s1", "feeder": "f1"}}],
        }
        assert (await send(gw, approve)).state == "applied"
        # A late write of an announcement already approved (the store task raced the approval).
        await gw.enrolment.store.save_pending(announced("scan-1"))
    async with Core(tmp_path, configured("bat-1")) as gw:
        assert [p.device_id for p in gw.enrolment.snapshot(utcnow()).pending] == ["scan-2"]
        assert "scan-1" in gw.registry
        approve = {
            "request_id": "a2",
            "op": "approve",
            "devices": [{"device_id": "scan-2", "location": {"substation": "s1", "feeder": "f1"}}],
        }
        ack = await send(gw, approve)
        assert (ack.state, ack.devices) == ("applied", ("scan-2",))
        assert gw.supervisors["scan-2"].adapter.reach == {"port": 1502}  # type: ignore[attr-defined]
    async with Core(tmp_path, configured("bat-1")) as gw:
        assert gw.enrolment.snapshot(utcnow()).pending == ()
        assert "scan-1" in gw.registry
        assert "scan-2" in gw.registry
