"""install / setup / verify / calibrate against the emulated board (real firmware, real mpremote, real Mosquitto)."""

from __future__ import annotations

import json
import os
import pty
import re
import time
from pathlib import Path

import pytest

from provisioning import device
from provisioning.errors import ProvisioningError
from provisioning.registry import City, Node, NodeConfig, Sensor, get_node, save_city, save_node
from provisioning.secrets import SecretStore
from tests.provisioning.e2e import REPO, rig

FIRMWARE = REPO / "firmware"


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, SecretStore]:
    root = tmp_path / "reg"
    store = SecretStore(tmp_path / "sec")
    save_city(root, City(name="copenhagen", partner="tongyeong"))
    save_node(root, Node(id="buoy-a", city="copenhagen", domain="marine", site="Nordhavn",
                         sensors=[Sensor(kind="ph", serial="PH-1"), Sensor(kind="temp", serial="T-1"), Sensor(kind="battery")],
                         config=NodeConfig(interval_s=1, batch=1), credential_ref=store.ensure_mqtt("buoy-a")))
    store.put("wifi/copenhagen", {"ssid": "quay-net", "psk": "wifi-secret-123"})
    return root, store


def secrets_of(store: SecretStore) -> list[str]:
    return [store.get("mqtt/buoy-a")["password"].reveal(), "wifi-secret-123"]


def test_manifest_compiles_lib_and_keeps_main_source() -> None:
    items = device.manifest(FIRMWARE)
    dests = {i.dest for i in items}
    assert "main.py" in dests and "lib/te_app.mpy" in dests and "lib/te_app.py" not in dests
    assert "pyrightconfig.json" not in dests


def test_setup_on_emulated_board_then_install_is_incremental(world: tuple[Path, SecretStore], tmp_path: Path) -> None:
    root, store = world
    with rig(root, store, tmp_path) as r:
        t0 = time.monotonic()
        p = r.twinedge("node", "setup", "buoy-a", "--port", r.board.port, "--no-flash",
                       "--broker", f"127.0.0.1:{r.broker.port}", "--timeout", "60")
        took = time.monotonic() - t0
        out = p.stdout + p.stderr
        assert p.returncode == 0, out
        assert "buoy-a is set up and reporting" in out
        assert re.search(r"sensor ph PH-1\s*│\s*OK", out) and re.search(r"sensor temp T-1\s*│\s*OK", out), out
        assert "firmware" in out and "0.1.0" in out and "-67 dBm" in out
        for s in secrets_of(store):
            assert s not in out
        print(f"\nnode setup on the emulated board: {took:.2f} s wall clock ({out.strip().splitlines()[-2]})")
        node_json = json.loads((r.board.flash_dir / "node.json").read_text())
        assert node_json["user"] == "buoy-a" and node_json["wifi_key"] == "wifi-secret-123"
        assert get_node(root, "buoy-a").firmware == "0.1.0"

        # Second install: nothing changed, nothing sent.
        p = r.twinedge("node", "install", "buoy-a", "--port", r.board.port, "--broker", f"127.0.0.1:{r.broker.port}")
        assert p.returncode == 0, p.stderr
        assert "0 file(s) sent" in p.stdout, p.stdout
        # A changed config goes out alone (cfg.json), and the node is verified again on it.
        p = r.twinedge("node", "edit", "buoy-a", "--set", "config.batch=2")
        assert p.returncode == 0 and "config now v2" in p.stdout
        p = r.twinedge("node", "install", "buoy-a", "--port", r.board.port, "--broker", f"127.0.0.1:{r.broker.port}")
        assert "1 file(s) sent" in p.stdout, p.stdout + p.stderr
        assert json.loads((r.board.flash_dir / "cfg.json").read_text())["batch"] == 2
        p = r.twinedge("node", "verify", "buoy-a", "--broker", f"127.0.0.1:{r.broker.port}", "--timeout", "60")
        assert p.returncode == 0, p.stdout + p.stderr


