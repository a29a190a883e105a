# Simulated Atlas Scientific EZO circuits on I2C (unix port only).
import random
import te_sim


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


