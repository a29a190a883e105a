"""The server side of a city, started fresh for each scenario: Mosquitto, a fault proxy in
front of it (nodes connect to the proxy, the gateway to the broker), the gateway process,
and one InfluxDB shared by the cities (one database per city). Plus an operator MQTT client
per city that records every status message and pushes configs and commands."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from hil_tests.rig.model import NodeSpec
from hil_tests.rig.proxy import FaultProxy
from twinedge.gatewayproc import GatewayProcess
from twinedge.services import Influxd, Mosquitto


class Operator:
    """An operator's MQTT client on a city broker: statuses in, configs and commands out."""

    def __init__(self, city: str, port: int) -> None:
        self.city = city
        self.msgs: list[tuple[float, str, bytes]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"hil-operator-{city}")
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(f"twin/{city}/+/+/status", qos=1)
        self.c.on_message = self._on_msg
        self.c.reconnect_delay_set(0.1, 0.5)
        self.c.connect("127.0.0.1", port, keepalive=10)
        self.c.loop_start()
        deadline = time.monotonic() + 10
        while not self.c.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _on_msg(self, c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.msgs.append((time.time(), m.topic, bytes(m.payload)))

    def statuses(self, node: str) -> list[dict[str, Any]]:
        out = []
        with self.lock:
            msgs = list(self.msgs)
        for wall, topic, payload in msgs:
            if topic.endswith(f"/{node}/status") and payload:
                try:
                    d = json.loads(payload)
                except ValueError:
                    continue
                d["_wall"] = wall
                out.append(d)
        return out

    def last_status(self, node: str) -> dict[str, Any]:
        s = self.statuses(node)
        return s[-1] if s else {}

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def push_config(self, spec: NodeSpec, doc: dict[str, Any] | bytes) -> None:
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.publish(f"twin/{spec.city}/{spec.domain}/{spec.node}/cfg", body, retain=True)

    def command(self, spec: NodeSpec, cmd: dict[str, Any]) -> None:
        self.publish(f"twin/{spec.city}/{spec.domain}/{spec.node}/cmd", json.dumps(cmd))

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@dataclass
class City:
    name: str
    broker: Mosquitto
    proxy: FaultProxy
    gateway: GatewayProcess
    operator: Operator | None = None

    @property
    def database(self) -> str:
        return f"twin_{self.name}"

    def gateway_metric(self, name: str) -> float:
        return sum(v for k, v in self.gateway.metrics().items() if k == name or k.startswith(name + "{"))


@dataclass
class Stack:
    workdir: Path
    registry: Path | None = None
    proxy_host: str = "127.0.0.1"
    influx: Influxd | None = None
    cities: dict[str, City] = field(default_factory=dict)

    def start(self, city_names: list[str]) -> "Stack":
        self.influx = Influxd(self.workdir / "influxd").start()
        for name in city_names:
            broker = Mosquitto(self.workdir / f"mosquitto-{name}").start()
            proxy = FaultProxy(broker.port, listen_host=self.proxy_host).start()
            extra: dict[str, Any] = {"influx": {"flush_interval_s": 0.1}}
            if self.registry is not None:
                extra["registry"] = str(self.registry)
            gw = GatewayProcess(self.workdir / "gateway", name, broker.port, self.influx.url,
                                database=f"twin_{name}", extra=extra)
            self.cities[name] = City(name, broker, proxy, gw)
        for c in self.cities.values():
            c.gateway.start()
            c.operator = Operator(c.name, c.broker.port)
        return self

    def city(self, name: str) -> City:
        return self.cities[name]

    def stop(self) -> None:
        for c in self.cities.values():
            if c.operator is not None:
                c.operator.close()
            try:
                c.gateway.stop(timeout=10)
            except Exception:
                c.gateway.kill()
            c.proxy.stop()
            c.broker.stop()
        if self.influx is not None:
            self.influx.stop()

    # -- InfluxDB --------------------------------------------------------------------------
    def points(self, city: str) -> list[dict[str, Any]] | None:
        """Every reading point of a city's database (time in s, tags and fields as columns);
        None while InfluxDB does not answer."""
        assert self.influx is not None
        try:
            res = self.influx.query('SELECT * FROM "marine","mobility"', db=f"twin_{city}")
        except (urllib.error.URLError, OSError, ValueError):
            return None
        out = []
        for r in res.get("results", [{}]):
            for s in r.get("series", []) or []:
                cols = s["columns"]
                for row in s["values"]:
                    d = {k: v for k, v in zip(cols, row) if v is not None}
                    d["_measurement"] = s["name"]
                    out.append(d)
        return out
