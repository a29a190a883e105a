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


# --- I2C and UART: the simulated parts live in te_sim_ezo / te_sim_radar, loaded on first use


class I2C:
    def __new__(cls, *a, **k):
        import te_sim_ezo
        return te_sim_ezo.I2C(*a, **k)


class UART:
    def __new__(cls, *a, **k):
        import te_sim_radar
        return te_sim_radar.UART(*a, **k)
