# Sensor drivers. Each one reports a fault ("missing", "timeout", "range") instead of a
# value when the part does not answer properly; nothing is ever made up.
import array
import machine
from micropython import const

MISSING = "missing"
TIMEOUT = "timeout"
RANGE = "range"


class Ezo:
    # Atlas Scientific EZO circuit (pH 0x63, DO 0x61, EC 0x64) in I2C mode: write an ASCII
    # command, wait its processing time, read: code 1 ok, 2 syntax error, 254 busy, 255 no data.
    def __init__(self, i2c, addr, delay_ms):
        self.i2c = i2c
        self.addr = addr
        self.delay = delay_ms
        self.buf = bytearray(40)
        self.fault = None

    def send(self, cmd):
        try:
            self.i2c.writeto(self.addr, cmd)
            self.fault = None
            return True
        except OSError:
            self.fault = MISSING
            return False

    def result(self):
        # -> answer string, or None with self.fault set ("busy" while still processing)
        try:
            self.i2c.readfrom_into(self.addr, self.buf)
        except OSError:
            self.fault = MISSING
            return None
        code = self.buf[0]
        if code == 1:
            end = 1
            while end < len(self.buf) and self.buf[end] not in (0, 13):
                end += 1
            return bytes(self.buf[1:end]).decode()
        self.fault = "busy" if code == 254 else TIMEOUT
        return None

    async def ask(self, board, cmd, delay_ms=300):
        # one command/response round trip, re-polling a busy circuit a few times
        if not self.send(cmd):
            return None
        await board.vsleep(delay_ms)
        for _ in range(4):
            r = self.result()
            if r is not None or self.fault != "busy":
                return r
            await board.vsleep(100)
        self.fault = TIMEOUT
        return None

    async def calibrate(self, board, point, value):
        # point: "mid" | "low" | "high" (pH), "dry" | "low" | "high" (EC), "atm" (DO), "clear"
        if point == "clear":
            cmd = b"Cal,clear"
        elif value is None:
            cmd = b"Cal," + point.encode()
        else:
            cmd = b"Cal,%s,%.2f" % (point.encode(), value)
        if await self.ask(board, cmd, self.delay) is None:
            return None
        return await self.ask(board, b"Cal,?")


class Temp:
    # DS18B20 on 1-Wire (conversion takes 750 ms at 12 bit)
    def __init__(self, ds):
        self.ds = ds
        self.rom = None
        self.fault = None

    def start(self):
        try:
            if self.rom is None:
                roms = self.ds.scan()
                self.rom = roms[0] if roms else None
            if self.rom is None:
                self.fault = MISSING
                return False
            self.ds.convert_temp()
            return True
        except Exception:
            self.rom = None
            self.fault = MISSING
            return False

    def read(self):
        if self.rom is None:
            return None
        try:
            t = self.ds.read_temp(self.rom)
        except Exception:  # CRC error / bus error
            self.rom = None
            self.fault = TIMEOUT
            return None
        if t is None or t == 85.0:  # scratchpad power-on value: the conversion did not run
            self.fault = TIMEOUT
            return None
        self.fault = None
        return t


class Analog:
    # ADC input behind a divider; median of n reads in microvolts at the probe
    def __init__(self, adc, ratio=2, n=9):
        self.adc = adc
        self.ratio = ratio
        self.vals = array.array("i", [0] * n)
        self.fault = None

    def read_uv(self):
        v = self.vals
        n = len(v)
        for i in range(n):
            v[i] = self.adc.read_uv()
        for i in range(1, n):  # insertion sort, no allocation
            x = v[i]
            j = i - 1
            while j >= 0 and v[j] > x:
                v[j + 1] = v[j]
                j -= 1
            v[j + 1] = x
        return v[n // 2] * self.ratio


def turbidity(uv_probe):
    # -> (NTU x10, fault). Probe output 4.2 V in clear water, -0.5 mV per NTU;
    # a floating input (unplugged probe) reads far below the probe's range.
    if uv_probe < 200000:
        return 0, MISSING
    ntu10 = (4200000 - uv_probe) // 50
    if ntu10 < -500 or ntu10 > 40000:
        return 0, RANGE
    return max(0, ntu10), None


RADAR_MAX = const(256)


class Radar:
    # OmniPreSense OPS243-style Doppler radar on a UART: one speed per line ("41.2\r\n",
    # negative when receding), JSON lines ({"...":...}) answer commands. Speeds are kept as
    # integer tenths of km/h in a fixed array; "?V" each interval proves the radar is alive.
    def __init__(self, uart):
        self.uart = uart
        self.line = bytearray(48)
        self.ll = 0
        self.rx = bytearray(64)
        self.sp = array.array("H", [0] * RADAR_MAX)
        self.n = 0
        self.heard = False
        self.ever = False
        uart.write(b"UK\r\n")  # report km/h

    def poll(self):
        u = self.uart
        while u.any():
            k = u.readinto(self.rx)
            if not k:
                return
            for i in range(k):
                c = self.rx[i]
                if c == 10:
                    self._line()
                    self.ll = 0
                elif c != 13 and self.ll < len(self.line):
                    self.line[self.ll] = c
                    self.ll += 1

    def _line(self):
        ln = self.ll
        b = self.line
        if ln == 0:
            return
        if b[0] == 123:  # '{': a reply to a command
            self.heard = True
            self.ever = True
            return
        v = 0
        frac = -1
        i = 1 if b[0] in (43, 45) else 0
        while i < ln:
            c = b[i]
            if c == 46 and frac < 0:
                frac = 0
            elif 48 <= c <= 57:
                if frac < 0:
                    v = v * 10 + c - 48
                elif frac == 0:
                    v = v * 10 + c - 48
                    frac = 1
            else:
                return  # not a speed line
            i += 1
        if frac <= 0:
            v *= 10
        self.heard = True
        self.ever = True
        if self.n < RADAR_MAX and v <= 3000:
            self.sp[self.n] = v
            self.n += 1

    def interval(self):
        # -> (mean, p85, max) in 0.1 km/h or None, and the fault; resets for the next interval
        fault = None if self.heard else (TIMEOUT if self.ever else MISSING)
        self.heard = False
        n = self.n
        self.n = 0
        self.uart.write(b"?V\r\n")
        if fault or n == 0:
            return None, fault
        s = self.sp
        for i in range(1, n):
            x = s[i]
            j = i - 1
            while j >= 0 and s[j] > x:
                s[j + 1] = s[j]
                j -= 1
            s[j + 1] = x
        tot = 0
        for i in range(n):
            tot += s[i]
        p = (85 * n + 99) // 100 - 1
        return (tot // n, s[p], s[n - 1]), None


class Counter:
    # pulses on a GPIO (inductive loop detector, IR beam); the IRQ handler only increments
    def __init__(self, pin):
        self.n = 0
        pin.irq(handler=self._irq, trigger=machine.Pin.IRQ_FALLING)
        self.pin = pin

    def _irq(self, pin):
        self.n += 1

    def take(self):
        st = machine.disable_irq()
        n = self.n
        self.n = 0
        machine.enable_irq(st)
        return n
