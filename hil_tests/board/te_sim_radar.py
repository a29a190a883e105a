# Simulated OPS243-style Doppler radar on a UART (unix port only).
import random
import te_sim


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
