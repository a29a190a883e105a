"""Registry and broker commands through the typer apps (CliRunner), including every error message."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from provisioning.cli import broker_app, node_app
from provisioning.registry import get_node, load_registry
from tests.provisioning.conftest import Reg


@pytest.fixture
def run(reg: Reg, monkeypatch: pytest.MonkeyPatch):
    for k, v in reg.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("COLUMNS", "160")
    runner = CliRunner()

    def invoke(app, *args: str, input: str | None = None):
        return runner.invoke(app, list(args), input=input)

    return invoke


def test_add_list_show_edit_retire(run, reg: Reg) -> None:
    r = run(node_app, "add", "buoy-07", "--city", "copenhagen", "--domain", "marine", "--site", "Nordhavn",
            "--lat", "55.7105", "--lon", "12.595", "--sensor", "ph:PH-1234:EZO-pH:i2c:0x63", "--sensor", "temp:T-88")
    assert r.exit_code == 0, r.output
    pw = reg.store.get("mqtt/buoy-07")["password"].reveal()
    assert pw not in r.output and "mqtt/buoy-07" in r.output
    assert reg.store.path("mqtt/buoy-07").stat().st_mode & 0o777 == 0o600
    text = (reg.root / "nodes" / "buoy-07.toml").read_text()
    assert pw not in text  # the registry holds only the reference
    data = tomllib.loads(text)
    assert data["sensors"][0] == {"kind": "ph", "model": "EZO-pH", "serial": "PH-1234", "bus": "i2c:0x63"}
    r = run(node_app, "list")
    assert "buoy-07" in r.output and "buoy-old" not in r.output
    assert "buoy-old" in run(node_app, "list", "--all").output
    r = run(node_app, "show", "buoy-07")
    assert "PH-1234" in r.output and "mqtt/buoy-07 (present)" in r.output and pw not in r.output
    r = run(node_app, "edit", "buoy-07", "--set", "config.interval_s=30", "--set", "site=Nordhavn pier 3")
    assert r.exit_code == 0 and "config now v2" in r.output
    n = get_node(reg.root, "buoy-07")
    assert n.config.interval_s == 30 and n.config.version == 2 and n.site == "Nordhavn pier 3"
    r = run(node_app, "edit", "buoy-07", "--remove-sensor", "ph", "--add-sensor", "ph:PH-9999")
    assert r.exit_code == 0 and [s.serial for s in get_node(reg.root, "buoy-07").sensors] == ["T-88", "PH-9999"]
    r = run(node_app, "retire", "buoy-07")
    assert r.exit_code == 0 and "twinedge broker render --city copenhagen" in r.output
    assert load_registry(reg.root)["buoy-07"].retired
    assert "already retired" in run(node_app, "retire", "buoy-07").output


@pytest.mark.parametrize(
    "args, message",
    [
        (["add", "buoy-a", "--city", "copenhagen", "--domain", "marine"], "node 'buoy-a' already exists: change it with `twinedge node edit buoy-a"),
        (["add", "Buoy-9", "--city", "copenhagen", "--domain", "marine"], "field id: String should match pattern '^[a-z][a-z0-9-]{0,31}$'; use lowercase letters"),
        (["add", "b9", "--city", "copenhagen", "--domain", "sea"], "field domain: Input should be 'marine' or 'mobility'"),
        (["add", "b9", "--city", "copenhagen", "--domain", "marine", "--lat", "95"], "field lat: Input should be less than or equal to 90"),
        (["add", "b9", "--city", "copenhagen", "--domain", "marine", "--sensor", "phh:1"], "--sensor 'phh:1': field kind: Input should be 'ph'"),
        (["add", "b9", "--city", "copenhagen", "--domain", "marine", "--interval", "0"], "field config.interval_s: Input should be greater than or equal to 1"),
        (["show", "nope"], "node 'nope' is not in the registry"),
        (["edit", "buoy-a", "--set", "config.batch=99"], "field config.batch: Input should be less than or equal to 50"),
        (["edit", "buoy-a", "--set", "colour=red"], "field colour: Extra inputs are not permitted; remove it or check its spelling"),
        (["edit", "buoy-a", "--set", "site"], "--set 'site': write field=value"),
        (["edit", "buoy-a", "--set", "id=x"], "--set id: cannot be changed"),
        (["edit", "buoy-a", "--remove-sensor", "do"], "--remove-sensor do: the node has no such sensor"),
        (["calibrate", "buoy-a", "--sensor", "battery", "--port", "/dev/null"], "sensor 'battery' is not calibrated with reference points"),
        (["calibrate", "buoy-a", "--sensor", "do", "--port", "/dev/null"], "buoy-a has no do sensor"),
        (["calibrate", "buoy-a", "--sensor", "ph", "--port", "/dev/null", "--points", "7"], "give 2 or 3 different reference values"),
        (["verify", "buoy-a", "--broker", "host:notaport"], "--broker 'host:notaport': give host:port"),
    ],
)
def test_usage_errors_name_the_field_and_the_fix(run, args: list[str], message: str) -> None:
    r = run(node_app, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output and len([ln for ln in r.output.splitlines() if ln.startswith("error:")]) == 1


def test_broken_registry_file_is_named(run, reg: Reg) -> None:
    (reg.root / "nodes" / "buoy-b.toml").write_text("id = 'buoy-b'\ncity = \n")
    r = run(node_app, "list")
    assert r.exit_code == 2 and "buoy-b.toml: not valid TOML" in r.output and "restore it from git" in r.output
    (reg.root / "nodes" / "buoy-b.toml").write_text("id = 'buoy-x'\ncity = 'copenhagen'\ndomain = 'marine'\n")
    r = run(node_app, "list")
    assert r.exit_code == 2 and "rename the file to buoy-x.toml" in r.output


def test_secret_file_mode_is_enforced(run, reg: Reg, monkeypatch: pytest.MonkeyPatch) -> None:
    p = reg.store.path("wifi/copenhagen")
    os.chmod(p, 0o644)
    r = run(node_app, "install", "buoy-a", "--port", "/dev/null")
    assert r.exit_code == 2 and f"run `chmod 600 {p}`" in r.output


def test_wifi_key_prompted_hidden_and_never_echoed(run, reg: Reg) -> None:
    r = run(node_app, "wifi", "aarhus", "--ssid", "harbour-iot", input="sup3r-secret\n")
    assert r.exit_code == 0 and "sup3r-secret" not in r.output.replace("Key: ", "")
    assert reg.store.get("wifi/aarhus")["psk"].reveal() == "sup3r-secret"


def test_broker_render_and_ca_commands(run, reg: Reg, tmp_path: Path) -> None:
    r = run(broker_app, "render", "--city", "copenhagen", "--out", str(tmp_path / "b"), "--partner", "tongyeong")
    assert r.exit_code == 0, r.output
    assert "6 accounts (3 nodes)" in r.output
    for user in ("gateway-copenhagen", "ops-copenhagen", "partner-tongyeong"):
        assert reg.store.get(f"mqtt/{user}")["password"].reveal() not in r.output
    r = run(broker_app, "ca", "--city", "copenhagen", "--out", str(tmp_path / "pki"), "--host", "broker.cph.example")
    assert r.exit_code == 0 and (tmp_path / "pki" / "ca.crt").exists()
    r = run(broker_app, "render", "--city", "Copenhagen", "--out", str(tmp_path / "b"))
    assert r.exit_code == 2


def test_help_texts_teach_with_examples(run) -> None:
    for cmd in ("add", "edit", "flash", "install", "verify", "setup", "calibrate", "retire"):
        r = run(node_app, cmd, "--help")
        assert r.exit_code == 0 and "twinedge node " + cmd in r.output.replace("\n", " "), cmd
    for cmd in ("render", "ca"):
        assert "twinedge broker " + cmd in run(broker_app, cmd, "--help").output
