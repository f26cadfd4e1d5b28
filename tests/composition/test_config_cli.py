"""Configuration errors an integrator can act on, and the CLI's schema / check-config commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from composition.config import load_config, parse_config
from unified.config import ConfigError
from unified.model import json_schemas

ROOT = Path(__file__).resolve().parents[2]


def device(i: int, **over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "device_id": f"b{i}",
        "der_class": "battery",
        "adapter": "sunspec_battery",
        "location": {"substation": "s1", "feeder": "f1"},
        "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 10},
        "sunspec": {"port": 5020 + i},
    }
    return base | over


def problems(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_example_config_is_valid() -> None:
    config = load_config(ROOT / "examples" / "gateway.toml")
    assert len(config.devices) == 2
    assert config.store.path.is_absolute()


def test_errors_name_the_exact_place() -> None:
    found = problems(
        {
            "devices": [
                device(1),
                device(2, ratings={"max_charge_kw": -1, "max_discharge_kw": 5, "capacity_kwh": 10}),
            ]
        }
    )
    assert found == ["devices[1].ratings.max_charge_kw: Input should be greater than 0"]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"devices": [device(1), device(1, sunspec={"port": 6000})]}, "appears twice"),
        ({"devices": [device(1), device(2, sunspec={"port": 5021})]}, "share the endpoint"),
        ({"devices": [device(1, adapter="carrier-pigeon")]}, "unknown adapter"),
        ({"devices": [device(1, sunspec=None)]}, "needs a [devices.sunspec]"),
        ({"devices": [device(1, der_class="thermostat")]}, "only drives der_class 'battery'"),
        ({"devices": [device(1, adapter="sunspec_pv")]}, "only drives der_class 'pv'"),
        (
            {"devices": [device(1, location={"substation": "s", "transformer": "t"})]},
            "without a feeder",
        ),
        (
            {"devices": [device(1, constraints={"reserve_soc_pct": 80, "max_soc_pct": 50})]},
            "reserve_soc_pct must be below",
        ),
        (
            {"devices": [device(1)], "timing": {"poll_interval_s": 20, "stale_after_s": 10}},
            "stale_after_s must be longer",
        ),
        ({"devices": [device(1)], "broker": {"port": 70000}}, "broker.port"),
        ({"devices": [device(1)], "brokr": {}}, "brokr"),
        (
            {"devices": [device(1, sunspec={"port": 1, "setpoint_revert_s": 30})]},
            "must exceed timing.refresh_s",
        ),
    ],
)
def test_invalid_configs(data: dict[str, object], fragment: str) -> None:
    assert any(fragment in p for p in problems(data)), problems(data)


def test_a_gateway_may_start_with_no_devices_and_enrol_them_through_the_registry_api() -> None:
    assert parse_config({"devices": [], "settlement": {"timezone": "UTC"}}).devices == ()


def test_unreadable_and_non_toml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("gateway_id = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "composition.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_schema_prints_every_message_schema() -> None:
    result = run_cli("schema")
    assert result.returncode == 0, result.stderr
    schemas = json.loads(result.stdout)
    assert {"command", "ack", "error", "group_telemetry", "status"} <= set(schemas)
    variants = {v["$ref"].rsplit("/", 1)[-1] for v in schemas["command"]["oneOf"]}
    assert variants == {"Dispatch", "OperatingEnvelope", "DeviceSetpoint", "GridService", "Cancel"}


def test_docs_schemas_are_current() -> None:
    for name, schema in json_schemas().items():
        on_disk = json.loads((ROOT / "docs" / "schemas" / f"{name}.schema.json").read_text())
        assert on_disk == schema, (
            f"docs/schemas/{name}.schema.json is stale: run "
            "`derms-gateway schema --out docs/schemas`"
        )


def test_cli_check_config_reports_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[devices]]\ndevice_id = "b 1"\n')
    result = run_cli("check-config", "--config", str(bad))
    assert result.returncode == 2
    assert "devices[0].device_id" in result.stderr
    ok = run_cli("check-config", "--config", str(ROOT / "examples" / "gateway.toml"))
    assert ok.returncode == 0
    assert "feeder:north-f1: 1 device(s)" in ok.stdout


def test_broker_secret_and_certificate_files_must_exist(tmp_path: Path) -> None:
    example = (ROOT / "examples" / "gateway.toml").read_text()
    assert "\n[broker]\n" in example
    (tmp_path / "ca.pem").write_text("not checked at load time, only that it can be read")
    config = tmp_path / "gw.toml"
    config.write_text(
        example.replace(
            "\n[broker]\n",
            "\n[broker.tls]\nca_file = 'ca.pem'\ncert_file = 'pki/gw.pem'\n"
            "[broker]\nusername = 'gw'\npassword_file = 'secrets/gw.password'\n",
        )
    )
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode != 0
    assert f"broker.password_file: {tmp_path / 'secrets/gw.password'} does not exist" in (
        result.stderr
    )
    assert f"broker.tls.cert_file: {tmp_path / 'pki/gw.pem'} does not exist" in result.stderr
    assert "ca_file" not in result.stderr
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets/gw.password").write_text("pw\n")
    (tmp_path / "secrets/gw.password").chmod(0o600)
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki/gw.pem").write_text("-")
    assert load_config(config).broker.password_file == tmp_path / "secrets/gw.password"
    ok = run_cli("check-config", "--config", str(config))
    assert ok.returncode == 0, ok.stderr
    assert "warning" not in ok.stdout


def test_cli_certs_make_a_ca_issue_and_describe(tmp_path: Path) -> None:
    from protocols.sep2 import has_valid_check_digit, lfdi_from_cert

    assert run_cli("certs", "ca", str(tmp_path)).returncode == 0
    issued = run_cli("certs", "issue", str(tmp_path), "inverter-1")
    assert issued.returncode == 0, issued.stderr
    lfdi = lfdi_from_cert((tmp_path / "inverter-1.pem").read_bytes())
    assert f"LFDI: {lfdi}" in issued.stdout
    shown = run_cli("certs", "show", str(tmp_path / "inverter-1.pem"))
    assert shown.returncode == 0
    sfdi = int(shown.stdout.split("SFDI: ")[1].split()[0])
    assert has_valid_check_digit(sfdi)
    server = run_cli("certs", "issue", str(tmp_path), "gateway", "--server", "--host", "127.0.0.1")
    assert server.returncode == 0, server.stderr
    missing = run_cli("certs", "issue", str(tmp_path / "nowhere"), "x")
    assert missing.returncode != 0
    assert "cannot load CA" in missing.stderr
    # The CA is never replaced by accident: its certificates would all fail to verify.
    key_before = (tmp_path / "derms-dev-ca.key").read_bytes()
    again = run_cli("certs", "ca", str(tmp_path))
    assert again.returncode != 0
    assert "--force" in again.stderr
    assert "Traceback" not in again.stderr
    assert (tmp_path / "derms-dev-ca.key").read_bytes() == key_before
    # Anything that is not a certificate gets a sentence, not a traceback.
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(100)))
    shown_junk = run_cli("certs", "show", str(junk))
    assert shown_junk.returncode != 0
    assert "not a certificate" in shown_junk.stderr
    assert "Traceback" not in shown_junk.stderr


def test_edge_agent_example_resolves_paths_against_its_folder() -> None:
    from composition.config import EdgeAgentConfig

    config = load_config(ROOT / "examples" / "edge-agent.toml", EdgeAgentConfig)
    assert isinstance(config, EdgeAgentConfig)
    tls = config.upstream_sep2.tls
    assert tls is not None
    assert tls.cert_file == ROOT / "examples" / "pki" / "site-1.pem"
    assert config.upstream_sep2.state_path == ROOT / "examples" / "site-1-sep2-state.json"
    assert config.store.path == ROOT / "examples" / "site-1-edge.sqlite"
    with pytest.raises(ConfigError, match="upstream_sep2"):
        load_config(ROOT / "examples" / "gateway.toml", EdgeAgentConfig)


def _nullable_but_required(schema: dict[str, object]) -> list[str]:
    """Properties a schema requires although they may be null (at any depth)."""
    found: list[str] = []
    defs = schema.get("$defs", {})
    assert isinstance(defs, dict)
    for name, node in [("", schema), *defs.items()]:
        assert isinstance(node, dict)
        required = set(node.get("required", ()))
        for prop, spec in node.get("properties", {}).items():
            options = spec.get("anyOf", [spec])
            if prop in required and any(o.get("type") == "null" for o in options):
                found.append(f"{name or 'root'}.{prop}")
    return found


def test_published_messages_do_not_require_what_the_gateway_leaves_out() -> None:
    """The gateway omits null fields from what it publishes (smaller messages on thousands of
    devices), so a published schema must not require a field that may be null: a consumer that
    validates with it would reject every message of an unavailable device or a failed
    settlement."""
    from gateway.flex import flex_json_schemas

    schemas = json_schemas() | flex_json_schemas()
    offenders = {name: bad for name, s in schemas.items() if (bad := _nullable_but_required(s))}
    assert offenders == {}


def test_a_corrupt_store_is_said_in_a_sentence_not_a_traceback(tmp_path: Path) -> None:
    store = tmp_path / "gw.sqlite"
    store.write_bytes(bytes(range(256)) * 20)  # not a SQLite file
    config = tmp_path / "gw.toml"
    config.write_text(
        f"""gateway_id = "gw-corrupt"
