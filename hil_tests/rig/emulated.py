"""The emulated board: the deployed firmware files on the MicroPython unix port (via
hil_tests/board/runner.NodeProcess), plus what a bench around a real board offers:
stimulus, Wi-Fi switch, power cycle with a reset cause, a hardware-like watchdog, a
timestamped console, and a pty with a raw REPL for mpremote."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hil_tests.board.runner import BOARD, FIRMWARE, NodeProcess
from hil_tests.rig.model import NodeSpec, Ring, Sample, parse_ring
from hil_tests.rig.oracle import Expected, expect

OVERLAY = Path(__file__).resolve().parent / "shim"
# Sensor values of the simulated world unless a scenario says otherwise (engineering units).
DEFAULT_VALUES: dict[str, float] = {"ph": 8.12, "temp": 15.34, "do": 7.12, "ec": 45210, "sal": 31.2,
                                    "turb": 12.3, "bat": 3.712}
DEFAULT_MOBILITY: dict[str, Any] = {"pulses_per_min": {"25": 120, "26": 12, "27": 30}, "radar_per_min": 120,
                                    "radar_kmh": [40, 60], "values": {"bat": 3.95}}


class TimedLines(list[str]):
    """The runner's console buffer, with the wall time each line arrived (for latencies)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, line: str) -> None:  # type: ignore[override]
        self.times.append(time.time())
        super().append(line)


@dataclass
class Event:
    wall: float
    index: int  # console line number: gives the order within the node
    doc: dict[str, Any]


