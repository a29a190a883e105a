"""Test helpers: publish known readings, then account for every one of them in InfluxDB."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from gateway.decode import encode_compact
from gateway.schema import MARINE, MOBILITY, Schema
from twinedge.services import Influxd


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def marine_row(k: int) -> list[int]:
    return [800 + k % 50, 1500 + k % 100, 700, 45000 + k % 7, 3100, 120, 3700]


def mobility_row(k: int) -> list[int]:
    return [k % 300, k % 40, k % 25, 400, 600, 900, 3900, 60]


@dataclass
class Node:
    city: str
    domain: str
    node: str
    next_seq: int = 1
    published: dict[int, int] = field(default_factory=dict)  # seq -> t

    @property
    def schema(self) -> Schema:
        return MARINE if self.domain == "marine" else MOBILITY

    @property
    def topic(self) -> str:
        return f"twin/{self.city}/{self.domain}/{self.node}/up"

    def batch(self, n: int, t0: int) -> bytes:
        rows = []
        for i in range(n):
            k = self.next_seq + i
            vals = marine_row(k) if self.domain == "marine" else mobility_row(k)
            rows.append((i, 0, 0x7F if self.domain == "marine" else 0xFF, vals))
        payload = encode_compact(self.schema, self.node, self.next_seq, t0, rows)
        for i in range(n):
            self.published[self.next_seq + i] = t0 + i
        self.next_seq += n
        return payload


class Publisher:
    """A QoS 1 publisher with a persistent session, so a broker restart loses nothing it sent."""

    def __init__(self, port: int, client_id: str = "test-publisher") -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.infos.append(self.client.publish(topic, payload, qos=1, retain=retain))

    def wait_all(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for info in self.infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "publish was not acknowledged by the broker"
        self.infos.clear()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def counts_by_node(influx: Influxd, measurement: str, field_name: str, db: str = "twinedge") -> dict[str, int]:
    res = influx.query(f'SELECT count("{field_name}") FROM "{measurement}" GROUP BY "node"', db=db)
    out: dict[str, int] = {}
    for s in res["results"][0].get("series", []):
        out[s["tags"]["node"]] = int(s["values"][0][1])
    return out


def times_for(influx: Influxd, measurement: str, node: str, field_name: str, db: str = "twinedge") -> list[int]:
    res = influx.query(f"SELECT \"{field_name}\" FROM \"{measurement}\" WHERE \"node\" = '{node}'", db=db)
    series = res["results"][0].get("series", [])
    return [int(v[0]) for v in series[0]["values"]] if series else []


def run_in_thread(fn: Callable[[], None]) -> threading.Thread:
    th = threading.Thread(target=fn, daemon=True)
    th.start()
    return th