[broker]
port = 1
[store]
path = "{store}"
[history]
enabled = false
[[devices]]
device_id = "b1"
der_class = "battery"
adapter = "sunspec_battery"
location = {{ substation = "s1", feeder = "f1" }}
ratings = {{ max_charge_kw = 5, max_discharge_kw = 5, capacity_kwh = 10 }}
sunspec = {{ host = "127.0.0.1", port = 1 }}
"""
    )
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 1
    assert "cannot use this SQLite file" in result.stderr
    assert str(store) in result.stderr
    assert "Traceback" not in result.stderr


def test_settlement_needs_a_time_zone_unless_it_is_off() -> None:
    found = problems({"devices": [device(1)]})
    assert any("settlement.timezone is required when settlement is on" in p for p in found)
    for ok in (
        {"settlement": {"timezone": "America/Los_Angeles"}},
        {"settlement": {"group_timezones": {"feeder:f1": "America/Los_Angeles"}}},
        {"settlement": {"enabled": False}},
        {"history": {"enabled": False}},
    ):
        parse_config({"devices": [device(1)], **ok})
    assert any(
        "unknown time zone 'Mars/Olympus'" in p
        for p in problems({"devices": [device(1)], "settlement": {"timezone": "Mars/Olympus"}})
    )


def test_a_pv_inverter_gets_the_sunspec_pv_adapter() -> None:
    from adapters.sunspec.pv_inverter import SunSpecPvInverter
    from composition.app import build_adapters

    pv = device(1, adapter="sunspec_pv", der_class="pv")
    config = parse_config({"devices": [pv], "settlement": {"timezone": "UTC"}})
    adapters = build_adapters(config, None, None, lambda c, e: None)
    assert isinstance(adapters["b1"], SunSpecPvInverter)