def test_install_replaces_changed_file_and_removes_shadowing_source(world: tuple[Path, SecretStore], tmp_path: Path) -> None:
    root, store = world
    fw = tmp_path / "fw"
    (fw / "lib").mkdir(parents=True)
    (fw / "main.py").write_text("import app\n")
    (fw / "lib" / "app.py").write_text("V = 1\n")
    with rig(root, store, tmp_path) as r:
        (r.board.flash_dir / "lib").mkdir()
        (r.board.flash_dir / "lib" / "app.py").write_text("V = 'stale source'\n")
        files = device.build(device.manifest(fw), tmp_path / "cache")
        res = device.install(r.board.port, files, {}, reset=False)
        assert sorted(res.sent) == ["lib/app.mpy", "main.py"] and res.removed == ["lib/app.py"]
        (fw / "lib" / "app.py").write_text("V = 2\n")
        files = device.build(device.manifest(fw), tmp_path / "cache")
        res = device.install(r.board.port, files, {}, reset=False)
        assert res.sent == ["lib/app.mpy"] and res.unchanged == ["main.py"]
        with device.board(r.board.port) as b:
            assert b.exec("import app; print(app.V)").strip() == "2"


def test_install_errors(world: tuple[Path, SecretStore], tmp_path: Path) -> None:
    root, store = world
    with rig(root, store, tmp_path) as r:
        p = r.twinedge("node", "install", "buoy-a", "--port", "/dev/ttyNOPE0")
        assert p.returncode == 2 and "serial port /dev/ttyNOPE0 not found" in p.stderr and "Traceback" not in p.stderr
        p = r.twinedge("node", "install", "buoy-zz", "--port", r.board.port)
        assert p.returncode == 2 and "node 'buoy-zz' is not in the registry" in p.stderr
        store.path("wifi/copenhagen").unlink()
        p = r.twinedge("node", "install", "buoy-a", "--port", r.board.port)
        assert p.returncode == 2 and "secret 'wifi/copenhagen' not found" in p.stderr
        p = r.twinedge("node", "setup", "buoy-a", "--port", r.board.port)
        assert p.returncode == 2 and "--firmware is missing" in p.stderr
    # A port where nothing answers (a pty nobody drives): no REPL.
    master, slave = pty.openpty()
    try:
        with pytest.raises(ProvisioningError, match="no MicroPython REPL on"):
            with device.board(os.ttyname(slave), timeout=1):
                pass
    finally:
        os.close(master)
        os.close(slave)


def test_verify_reports_faulty_sensor_and_silence(world: tuple[Path, SecretStore], tmp_path: Path) -> None:
    root, store = world
    scenario = {"speed": 1, "values": {"ph": 8.1, "temp": 15.2, "bat": 3.9}, "missing": ["ph"]}
    with rig(root, store, tmp_path, scenario=scenario) as r:
        p = r.twinedge("node", "install", "buoy-a", "--port", r.board.port, "--broker", f"127.0.0.1:{r.broker.port}")
        assert p.returncode == 0, p.stderr
        p = r.twinedge("node", "verify", "buoy-a", "--broker", f"127.0.0.1:{r.broker.port}", "--timeout", "60")
        out = p.stdout + p.stderr
        assert p.returncode == 1, out
        assert re.search(r"sensor ph PH-1\s*│\s*faulty: missing", out), out
        assert "sensor ph PH-1: faulty: missing; check its wiring and connector" in out
    # Nothing listening on that broker port any more.
    p = r.twinedge("node", "verify", "buoy-a", "--broker", f"127.0.0.1:{r.broker.port}", "--timeout", "2")
    assert p.returncode == 1 and "cannot reach the broker at 127.0.0.1" in p.stderr


def test_verify_times_out_with_advice(world: tuple[Path, SecretStore], tmp_path: Path) -> None:
    root, store = world
    with rig(root, store, tmp_path) as r:  # board never installed: the node is silent
        p = r.twinedge("node", "verify", "buoy-a", "--broker", f"127.0.0.1:{r.broker.port}", "--timeout", "1.5")
        assert p.returncode == 1
        assert "no status from the node within 2 s: check power, Wi-Fi and the broker address" in p.stdout
        assert "only 0 of 1 readings arrived" in p.stdout
