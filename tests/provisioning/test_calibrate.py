"""`twinedge node calibrate` at the emulated board's REPL (simulated EZO pH circuit), recorded and pushed."""

from __future__ import annotations

import datetime as dt
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provisioning import calibrate as cal
from provisioning.errors import ProvisioningError
from provisioning.registry import City, Node, NodeConfig, Sensor, get_node, save_city, save_node
from provisioning.secrets import SecretStore
from tests.provisioning.e2e import rig
from tests.provisioning.mqttc import Client


def move_probe(scenario: Path, raw: float) -> None:
    """The technician moves the (simulated) probe into the next buffer: the EZO now reads `raw`."""
    doc = json.loads(scenario.read_text())
    doc["values"]["ph"] = raw
    tmp = scenario.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, scenario)


def read_until(proc: subprocess.Popen[bytes], marker: bytes, seen: bytearray, deadline: float) -> None:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in {bytes(seen)!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            assert chunk, f"calibrate ended early: {bytes(seen)!r}"
            seen += chunk


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, SecretStore]:
    root = tmp_path / "reg"
    store = SecretStore(tmp_path / "sec")
    save_city(root, City(name="copenhagen"))
    save_node(root, Node(id="buoy-a", city="copenhagen", domain="marine", site="Nordhavn",
                         sensors=[Sensor(kind="ph", serial="PH-1"), Sensor(kind="temp"), Sensor(kind="battery")],
                         config=NodeConfig(interval_s=1, batch=1), credential_ref=store.ensure_mqtt("buoy-a")))
    store.put("wifi/copenhagen", {"ssid": "quay-net", "psk": "wifi-secret-123"})
    return root, store


def test_three_point_ph_calibration(world: tuple[Path, SecretStore], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, store = world
    with rig(root, store, tmp_path) as r:
        broker = f"127.0.0.1:{r.broker.port}"
        assert r.twinedge("node", "install", "buoy-a", "--port", r.board.port, "--broker", broker).returncode == 0
        proc = subprocess.Popen([sys.executable, "-m", "twinedge.cli", "node", "calibrate", "buoy-a", "--sensor", "ph",
                                 "--port", r.board.port, "--broker", broker, "--settle", "20"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=r.env)
        seen = bytearray()
        deadline = time.monotonic() + 90
        try:
            for ref, raw in ((b"7", 6.9), (b"4", 3.95), (b"10", 10.1)):
                read_until(proc, b"put it in the " + ref + b" buffer", seen, deadline)
                read_until(proc, b"Press Enter", seen, deadline)
                seen.clear()
                move_probe(r.board.flash_dir / "scenario.json", raw)
                assert proc.stdin is not None
                proc.stdin.write(b"\n")
                proc.stdin.flush()
            rest, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        output = (bytes(seen) + rest).decode()
        assert proc.returncode == 0, output
        assert "calibrated ph on buoy-a (3-point" in output and "published as retained cfg" in output
        node = get_node(root, "buoy-a")
        rec = node.calibration["ph"]
        assert rec.date == dt.date.today() and rec.serial == "PH-1" and rec.cfg_version == node.config.version == 2
        assert [ref for ref, _ in rec.points] == [7.0, 4.0, 10.0]
        assert [round(raw, 2) for _, raw in rec.points] == [6.9, 3.95, 10.1]
        on_board = json.loads((r.board.flash_dir / "cfg.json").read_text())
        assert on_board["v"] == 2 and on_board["cal"]["ph"]["points"][1] == [4.0, 3.95]
        ops = Client(r.broker.port, "ops-copenhagen", store.get("mqtt/ops-copenhagen")["password"].reveal()).connect()
        ops.subscribe("twin/copenhagen/marine/buoy-a/cfg")
        topic, payload, retained = ops.get()
        ops.close()
        assert retained and json.loads(payload) == on_board
        # The firmware took the new config: verify shows config version 2 and no rejection.
        p = r.twinedge("node", "verify", "buoy-a", "--broker", broker, "--timeout", "60")
        assert p.returncode == 0, p.stdout + p.stderr
        assert "config version │ 2" in p.stdout.replace("  ", " ") or "│ 2 " in p.stdout


def test_probe_that_does_not_move_is_refused(world: tuple[Path, SecretStore], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, store = world
    with rig(root, store, tmp_path) as r:
        assert r.twinedge("node", "install", "buoy-a", "--port", r.board.port, "--no-reset").returncode == 0
        p = r.twinedge("node", "calibrate", "buoy-a", "--sensor", "ph", "--port", r.board.port, "--points", "7,4", "--yes")
        assert p.returncode == 1
        assert "two buffers gave the same raw reading" in p.stderr and "check it is connected" in p.stderr
        assert get_node(root, "buoy-a").config.version == 1  # nothing recorded
        doc = json.loads((r.board.flash_dir / "scenario.json").read_text())
        doc["missing"] = ["ph"]
        (r.board.flash_dir / "scenario.json").write_text(json.dumps(doc))
        p = r.twinedge("node", "calibrate", "buoy-a", "--sensor", "ph", "--port", r.board.port, "--yes")
        assert p.returncode == 1 and "the ph probe does not answer (fault: missing)" in p.stderr


def test_unstable_and_mixed_up_buffers() -> None:
    vals = iter([1.0, 2.0, 3.0] * 100000)
    with pytest.raises(ProvisioningError, match="did not settle within 0 s"):
        cal.read_stable(lambda: next(vals), cal.Stability(3, 0.01, 0.05))
    with pytest.raises(ProvisioningError, match="a buffer was probably mixed up"):
        cal.check_points([(7.0, 7.0), (4.0, 10.0), (10.0, 12.0)], "ph")
    steady = iter([7.0, 7.01, 7.0])
    assert cal.read_stable(lambda: next(steady), cal.Stability(3, 0.01, 5)) == 7.0
