"""The rig a scenario drives: the city stacks, the nodes (emulated or real), the InfluxDB
watcher, and the helpers to wait, push configs and account for every sample."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hil_tests.rig.accounting import Figures, InfluxWatcher, NodeFigures, account_node, summarise
from hil_tests.rig.model import NodeSpec, Ring
from hil_tests.rig.oracle import Expected
from hil_tests.rig.stack import City, Operator, Stack

# Capabilities a scenario may need. A real board on a serial port offers only the ones that
# need no hand on the hardware; the rest are skipped there, with the reason.
EMULATED_CAPS = frozenset({"network", "services", "config", "stimulus", "wifi", "power", "watchdog", "clock",
                           "small_ring"})
REAL_CAPS = frozenset({"network", "services", "config"})
CAP_REASON = {
    "stimulus": "needs a sensor stimulus (set values, unplug a probe): emulated board only",
    "wifi": "needs the access point switched off and on: emulated board only",
    "power": "needs the board's power cut (a relay on the supply): emulated board only",
    "watchdog": "needs the firmware hung on purpose: emulated board only",
    "clock": "needs the board's RTC off and NTP unreachable: emulated board only",
    "small_ring": "needs the node provisioned with an 8-reading flash ring: emulated board only",
}


class Node(Protocol):
    spec: NodeSpec
    backend: str
    cfg_docs: dict[int, dict[str, Any]]

    def start(self) -> Any: ...
    def stop(self) -> None: ...
    def ring(self) -> Ring: ...
    def sample_walls(self) -> dict[int, float]: ...
    def expectation(self, seq: int) -> list[Expected] | None: ...
    def top_seq(self) -> int: ...
    def console(self) -> str: ...


class WaitTimeout(AssertionError):
    pass


@dataclass
class Rig:
    backend: str
    stack: Stack
    nodes: list[Any]
    workdir: Path
    speed: float = 1.0
    interval_s: int = 60
    caps: frozenset[str] = EMULATED_CAPS
    watcher: InfluxWatcher | None = None
    marks: dict[str, float] = field(default_factory=dict)  # named wall times (fault start/end)
    notes: list[str] = field(default_factory=list)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> "Rig":
        polls = [n.ring for n in self.nodes if n.backend == "emulated"]  # a real ring is read once, at the end
        self.watcher = InfluxWatcher(self.stack, on_poll=polls).start()
        return self

    def stop(self) -> None:
        for n in self.nodes:
            try:
                n.stop()
            except Exception:
                pass
        if self.watcher is not None:
            self.watcher.stop()
        self.stack.stop()

    # -- access ------------------------------------------------------------------------
    @property
    def node(self) -> Any:
        return self.nodes[0]

    def city(self, node: Any | None = None) -> City:
        return self.stack.city((node or self.node).spec.city)

    def operator(self, node: Any | None = None) -> Operator:
        op = self.city(node).operator
        assert op is not None
        return op

    def wall(self, node_seconds: float) -> float:
        """Wall seconds of a span of node time (time acceleration)."""
        return node_seconds / self.speed

    def mark(self, name: str) -> float:
        self.marks[name] = time.time()
        return self.marks[name]

    # -- waiting -----------------------------------------------------------------------
    def wait(self, pred: Callable[[], Any], timeout: float, what: str, node: Any | None = None) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = pred()
            if v:
                return v
            time.sleep(0.05)
        tail = ("\n--- console of " + node.spec.node + " ---\n" + node.console()[-2500:]) if node is not None else ""
        raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {what}{tail}")

    def status(self, node: Any | None = None) -> dict[str, Any]:
        n = node or self.node
        return self.operator(n).last_status(n.spec.node)

    def wait_status(self, pred: Callable[[dict[str, Any]], Any], timeout: float, what: str,
                    node: Any | None = None) -> dict[str, Any]:
        n = node or self.node
        return self.wait(lambda: (s := self.status(n)) and pred(s) and s, timeout, what, n)

    def wait_online(self, timeout: float = 60) -> None:
        for n in self.nodes:
            self.wait_status(lambda s: s.get("online"), timeout, f"{n.spec.node} online", n)

    def samples_taken(self, node: Any | None = None) -> int:
        return (node or self.node).top_seq()

    def wait_samples(self, more: int, node: Any | None = None, timeout: float | None = None) -> int:
        """Wait until the node has taken `more` further samples; returns its newest seq."""
        n = node or self.node
        start = n.top_seq()
        budget = timeout or (more * self.wall(self.interval_s) * 2 + 30)
        self.wait(lambda: n.top_seq() >= start + more, budget, f"{more} more samples on {n.spec.node}", n)
        return int(n.top_seq())

    def hold(self, node_seconds: float) -> float:
        """Keep the current condition for a span of node time (the fault's duration, not a
        synchronisation: the scenario checks what happened in it afterwards)."""
        t = self.wall(node_seconds)
        time.sleep(t)
        return t

    # -- configuration -----------------------------------------------------------------
    def push_config(self, doc: dict[str, Any] | bytes, node: Any | None = None) -> None:
        n = node or self.node
        if isinstance(doc, dict) and isinstance(doc.get("v"), int):
            n.cfg_docs[int(doc["v"])] = dict(doc)
        self.operator(n).push_config(n.spec, doc)

    # -- accounting --------------------------------------------------------------------
    def landed(self, node: Any, seqs: range) -> bool:
        assert self.watcher is not None
        ring = node.ring()
        rows = self.watcher.node_rows(node.spec)
        return all(s in ring.samples and ring.samples[s].t in rows for s in seqs)

    def account(self, scenario: str, fault_end: float | None = None, allow_drops: bool = False,
                drain_timeout: float = 60) -> Figures:
        """Cut each node's samples at its newest seq now, wait (deadline) until all of them can
        be in InfluxDB, then account for each one. Samples after the cut are left out."""
        assert self.watcher is not None
        t0 = time.monotonic()
        cuts = {n.spec.node: n.top_seq() for n in self.nodes}
        deadline = time.monotonic() + drain_timeout
        pending = list(self.nodes)
        while pending and time.monotonic() < deadline:
            self.watcher.poll()
            pending = [n for n in pending if not self._drained(n, cuts[n.spec.node], allow_drops)]
            if pending:
                time.sleep(0.2)
        self.watcher.poll()
        per: list[NodeFigures] = []
        for n in self.nodes:
            if n.backend == "real":
                n.pull_ring()
            per.append(account_node(n, self.watcher, cuts[n.spec.node], first=getattr(n, "first_seq", 1),
                                    fault_end=fault_end, allow_drops=allow_drops))
        redelivered = 0
        for c in self.stack.cities.values():
            redelivered += int(c.gateway_metric("twinedge_duplicates_total"))
        f = summarise(scenario, self.backend, per, redelivered)
        f.notes += self.notes
        if pending:
            f.problems.append(f"not all samples queryable {drain_timeout:.0f} s after the cut: "
                              + ", ".join(n.spec.node for n in pending))
            f.verdict = "fail"
        f.wall_s = round(time.monotonic() - t0, 2)
        return f

    def _drained(self, n: Any, cut: int, allow_drops: bool) -> bool:
        assert self.watcher is not None
        rows = self.watcher.node_rows(n.spec)
        if n.backend == "real":
            return len(rows) >= cut - n.first_seq + 1  # times unknown until the ring is read
        ring = n.ring()
        missing = 0
        for s in range(1, cut + 1):
            smp = ring.samples.get(s)
            if smp is None or smp.t not in rows:
                missing += 1
        # readings overwritten in a full ring never leave the node: it counts them (ring.meta drop)
        return missing <= (ring.drop if allow_drops else 0)
