# Small MQTT 3.1.1 client for the node (asyncio, QoS 0/1).
# - every packet is built in a preallocated buffer and goes out in ONE write (no Nagle
#   stalls; TCP_NODELAY set where the port allows it);
# - QoS 1 publishes sit in a bounded window of slots until PUBACK; after a reconnect the
#   unacknowledged ones are sent again with DUP set, in their original order;
# - clean_session is always set: the node's flash ring is its store-and-forward, so no
#   broker session is needed (and mqtt_as' session-present trap cannot happen);
# - keepalive: PINGREQ every keepalive/2; no packet at all from the broker for one
#   keepalive means the link is dead (silent loss is detected within ~1.0-1.1 x keepalive);
# - TLS when a CA is given: the broker certificate must chain to the city CA and match the
#   broker host name; there is no plaintext fallback, a failed handshake is a failed connect.
import asyncio
import errno
import socket
import struct
import time
from micropython import const

import te_cfg

T_CONNECT = const(0x10)
T_PUBLISH = const(0x30)
T_PUBACK = const(0x40)
T_SUBSCRIBE = const(0x82)
T_PINGREQ = const(0xC0)
T_DISCONNECT = const(0xE0)
CONNECT_TIMEOUT_MS = const(5000)


class MQTTError(Exception):
    pass


def _reason(e):
    # mbedTLS messages come wrapped in newlines; keep a single line for the log
    m = " ".join(str(e).split())
    return m or repr(e)


def _rl(buf, off, n):
    # MQTT remaining length (variable length integer); returns new offset
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            b |= 0x80
        buf[off] = b
        off += 1
        if not n:
            return off


def _rl_size(n):
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


def _put_str(buf, off, s):
    n = len(s)
    buf[off] = n >> 8
    buf[off + 1] = n & 0xFF
    buf[off + 2:off + 2 + n] = s
    return off + 2 + n


