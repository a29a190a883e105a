"""The rig's own parts: fault proxy modes, accounting that catches loss / doubles / wrong
values, mpremote over the pty, the esptool flash path, and the real-board backend (against
an emulated USB board on a pty, and with a missing port)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil_tests.rig.boards import emulated_rig
from hil_tests.rig.flashpath import MockBootloader, esp32_image, esptool
from hil_tests.rig.proxy import FaultProxy
from hil_tests.rig.real import BoardUnavailable, check_ports, real_rig
from hil_tests.rig.scenarios import SCENARIOS

REPO = Path(__file__).resolve().parents[1]


def _echo(c: socket.socket) -> None:
    try:
        for d in iter(lambda: c.recv(4096), b""):
            c.sendall(d)
    except OSError:
        pass  # the proxy reset us: part of the test
    finally:
        c.close()


@pytest.fixture
def echo() -> Iterator[int]:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield port
    srv.close()


def _roundtrip(port: int, timeout: float = 2.0) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        t = time.monotonic()
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        return time.monotonic() - t


def test_fault_proxy_modes(echo: int) -> None:
    with FaultProxy(echo) as p:
        assert _roundtrip(p.port) < 0.2
        p.delay(300)
        assert _roundtrip(p.port) >= 0.3
        p.passthrough()
        s = socket.create_connection(("127.0.0.1", p.port), timeout=1)
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        p.blackhole()
        s.sendall(b"lost")
        with pytest.raises(socket.timeout):
            s.recv(4)  # connection open, nothing comes back
        assert p.stats.swallowed >= 4
        p.reset()
        with pytest.raises((ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
            s.sendall(b"y")
            if not s.recv(1):
                raise ConnectionResetError("closed")
        s.close()
        p.refuse()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p.port), timeout=1)
        p.passthrough()
        assert _roundtrip(p.port) < 0.2


def test_accounting_catches_loss_doubles_and_wrong_values(tmp_path: Path) -> None:
    rig = emulated_rig(tmp_path, 1)
    try:
        rig.wait_online()
        rig.wait_samples(4)
        f = rig.account("check")
        assert f.verdict == "pass" and f.lost == 0 and f.landed == f.taken >= 4, f.problems
        node, influx = rig.node, rig.stack.influx
        assert influx is not None
        db = "twin_copenhagen"
        ring = node.ring().samples
        first, second = ring[1], ring[2]
        # lose one point, add one nobody sampled, falsify one value
        influx.query(f'DELETE FROM "marine" WHERE time = {first.t * 10**9}', db=db, method="POST")
        tags = "city=copenhagen,domain=marine,node=buoy-01,site=copenhagen-site-1"
        for line in (f"marine,{tags} ph=7.5,battery_v=3.7 {second.t + 100000}",
                     f"marine,{tags} " + ",".join(f"{k}={v}" for k, v in {**second.values, 'ph': 6.5}.items()) + f" {second.t}"):
            req = __import__("urllib.request").request.Request(f"{influx.url}/write?db={db}&precision=s", data=line.encode())
            __import__("urllib.request").request.urlopen(req).read()
        # and claim the world had another pH all along: the oracle must object
        node.world_log.insert(1, (0.0, {"values": {"ph": 7.0}}))
        f = rig.account("check", drain_timeout=3)  # the deleted point will not come back
        assert f.verdict == "fail"
        assert f.lost == 1 and f.duplicated == 1 and f.wrong >= 2, f.problems
        text = "\n".join(f.problems)
        assert "seq 2: ph=6.5 but the node stored 8.12" in text
        assert "not what the world and the calibration imply" in text
    finally:
        rig.stop()


def test_mpremote_over_the_nodes_pty(tmp_path: Path) -> None:
    rig = emulated_rig(tmp_path, 1)
    try:
        rig.wait_online()
        node = rig.node
        with node.serial() as port:
            mp = [sys.executable, "-m", "mpremote", "connect", port]
            p = subprocess.run(mp + ["fs", "cat", "node.json"], capture_output=True, text=True, timeout=60)
            assert p.returncode == 0 and json.loads(p.stdout)["node"] == "buoy-01", p.stderr
            p = subprocess.run(mp + ["exec", "import te_store; s = te_store.Store(4096); print('hi', s.hi)"],
                               capture_output=True, text=True, timeout=60)
            assert p.returncode == 0 and p.stdout.startswith("hi "), p.stdout + p.stderr
        rig.wait_status(lambda s: s.get("reset") == "soft" and s.get("online"), 30, "node back after the REPL", node)
    finally:
        rig.stop()


def test_flash_path_esptool_against_mock_bootloader(tmp_path: Path) -> None:
    image = esp32_image(tmp_path / "micropython.bin")
    with MockBootloader() as mb:
        p = esptool(mb.url, "chip-id")
        assert p.returncode == 0 and "ESP32" in p.stdout, p.stdout + p.stderr
        p = esptool(mb.url, "write-flash", "0x1000", str(image))
        assert p.returncode == 0 and "Hash of data verified" in p.stdout, p.stdout + p.stderr
        p = esptool(mb.url, "verify-flash", "0x1000", str(image))
        assert p.returncode == 0 and "Verification successful" in p.stdout, p.stdout + p.stderr
        other = tmp_path / "other.bin"
        other.write_bytes(image.read_bytes()[:-1] + b"\x00")
        p = esptool(mb.url, "verify-flash", "0x1000", str(other))
        assert p.returncode != 0, "verify must fail for different bytes"


def test_missing_board_port_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(BoardUnavailable, match="no such serial port"):
        check_ports(["/dev/ttyUSB-hil-missing"])
    p = subprocess.run([sys.executable, "-m", "twinedge.cli", "hil", "run", "--board", "/dev/ttyUSB-hil-missing",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 2 and "no such serial port" in p.stdout and "Traceback" not in p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "pytest", str(REPO / "hil_tests" / "test_scenarios.py"),
                        "--board", "/dev/ttyUSB-hil-missing", "-p", "no:cacheprovider"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 4 and "no such serial port" in p.stdout + p.stderr


def test_real_backend_on_a_usb_board_emulated_by_pty(tmp_path: Path) -> None:
    """The --board code path end to end: provisioning commands, scenario, ring read back
    with mpremote, accounting; and the skip reason for a scenario that needs a hand."""
    from hil_tests.board.runner import BOARD
    from hil_tests.pty_board import start

    flash = tmp_path / "usb-board"
    flash.mkdir()
    (flash / "scenario.json").write_text(json.dumps({"speed": 1}))
    board = start(flash, micropath=str(BOARD), env={"TE_SCENARIO": "scenario.json"})
    try:
        rig = real_rig(tmp_path / "rig", [board.port])
        try:
            f = SCENARIOS["steady"].run(rig)
            assert f.verdict == "pass" and f.backend == "real" and f.landed == f.taken >= 4, f.problems
        finally:
            rig.stop()
    finally:
        board.stop()
    from hil_tests.rig.real import REAL_CAPS, skip_reason

    assert "power" in (skip_reason(SCENARIOS["power_cycle"].needs, REAL_CAPS) or "")
