# The node: sample -> filter/calibrate -> fixed-point reading -> flash ring -> batches over
# MQTT. Sampling, publishing and supervision are separate asyncio tasks, so a dead broker
# or a slow link never delays a sample.
import asyncio
import gc
import json
import random
import sys
import time
from micropython import const

import struct

import te_cfg
import te_wire
from te_drivers import Analog, Counter, Ezo, Radar, Temp, turbidity, MISSING
from te_hal import Board
from te_mqtt import MQTT
from te_store import REC, Store

FW = "0.1.0"
SAFE_AFTER = const(3)  # crash boots in a row before safe mode
STABLE_MS = const(60000)  # running this long clears the crash-boot count
WDT_MS = const(30000)
MAX_BATCH = const(50)
BACKOFF_MAX_MS = const(4000)


def log(*a):
    print("te:", *a)


class Node:
    def __init__(self, board, ncfg):
        self.b = board
        self.n = ncfg
        self.id = ncfg["node"]
        self.nid = self.id.encode()
        dom = ncfg["domain"]
        self.schema = te_wire.MARINE if dom == "marine" else te_wire.MOBILITY
        self.fields = te_wire.FIELDS[self.schema]
        base = "twin/%s/%s/%s/" % (ncfg["city"], dom, self.id)
        self.t_up = (base + "up").encode()
        self.t_status = (base + "status").encode()
        self.t_cfg = (base + "cfg").encode()
        self.t_cmd = (base + "cmd").encode()
        self.trace = ncfg.get("trace", False)
        self.t_boot = time.ticks_ms()
        self.reset = board.reset_cause()
        self.rtc = board.rtc_load()
        # crash-boot accounting in RTC memory (survives resets, not power loss)
        crashes = self.rtc.get("c", 0)
        if self.reset in ("power_on", "deepsleep"):
            crashes = 0
        self.crashes = crashes + 1
        self.safe = self.crashes > SAFE_AFTER
        self.rtc["c"] = self.crashes
        self.synced = bool(self.rtc.get("sy")) and self.reset != "power_on"
        self.rtc["sy"] = 1 if self.synced else 0
        board.rtc_save(self.rtc)
        self.cfg_err = None
        if self.safe:
            self.cfg = dict(te_cfg.DEFAULTS)
            self.cfg["v"] = te_cfg.load(self.fields)[0]["v"]
            self.cfg_err = {"v": self.cfg["v"], "reason": "safe mode after %d crash boots" % (self.crashes - 1)}
        else:
            self.cfg, err = te_cfg.load(self.fields)
            if err:
                self.cfg_err = {"v": None, "reason": err}
        self.cal = te_cfg.compile_cal(self.cfg["cal"])
        self.store = Store(ncfg.get("ring", 4096), self.cfg["flush_n"])
        self.wake = asyncio.Event()
        # tls: the city CA (installed next to node.json) must vouch for the broker; no
        # plaintext fallback, and 8883 (MQTT over TLS) unless a port is given
        ca = ncfg.get("ca", "ca.crt") if ncfg.get("tls") else None
        self.mq = MQTT(self.nid, ncfg.get("broker", "127.0.0.1"), ncfg.get("port", 8883 if ca else 1883),
                       ncfg.get("user", self.id).encode(), ncfg.get("pass", "").encode(),
                       self.cfg["keepalive_s"], self.t_status,
                       b'{"v":1,"node":"%s","online":false}' % self.nid, self._on_msg, self.wake,
                       self._on_ack, window=ncfg.get("window", 2), ca=ca)
        self.conn_err = None  # last connect failure, logged once per distinct reason
        # preallocated buffers
        self.rd = bytearray(te_wire.RSIZE)
        self.vals = [0] * 8
        self.rbuf = bytearray(REC * MAX_BATCH)
        self.pbuf = bytearray(te_wire.header_size(self.nid) + te_wire.RSIZE * MAX_BATCH)
        self.cursor = self.store.lo  # next seq to send
        self.inflight = {}  # pid -> (seq0, n)
        self.sent_hi = 0  # first seq never published in this boot
        self.done = {}  # acked ranges waiting for an older one: seq0 -> end
        self.faults = {}
        self.alarm = False
        self.last_batch = time.ticks_ms()
        self.status_due = True
        self.cfg_in = None
        self.cmd_in = None
        self.hb_sample = self.hb_net = time.ticks_ms()
        self.bat = Analog(board.adc("bat"))
        self.bat_mv = None
        self.heap_min = 1 << 30
        self.pub_t = {}
        self.samples = 0
        self.sensors_up = False
        self.flush_now = False
        self.cal_ack = None
        self.was_up = False
        self.last_ntp = time.ticks_add(time.ticks_ms(), -3600000)

    def tr(self, ev, **kw):
        if self.trace:
            kw["ev"] = ev
            kw["ms"] = time.ticks_ms()
            print("TE", json.dumps(kw))

    # -- sensors -------------------------------------------------------------------------
    def _init_sensors(self):
        b = self.b
        if self.schema == te_wire.MARINE:
            i2c = b.i2c()
            self.ph = Ezo(i2c, 0x63, 900)
            self.do = Ezo(i2c, 0x61, 600)
            self.ec = Ezo(i2c, 0x64, 600)
            self.temp = Temp(b.ds18x20())
            self.turb = Analog(b.adc("turb"))
        else:
            self.radar = Radar(b.uart())
            self.c_veh = Counter(b.pin_in("loop"))
            self.c_bike = Counter(b.pin_in("bike"))
            self.c_ped = Counter(b.pin_in("ped"))
        self.sensors_up = True

    async def _ezo_setup(self):
        # EC circuit: output conductivity and salinity only
        for cmd in (b"O,EC,1", b"O,S,1", b"O,TDS,0", b"O,SG,0"):
            await self.ec.ask(self.b, cmd)

    def _put(self, i, x, fault):
        # engineering value -> calibrated, fixed-point, range-checked slot i
        name = self.fields[i]
        if fault is None:
            x = te_cfg.apply_cal(self.cal.get(name), x)
            w = int(round(x * te_wire.SCALE[self.schema][i]))
            if w < te_wire.LO[self.schema][i] or w > te_wire.HI[self.schema][i]:
                fault = "range"
            else:
                self.vals[i] = w
                thr = self.cfg["thr"].get(name)
                if thr and (x < thr[0] or x > thr[1]):
                    self.alarm = True
                return 1 << i
        self.vals[i] = 0
        self.new_faults[name] = fault
        return 0

    async def _sample_marine(self):
        rounds = self.cfg["filt_n"]
        got = [[], [], [], [], []]  # ph, do, ec, sal, temp
        errs = [""] * 5  # fault per sensor ('' = none yet)
        for _ in range(rounds):
            for e in (self.ph, self.do, self.ec):
                e.send(b"R")
            self.temp.start()
            await self.b.vsleep(900)
            for k, e in ((0, self.ph), (1, self.do), (2, self.ec)):
                r = e.result()
                for _ in range(3):
                    if r is not None or e.fault != "busy":
                        break
                    await self.b.vsleep(100)
                    r = e.result()
                if r is None:
                    errs[k] = "timeout" if e.fault == "busy" else (e.fault or "timeout")
                    if k == 2:
                        errs[3] = errs[2]
                    continue
                try:
                    if k == 2:
                        parts = r.split(",")
                        got[2].append(float(parts[0]))
                        got[3].append(float(parts[1]))
                    else:
                        got[k].append(float(r))
                except (ValueError, IndexError):
                    errs[k] = "range"
            t = self.temp.read()
            if t is None:
                errs[4] = self.temp.fault or "timeout"
            else:
                got[4].append(t)
        mask = 0
        for k, i in ((0, 0), (4, 1), (1, 2), (2, 3), (3, 4)):
            g = got[k]
            # median of the rounds; a sensor that failed in most rounds is a fault
            if len(g) * 2 > rounds:
                mask |= self._put(i, te_cfg.median(g, len(g)), None)
            else:
                mask |= self._put(i, 0, errs[k] or "timeout")
        ntu10, f = turbidity(self.turb.read_uv())
        mask |= self._put(5, ntu10 / 10, f)
        return mask

    def _battery(self, i):
        mv = self.bat.read_uv() // 1000
        self.bat_mv = mv
        return self._put(i, mv / 1000, MISSING if mv < 200 else None)

    async def _sample_mobility(self):
        ivl = self.cfg["interval_s"]
        # counts of the interval that just ended; the first interval after boot is short
        mask = self._put(0, self.c_veh.take(), None)
        mask |= self._put(1, self.c_bike.take(), None)
        mask |= self._put(2, self.c_ped.take(), None)
        self.radar.poll()
        st, f = self.radar.interval()
        if st is not None:
            for k in range(3):
                mask |= self._put(3 + k, st[k] / 10, None)
        elif f is not None:
            for k in range(3):
                mask |= self._put(3 + k, 0, f)
        # no vehicle, no speed: the speed bits stay clear without a fault
        mask |= self._put(7, ivl, None)
        return mask

    async def _radar_task(self):
        while True:
            self.radar.poll()
            await asyncio.sleep_ms(50)

    async def sample(self):
        self.new_faults = {}
        for i in range(8):
            self.vals[i] = 0
        if self.schema == te_wire.MARINE:
            mask = await self._sample_marine()
            mask |= self._battery(6)
        else:
            mask = await self._sample_mobility()
            mask |= self._battery(6)
        t = self.b.now()
        flags = 0 if self.synced else te_wire.F_UNSYNCED
        te_wire.pack_reading(self.rd, 0, self.schema, 0, flags, mask, self.vals)
        seq = self.store.add(t, self.rd)
        self.samples += 1
        if self.new_faults != self.faults:
            self.faults = self.new_faults
            self.status_due = True
        self.tr("sample", seq=seq, mask=mask)
        self.wake.set()

    async def sampler(self):
        if self.schema == te_wire.MARINE:
            await self._ezo_setup()
        else:
            asyncio.create_task(self._radar_task())
        nxt = time.ticks_ms()
        while True:
            late = time.ticks_diff(time.ticks_ms(), nxt)
            self.tr("tick", late=late)
            await self.sample()
            self.hb_sample = time.ticks_ms()
            h = self.b.heap()
            if h < self.heap_min:
                self.heap_min = h
            self.tr("heap", free=h)
            nxt = time.ticks_add(nxt, self.b.vms(self.cfg["interval_s"] * 1000))
            d = time.ticks_diff(nxt, time.ticks_ms())
            if d < 0:  # overran the interval: skip, do not burst
                nxt = time.ticks_ms()
                d = 0
            await asyncio.sleep_ms(d)

    # -- publishing ----------------------------------------------------------------------
    def _on_ack(self, pid):
        t = self.pub_t.pop(pid, None)
        if t is not None:
            self.tr("ack", pid=pid, lat=time.ticks_diff(time.ticks_ms(), t))
        r = self.inflight.pop(pid, None)
        if r is None:
            return  # a status message
        self.done[r[0]] = r[0] + r[1]
        st = self.store
        while True:
            end = self.done.pop(st.lo, None)
            if end is None:
                break
            st.ack(end)
        # ranges made obsolete by ring overflow
        for k in [k for k in self.done if k < st.lo]:
            self.done.pop(k)

    def _batch(self):
        # Build the next batch from flash into self.pbuf; returns (seq0, n, length) or None.
        st = self.store
        if self.cursor < st.lo:
            self.cursor = st.lo
        avail = st.hi - self.cursor
        if avail <= 0:
            return None
        want = self.cfg["batch"]
        if avail < want and not self.alarm:
            # a partial batch only when the oldest waited for a whole batch period
            age = time.ticks_diff(time.ticks_ms(), self.last_batch)
            if age < self.b.vms(self.cfg["interval_s"] * 1000 * want) and not self.flush_now:
                return None
        n = st.read(self.cursor, min(avail, want), self.rbuf)
        rb = self.rbuf
        seq0, t0 = struct.unpack_from("<II", rb, 0)
        if seq0 != self.cursor:
            self.cursor = st.lo
            return None
        off = te_wire.header_size(self.nid)
        k = 0
        while k < n:
            s, t = struct.unpack_from("<II", rb, k * REC)
            dt = t - t0
            if s != seq0 + k or dt < 0 or dt > 65535:
                break  # clock jumped: start a new batch there
            self.pbuf[off:off + te_wire.RSIZE] = rb[k * REC + 8:(k + 1) * REC]
            struct.pack_into("<H", self.pbuf, off, dt)
            off += te_wire.RSIZE
            k += 1
        te_wire.pack_header(self.pbuf, 0, self.schema, self.nid, seq0, t0, k)
        return seq0, k, off

    async def pump(self):
        mq = self.mq
        while mq.up and mq.free_slots():
            if self.status_due and mq.free_slots() >= 1:
                await self.pub_status()
                continue
            b = self._batch()
            if b is None:
                break
            seq0, n, ln = b
            pid = await mq.publish(self.t_up, memoryview(self.pbuf)[:ln])
            if pid <= 0:
                break
            if self.trace:
                self.pub_t[pid] = time.ticks_ms()
            self.inflight[pid] = (seq0, n)
            self.cursor = seq0 + n
            if self.cursor > self.sent_hi:
                self.sent_hi = self.cursor
            self.last_batch = time.ticks_ms()
        if self.store.hi == self.cursor:
            self.alarm = False
            self.flush_now = False

    def status_doc(self):
        st = self.store
        d = {"v": 1, "node": self.id, "online": True, "fw": FW,
             "up_s": time.ticks_diff(time.ticks_ms(), self.t_boot) // 1000,
             "reset": self.reset, "heap": self.b.heap(), "rssi": self.b.rssi(),
             "bat_mv": self.bat_mv, "buf": st.depth(), "drop": st.drop, "seq": st.hi - 1,
             "faults": self.faults, "cfg": self.cfg["v"], "cfg_err": self.cfg_err,
             "synced": self.synced, "t": self.b.now()}
        if self.safe:
            d["safe"] = True
        if self.cal_ack is not None:
            d["cal_ack"] = self.cal_ack
        return d

    async def pub_status(self, doc=None):
        pid = await self.mq.publish(self.t_status, json.dumps(doc or self.status_doc()).encode(), True)
        if pid > 0:
            self.status_due = False
            self.last_status = time.ticks_ms()
        return pid

    def _on_msg(self, topic, payload):
        if topic == self.t_cfg:
            self.cfg_in = payload
        elif topic == self.t_cmd:
            self.cmd_in = payload

    def _apply_cfg(self, payload):
        if not payload:
            return  # retained config cleared: keep the one in force
        try:
            doc = json.loads(payload)
        except ValueError:
            doc = None
            err = "config is not valid JSON"
        v = doc.get("v") if isinstance(doc, dict) else None
        if isinstance(v, int) and v <= self.cfg["v"]:
            return  # already applied (retained redelivery) or older
        if doc is not None:
            cfg, err = te_cfg.validate(doc, self.fields)
        else:
            cfg = None
        if cfg is None:
            self.cfg_err = {"v": v, "reason": err}
            log("config rejected:", err)
        else:
            te_cfg.save(cfg)  # temp file + rename: never half a config on flash
            if self.safe:
                self._reboot()
            old_ka = self.cfg["keepalive_s"]
            self.cfg = cfg
            self.cal = te_cfg.compile_cal(cfg["cal"])
            self.store.flush_n = cfg["flush_n"]
            self.cfg_err = None
            log("config", cfg["v"], "applied")
            if cfg["keepalive_s"] != old_ka:
                self.mq.keepalive = cfg["keepalive_s"]
                self.mq.close()  # reconnect with the new keepalive
        self.status_due = True

    async def _do_cmd(self, payload):
        try:
            c = json.loads(payload)
            cmd = c.get("cmd")
        except (ValueError, AttributeError):
            return
        if cmd == "reboot":
            await self.mq.disconnect()
            self._reboot()
        elif cmd == "status":
            self.status_due = True
        elif cmd == "sync_time":
            self._ntp()
        elif cmd == "flush":
            self.flush_now = True
        elif cmd == "cal" and self.schema == te_wire.MARINE and self.sensors_up:
            ezo = {"ph": self.ph, "do": self.do, "ec": self.ec}.get(c.get("sensor"))
            if ezo is not None:
                r = await ezo.calibrate(self.b, c.get("point", "mid"), c.get("value"))
                self.cal_ack = {"sensor": c.get("sensor"), "result": r, "fault": ezo.fault}
                self.status_due = True

    def _reboot(self):
        self.store.close()
        self.rtc["c"] = 0
        self.b.rtc_save(self.rtc)
        self.b.reset()

    async def net(self):
        # the network loop must never die quietly: a failure drops the link and starts over
        # (if it keeps failing, the supervisor stops feeding the watchdog)
        while True:
            try:
                await self._net()
            except Exception as e:
                self.tr("neterr", err=repr(e))
                self.mq.close()
                gc.collect()
                await asyncio.sleep_ms(1000)

    async def _net(self):
        mq = self.mq
        backoff = 500
        while True:
            self.hb_net = time.ticks_ms()
            if self.was_up and not mq.up:
                self.was_up = False
                self.tr("down")
            if self.cfg_in is not None:
                p = self.cfg_in
                self.cfg_in = None
                self._apply_cfg(p)
            if self.cmd_in is not None:
                p = self.cmd_in
                self.cmd_in = None
                await self._do_cmd(p)
            if not mq.up:
                if not self.b.wifi_ok():
                    await asyncio.sleep_ms(500)
                    continue
                if not self.synced and time.ticks_diff(time.ticks_ms(), self.last_ntp) > 15000:
                    # set the clock before sending, so stored readings leave re-timed
                    self.last_ntp = time.ticks_ms()
                    self._ntp()
                try:
                    await mq.connect((self.t_cfg, self.t_cmd))
                    self.tr("conn", n=mq.connects, dups=mq.dups)
                    if self.conn_err is not None:
                        log("mqtt connected%s after failures" % (" (tls)" if mq.ca else ""))
                        self.conn_err = None
                    self.was_up = True
                    backoff = 500
                    self.status_due = True
                except Exception as e:
                    self.tr("connfail", err=str(e), backoff=backoff)
                    if str(e) != self.conn_err:
                        self.conn_err = str(e)
                        log("mqtt connect failed:", self.conn_err)
                    # jittered exponential backoff, capped so a returning broker is
                    # found again within ~4 s
                    await asyncio.sleep_ms(backoff // 2 + random.getrandbits(12) % (backoff // 2 + 1))
                    backoff = min(backoff * 2, BACKOFF_MAX_MS)
                    continue
            elif not self.b.wifi_ok():
                mq.close()
                continue
            self.wake.clear()
            await self.pump()
            if not mq.up:
                continue
            try:
                await asyncio.wait_for_ms(self.wake.wait(), 1000)
            except asyncio.TimeoutError:
                pass

    # -- supervision ---------------------------------------------------------------------
    def _ntp(self):
        delta = self.b.ntp_sync()
        if delta is None:
            return False
        if not self.synced:
            fixed = self.store.fix_time(delta, te_wire.F_UNSYNCED, self.sent_hi)
            log("clock synced, %d s correction, %d readings re-timed" % (delta, fixed))
        self.synced = True
        self.rtc["sy"] = 1
        self.b.rtc_save(self.rtc)
        self.status_due = True
        return True

    async def supervisor(self):
        self.b.wdt(WDT_MS)
        stable = False
        self.last_status = time.ticks_ms()
        while True:
            now = time.ticks_ms()
            # feed the watchdog only while both the sampler and the network loop make progress
            samp_ok = self.safe or time.ticks_diff(now, self.hb_sample) < self.b.vms(self.cfg["interval_s"] * 2000) + 20000
            if samp_ok and time.ticks_diff(now, self.hb_net) < 20000:
                self.b.feed()
            if not stable and time.ticks_diff(now, self.t_boot) > STABLE_MS and not self.safe:
                stable = True
                self.rtc["c"] = 0
                self.b.rtc_save(self.rtc)
            if self.b.wlan.isconnected() and time.ticks_diff(now, self.last_ntp) > (3600000 if self.synced else 15000):
                self.last_ntp = now
                self._ntp()
            if time.ticks_diff(now, self.last_status) > self.b.vms(self.cfg["status_s"] * 1000):
                self.last_status = now
                self.status_due = True
                self.wake.set()
            await asyncio.sleep_ms(1000)

    async def duty_cycle(self):
        # sleep_s > 0: sample once, send everything, report, deep-sleep. Readings and
        # counters live in flash / RTC memory, so nothing is lost across the sleep.
        await self._ezo_setup()
        await self.sample()
        self.flush_now = True
        self.store.flush()
        end = time.ticks_add(time.ticks_ms(), 30000)
        while time.ticks_diff(end, time.ticks_ms()) > 0:
            if self.mq.up and self.store.depth() == 0 and not self.status_due and not self.mq.inflight():
                break
            await asyncio.sleep_ms(50)
        sl = self.cfg["sleep_s"]
        if self.mq.up:
            d = self.status_doc()
            d["online"] = False
            d["sleep_s"] = sl
            await self.pub_status(d)
            t = time.ticks_add(time.ticks_ms(), 2000)
            while self.mq.inflight() and time.ticks_diff(t, time.ticks_ms()) > 0:
                await asyncio.sleep_ms(20)
            await self.mq.disconnect()
        self.store.close()
        self.rtc["c"] = 0
        self.b.rtc_save(self.rtc)
        self.b.deepsleep(self.b.vms(sl * 1000))

    async def run(self):
        log("node", self.id, "fw", FW, "reset", self.reset, "safe" if self.safe else "")
        self.tasks = [asyncio.create_task(self.net()), asyncio.create_task(self.supervisor())]
        if self.safe:
            # reachable for provisioning: network, status, config and commands only
            while True:
                await asyncio.sleep_ms(1000)
        self._init_sensors()
        if self.cfg["sleep_s"] and self.schema == te_wire.MARINE:
            await self.duty_cycle()
        await self.sampler()


def load_node_cfg():
    with open("node.json") as f:
        n = json.load(f)
    for k in ("node", "city", "domain"):
        if k not in n:
            raise ValueError("node.json lacks '%s'" % k)
    if n["domain"] not in ("marine", "mobility"):
        raise ValueError("node.json domain must be marine or mobility")
    return n


def main():
    try:
        ncfg = load_node_cfg()
    except (OSError, ValueError) as e:
        # not provisioned: stay at the REPL so a technician can install node.json
        log("not provisioned (%s): install node.json, then reset" % e)
        return
    board = Board(ncfg)
    gc.collect()  # drop import-time garbage before the long-lived buffers are allocated
    gc.threshold(4096)  # collect early and often: keeps the small heap from fragmenting
    try:
        node = Node(board, ncfg)
        asyncio.run(node.run())
    except KeyboardInterrupt:
        raise
    except Exception as e:
        sys.print_exception(e)
        try:
            with open("crash.txt", "w") as f:
                sys.print_exception(e, f)
        except OSError:
            pass
        board.reset()
