"""One MQTT connection for the mirror (paho thread bridged into asyncio), used on both sides.

The sender connects to the partner's broker (partner-issued credentials, partner CA);
the receiver connects to its own city's broker with manual acknowledgement, so a batch
is PUBACKed only after it is in InfluxDB (same pattern and caveats as ingest_mqtt.py:
an id from an earlier connection is never acknowledged on a later one).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections import deque

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.ingest_mqtt import Inbound

log = logging.getLogger("twinedge.gateway.mirror")


# A message received on a mirror link: the same shape as the city ingest's.
LinkMessage = Inbound


class MqttLink:
    def __init__(self, what: str, host: str, port: int, client_id: str, username: str, password: str,
                 tls_ca: str | None, subscriptions: list[str], loop: asyncio.AbstractEventLoop,
                 manual_ack: bool = False, keepalive_s: int = 30, receive_maximum: int = 100) -> None:
        self.what = what
        self.host, self.port = host, port
        self.loop = loop
        self.subscriptions = subscriptions
        self.receive_maximum = receive_maximum
        self.keepalive_s = keepalive_s
        self.queue: deque[LinkMessage] = deque()
        self.wakeup = asyncio.Event()
        self.connected = False
        self.generation = 0
        self.last_error = "not connected yet"
        self._lock = threading.Lock()
        self._stopping = False
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                                  manual_ack=manual_ack)
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)
        if username:
            self.client.username_pw_set(username, password or None)
        if tls_ca:
            self.client.tls_set(ca_certs=tls_ca, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, _ud: object, _flags: mqtt.ConnectFlags, rc: ReasonCode, _p: object) -> None:
        if rc.is_failure:
            self.last_error = f"{self.what}: broker {self.host}:{self.port} refused the connection: {rc}"
            log.warning("mirror link refused", extra={"link": self.what, "reason": str(rc)})
            return
        with self._lock:
            self.generation += 1
        self.connected = True
        self.last_error = ""
        if self.subscriptions:
            client.subscribe([(s, 1) for s in self.subscriptions])
        log.info("mirror link connected", extra={"link": self.what, "broker": f"{self.host}:{self.port}"})
        self.loop.call_soon_threadsafe(self.wakeup.set)

    def _on_disconnect(self, _c: mqtt.Client, _ud: object, _f: object, rc: ReasonCode, _p: object) -> None:
        self.connected = False
        if not self._stopping:
            self.last_error = f"{self.what}: disconnected from {self.host}:{self.port} ({rc}); reconnecting"
            log.warning("mirror link down", extra={"link": self.what, "reason": str(rc)})

    def _on_message(self, _c: mqtt.Client, _ud: object, msg: mqtt.MQTTMessage) -> None:
        self.queue.append(LinkMessage(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self.generation, time.time()))
        self.loop.call_soon_threadsafe(self.wakeup.set)

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 7 * 86400
        props.ReceiveMaximum = self.receive_maximum
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive_s, clean_start=False, properties=props)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def ack(self, items: list[LinkMessage]) -> None:
        with self._lock:
            gen = self.generation
            for it in items:
                if it.qos and it.generation == gen:
                    self.client.ack(it.mid, it.qos)

    def stop(self) -> None:
        self._stopping = True
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
