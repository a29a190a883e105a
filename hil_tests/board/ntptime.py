# ntptime shim (unix port): the host clock is the truth; "setting the RTC" clears the
# simulated RTC error. "ntp": false in the scenario makes the server unreachable.
import time
import te_sim

host = "pool.ntp.org"
timeout = 1


def time():
    if not te_sim.flag("ntp", True):
        raise OSError(110)  # ETIMEDOUT
    import time as _t
    return int(_t.time()) - 946684800  # ESP32 ntptime returns seconds since 2000


def settime():
    time()
    te_sim.write_file(te_sim.RTCSYNC_FILE, b"1")
