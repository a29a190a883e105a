# Simulated world for the emulated board (MicroPython unix port only; never deployed).
# Everything the shims (machine, network, ntptime, onewire, ds18x20, esp32) pretend to sense
# comes from a JSON scenario file that a test may rewrite while the node runs; it is
# re-read when its mtime changes. Paths are relative to the flash directory (the cwd).
#
# Scenario keys (all optional):
#   speed            time acceleration of the simulated world (default 1)
#   values           {"ph","temp","do","ec","sal","turb","bat"}: number, or [lo, hi] drawn uniformly
#   missing          list of devices that do not answer: "ph","do","ec","temp","turb","radar"
#   timeout          list of devices that answer but never finish ("ph","do","ec" stay busy; "temp" CRC errors)
#   wifi             false = access point gone;   rssi (dBm, default -67)
#   ntp              false = NTP unreachable;     rtc_offset_s: RTC error until the first NTP sync
#   pulses_per_min   {"<pin>": rate} pulses on GPIO inputs (loop detector, IR beam)
#   radar_per_min    vehicles seen by the radar;  radar_kmh: [lo, hi]
import json
import os
import random
import time

SCENARIO = os.getenv("TE_SCENARIO") or "scenario.json"
_t0 = time.ticks_ms()
_state = {"mtime": -1, "checked": -10000, "sc": {}}


def scenario():
    now = time.ticks_ms()
    if time.ticks_diff(now, _state["checked"]) >= 100:
        _state["checked"] = now
        try:
            st = os.stat(SCENARIO)
            m = (st[1], st[6], st[8])  # inode too: mtime has 1 s resolution, writers replace the file
        except OSError:
            m = 0
        if m != _state["mtime"]:
            _state["mtime"] = m
            try:
                with open(SCENARIO) as f:
                    _state["sc"] = json.load(f)
            except (OSError, ValueError):
                if m == 0:
                    _state["sc"] = {}
                # a half-written file: keep the previous scenario and retry next time
                else:
                    _state["mtime"] = -1
    return _state["sc"]


def speed():
    return scenario().get("speed", 1) or 1


def vms():
    # simulated milliseconds since this interpreter started
    return time.ticks_diff(time.ticks_ms(), _t0) * speed()


def value(name, default):
    v = scenario().get("values", {}).get(name, default)
    if isinstance(v, list):
        return v[0] + random.random() * (v[1] - v[0])
    return v


def missing(dev):
    return dev in scenario().get("missing", ())


def stuck(dev):
    return dev in scenario().get("timeout", ())


def flag(name, default=True):
    return scenario().get(name, default)


# --- persistent bits of the "hardware" (files in the flash dir, wiped at power-on) ---
RESET_FILE = ".reset_cause"
RTCMEM_FILE = ".rtcmem"
RTCSYNC_FILE = ".rtc_synced"


def read_file(path, default=None):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return default


def write_file(path, data):
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.rename(path + ".tmp", path)


def remove(path):
    try:
        os.remove(path)
    except OSError:
        pass
