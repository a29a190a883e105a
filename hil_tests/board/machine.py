# machine shim for the MicroPython unix port: the parts of the ESP32 `machine` module the
# firmware uses, backed by simulated devices (te_sim). Never deployed to a board.
from umachine import *  # noqa: F401,F403  (the built-in: idle, mem32, ...)
import sys
import time
import random
import te_sim

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5
REBOOT_EXIT = 66  # exit code the runner treats as "reboot me" (reset, deep sleep, WDT)
_CAUSES = {"power_on": 1, "hard": 2, "wdt": 3, "deepsleep": 4, "soft": 5}

_c = te_sim.read_file(te_sim.RESET_FILE)
te_sim.remove(te_sim.RESET_FILE)
_reset = _CAUSES.get(_c.decode().strip(), 2) if _c else PWRON_RESET
if _reset == PWRON_RESET:
    # power loss: RTC memory and the RTC's time are gone
    te_sim.remove(te_sim.RTCMEM_FILE)
    te_sim.remove(te_sim.RTCSYNC_FILE)


def reset_cause():
    return _reset


def _reboot(cause):
    te_sim.write_file(te_sim.RESET_FILE, cause.encode())
    sys.exit(REBOOT_EXIT)


def reset():
    _reboot("soft")


def deepsleep(ms=0):
    time.sleep_ms(int(ms // te_sim.speed()))
    _reboot("deepsleep")


def lightsleep(ms=0):
    time.sleep_ms(int(ms // te_sim.speed()))


def freq(*a):
    return 240000000


def unique_id():
    return b"\x24\x0a\xc4\x00\x00\x01"


def _rtc_offset():
    # error of the board's RTC against UTC, until the first NTP sync (see ntptime shim)
    if te_sim.read_file(te_sim.RTCSYNC_FILE) is not None:
        return 0
    return te_sim.flag("rtc_offset_s", 0)


class RTC:
    def __init__(self, id=0):
        pass

    def datetime(self, dt=None):
        t = time.gmtime(int(time.time()) + _rtc_offset())
        return (t[0], t[1], t[2], t[6], t[3], t[4], t[5], 0)

    def memory(self, data=None):
        if data is None:
            return te_sim.read_file(te_sim.RTCMEM_FILE, b"")
        te_sim.write_file(te_sim.RTCMEM_FILE, bytes(data[:2048]))


class WDT:
    # The runner cannot see inside the process, so a stalled node is not reset here; the
    # firmware's feeding logic is still exercised and `fed` counts it.
    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout
        self.fed = 0

    def feed(self):
        self.fed += 1


# --- GPIO with simulated pulse sources -------------------------------------------------
_irq_pins = []


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 1
    PULL_DOWN = 2
    IRQ_FALLING = 2
    IRQ_RISING = 1

    def __init__(self, id, mode=-1, pull=-1, value=None):
        self.id = id
        self._v = value or 0
        self._h = None
        self._due = 0.0
        self._last = te_sim.vms()

    def value(self, v=None):
        if v is None:
            return self._v
        self._v = v

    def on(self):
        self._v = 1

    def off(self):
        self._v = 0

    def init(self, *a, **k):
        pass

    def irq(self, handler=None, trigger=3):
        self._h = handler
        self._last = te_sim.vms()
        if handler is not None and self not in _irq_pins:
            _irq_pins.append(self)

    def _pump(self):
        rate = te_sim.scenario().get("pulses_per_min", {}).get(str(self.id), 0)
        now = te_sim.vms()
        self._due += rate * (now - self._last) / 60000
        self._last = now
        while self._due >= 1 and self._h is not None:
            self._due -= 1
            self._h(self)


def disable_irq():
    # a board's pending edges reach their handlers "in real time"; here they are delivered
    # when the firmware enters its critical section to read the counters
    for p in _irq_pins:
        p._pump()
    return 1


def enable_irq(state=1):
    pass


# --- ADC: turbidity probe behind a 1:2 divider, battery behind a 1:2 divider ----------
TURB_PIN = 34
BAT_PIN = 35


class ADC:
    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3
    WIDTH_12BIT = 3

    def __init__(self, pin, atten=3):
        self.pin = pin.id if isinstance(pin, Pin) else pin

    def atten(self, a):
        pass

    def width(self, w):
        pass

    def read_uv(self):
        if self.pin == TURB_PIN:
            if te_sim.missing("turb"):
                return int(random.random() * 30000)  # floating input
            ntu = te_sim.value("turb", 12.3)
            probe_mv = 4200 - ntu / 2  # linear part of a DFRobot-style probe
            mv = probe_mv / 2
        elif self.pin == BAT_PIN:
            mv = te_sim.value("bat", 3.712) * 1000 / 2
        else:
            mv = 0
        return int((mv + (random.random() - 0.5) * 0.4) * 1000)

    def read_u16(self):
        return min(65535, self.read_uv() * 65535 // 3100000)

    def read(self):
        return self.read_u16() >> 4


# --- I2C with Atlas Scientific EZO circuits -------------------------------------------
class _Ezo:
    # Protocol as documented by Atlas Scientific: write an ASCII command, wait the
    # processing time, read: first byte 1 ok, 2 syntax error, 254 still processing,
    # 255 no data; then the ASCII answer, NUL terminated.
    DELAY = {"ph": 900, "do": 600, "ec": 600}
    INFO = {"ph": "?I,pH,2.16", "do": "?I,DO,2.16", "ec": "?I,EC,2.15"}

    def __init__(self, kind):
        self.kind = kind
        self.pending = None
        self.at = 0
        self.cal = 0
        self.out = ["EC", "TDS", "S", "SG"]
        self.temp = 25.0

    def command(self, cmd):
        self.at = te_sim.vms()
        c = cmd.split(",")
        op = c[0].lower()
        delay = 300
        code, ans = 1, ""
        if op in ("r", "rt"):
            delay = self.DELAY[self.kind]
            ans = self._reading()
        elif op == "cal":
            if len(c) >= 2 and c[1] == "?":
                ans = "?CAL,%d" % self.cal
            elif len(c) >= 2 and c[1] == "clear":
                self.cal = 0
            elif len(c) >= 2:
                self.cal = min(3, self.cal + 1)
                delay = self.DELAY[self.kind]
            else:
                code = 2
        elif op == "o" and self.kind == "ec" and len(c) == 3:
            p = c[1].upper()
            if c[2] == "1" and p not in self.out:
                self.out.append(p)
            elif c[2] == "0" and p in self.out:
                self.out.remove(p)
        elif op == "t" and len(c) == 2:
            self.temp = float(c[1])
        elif op == "i":
            ans = self.INFO[self.kind]
        elif op == "status":
            ans = "?STATUS,P,5.038"
        elif op == "sleep":
            self.pending = None
            return
        else:
            code = 2
        self.pending = (code, ans, delay)

    def _reading(self):
        if self.kind == "ph":
            return "%.3f" % te_sim.value("ph", 8.12)
        if self.kind == "do":
            return "%.2f" % te_sim.value("do", 7.12)
        parts = []
        for p in self.out:
            if p == "EC":
                parts.append("%d" % te_sim.value("ec", 45210))
            elif p == "TDS":
                parts.append("%d" % (te_sim.value("ec", 45210) * 0.54))
            elif p == "S":
                parts.append("%.2f" % te_sim.value("sal", 31.2))
            elif p == "SG":
                parts.append("1.023")
        return ",".join(parts)

    def read(self, n):
        buf = bytearray(n)
        if self.pending is None:
            buf[0] = 255
            return buf
        code, ans, delay = self.pending
        if te_sim.stuck(self.kind) or te_sim.vms() - self.at < delay:
            buf[0] = 254
            return buf
        buf[0] = code
        b = ans.encode()[: n - 2]
        buf[1:1 + len(b)] = b
        return buf


_EZO_ADDR = {0x63: "ph", 0x61: "do", 0x64: "ec"}
_ezos = {}


def _ezo(addr):
    kind = _EZO_ADDR.get(addr)
    if kind is None or te_sim.missing(kind):
        raise OSError(19)  # ENODEV: no ACK
    d = _ezos.get(addr)
    if d is None:
        d = _ezos[addr] = _Ezo(kind)
    return d


class I2C:
    def __init__(self, id=0, scl=None, sda=None, freq=100000, timeout=50000):
        pass

    def scan(self):
        return [a for a, k in _EZO_ADDR.items() if not te_sim.missing(k)]

    def writeto(self, addr, buf, stop=True):
        _ezo(addr).command(bytes(buf).decode().strip())
        return 1

    def readfrom(self, addr, n, stop=True):
        return bytes(_ezo(addr).read(n))

    def readfrom_into(self, addr, buf, stop=True):
        b = _ezo(addr).read(len(buf))
        buf[:] = b


# --- UART with an OPS243-style Doppler radar ------------------------------------------
class UART:
    def __init__(self, id, baudrate=9600, tx=None, rx=None, **kw):
        self.buf = bytearray()
        self.last = te_sim.vms()
        self.due = 0.0

    def init(self, *a, **k):
        pass

    def _pump(self):
        if te_sim.missing("radar"):
            self.last = te_sim.vms()
            return
        rate = te_sim.scenario().get("radar_per_min", 0)
        lo, hi = te_sim.scenario().get("radar_kmh", [30, 60])
        now = te_sim.vms()
        self.due += rate * (now - self.last) / 60000
        self.last = now
        while self.due >= 1:
            self.due -= 1
            self.buf += b"%.1f\r\n" % (lo + random.random() * (hi - lo))
        if len(self.buf) > 4096:
            self.buf = self.buf[-4096:]

    def write(self, data):
        if not te_sim.missing("radar"):
            cmd = bytes(data).strip()
            if cmd == b"?V":
                self.buf += b'{"Version":"1.2.5"}\r\n'
            elif cmd == b"UK":
                self.buf += b'{"Units":"km/h"}\r\n'
            elif cmd:
                self.buf += b'{"OK":"' + cmd + b'"}\r\n'
        return len(data)

    def any(self):
        self._pump()
        return len(self.buf)

    def read(self, n=-1):
        self._pump()
        if not self.buf:
            return None
        if n < 0:
            n = len(self.buf)
        out = bytes(self.buf[:n])
        self.buf = self.buf[n:]
        return out

    def readinto(self, buf, nbytes=-1):
        self._pump()
        k = min(len(buf), len(self.buf))
        if not k:
            return None
        buf[:k] = self.buf[:k]
        self.buf = self.buf[k:]
        return k

    def readline(self):
        self._pump()
        i = self.buf.find(b"\n")
        if i < 0:
            return None
        out = bytes(self.buf[: i + 1])
        self.buf = self.buf[i + 1:]
        return out
