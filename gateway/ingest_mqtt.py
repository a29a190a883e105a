"""MQTT in: the city uplink subscription, read on the asyncio loop, acknowledged only when durable.

Why not paho here (the mirror link still uses it): profiled under bench/gateway_bench.py mode (1),
one reading per message, paho's network thread took 42 % of the gateway's samples. paho reads one
packet per select() with several recv() calls each, and every manual `ack()` from another thread
queues one PUBACK behind a wake-up byte on a socket pair. This subscriber parses every packet of a
64 KB read in one pass on the event loop and writes a whole batch's PUBACKs in one send. It speaks
only what the ingest needs: CONNECT (3.1.1 or 5, persistent session), SUBSCRIBE at QoS 1
(optionally `$share/<group>/...`), PUBLISH in, PUBACK out, keepalive, reconnect with backoff.

Backpressure: when the queue holds `receive_maximum` messages or 8 MB, the transport stops reading
until ingest drains it to half; TCP then pushes back on the broker, which keeps the backlog
(Mosquitto 2.0.11 was measured overrunning a 1,000-message window by 14,630 messages, see
docs/operations.md).

Reconnects: the broker redelivers unacknowledged messages with their original packet ids, so a
message received on an earlier connection is never acknowledged on a later one (its id may by
then name another message); its redelivered copy is acked instead.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import time
from collections import deque
from dataclasses import dataclass

from gateway.config import MqttConfig
from gateway.topics import status_filter, up_filter

log = logging.getLogger("twinedge.gateway.mqtt")

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14
MAX_PACKET = 16 * 1024 * 1024  # far above any payload limit; a larger length means a broken stream

CONNACK_V3 = {1: "unacceptable protocol version", 2: "client id rejected", 3: "server unavailable",
              4: "bad user name or password", 5: "not authorised"}
REASON_V5 = {0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error",
             0x83: "implementation specific error", 0x84: "unsupported protocol version",
             0x85: "client id not valid", 0x86: "bad user name or password", 0x87: "not authorised",
             0x88: "server unavailable", 0x89: "server busy", 0x8A: "banned", 0x8C: "bad authentication method",
             0x8E: "session taken over", 0x8F: "topic filter invalid", 0x97: "quota exceeded",
             0x9E: "shared subscriptions not supported", 0x9F: "connection rate exceeded"}


class MqttProtocolError(Exception):
    pass


@dataclass(slots=True)
class Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int
    received_at: float
    retain: bool = False


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect_packet(cfg: MqttConfig) -> bytes:
    v5 = cfg.protocol == 5
    password = cfg.password.get_secret_value()
    flags = (0x80 if cfg.username else 0) | (0x40 if cfg.username and password else 0)  # clean session/start = 0
    body = _utf8("MQTT") + bytes([cfg.protocol, flags]) + struct.pack("!H", cfg.keepalive_s)
    if v5:
        props = b"\x11" + struct.pack("!I", cfg.session_expiry_s) + b"\x21" + struct.pack("!H", cfg.receive_maximum)
        body += _varint(len(props)) + props
    body += _utf8(cfg.client_id)
    if cfg.username:
        body += _utf8(cfg.username)
        if password:
            body += _utf8(password)
    return _packet(CONNECT << 4, body)


def subscribe_packet(mid: int, filters: list[str], v5: bool) -> bytes:
    body = struct.pack("!H", mid) + (b"\x00" if v5 else b"")
    for f in filters:
        body += _utf8(f) + b"\x01"
    return _packet(SUBSCRIBE << 4 | 0x02, body)


def puback_packets(mids: list[int]) -> bytes:
    return b"".join(b"\x40\x02" + m.to_bytes(2, "big") for m in mids)


class _Session(asyncio.Protocol):
    """One TCP (or TLS) connection: parses packets as they arrive, hands PUBLISHes to the owner."""

    def __init__(self, owner: MqttIngest) -> None:
        self.owner = owner
        self.v5 = owner.cfg.protocol == 5
        self.transport: asyncio.Transport | None = None
        self.generation = 0  # set at CONNACK
        self.rest = b""
        self.need = 0
        self.parts: list[bytes] = []
        self.last_rx = time.monotonic()
        self.connack: asyncio.Future[tuple[bool, int]] = owner.loop.create_future()
        self.suback: asyncio.Future[list[int]] = owner.loop.create_future()
        self.lost: asyncio.Future[str] = owner.loop.create_future()
        self.paused = False

    # -- asyncio callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(str(exc) if exc else "connection closed by broker")
        for f in (self.connack, self.suback):
            if not f.done():
                f.set_exception(ConnectionError(str(exc) if exc else "connection closed by broker"))

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        if self.need:  # a long packet arriving in pieces: collect them before joining once
            self.parts.append(data)
            self.need -= len(data)
            if self.need > 0:
                return
            data = b"".join(self.parts)
            self.parts = []
            self.need = 0
        elif self.rest:
            data = self.rest + data
        try:
            self.rest = self._parse(data)
        except MqttProtocolError as e:
            self.close(f"broken MQTT stream from broker: {e}")

    # -- hot path ------------------------------------------------------------------------
    def _parse(self, data: bytes) -> bytes:
        owner = self.owner
        q = owner.queue
        n = len(data)
        pos = 0
        now = time.time()
        gen = self.generation
        v5 = self.v5
        high_water, high_water_bytes = owner.high_water, owner.high_water_bytes
        received = 0
        payload_bytes = 0
        rest: bytes | None = None  # set when the loop stops before the end of `data`
        while n - pos >= 2:
            first = data[pos]
            i = pos + 1
            length = 0
            shift = 0
            while True:
                if i >= n:
                    length = -1  # the length itself is cut off
                    break
                b = data[i]
                i += 1
                length |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise MqttProtocolError("remaining length longer than 4 bytes")
            if length < 0:
                rest = data[pos:]
                break
            end = i + length
            if end > n:
                if length > MAX_PACKET:
                    raise MqttProtocolError(f"packet of {length} bytes")
                self.need = end - n
                self.parts = [data[pos:]]
                rest = b""
                break
            kind = first >> 4
            if kind == PUBLISH:
                if len(q) >= high_water or owner.queue_bytes + payload_bytes >= high_water_bytes:
                    # Window full: keep the rest unparsed and stop reading until ingest drains half.
                    self._pause()
                    rest = data[pos:]
                    break
                qos = (first >> 1) & 3
                tl = (data[i] << 8) | data[i + 1]
                j = i + 2 + tl
                topic = data[i + 2:j].decode("utf-8", "replace")
                mid = 0
                if qos:
                    mid = (data[j] << 8) | data[j + 1]
                    j += 2
                if v5:
                    plen, j = self._read_varint(data, j)
                    j += plen
                payload = data[j:end]
                payload_bytes += end - j
                q.append(Inbound(topic, payload, mid, qos, gen, now, bool(first & 1)))
                received += 1
            else:
                self._control(kind, data[i:end])
                gen = self.generation  # a CONNACK and the session's first PUBLISHes share one read
            pos = end
        # Every exit passes here: what was queued is counted and ingest is woken.
        if received:
            owner.received_count += received
            owner.queue_bytes += payload_bytes
            owner.wakeup.set()
        if rest is None:
            rest = data[pos:] if pos < n else b""
        return rest

    @staticmethod
    def _read_varint(data: bytes, j: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            b = data[j]
            j += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value, j
            shift += 7

    def _control(self, kind: int, body: bytes) -> None:
        if kind == CONNACK:
            if len(body) < 2:
                raise MqttProtocolError("short CONNACK")
            if body[1] == 0:
                # Numbered here, not after the await: queued PUBLISHes follow in the same read.
                self.owner.connections += 1
                self.generation = self.owner.connections
            if not self.connack.done():
                self.connack.set_result((bool(body[0] & 1), body[1]))
        elif kind == SUBACK:
            codes = body[2:]
            if self.v5:
                plen, j = self._read_varint(body, 2)
                codes = body[j + plen:]
            if not self.suback.done():
                self.suback.set_result(list(codes))
        elif kind == PUBREL:  # only if a broker sends QoS 2 despite the QoS 1 subscription
            self.write(bytes([PUBCOMP << 4, 2]) + body[:2])
        elif kind == DISCONNECT:
            reason = body[0] if body else 0
            self.close(f"broker disconnected us: {REASON_V5.get(reason, hex(reason))}")
        elif kind in (PINGRESP, PUBACK, PUBCOMP):
            pass
        else:
            raise MqttProtocolError(f"unexpected packet type {kind}")

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.owner.backpressure_waits += 1
            if self.transport is not None and not self.transport.is_closing():
                self.transport.pause_reading()

    def resume(self) -> None:
        """Parse what was held back, then read again unless that filled the window once more."""
        if not self.paused or self.transport is None or self.transport.is_closing():
            return
        self.paused = False
        if self.rest:
            rest, self.rest = self.rest, b""
            try:
                self.rest = self._parse(rest)
            except MqttProtocolError as e:
                self.close(f"broken MQTT stream from broker: {e}")
                return
        if not self.paused:
            self.transport.resume_reading()

    def close(self, why: str) -> None:
        if not self.lost.done():
            self.lost.set_result(why)
        if self.transport is not None:
            self.transport.abort()


class MqttIngest:
    def __init__(self, cfg: MqttConfig, city: str, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.city = city
        self.loop = loop
        self.queue: deque[Inbound] = deque()
        self.wakeup = asyncio.Event()
        self.subscribed = asyncio.Event()
        self.connected = False
        self.last_error = "not connected yet"
        self.received_count = 0
        self.acked_count = 0
        self.queue_bytes = 0
        self.high_water = cfg.receive_maximum
        self.high_water_bytes = 8 * 1024 * 1024
        self.backpressure_waits = 0
        self.connections = 0  # CONNACKs so far: numbers the messages of each connection
        self._session: _Session | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._ssl: ssl.SSLContext | None = None
        if cfg.tls_ca:
            self._ssl = ssl.create_default_context(cafile=str(cfg.tls_ca))

    def subscriptions(self) -> list[str]:
        subs = [up_filter(self.city, self.cfg.share_group or None)]
        if self.cfg.subscribe_status:
            # Status is retained: a shared subscription would hide retained copies from all but one member.
            subs.append(status_filter(self.city))
        return subs

    def start(self) -> None:
        self._task = self.loop.create_task(self._run(), name="mqtt")

    async def _run(self) -> None:
        delay = 1.0
        while not self._stopping:
            try:
                if await self._one_session():
                    delay = 1.0
            except (OSError, ConnectionError, asyncio.TimeoutError, MqttProtocolError, ssl.SSLError) as e:
                self.last_error = f"cannot reach broker {self.cfg.host}:{self.cfg.port}: {e or type(e).__name__}"
                log.warning("mqtt connection failed", extra={"error": self.last_error})
            except Exception as e:  # noqa: BLE001 - a bug here must not leave the gateway silently deaf
                self.last_error = f"MQTT session failed ({type(e).__name__}: {e}); reconnecting"
                log.exception("mqtt session failed")
            self.connected = False
            self._session = None
            if self._stopping:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _one_session(self) -> bool:
        """Connect, subscribe, then serve until the connection ends; True if it got as far as CONNACK."""
        cfg = self.cfg
        transport, session = await asyncio.wait_for(self.loop.create_connection(
            lambda: _Session(self), cfg.host, cfg.port, ssl=self._ssl,
            server_hostname=cfg.host if self._ssl else None), timeout=10)
        try:
            transport.write(connect_packet(cfg))
            session_present, rc = await asyncio.wait_for(session.connack, timeout=max(10, cfg.keepalive_s))
            if rc:
                why = REASON_V5.get(rc, hex(rc)) if cfg.protocol == 5 else CONNACK_V3.get(rc, str(rc))
                self.last_error = f"broker refused connection: {why}"
                log.warning("mqtt connect refused", extra={"reason": why})
                return False
            self._session = session
            self.connected = True
            self.last_error = ""
            subs = self.subscriptions()
            session.write(subscribe_packet(1, subs, cfg.protocol == 5))
            codes = await asyncio.wait_for(session.suback, timeout=max(10, cfg.keepalive_s))
            bad = [REASON_V5.get(c, hex(c)) for c in codes if c >= 0x80]
            if bad:
                self.last_error = f"subscription refused by broker: {', '.join(bad)} (check the gateway's ACL)"
                log.error("mqtt subscribe refused", extra={"reasons": bad})
            self.subscribed.set()
            log.info("mqtt connected", extra={"session_present": session_present, "subscriptions": subs})
            why = await self._keepalive(session)
            if not self._stopping:
                self.last_error = f"disconnected from broker ({why}); reconnecting"
                log.warning("mqtt disconnected", extra={"reason": why})
            return True
        finally:
            if not transport.is_closing():
                transport.abort()

    async def _keepalive(self, session: _Session) -> str:
        """PINGREQ every half keepalive; a broker silent for 1.5 keepalives is gone (half-open TCP)."""
        interval = self.cfg.keepalive_s / 2
        while True:
            done, _ = await asyncio.wait({session.lost}, timeout=interval)
            if done:
                return session.lost.result()
            if time.monotonic() - session.last_rx > 1.5 * self.cfg.keepalive_s and not session.paused:
                session.close(f"no answer from broker in {1.5 * self.cfg.keepalive_s:.0f} s")
                continue
            session.write(bytes([PINGREQ << 4, 0]))

    def taken(self, items: list[Inbound]) -> None:
        """Ingest took these off the queue: account for them and read again when drained to half."""
        self.queue_bytes -= sum(len(it.payload) for it in items)
        s = self._session
        if s is not None and s.paused and len(self.queue) <= self.high_water // 2 \
                and self.queue_bytes <= self.high_water_bytes // 2:
            s.resume()

    def ack(self, items: list[Inbound]) -> int:
        """PUBACK items from the current connection in one write; returns how many were acknowledged."""
        s = self._session
        if s is None:
            return 0
        gen = s.generation
        mids = [it.mid for it in items if it.qos == 1 and it.generation == gen]
        out = puback_packets(mids)
        recs = [it.mid for it in items if it.qos == 2 and it.generation == gen]
        if recs:
            out += b"".join(bytes([PUBREC << 4, 2]) + m.to_bytes(2, "big") for m in recs)
        if out:
            s.write(out)
        done = len(mids) + len(recs)
        self.acked_count += done
        return done

    def stop(self) -> None:
        self._stopping = True
        s = self._session
        if s is not None and s.transport is not None and not s.transport.is_closing():
            s.transport.write(bytes([DISCONNECT << 4, 0]))
            s.transport.close()
        if self._task is not None:
            self._task.cancel()