class EmulatedNode(NodeProcess):
    """One emulated node. Stimulus methods change the simulated world live."""

    backend = "emulated"

    def __init__(self, spec: NodeSpec, broker_port: int, flash_dir: Path, *, speed: float,
                 cfg: dict[str, Any], world: dict[str, Any] | None = None, ring: int = 4096,
                 wdt_timeout_s: float | None = None, broker_host: str = "127.0.0.1") -> None:
        base = dict(DEFAULT_MOBILITY) if spec.domain == "mobility" else {"values": dict(DEFAULT_VALUES)}
        super().__init__(spec.node, spec.city, spec.domain, broker_host, broker_port, flash_dir,
                         scenario={**base, **(world or {})}, speed=speed, node_extra={"ring": ring}, trace=True)
        self.spec = spec
        self._lines = TimedLines()
        self.cfg_docs: dict[int, dict[str, Any]] = {int(cfg["v"]): dict(cfg)}
        (self.flash / "cfg.json").write_text(json.dumps(cfg))  # provisioned config, as `node install` leaves it
        self.world_log: list[tuple[float, dict[str, Any]]] = [(0.0, dict(self.scenario))]
        self.wdt_timeout_s = wdt_timeout_s
        self.wdt_resets: list[float] = []
        self.power_cycles: list[tuple[float, str]] = []
        self._life = threading.RLock()
        self._dog: threading.Thread | None = None
        self._dog_stop = threading.Event()
        self._seen: dict[int, Sample] = {}  # every ring record ever read (slots get overwritten)
        self._ring_lock = threading.Lock()

    # -- process -------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = super()._env()
        env["MICROPYPATH"] = f"{OVERLAY}:{env['MICROPYPATH']}"
        env["TE_BOARD_MACHINE"] = str(BOARD / "machine.py")
        return env

    def start(self) -> "EmulatedNode":
        with self._life:
            (self.flash / ".wdt").unlink(missing_ok=True)  # the watchdog is off until the firmware arms it
            super().start()
            if self._dog is None:
                self._dog_stop.clear()
                self._dog = threading.Thread(target=self._watchdog, name=f"wdt {self.spec.node}", daemon=True)
                self._dog.start()
        return self

    def stop(self) -> None:
        self._dog_stop.set()
        if self._dog is not None and self._dog is not threading.current_thread():
            self._dog.join(timeout=5)
        self._dog = None
        with self._life:
            super().stop()

    def power_cycle(self, cause: str = "power_on", off_s: float = 1.2) -> None:
        """Cut power (SIGKILL: nothing flushed, RAM lost), stay off `off_s`, boot with `cause`.

        The off time is part of the stimulus (a real power cut lasts a while); keeping it
        above 1 s also keeps the new boot's first reading out of the last one's second."""
        with self._life:
            self.power_cycles.append((time.time(), cause))
            self.kill()
            time.sleep(off_s)
            if cause != "power_on":
                # a reset that is not a power loss: the chip reports it, RTC memory survives
                (self.flash / ".reset_cause").write_text(cause)
            (self.flash / ".wdt").unlink(missing_ok=True)
            NodeProcess.start(self)

    # -- watchdog ------------------------------------------------------------------------
    def _watchdog(self) -> None:
        """Reset the node when it stops feeding its WDT, as the ESP32's hardware watchdog does.

        The firmware arms a 30 s WDT; with time acceleration the rig may use a shorter
        timeout (`wdt_timeout_s`), still several times the firmware's 1 s feeding period."""
        path = self.flash / ".wdt"
        seen: tuple[int, bytes] | None = None
        last = time.monotonic()
        while not self._dog_stop.wait(0.1):
            try:
                data = path.read_bytes()
            except OSError:
                data = b""
            now = time.monotonic()
            key = (self.boots, data)
            if key != seen or not data or not self.running:
                seen, last = key, now
                continue
            timeout = self.wdt_timeout_s or int(data.split()[0]) / 1000
            if now - last > timeout:
                self.wdt_resets.append(time.time())
                self._lines.append(f"[rig] watchdog: not fed for {now - last:.1f} s, resetting")
                world = {k: v for k, v in self.scenario.items() if k != "hang"}  # reset clears a locked bus
                self.set_world(world)
                self.power_cycle("wdt", off_s=0.0)
                seen, last = None, time.monotonic()

    # -- world (stimulus) ----------------------------------------------------------------
    def set_world(self, world: dict[str, Any]) -> None:
        self.world_log.append((time.time(), dict(world)))
        self.set_scenario(world)

    def _patch(self, **changes: Any) -> None:
        w = json.loads(json.dumps(self.scenario))
        for k, v in changes.items():
            if v is None:
                w.pop(k, None)
            else:
                w[k] = v
        self.set_world(w)

    def set_value(self, name: str, value: float) -> None:
        """e.g. set_value("ph", 8.1): what the probe measures from now on (engineering units)."""
        self._patch(values={**self.scenario.get("values", {}), name: value})

    def set_ph(self, ph: float) -> None:
        self.set_value("ph", ph)

    def drain_battery(self, volts: float) -> None:
        self.set_value("bat", volts)

    def radar(self, per_min: float, kmh: tuple[float, float] = (40, 60)) -> None:
        """Vehicles the radar detects per minute, with speeds drawn from kmh."""
        self._patch(radar_per_min=per_min, radar_kmh=list(kmh))

    def unplug(self, *devices: str) -> None:
        self._patch(missing=sorted(set(self.scenario.get("missing", [])) | set(devices)))

    def stall(self, *devices: str) -> None:
        """The devices answer but never finish (EZO busy forever, DS18B20 CRC errors)."""
        self._patch(timeout=sorted(set(self.scenario.get("timeout", [])) | set(devices)))

    def replug(self, *devices: str) -> None:
        gone = set(devices) if devices else None
        miss = [d for d in self.scenario.get("missing", []) if gone is not None and d not in gone]
        stuck = [d for d in self.scenario.get("timeout", []) if gone is not None and d not in gone]
        self._patch(missing=miss or None, timeout=stuck or None)

    def wifi(self, on: bool) -> None:
        self._patch(wifi=None if on else False)

    def ntp(self, on: bool) -> None:
        self._patch(ntp=None if on else False)

    def hang_bus(self) -> None:
        """The next ADC read never returns: the firmware stalls until the watchdog resets it."""
        self._patch(hang=True)

    # -- console -------------------------------------------------------------------------
    def events(self, kind: str | None = None) -> list[Event]:
        with self._lock:
            lines, times = list(self._lines), list(self._lines.times)
        out = []
        for i, (ln, t) in enumerate(zip(lines, times)):
            if ln.startswith("TE {"):
                try:
                    d = json.loads(ln[3:])
                except ValueError:
                    continue
                if kind is None or d.get("ev") == kind:
                    out.append(Event(t, i, d))
        return out

    def sample_events(self) -> dict[int, Event]:
        """seq -> the console event of that sample (first one; a seq never repeats)."""
        out: dict[int, Event] = {}
        for e in self.events("sample"):
            out.setdefault(int(e.doc["seq"]), e)
        return out

    def top_seq(self) -> int:
        ev = self.sample_events()
        return max(ev) if ev else 0

    def config_applied(self) -> list[tuple[int, int]]:
        """(console line, version) of every config the node applied while running."""
        with self._lock:
            lines = list(self._lines)
        out = []
        for i, ln in enumerate(lines):
            if ln.startswith("te: config ") and ln.endswith(" applied"):
                out.append((i, int(ln.split()[2])))
        return out

    def boot_lines(self) -> list[int]:
        with self._lock:
            return [i for i, ln in enumerate(self._lines) if ln.startswith("te: node ")]

    def flash_file(self, name: str) -> bytes | None:
        try:
            return (self.flash / name).read_bytes()
        except OSError:
            return None

    # -- accounting hooks -------------------------------------------------------------------
    WORLD_WINDOW_S = 1.0  # a world change reaches the sensors within ~0.1 s (te_sim re-read) + one sampling

    def ring(self) -> Ring:
        """The flash ring now, merged with every record read before (slots are reused)."""
        r = parse_ring(self.spec.domain, self.flash_file("ring.bin"), self.flash_file("ring.meta"))
        with self._ring_lock:
            for seq, smp in r.samples.items():
                self._seen[seq] = smp  # a later read wins: re-timing after NTP sync rewrites records
            r.samples = dict(self._seen)
        return r

    def sample_walls(self) -> dict[int, float]:
        return {seq: e.wall for seq, e in self.sample_events().items()}

    def expectation(self, seq: int) -> list[Expected] | None:
        ev = self.sample_events().get(seq)
        if ev is None:
            return None
        applied = [v for i, v in self.config_applied() if i < ev.index]
        cfg = self.cfg_docs.get(applied[-1] if applied else min(self.cfg_docs), {})
        worlds = [w for t, w in self.world_log if ev.wall - self.WORLD_WINDOW_S <= t <= ev.wall]
        before = [w for t, w in self.world_log if t < ev.wall - self.WORLD_WINDOW_S]
        if before:
            worlds.insert(0, before[-1])
        return [expect(self.spec.domain, {**w, "values": {**w.get("values", {})}}, cfg) for w in worlds]

    # -- serial (pty with a raw REPL, for mpremote) ----------------------------------------
    @contextmanager
    def serial(self) -> Iterator[str]:
        """Stop the firmware (as Ctrl-C at a board's REPL does) and expose this node's flash
        on a pty that speaks the raw REPL: `mpremote connect <port> fs cat node.json` works.
        On exit the node boots again (soft reset) with its flash as mpremote left it."""
        from hil_tests.pty_board import start as start_pty

        with self._life:
            self.stop()
            board = start_pty(self.flash, micropath=f"{OVERLAY}:{BOARD}:{FIRMWARE / 'lib'}", run_main=False,
                              env={"TE_SCENARIO": "scenario.json", "TE_BOARD_MACHINE": str(BOARD / "machine.py")})
            try:
                yield board.port
            finally:
                board.stop()
                (self.flash / ".reset_cause").write_text("soft")
                self.start()

    def describe(self) -> str:
        return f"{self.spec.node} ({self.spec.city}/{self.spec.domain}, emulated, flash {self.flash})"


def env_has_micropython() -> bool:
    from hil_tests.board.runner import micropython_bin

    try:
        return bool(micropython_bin()) and os.access(micropython_bin(), os.X_OK)
    except RuntimeError:
        return False
