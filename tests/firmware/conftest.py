"""Fixtures for firmware tests: a subscriber that records everything under twin/#, and
emulated nodes (real MicroPython unix port running the real firmware, shims for hardware)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from gateway.decode import decode_up
from hil_tests.board.runner import NodeProcess
from twinedge.services import Mosquitto


class Collector:
    """Subscribes to twin/# with QoS 1; reconnects by itself when the broker comes back.

    A persistent session, so a broker restart (persistence on) keeps its subscription: with a clean
    session, a node that reconnected first could flush its backlog before the collector had
    subscribed again, and the broker would drop those messages (seen once in CI)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.msgs: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="collector", clean_session=False)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe("twin/#", qos=1)
        self.c.on_message = self._on_msg
        self.c.reconnect_delay_set(0.1, 0.5)
        self.c.connect("127.0.0.1", broker.port, keepalive=10)
        self.c.loop_start()

    def _on_msg(self, c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.msgs.append((m.topic, bytes(m.payload), bool(m.retain)))

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def ups(self, node: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.msgs if t.endswith(f"/{node}/up")]

    def readings(self, topic: str, node: str) -> dict[int, Any]:
        """Every reading the gateway decoder accepts, by seq; asserts duplicates are identical."""
        out: dict[int, Any] = {}
        now = int(time.time())
        for p in self.ups(node):
            d = decode_up(topic, p, now)
            assert not d.rejected, [r.detail for r in d.rejected]
            for r in d.readings:
                assert r.seq is not None
                if r.seq in out:
                    assert (out[r.seq].t, out[r.seq].values) == (r.t, r.values), f"seq {r.seq} reused"
                out[r.seq] = r
        return out

    def statuses(self, node: str) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.msgs if t.endswith(f"/{node}/status") and p]

    def last_status(self, node: str) -> dict[str, Any]:
        s = self.statuses(node)
        return s[-1] if s else {}


def wait_until(pred: Callable[[], Any], timeout: float, what: str, node: NodeProcess | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    extra = ("\n--- node console ---\n" + node.console()[-3000:]) if node else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")


@pytest.fixture
def collector(mosquitto: Mosquitto) -> Iterator[Collector]:
    c = Collector(mosquitto)
    wait_until(lambda: c.c.is_connected(), 10, "collector connected")
    yield c
    c.close()


@pytest.fixture
def make_node(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Callable[..., NodeProcess]]:
    nodes: list[NodeProcess] = []

    def make(node: str = "buoy-01", domain: str = "marine", city: str = "copenhagen", **kw: Any) -> NodeProcess:
        kw.setdefault("speed", 60)
        extra = {"ring": 256, **kw.pop("node_extra", {})}
        n = NodeProcess(node, city, domain, "127.0.0.1", mosquitto.port, tmp_path / node,
                        node_extra=extra, trace=True, **kw)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.stop()


def cfg_file(flash: Path, doc: dict[str, Any]) -> None:
    """Provision a config as if it had been applied before (flash file)."""
    flash.mkdir(parents=True, exist_ok=True)
    (flash / "cfg.json").write_text(json.dumps(doc))
