"""Real boards on serial ports (`--board /dev/ttyUSB0`, repeatable).

The board is prepared the way a technician does it, with the provisioning commands
(`twinedge node add`, `node wifi`, `broker render`, `node setup --no-flash`), pointed at the
rig's fault proxy in front of the rig's own broker. Scenarios that need a hand on the
hardware (sensor stimulus, power relay, Wi-Fi access point, a hung firmware, RTC/NTP
control) are skipped with the reason. What the board sampled is read back from its flash
ring with `mpremote` at the end of each scenario (which stops the firmware at the REPL).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hil_tests.rig.model import NodeSpec, Ring, fleet, parse_ring
from hil_tests.rig.oracle import Expected
from hil_tests.rig.rig import CAP_REASON, REAL_CAPS, Rig
from hil_tests.rig.stack import Stack

__all__ = ["REAL_CAPS", "BoardUnavailable", "check_ports", "real_rig", "skip_reason"]

REAL_INTERVAL_S = 2  # no time acceleration on a board: keep scenarios short, samples > 1 s apart


class BoardUnavailable(RuntimeError):
    """A --board port that cannot be used; the message says what to do."""


def check_ports(ports: list[str]) -> None:
    for p in ports:
        if "://" in p:
            continue  # a pyserial URL (rfc2217://, socket://): reachability shows when used
        if not os.path.exists(p):
            raise BoardUnavailable(
                f"--board {p}: no such serial port. Plug the board in with a data USB cable and check "
                "`ls /dev/ttyUSB* /dev/ttyACM*`, or leave --board out to run on emulated boards")
        if not os.access(p, os.R_OK | os.W_OK):
            raise BoardUnavailable(f"--board {p}: permission denied. Add yourself to the dialout group "
                                   "(`sudo usermod -aG dialout $USER`), log out and in again")
    if len(set(ports)) != len(ports):
        raise BoardUnavailable("--board: the same port is given twice")


def skip_reason(needs: frozenset[str] | set[str], caps: frozenset[str]) -> str | None:
    missing = sorted(set(needs) - caps)
    if not missing:
        return None
    return "real board: " + "; ".join(CAP_REASON.get(m, m) for m in missing)


class RealNode:
    backend = "real"

    def __init__(self, spec: NodeSpec, port: str, rig: Rig, env: dict[str, str]) -> None:
        self.spec = spec
        self.port = port
        self.rig = rig
        self.env = env
        self.cfg_docs: dict[int, dict[str, Any]] = {1: {"v": 1, "interval_s": REAL_INTERVAL_S, "batch": 1}}
        self.first_seq = 1
        self._ring: Ring | None = None
        self._asked = 0.0
        self._log: list[str] = []

    def twinedge(self, *args: str, timeout: float = 240) -> str:
        p = subprocess.run([sys.executable, "-m", "twinedge.cli", *args], capture_output=True, text=True,
                           env=self.env, timeout=timeout)
        out = (p.stdout + p.stderr).strip()
        self._log.append(f"$ twinedge {' '.join(args)}\n{out}")
        if p.returncode != 0:
            raise BoardUnavailable(f"`twinedge {' '.join(args[:2])}` failed on {self.port}: "
                                   + (out.splitlines()[-1] if out else f"exit {p.returncode}"))
        return out

    def prepare(self, broker: str) -> None:
        s = self.spec
        self.twinedge("node", "add", s.node, "--city", s.city, "--domain", s.domain, "--site", s.site,
                      "--interval", str(REAL_INTERVAL_S))
        self.twinedge("node", "edit", s.node, "--set", "config.batch=1")
        self.twinedge("node", "setup", s.node, "--port", self.port, "--no-flash", "--broker", broker, "--timeout", "120")

    def baseline(self) -> None:
        """Account from the next sample on (the setup's own readings are not part of a scenario)."""
        since = time.time()
        self.rig.operator(self).command(self.spec, {"cmd": "status"})
        st = self.rig.wait_status(lambda d: d.get("online") and "seq" in d and d["_wall"] >= since, 60,
                                  f"{self.spec.node} status", self)
        self.first_seq = int(st["seq"]) + 1
        v = int(st.get("cfg") or 1)
        self.cfg_docs = {v: {"v": v, "interval_s": REAL_INTERVAL_S, "batch": 1}}

    def start(self) -> "RealNode":
        return self

    def stop(self) -> None:
        pass

    def console(self) -> str:
        return "\n".join(self._log)

    def top_seq(self) -> int:
        """Newest seq, from the status the board publishes on request (at most every 2 s)."""
        if time.monotonic() - self._asked > 2:
            self._asked = time.monotonic()
            self.rig.operator(self).command(self.spec, {"cmd": "status"})
        st = self.rig.status(self)
        return int(st.get("seq", 0))

    def pull_ring(self) -> Ring:
        """Read ring.bin/ring.meta off the board (mpremote stops the firmware at the REPL)."""
        with tempfile.TemporaryDirectory() as d:
            for name in ("ring.bin", "ring.meta"):
                p = subprocess.run([sys.executable, "-m", "mpremote", "connect", self.port, "fs", "cp",
                                    f":{name}", str(Path(d) / name)], capture_output=True, text=True, timeout=120)
                if p.returncode != 0:
                    raise BoardUnavailable(f"could not read {name} from {self.port}: {p.stderr.strip()[-200:]}")
            self._ring = parse_ring(self.spec.domain, (Path(d) / "ring.bin").read_bytes(),
                                    (Path(d) / "ring.meta").read_bytes())
        return self._ring

    def ring(self) -> Ring:
        return self._ring or Ring(0, 1, 0, 0)

    def sample_walls(self) -> dict[int, float]:
        return {}  # no console: latency is measured from the reading's own timestamp (1 s resolution)

    def expectation(self, seq: int) -> list[Expected] | None:
        return None  # real sensors: values are checked against what the board stored, not a model


def real_rig(workdir: Path, ports: list[str], broker_host: str = "127.0.0.1", cfg: dict[str, Any] | None = None,
             world: dict[str, Any] | None = None, ring: int | None = None) -> Rig:
    check_ports(ports)
    specs = fleet(len(ports))
    registry, secrets = workdir / "registry", workdir / "secrets"
    env = {**os.environ, "TWINEDGE_REGISTRY": str(registry), "TWINEDGE_SECRETS": str(secrets), "COLUMNS": "120",
           "XDG_CACHE_HOME": str(workdir / "cache")}
    stack = Stack(workdir, registry=registry, proxy_host=broker_host)
    from hil_tests.rig.rig import REAL_CAPS as caps

    (registry / "nodes").mkdir(parents=True, exist_ok=True)
    rig = Rig("real", stack, [], workdir, speed=1.0, interval_s=REAL_INTERVAL_S, caps=caps)
    try:
        stack.start(sorted({s.city for s in specs}, key=lambda c: [x.city for x in specs].index(c)))
        nodes = [RealNode(s, p, rig, env) for s, p in zip(specs, ports)]
        rig.nodes.extend(nodes)
        cities_done: set[str] = set()
        for n in nodes:
            if n.spec.city not in cities_done:
                cities_done.add(n.spec.city)
                n.twinedge("node", "wifi", n.spec.city, "--ssid", os.environ.get("TWINEDGE_HIL_SSID", "sim"),
                           "--key", os.environ.get("TWINEDGE_HIL_WIFI_KEY", "not-used-by-the-emulator"))
        for city in cities_done:  # also creates the ops credential `node setup` verifies with
            nodes[0].twinedge("broker", "render", "--city", city, "--out", str(workdir / "broker" / city))
        rig.start()
        for n in nodes:
            n.prepare(f"{broker_host}:{stack.city(n.spec.city).proxy.port}")
        for c in stack.cities.values():  # read the registry the setup filled (site tags from the start)
            c.gateway.stop()
            c.gateway.start()
        for n in nodes:
            n.baseline()
    except BaseException:
        rig.stop()
        raise
    return rig