class MQTT:
    def __init__(self, client_id, host, port, user, password, keepalive, will_topic, will_msg,
                 on_msg, wake, on_ack, window=4, slot_size=1280, ca=None):
        self.cid = client_id
        self.ca = ca  # path of the city CA (DER or PEM): TLS on, never plaintext
        self.ctx = None
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.keepalive = keepalive
        self.will_topic = will_topic
        self.will_msg = will_msg
        self.on_msg = on_msg  # on_msg(topic_bytes, payload_bytes)
        self.on_ack = on_ack  # on_ack(pid)
        self.wake = wake  # asyncio.Event set on ack / connection change / message
        self.slots = [bytearray(slot_size) for _ in range(window)]
        self.slot_len = [0] * window
        self.slot_pid = [0] * window  # 0 = free
        self.slot_ord = [0] * window  # send order, for in-order retransmission
        self._ord = 0
        self._pid = 0
        self.small = bytearray(8)
        self.r = None
        self.w = None
        self.up = False
        self.last_rx = 0
        self.last_ping = 0
        self.tasks = []
        self.connects = 0
        self.dups = 0

    # -- connection ----------------------------------------------------------------
    async def connect(self, subs):
        self.close()
        if self.ca:
            try:
                await asyncio.wait_for_ms(self._open_tls(), CONNECT_TIMEOUT_MS)
            except asyncio.TimeoutError:
                self.close()
                raise MQTTError("TLS handshake with %s:%d timed out" % (self.host, self.port))
            except Exception:
                self.close()
                raise
            r = self.r
            if r is None:
                raise MQTTError("TLS link closed")
        else:
            r, w = await asyncio.wait_for_ms(asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT_MS)
            self.r = r
            self.w = w
            try:
                w.s.setsockopt(6, 1, 1)  # IPPROTO_TCP, TCP_NODELAY (no constants on some ports)
            except (AttributeError, OSError):
                pass
        try:
            if not self.ca:
                await self._send(self._connect_packet())
            hdr = await asyncio.wait_for_ms(r.readexactly(4), CONNECT_TIMEOUT_MS)
        except Exception:
            self.close()
            raise
        if hdr[0] != 0x20 or hdr[3] != 0:
            self.close()
            raise MQTTError("CONNACK refused, code %d" % hdr[3])
        self.up = True
        self.connects += 1
        self.last_rx = self.last_ping = time.ticks_ms()
        # resend what the broker never acknowledged, oldest first, flagged DUP
        order = sorted([i for i in range(len(self.slots)) if self.slot_pid[i]], key=lambda i: self.slot_ord[i])
        for i in order:
            self.slots[i][0] |= 0x08
            self.dups += 1
            await self._send(memoryview(self.slots[i])[:self.slot_len[i]])
        if subs:
            await self._subscribe(subs)
        self.tasks = [asyncio.create_task(self._reader()), asyncio.create_task(self._pinger())]
        self.wake.set()

    def _context(self):
        # one SSLContext per client: the CA is parsed once, not on every reconnect
        if self.ctx is None:
            import tls  # only TLS nodes pay for the module

            ctx = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)
            try:
                # positional: the C implementation takes no cadata= keyword; DER, since
                # mbedTLS rejects PEM without a trailing NUL ("invalid cert")
                ctx.load_verify_locations(te_cfg.load_ca(self.ca))
            except (OSError, ValueError) as e:
                raise MQTTError("TLS CA %s unusable: %s" % (self.ca, _reason(e)))
            ctx.verify_mode = tls.CERT_REQUIRED  # type: ignore  # real attribute, missing from the stubs
            self.ctx = ctx
        return self.ctx

    async def _open_tls(self):
        # Non-blocking all the way: the socket connects in the background and mbedTLS runs
        # the handshake inside the first write (do_handshake_on_connect=False), driven by
        # the stream's poll loop, so sampling never waits on a slow handshake. The CONNECT
        # packet goes out in that first write; certificate/host-name errors surface there.
        ctx = self._context()
        ai = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)[0]
        s = socket.socket(ai[0], ai[1], ai[2])
        try:
            s.setsockopt(6, 1, 1)  # TCP_NODELAY on the raw socket: the TLS one has no setsockopt
        except (AttributeError, OSError):
            pass
        s.setblocking(False)
        try:
            s.connect(ai[-1])
        except OSError as e:
            if e.errno != errno.EINPROGRESS:
                s.close()
                raise
        try:
            ss = ctx.wrap_socket(s, server_hostname=self.host, do_handshake_on_connect=False)
        except Exception as e:
            s.close()
            raise MQTTError("TLS setup failed: %s" % _reason(e))
        # MicroPython's StreamReader/StreamWriter are both Stream(sock, extra); two thin
        # wrappers of one socket keep the CPython-shaped stubs happy
        self.r = asyncio.StreamReader(ss, {})  # type: ignore
        self.w = asyncio.StreamWriter(ss, {})  # type: ignore
        try:
            await self._send(self._connect_packet())
        except OSError as e:
            self.close()
            if e.errno is not None and e.errno > 0:
                # plain socket error (refused, unreachable): not a TLS verdict
                raise MQTTError("connect to %s:%d failed: %s" % (self.host, self.port, _reason(e)))
            raise MQTTError("TLS handshake with %s:%d failed: %s" % (self.host, self.port, _reason(e)))
        except Exception as e:
            self.close()
            raise MQTTError("TLS handshake with %s:%d failed: %s" % (self.host, self.port, _reason(e)))

    def _connect_packet(self):
        flags = 0x02  # clean session
        n = 10 + 2 + len(self.cid)
        if self.will_topic:
            flags |= 0x04 | 0x08 | 0x20  # will, will QoS 1, will retain
            n += 4 + len(self.will_topic) + len(self.will_msg)
        if self.user:
            flags |= 0x80
            n += 2 + len(self.user)
        if self.password:
            flags |= 0x40
            n += 2 + len(self.password)
        buf = bytearray(1 + _rl_size(n) + n)
        buf[0] = T_CONNECT
        off = _rl(buf, 1, n)
        off = _put_str(buf, off, b"MQTT")
        buf[off] = 4
        buf[off + 1] = flags
        struct.pack_into(">H", buf, off + 2, self.keepalive)
        off = _put_str(buf, off + 4, self.cid)
        if self.will_topic:
            off = _put_str(buf, off, self.will_topic)
            off = _put_str(buf, off, self.will_msg)
        if self.user:
            off = _put_str(buf, off, self.user)
        if self.password:
            off = _put_str(buf, off, self.password)
        return buf

    async def _subscribe(self, subs):
        n = 2
        for t in subs:
            n += 3 + len(t)
        buf = bytearray(1 + _rl_size(n) + n)
        buf[0] = T_SUBSCRIBE
        off = _rl(buf, 1, n)
        struct.pack_into(">H", buf, off, self._next_pid())
        off += 2
        for t in subs:
            off = _put_str(buf, off, t)
            buf[off] = 1
            off += 1
        await self._send(buf)

    def close(self):
        was = self.up
        self.up = False
        try:
            cur = asyncio.current_task()
        except Exception:
            cur = None
        for t in self.tasks:
            if t is not cur:
                t.cancel()
        self.tasks = []
        if self.w is not None:
            try:
                self.w.close()
            except Exception:
                pass
        self.w = None
        self.r = None
        if was:
            self.wake.set()

    async def disconnect(self):
        if self.up:
            try:
                self.small[0] = T_DISCONNECT
                self.small[1] = 0
                await self._send(memoryview(self.small)[:2])
            except Exception:
                pass
        self.close()

    async def _send(self, data):
        w = self.w
        if w is None:
            raise OSError(107)  # ENOTCONN
        w.write(data)
        await w.drain()

    # -- publishing ----------------------------------------------------------------
    def free_slots(self):
        return self.slot_pid.count(0)

    def inflight(self):
        return len(self.slots) - self.slot_pid.count(0)

    def _next_pid(self):
        while True:
            self._pid = self._pid % 65535 + 1
            if self._pid not in self.slot_pid:
                return self._pid

    async def publish(self, topic, payload, retain=False, qos=1):
        # Returns the packet id (0 for QoS 0), or -1 when no slot is free. A QoS 1 message
        # stays in its slot until PUBACK, across reconnects; a failed write only drops the link.
        if qos:
            try:
                i = self.slot_pid.index(0)
            except ValueError:
                return -1
            buf = self.slots[i]
        else:
            i = -1
            buf = bytearray(5 + 2 + len(topic) + len(payload))
        n = 2 + len(topic) + len(payload) + (2 if qos else 0)
        if 1 + _rl_size(n) + n > len(buf):
            raise ValueError("message too large for a slot")
        buf[0] = T_PUBLISH | (2 if qos else 0) | (1 if retain else 0)
        off = _put_str(buf, _rl(buf, 1, n), topic)
        pid = 0
        if qos:
            pid = self._next_pid()
            buf[off] = pid >> 8
            buf[off + 1] = pid & 0xFF
            off += 2
            self.slot_pid[i] = pid
            self._ord += 1
            self.slot_ord[i] = self._ord
        buf[off:off + len(payload)] = payload
        off += len(payload)
        if qos:
            self.slot_len[i] = off
        if self.up:
            try:
                await self._send(memoryview(buf)[:off])
            except Exception:
                self.close()
        return pid

    # -- receiving -----------------------------------------------------------------
    async def _reader(self):
        r = self.r
        if r is None:
            return
        try:
            while True:
                b = await r.readexactly(1)
                t = b[0]
                n = 0
                sh = 0
                while True:
                    c = (await r.readexactly(1))[0]
                    n |= (c & 0x7F) << sh
                    sh += 7
                    if not c & 0x80:
                        break
                body = await r.readexactly(n) if n else b""
                self.last_rx = time.ticks_ms()
                k = t & 0xF0
                if k == T_PUBACK and n >= 2:
                    self._acked((body[0] << 8) | body[1])
                elif k == T_PUBLISH:
                    tl = (body[0] << 8) | body[1]
                    topic = body[2:2 + tl]
                    off = 2 + tl
                    if t & 0x06:
                        pid = (body[off] << 8) | body[off + 1]
                        off += 2
                        self.small[0] = T_PUBACK
                        self.small[1] = 2
                        self.small[2] = pid >> 8
                        self.small[3] = pid & 0xFF
                        await self._send(memoryview(self.small)[:4])
                    self.on_msg(topic, body[off:])
                    self.wake.set()
                # SUBACK, PINGRESP: only refresh last_rx
        except asyncio.CancelledError:
            raise
        except Exception:
            self.close()

    def _acked(self, pid):
        try:
            i = self.slot_pid.index(pid)
        except ValueError:
            return  # duplicate ack
        self.slot_pid[i] = 0
        self.on_ack(pid)
        self.wake.set()

    async def _pinger(self):
        ka = self.keepalive * 1000
        try:
            while self.up:
                await asyncio.sleep_ms(min(1000, ka // 4))
                now = time.ticks_ms()
                if time.ticks_diff(now, self.last_rx) > ka:
                    self.close()  # silent link loss: nothing from the broker for a keepalive
                    return
                if time.ticks_diff(now, self.last_ping) >= ka // 2:
                    self.last_ping = now
                    self.small[0] = T_PINGREQ
                    self.small[1] = 0
                    await self._send(memoryview(self.small)[:2])
        except asyncio.CancelledError:
            raise
        except Exception:
            self.close()
