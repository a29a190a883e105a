"""A small synchronous paho-mqtt (v5) client for tests: connect, publish with PUBACK reason, collect."""

from __future__ import annotations

import queue
import ssl
import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode


class ConnectRefused(Exception):
    pass


@dataclass
class Client:
    port: int
    username: str
    password: str
    ca: str | None = None
    client_id: str = ""
    messages: "queue.Queue[tuple[str, bytes, bool]]" = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        self._c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id or f"t-{self.username}-{time.monotonic_ns()}",
                              protocol=mqtt.MQTTv5)
        self._c.username_pw_set(self.username, self.password)
        if self.ca:
            self._c.tls_set(ca_certs=self.ca)
        self._connected = threading.Event()
        self._rc: ReasonCode | None = None
        self._acks: dict[int, ReasonCode] = {}
        self._acked = threading.Condition()
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._c.on_connect = self._on_connect
        self._c.on_publish = self._on_publish
        self._c.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload), bool(m.retain)))
        self._c.on_subscribe = self._on_subscribe

    def _on_connect(self, c: mqtt.Client, u: object, flags: object, rc: ReasonCode, props: Properties | None) -> None:
        self._rc = rc
        self._connected.set()

    def _on_publish(self, c: mqtt.Client, u: object, mid: int, rc: ReasonCode, props: Properties) -> None:
        with self._acked:
            self._acks[mid] = rc
            self._acked.notify_all()

    def _on_subscribe(self, c: mqtt.Client, u: object, mid: int, rcs: list[ReasonCode], props: Properties) -> None:
        with self._acked:
            self._subacks[mid] = rcs
            self._acked.notify_all()

    def connect(self, timeout: float = 10) -> "Client":
        self._c.connect("127.0.0.1", self.port, keepalive=30)
        self._c.loop_start()
        if not self._connected.wait(timeout):
            self._c.loop_stop()
            raise ConnectRefused("no CONNACK")
        if self._rc is None or self._rc.is_failure:
            self._c.loop_stop()
            raise ConnectRefused(str(self._rc))
        return self

    def publish(self, topic: str, payload: bytes | str, retain: bool = False, timeout: float = 10) -> ReasonCode:
        info = self._c.publish(topic, payload, qos=1, retain=retain)
        with self._acked:
            ok = self._acked.wait_for(lambda: info.mid in self._acks, timeout)
        assert ok, f"no PUBACK for {topic}"
        return self._acks[info.mid]

    def subscribe(self, topic: str, timeout: float = 10) -> list[ReasonCode]:
        _, mid = self._c.subscribe(topic, qos=1)
        assert mid is not None
        with self._acked:
            ok = self._acked.wait_for(lambda: mid in self._subacks, timeout)
        assert ok, f"no SUBACK for {topic}"
        return self._subacks[mid]

    def get(self, timeout: float = 10) -> tuple[str, bytes, bool]:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self._c.disconnect()
        self._c.loop_stop()


def try_connect(port: int, username: str, password: str, ca: str | None = None) -> str:
    """'ok' or the refusal reason (CONNACK reason code or TLS error), for negative tests."""
    c = Client(port, username, password, ca=ca)
    try:
        c.connect()
    except ConnectRefused as e:
        return f"refused: {e}"
    except (ssl.SSLError, OSError) as e:
        return f"tls: {e}"
    c.close()
    return "ok"


def refused_publish(port: int, username: str, password: str, topic: str, payload: bytes = b"forged") -> bool:
    """Publish once on a fresh connection; True when the broker refuses it (PUBACK reason >= 0x80).

    Mosquitto 2.0.11 drops the connection right after refusing a publish (paho then reconnects
    and retries), so each refused publish gets a connection of its own.
    """
    c = Client(port, username, password).connect()
    try:
        return c.publish(topic, payload).is_failure
    finally:
        c.close()
