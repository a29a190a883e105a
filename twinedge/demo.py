"""`twinedge demo`: a local twin-city stack with a live view.

Per city: a Mosquitto and an InfluxDB of its own (free loopback ports, data under the
work dir), a gateway, and synthetic buoys and traffic counters publishing realistic
signals in the compact wire format. Ctrl-C (or --duration) stops every process it
started and prints where the data lives.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.decode import encode_compact
from gateway.schema import MARINE, MOBILITY
from twinedge.gatewayproc import GatewayProcess
from twinedge.services import Influxd, Mosquitto
from twinedge.signals import marine_row, mobility_row

DOMAIN_OF = {"copenhagen": "marine", "tongyeong": "marine", "helsinki": "mobility", "amsterdam": "mobility"}


@dataclass
class SyntheticNode:
    city: str
    domain: str
    node: str
    rng: random.Random
    phase: float
    seq: int = 1
    pending: list[tuple[int, int, list[int]]] = field(default_factory=list)

    @property
    def topic(self) -> str:
        return f"twin/{self.city}/{self.domain}/{self.node}/up"

    def sample(self, t: int, interval_s: int) -> None:
        if self.domain == "marine":
            mask, vals = marine_row(t, self.phase, self.rng)
        else:
            mask, vals = mobility_row(t, 1.0 + self.phase, interval_s, self.rng)
        self.pending.append((t, mask, vals))

    def batch(self) -> tuple[bytes, int]:
        t0 = self.pending[0][0]
        rows = [(t - t0, 0, mask, vals) for t, mask, vals in self.pending]
        payload = encode_compact(MARINE if self.domain == "marine" else MOBILITY, self.node, self.seq, t0, rows)
        n = len(rows)
        self.seq += n
        self.pending.clear()
        return payload, n


@dataclass
class DemoCity:
    name: str
    domains: list[str]
    workdir: Path
    broker: Mosquitto | None = None
    influx: Influxd | None = None
    gateway: GatewayProcess | None = None
    nodes: list[SyntheticNode] = field(default_factory=list)
    published: int = 0
    client: mqtt.Client | None = None

    def start(self, nodes: int, seed: int) -> None:
        self.broker = Mosquitto(self.workdir / "mosquitto").start()
        self.influx = Influxd(self.workdir / "influxdb").start()
        self.gateway = GatewayProcess(self.workdir, self.name, self.broker.port, self.influx.url,
                                      extra={"stats_interval_s": 5.0}).start()
        rng = random.Random(f"{seed}-{self.name}")
        for i in range(nodes):
            domain = self.domains[i % len(self.domains)]
            prefix = "buoy" if domain == "marine" else "count"
            self.nodes.append(SyntheticNode(self.name, domain, f"{prefix}-{i + 1:02d}",
                                            random.Random(rng.random()), rng.random()))
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-nodes-{self.name}")
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", self.broker.port)
        self.client.loop_start()

    def tick(self, t: int, interval_s: int, batch: int) -> None:
        assert self.client is not None
        for n in self.nodes:
            n.sample(t, interval_s)
            if len(n.pending) >= batch:
                payload, count = n.batch()
                self.client.publish(n.topic, payload, qos=1)
                self.published += count

    def flush(self) -> None:
        assert self.client is not None
        infos = []
        for n in self.nodes:
            if n.pending:
                payload, count = n.batch()
                infos.append(self.client.publish(n.topic, payload, qos=1))
                self.published += count
        for i in infos:
            i.wait_for_publish(10)

    def stored(self) -> int:
        assert self.influx is not None
        total = 0
        for meas, fld in (("marine", "battery_v"), ("mobility", "interval_s")):
            res = self.influx.query(f'SELECT count("{fld}") FROM "{meas}"', db="twinedge")
            s = res["results"][0].get("series")
            if s:
                total += int(s[0]["values"][0][1])
        return total

    def stop(self) -> None:
        if self.client is not None:
            self.client.loop_stop()
            self.client.disconnect()
        if self.gateway is not None:
            self.gateway.stop()
        for svc in (self.broker, self.influx):
            if svc is not None:
                svc.stop()


def run_sampler(cities: list[DemoCity], interval_s: int, batch: int, stop: threading.Event) -> None:
    nxt = time.time()
    while not stop.is_set():
        t = int(time.time())
        for c in cities:
            c.tick(t, interval_s, batch)
        nxt += interval_s
        stop.wait(max(0.0, nxt - time.time()))
