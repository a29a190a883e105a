"""The simulated world around the demo's emulated boards: what their sensors measure.

Every node runs the real firmware on the MicroPython unix port; its I2C, 1-Wire, ADC, UART
and GPIO are the board shims of hil_tests/board/, which read a scenario file in the node's
flash directory (see hil_tests/board/te_sim.py). This module writes that file about once a
second from the signal formulas in twinedge/signals.py, on a world clock that runs
`speed` times faster than the wall clock (so a tide or a rush hour passes in minutes), in
each city's own time zone. On top of the smooth signals it plays, from a seeded random
generator: a probe that stops answering now and then (`missing`) or hangs (`timeout`),
turbid run-off after rain (a turbidity alarm), and speeders at night (a speed alarm).

Reading timestamps stay wall-clock (the nodes' own RTC, synced by NTP): only the values
follow the accelerated world.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinedge.signals import marine_world, mobility_world

UTC_OFFSET_H = {"copenhagen": 1, "tongyeong": 9, "helsinki": 2, "amsterdam": 1}
WATER_TEMP_C = {"copenhagen": 11.0, "tongyeong": 17.0, "helsinki": 8.0, "amsterdam": 12.0}
MARINE_DEVICES = ("ph", "do", "ec", "temp", "turb")
NOISE = {"ph": 0.01, "temp": 0.03, "do": 0.05, "ec": 25.0, "sal": 0.03, "turb": 0.3, "bat": 0.004}
FAULT_PER_S = 1 / 150      # per node: a probe fails about every 2.5 minutes of wall time
EVENT_PER_S = 1 / 240      # per node: run-off or speeders about every 4 minutes


@dataclass
class WorldNode:
    node: str
    city: str
    domain: str
    flash: Path
    rng: random.Random
    phase: float = 0.0
    scale: float = 1.0
    faults: dict[str, tuple[str, float]] = field(default_factory=dict)  # device -> (missing|timeout, until)
    event: tuple[str, float] | None = None  # (runoff|speeders, until)


class World:
    def __init__(self, speed: float, seed: int, start: float | None = None) -> None:
        self.speed = speed
        self.seed = seed
        self.t0 = time.time() if start is None else start
        self.nodes: list[WorldNode] = []
        self.log: list[tuple[float, str, str]] = []  # (wall, city, what happened)
        self._lock = threading.Lock()

    def add(self, node: str, city: str, domain: str, flash: Path) -> WorldNode:
        rng = random.Random(f"{self.seed}-{node}")
        wn = WorldNode(node, city, domain, flash, rng, phase=rng.uniform(0, 1.0), scale=rng.uniform(0.6, 1.6))
        self.nodes.append(wn)
        self.write(wn, time.time())
        return wn

    # -- clock ------------------------------------------------------------------------------
    def local_time(self, city: str, wall: float | None = None) -> float:
        """Local world time of a city (seconds since the epoch, shifted by its UTC offset)."""
        wall = time.time() if wall is None else wall
        return self.t0 + (wall - self.t0) * self.speed + UTC_OFFSET_H.get(city, 0) * 3600

    def clock(self, city: str) -> str:
        t = time.gmtime(self.local_time(city))
        return f"{t.tm_hour:02d}:{t.tm_min:02d}"

    # -- what the sensors see -----------------------------------------------------------------
    def scenario(self, n: WorldNode, wall: float) -> dict[str, Any]:
        t = self.local_time(n.city, wall)
        rng = n.rng
        if n.domain == "marine":
            v = marine_world(t, n.phase * 6.28, WATER_TEMP_C.get(n.city, 14.0))
            if n.event is not None and n.event[0] == "runoff":
                v["turb"] = 60 + 60 * rng.random()  # over the 50 NTU alarm band
            doc: dict[str, Any] = {"values": {k: [x - NOISE[k], x + NOISE[k]] for k, x in v.items()}}
        else:
            m = mobility_world(t, n.scale)
            lo, hi = m["speed_kmh"] * 0.75, m["speed_kmh"] * 1.3
            if n.event is not None and n.event[0] == "speeders":
                lo, hi = 62.0, 98.0  # p85 over the 70 km/h alarm band
            doc = {"pulses_per_min": {"25": m["vehicles_per_min"], "26": m["bikes_per_min"], "27": m["peds_per_min"]},
                   "radar_per_min": m["vehicles_per_min"], "radar_kmh": [lo, hi],
                   "values": {"bat": [m["bat"] - NOISE["bat"], m["bat"] + NOISE["bat"]]}}
        missing = sorted(d for d, (kind, _u) in n.faults.items() if kind == "missing")
        stuck = sorted(d for d, (kind, _u) in n.faults.items() if kind == "timeout")
        if missing:
            doc["missing"] = missing
        if stuck:
            doc["timeout"] = stuck
        return doc

    def write(self, n: WorldNode, wall: float) -> None:
        # Atomic replace: the shims re-read the file when its mtime or inode changes.
        tmp = n.flash / "scenario.json.tmp"
        tmp.write_text(json.dumps(self.scenario(n, wall)))
        os.replace(tmp, n.flash / "scenario.json")

    def _note(self, wall: float, n: WorldNode, what: str) -> None:
        with self._lock:
            self.log.append((wall, n.city, f"{n.node}: {what}"))
            del self.log[:-50]

    def evolve(self, n: WorldNode, wall: float, dt: float) -> None:
        """Start and end faults and events (seeded, per node)."""
        rng = n.rng
        for dev, (kind, until) in list(n.faults.items()):
            if wall >= until:
                del n.faults[dev]
                self._note(wall, n, f"{dev} probe back")
        if n.event is not None and wall >= n.event[1]:
            self._note(wall, n, "run-off cleared" if n.event[0] == "runoff" else "traffic calm again")
            n.event = None
        if rng.random() < FAULT_PER_S * dt and not n.faults:
            dev = rng.choice(MARINE_DEVICES) if n.domain == "marine" else "radar"
            kind = "missing" if rng.random() < 0.6 else "timeout"
            n.faults[dev] = (kind, wall + rng.uniform(6, 20))
            self._note(wall, n, f"{dev} probe {'not answering' if kind == 'missing' else 'hangs'}")
        if n.event is None and rng.random() < EVENT_PER_S * dt:
            kind = "runoff" if n.domain == "marine" else "speeders"
            n.event = (kind, wall + rng.uniform(10, 25))
            self._note(wall, n, "turbid run-off after rain" if kind == "runoff" else "speeders on the road")

    def step(self, wall: float, dt: float) -> None:
        for n in self.nodes:
            self.evolve(n, wall, dt)
            try:
                self.write(n, wall)
            except OSError:
                pass  # flash dir gone while stopping

    def run(self, stop: threading.Event, period: float = 1.0) -> None:
        last = time.time()
        while not stop.wait(period):
            now = time.time()
            self.step(now, now - last)
            last = now

    def recent(self, city: str, n: int = 4) -> list[str]:
        with self._lock:
            rows = [(w, what) for w, c, what in self.log if c == city]
        return [f"{time.strftime('%H:%M:%S', time.localtime(w))} {what}" for w, what in rows[-n:]]

    def active_faults(self, city: str) -> int:
        return sum(len(n.faults) for n in self.nodes if n.city == city)
