"""Firmware modules on the real MicroPython unix port, without a broker: the flash ring
(persistence, drop-oldest accounting, re-timing), config validation and calibration,
the radar line parser, the EZO driver against the simulated circuit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from hil_tests.board.runner import BOARD, FIRMWARE, micropython_bin

SCRIPT = r"""
import json, asyncio
import te_store, te_cfg, te_wire
from te_drivers import Radar, Ezo
import machine
out = {}

# ring: 8 slots, 12 readings -> 4 dropped, counted; survives a "reset" (new Store object)
r = bytearray(20)
s = te_store.Store(8, flush_n=3)
for i in range(12):
    r[4] = i
    s.add(1000 + i, r)
s.flush()
out["drop"] = [s.lo, s.hi, s.drop, s.depth()]
buf = bytearray(28 * 8)
n = s.read(s.lo, 8, buf)
out["read"] = [n] + [buf[k * 28 + 12] for k in range(n)]
s.ack(s.lo + 3)
s.f.close()
s2 = te_store.Store(8, flush_n=1)
out["reopen"] = [s2.lo, s2.hi, s2.drop, s2.boot]
# re-timing touches only this boot's flagged readings
r[2] = te_wire.F_UNSYNCED
s2.add(50, r)
out["fixed"] = s2.fix_time(1000, te_wire.F_UNSYNCED)
s2.read(s2.hi - 1, 1, buf)
out["t_after_fix"] = int.from_bytes(buf[4:8], "little")

F = te_wire.FIELDS[1]
out["valid"] = te_cfg.validate({"v": 4, "interval_s": 60, "batch": 10, "keepalive_s": 60,
    "cal": {"ph": {"points": [[4.0, 1.2], [7.0, 0.0], [10.0, -1.1]]}, "water_temp_c": {"gain": 1.0, "offset": -0.1}},
    "thr": {"ph": [7.5, 8.6]}, "sleep_s": 0}, F)[1]
out["bad"] = [te_cfg.validate(d, F)[1] for d in (
    [], {"interval_s": 5}, {"v": 1, "batch": 51}, {"v": 1, "batch": True}, {"v": 1, "cal": {"nitrate": {"gain": 1}}},
    {"v": 1, "cal": {"ph": {"points": [[4, 1], [7, 1]]}}}, {"v": 1, "thr": {"ph": [9, 8]}}, {"v": 1, "cal": {"ph": {"gain": 0}}})]
c = te_cfg.compile_cal({"ph": {"points": [[4.0, 4.2], [7.0, 7.1], [10.0, 9.9]]}, "t": {"gain": 2, "offset": 1}})
out["cal"] = [round(te_cfg.apply_cal(c["ph"], x), 4) for x in (4.2, 5.65, 7.1, 9.9, 11.3)] + [te_cfg.apply_cal(c["t"], 3)]
out["median"] = te_cfg.median([5, 1, 9, 3, 7], 5)

class U:
    def __init__(self, data): self.d = bytearray(data)
    def any(self): return len(self.d)
    def readinto(self, b):
        k = min(len(b), len(self.d)); b[:k] = self.d[:k]; self.d = self.d[k:]; return k
    def write(self, b): pass
u = U(b"")
rd = Radar(u)
u.d += b'{"Units":"km/h"}\r\n41.2\r\n-38\r\n55.25\r\nxx\r\n60.0\r\n12.5'
rd.poll()
out["radar"] = [list(rd.sp[:rd.n]), rd.interval()[0], rd.interval()]

class B:
    speed = 1
    async def vsleep(self, ms): await asyncio.sleep_ms(ms)
async def ezo():
    e = Ezo(machine.I2C(0), 0x63, 900)
    res = [await e.ask(B(), b"i"), await e.ask(B(), b"R", 900), await e.calibrate(B(), "mid", 7.0),
           await e.calibrate(B(), "low", 4.0), await e.ask(B(), b"Nonsense")]
    res.append(e.fault)
    gone = Ezo(machine.I2C(0), 0x70, 600)
    res += [await gone.ask(B(), b"R"), gone.fault]
    return res
out["ezo"] = asyncio.run(ezo())
print(json.dumps(out))
"""


def test_units(tmp_path: Path) -> None:
    (tmp_path / "t.py").write_text(SCRIPT)
    (tmp_path / "scenario.json").write_text(json.dumps({"speed": 10, "values": {"ph": 8.12}}))
    r = subprocess.run([micropython_bin(), "t.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={"MICROPYPATH": f"{BOARD}:.frozen:{FIRMWARE / 'lib'}"})
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["drop"] == [5, 13, 4, 8]  # seqs 1..4 overwritten and counted
    assert out["read"] == [8, 4, 5, 6, 7, 8, 9, 10, 11]  # oldest kept = the 5th reading
    assert out["reopen"] == [8, 13, 4, 2]  # acked pointer, next seq, drops, boot counter persisted
    assert out["fixed"] == 1 and out["t_after_fix"] == 1050
    assert out["valid"] is None
    assert out["bad"] == [
        "config must be a JSON object", "config has no version 'v'", "batch=51 outside 1..50",
        "batch must be an integer", "cal: unknown field 'nitrate'",
        "cal.ph.points has two points with the same raw value", "thr.ph must be [low, high] with low < high",
        "cal.ph gain must not be 0"]
    assert out["cal"] == [4.0, 5.5, 7.0, 10.0, 11.5, 7.0]
    assert out["median"] == 5
    speeds, stats, after = out["radar"]
    assert speeds == [412, 380, 552, 600]  # tenths of km/h; the junk line and the unfinished one skipped
    assert stats == [486, 600, 600]
    assert after == [None, "timeout"]  # nothing heard since the last interval
    assert out["ezo"] == ["?I,pH,2.16", "8.120", "?CAL,1", "?CAL,2", None, "timeout", None, "missing"]
