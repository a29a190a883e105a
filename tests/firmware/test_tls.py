"""TLS between an emulated node (real MicroPython unix port, real firmware, mbedTLS) and a real
Mosquitto TLS listener whose certificates come from the project's own city-CA code: a node
holding the city CA delivers readings the gateway decoder accepts; a node holding another
CA never gets a session (no plaintext fallback) and says why in its log."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil_tests.board.runner import NodeProcess
from provisioning.broker import TlsFiles, make_ca, mosquitto_tls_listener
from tests.firmware.conftest import Collector, wait_until
from twinedge.services import Mosquitto, free_port

VALUES = {"ph": 8.12, "temp": 15.34, "do": 7.12, "ec": 45210, "sal": 31.2, "turb": 12.3, "bat": 3.712}
TOPIC = "twin/copenhagen/marine/{}/up"


@pytest.fixture
def pki(tmp_path: Path) -> tuple[TlsFiles, TlsFiles]:
    return make_ca("copenhagen", tmp_path / "ca", hosts=["127.0.0.1", "localhost"]), make_ca("elsewhere", tmp_path / "other")


@pytest.fixture
def tls_broker(tmp_path: Path, pki: tuple[TlsFiles, TlsFiles]) -> Iterator[tuple[Mosquitto, int]]:
    tls_port = free_port()
    b = Mosquitto(tmp_path / "mosq", extra_conf=mosquitto_tls_listener(pki[0], tls_port)).start()
    yield b, tls_port
    b.stop()


def _node(tmp_path: Path, name: str, port: int | None, ca: Path | None) -> NodeProcess:
    flash = tmp_path / name
    flash.mkdir()
    if ca is not None:
        shutil.copy(ca, flash / "ca.crt")
    n = NodeProcess(name, "copenhagen", "marine", "127.0.0.1", port or 0, flash, scenario={"values": VALUES},
                    speed=60, node_extra={"ring": 256, "tls": True, "ca": "ca.crt"}, trace=True)
    if port is None:
        del n.node_cfg["port"]  # as provisioning may leave it out: the firmware's default applies
    (flash / "cfg.json").write_text('{"v": 1, "batch": 2}')
    return n


def test_tls_node_delivers_and_wrong_ca_node_never_connects(
        tmp_path: Path, pki: tuple[TlsFiles, TlsFiles], tls_broker: tuple[Mosquitto, int]) -> None:
    broker, tls_port = tls_broker
    collector = Collector(broker)  # plaintext listener: only the observer uses it
    good = _node(tmp_path, "buoy-t1", tls_port, pki[0].ca_cert)
    bad = _node(tmp_path, "buoy-t2", tls_port, pki[1].ca_cert)
    nodes = [good, bad]
    try:
        wait_until(lambda: collector.c.is_connected(), 10, "collector connected")
        good.start()
        bad.start()
        rs = wait_until(lambda: (r := collector.readings(TOPIC.format("buoy-t1"), "buoy-t1")) and len(r) >= 4 and r,
                        30, "4 readings over TLS", good)
        assert sorted(rs)[:4] == [1, 2, 3, 4]
        for r in rs.values():
            assert r.values["ph"] == 8.12 and r.values["do_mgl"] == 7.12
            assert abs(r.t - time.time()) < 30
        st = wait_until(lambda: collector.last_status("buoy-t1").get("online") and collector.last_status("buoy-t1"),
                        10, "status over TLS", good)
        assert st["cfg"] == 1
        assert any(t["ev"] == "conn" for t in good.traces())
        # the wrong-CA node has been sampling all along, and failing the handshake each time
        wait_until(lambda: sum(1 for t in bad.traces() if t["ev"] == "sample") >= 4
                   and sum(1 for t in bad.traces() if t["ev"] == "connfail") >= 2, 15, "wrong-CA node sampling", bad)
        assert "mqtt connect failed: TLS handshake with 127.0.0.1:%d failed" % tls_port in bad.console(), bad.console()[-2000:]
        assert "not correctly signed by the trusted CA" in bad.console()
        assert not any(t["ev"] == "conn" for t in bad.traces())
        assert collector.ups("buoy-t2") == [] and collector.statuses("buoy-t2") == []
    finally:
        for n in nodes:
            n.stop()
        collector.close()


def test_tls_default_port_and_missing_ca_fail_closed(tmp_path: Path, pki: tuple[TlsFiles, TlsFiles]) -> None:
    # no port in node.json: 8883; no CA file: a named connect failure, never a plaintext try
    noport = _node(tmp_path, "buoy-t3", None, pki[0].ca_cert)
    noca = _node(tmp_path, "buoy-t4", 1, None)
    nodes = [noport, noca]
    try:
        for n in nodes:
            n.start()
        for n in nodes:
            wait_until(lambda: "mqtt connect failed" in n.console(), 15, "connect failure logged", n)
            wait_until(lambda: sum(1 for t in n.traces() if t["ev"] == "sample") >= 2, 15, "sampling goes on", n)
        assert "127.0.0.1:8883" in noport.console(), noport.console()[-2000:]
        assert "TLS CA ca.crt unusable: ca.crt missing" in noca.console(), noca.console()[-2000:]
    finally:
        for n in nodes:
            n.stop()
