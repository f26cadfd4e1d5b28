"""``[operator]`` in the gateway's file: paths relative to it, a missing password file caught
at load time, and the warnings ``check-config`` prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from composition.config import load_config
from composition.status_cli import operator_section, status_url
from unified.config import ConfigError

BASE = """
gateway_id = "gw"
[settlement]
timezone = "America/New_York"
[[devices]]
device_id = "b1"
der_class = "battery"
adapter = "sunspec_battery"
location = { substation = "s1", feeder = "f1" }
ratings = { max_charge_kw = 5, max_discharge_kw = 5, capacity_kwh = 10 }
sunspec = { port = 5020 }
"""


def write(tmp_path: Path, operator: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(BASE + "[operator]\n" + operator)
    return path


def test_password_file_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'password_file = "secrets/op.pw"\nhost = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match=r"operator.password_file: cannot read"):
        load_config(path)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "op.pw").write_text("pw\n")
    (tmp_path / "secrets" / "op.pw").chmod(0o600)
    config = load_config(path)
    assert config.operator.password_file == tmp_path / "secrets" / "op.pw"
    assert config.operator.password() == "pw"
    assert config.operator.port == 9108
    assert any("unencrypted" in w for w in config.security_warnings())
    section = operator_section(path)  # what `derms-gateway status` reads
    assert section.password_file == config.operator.password_file
    assert status_url(section) == "http://127.0.0.1:9108/status"  # a wildcard: asked on loopback


def test_without_a_password_check_config_says_status_is_refused(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "port = 0\n"))
    assert any("/status" in w and "refused" in w for w in config.security_warnings())
    assert not load_config(write(tmp_path, "enabled = false\n")).operator.warnings()


def test_invalid_operator_settings_name_their_place(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, 'port = 70000\nuser = "a:b"\n'))
    assert any(p.startswith("operator.port") for p in info.value.problems)
    assert any(p.startswith("operator.user") for p in info.value.problems)
