# Board HAL: the only module that knows pins, buses, radio, clock epoch and reset causes.
# On an ESP32 it drives the real `machine`/`network`/`onewire`/`ds18x20`/`ntptime`; on the
# unix port the same imports resolve to the simulation shims in hil_tests/board.
import asyncio
import gc
import json
import time
import machine
import network

# ESP32 time counts from 2000-01-01, the unix port from 1970: the wire wants Unix seconds.
EPOCH_OFF = 946684800 if time.gmtime(0)[0] == 2000 else 0
# RTC error of the simulated board until NTP sync (only the unix shim has it)
_sim_rtc_offset = getattr(machine, "_rtc_offset", None)

PINS = {"scl": 22, "sda": 21, "ow": 4, "turb": 34, "bat": 35, "radar_tx": 17, "radar_rx": 16,
        "loop": 25, "bike": 26, "ped": 27}
RESETS = {
    machine.PWRON_RESET: "power_on",
    machine.HARD_RESET: "hard",
    machine.WDT_RESET: "wdt",
    machine.DEEPSLEEP_RESET: "deepsleep",
    machine.SOFT_RESET: "soft",
}


class Board:
    def __init__(self, ncfg):
        self.speed = ncfg.get("speed", 1) or 1
        self.pins = dict(PINS)
        self.pins.update(ncfg.get("pins", {}))
        self.ntp_host = ncfg.get("ntp", "pool.ntp.org")
        self.ssid = ncfg.get("ssid", "")
        self.key = ncfg.get("wifi_key", "")
        self.wlan = network.WLAN(network.STA_IF)
        self.rtc = machine.RTC()
        self.dog = None
        self._asked = 0

    # -- time ------------------------------------------------------------------------
    def now(self):
        t = int(time.time()) + EPOCH_OFF
        if _sim_rtc_offset is not None:
            t += _sim_rtc_offset()
        return t

    def vms(self, ms):
        # a duration of the node's schedule, shortened by the time-acceleration factor
        return int(ms // self.speed)

    async def vsleep(self, ms):
        await asyncio.sleep_ms(max(1, self.vms(ms)))

    def ntp_sync(self):
        # Set the RTC from NTP; returns the clock correction in seconds, or None.
        try:
            import ntptime
            ntptime.host = self.ntp_host
            before = self.now()
            ntptime.settime()
            return self.now() - before
        except Exception:
            return None

    # -- resets, RTC memory, watchdog, sleep -------------------------------------------
    def reset_cause(self):
        return RESETS.get(machine.reset_cause(), "unknown")

    def rtc_load(self):
        try:
            d = json.loads(bytes(self.rtc.memory()))
            if isinstance(d, dict):
                return d
        except Exception:
            pass
        return {}

    def rtc_save(self, d):
        self.rtc.memory(json.dumps(d).encode())

    def wdt(self, timeout_ms):
        self.dog = machine.WDT(id=0, timeout=timeout_ms)

    def feed(self):
        if self.dog is not None:
            self.dog.feed()

    def deepsleep(self, ms):
        machine.deepsleep(int(ms))

    def reset(self):
        machine.reset()

    def heap(self):
        gc.collect()
        return gc.mem_free()

    # -- radio -------------------------------------------------------------------------
    def wifi_ok(self):
        # Non-blocking: (re)starts association when down, reports whether it is up.
        w = self.wlan
        if w.isconnected():
            return True
        now = time.ticks_ms()
        if not w.active() or time.ticks_diff(now, self._asked) > 10000 or not self._asked:
            self._asked = now
            w.active(True)
            try:
                w.connect(self.ssid, self.key)
            except OSError:
                pass
        return False

    def rssi(self):
        try:
            return self.wlan.status("rssi") if self.wlan.isconnected() else None
        except Exception:
            return None

    # -- buses ---------------------------------------------------------------------------
    def i2c(self):
        p = self.pins
        return machine.I2C(0, scl=machine.Pin(p["scl"]), sda=machine.Pin(p["sda"]), freq=100000)

    def adc(self, name):
        a = machine.ADC(machine.Pin(self.pins[name]))
        a.atten(machine.ADC.ATTN_11DB)
        return a

    def uart(self):
        p = self.pins
        return machine.UART(2, baudrate=9600, tx=p["radar_tx"], rx=p["radar_rx"])

    def pin_in(self, name):
        return machine.Pin(self.pins[name], machine.Pin.IN, machine.Pin.PULL_UP)

    def ds18x20(self):
        import onewire
        import ds18x20
        return ds18x20.DS18X20(onewire.OneWire(machine.Pin(self.pins["ow"])))
