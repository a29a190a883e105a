"""MQTT in: paho-mqtt with manual acknowledgement, bridged into asyncio.

paho's network thread appends each message to a deque and wakes the event loop; the
ingest stage acknowledges (PUBACK) only after the message is durable. aiomqtt has no
public manual-ack API (empicano/aiomqtt#345), hence paho.

Backpressure: Mosquitto 2.0.11 was measured sending far more unacknowledged messages
than the client's receive window when several publishers are active (14,630 in flight
against a window of 1,000, bench notes in docs/operations.md). So the gateway bounds its
own memory: when the queue holds `receive_maximum` messages or 8 MB, paho's network
thread waits in the callback until ingest has drained it to half; TCP then pushes back
on the broker, which keeps the backlog.

Reconnects: the broker redelivers unacknowledged messages with their original packet
ids, so a message received on an earlier connection is never acknowledged on a later
one (its id may by then name another message); its redelivered copy is acked instead.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from gateway.config import MqttConfig
from gateway.topics import status_filter, up_filter

log = logging.getLogger("twinedge.gateway.mqtt")


@dataclass(slots=True)
class Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int
    received_at: float
    retain: bool = False


class MqttIngest:
    def __init__(self, cfg: MqttConfig, city: str, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.city = city
        self.loop = loop
        self.queue: deque[Inbound] = deque()
        self.wakeup = asyncio.Event()
        self.connected = False
        self.last_error = "not connected yet"
        self._generation = 0
        self.received_count = 0
        self.acked_count = 0
        self.queue_bytes = 0
        self.high_water = cfg.receive_maximum
        self.high_water_bytes = 8 * 1024 * 1024
        self.backpressure_waits = 0
        self._drained = threading.Event()
        self._lock = threading.Lock()
        self._stopping = False
        v5 = cfg.protocol == 5
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        if cfg.username:
            self.client.username_pw_set(cfg.username, cfg.password.get_secret_value() or None)
        if cfg.tls_ca:
            self.client.tls_set(ca_certs=str(cfg.tls_ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.subscribed = asyncio.Event()

    # -- paho thread ----------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _ud: object, flags: mqtt.ConnectFlags, rc: ReasonCode, _p: object) -> None:
        if rc.is_failure:
            self.last_error = f"broker refused connection: {rc}"
            log.warning("mqtt connect refused", extra={"reason": str(rc)})
            return
        with self._lock:
            self._generation += 1
        self.connected = True
        self.last_error = ""
        subs = [(up_filter(self.city, self.cfg.share_group or None), 1)]
        if self.cfg.subscribe_status:
            # Status is retained: a shared subscription would hide retained copies from all but one member.
            subs.append((status_filter(self.city), 1))
        client.subscribe(subs)
        log.info("mqtt connected", extra={"session_present": flags.session_present, "subscriptions": [s for s, _ in subs]})

    def _on_subscribe(self, _c: mqtt.Client, _ud: object, _mid: int, rcs: list[ReasonCode], _p: object) -> None:
        bad = [str(rc) for rc in rcs if rc.is_failure]
        if bad:
            self.last_error = f"subscription refused by broker: {', '.join(bad)} (check the gateway's ACL)"
            log.error("mqtt subscribe refused", extra={"reasons": bad})
        self.loop.call_soon_threadsafe(self.subscribed.set)

    def _on_disconnect(self, _c: mqtt.Client, _ud: object, _f: object, rc: ReasonCode, _p: object) -> None:
        self.connected = False
        if not self._stopping:
            self.last_error = f"disconnected from broker ({rc}); reconnecting"
            log.warning("mqtt disconnected", extra={"reason": str(rc)})

    def _on_message(self, _c: mqtt.Client, _ud: object, msg: mqtt.MQTTMessage) -> None:
        q = self.queue
        was_empty = not q
        self.received_count += 1
        self.queue_bytes += len(msg.payload)
        q.append(Inbound(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._generation, time.time(), bool(msg.retain)))
        if was_empty:
            self.loop.call_soon_threadsafe(self.wakeup.set)
        if len(q) >= self.high_water or self.queue_bytes >= self.high_water_bytes:
            self.backpressure_waits += 1
            while (len(q) > self.high_water // 2 or self.queue_bytes > self.high_water_bytes // 2) and not self._stopping:
                self._drained.clear()
                if len(q) <= self.high_water // 2 and self.queue_bytes <= self.high_water_bytes // 2:
                    break
                self._drained.wait(0.5)

    # -- event-loop side ------------------------------------------------------------
    def start(self) -> None:
        props = None
        if self.cfg.protocol == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.cfg.session_expiry_s
            props.ReceiveMaximum = self.cfg.receive_maximum
        self.client.connect_async(
            self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s,
            clean_start=False if self.cfg.protocol == 5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self.client.loop_start()

    def taken(self, items: list[Inbound]) -> None:
        """Ingest took these off the queue: account for them and let paho read again when drained."""
        self.queue_bytes -= sum(len(it.payload) for it in items)
        if len(self.queue) <= self.high_water // 2 and self.queue_bytes <= self.high_water_bytes // 2:
            self._drained.set()

    def ack(self, items: list[Inbound]) -> int:
        """PUBACK items from the current connection; returns how many were acknowledged."""
        done = 0
        with self._lock:
            gen = self._generation
            for it in items:
                if it.qos and it.generation == gen:
                    self.client.ack(it.mid, it.qos)
                    done += 1
        self.acked_count += done
        return done

    def stop(self) -> None:
        self._stopping = True
        self._drained.set()
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
