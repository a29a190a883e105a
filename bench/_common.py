"""Shared pieces of the benchmarks: load generators, contenders, process stats."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from gateway.decode import encode_compact
from gateway.schema import MARINE, MOBILITY


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MB."""
    cur = peak = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            cur = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return cur, peak


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def node_ids(city: str, n: int) -> list[tuple[str, str]]:
    """(domain, node) pairs: half buoys, half counters."""
    return [("marine" if i % 2 == 0 else "mobility", f"{'buoy' if i % 2 == 0 else 'count'}-{city[:3]}-{i:03d}")
            for i in range(n)]


def build_payloads(city: str, nodes: int, msgs_per_node: int, per_msg: int, t_start: int,
                   seq_start: int = 1) -> list[tuple[str, bytes]]:
    out = []
    for k in range(msgs_per_node):
        for domain, node in node_ids(city, nodes):
            schema = MARINE if domain == "marine" else MOBILITY
            seq0 = seq_start + k * per_msg
            t0 = t_start + k * per_msg
            if domain == "marine":
                rows = [(j, 0, 0x7F, [800 + (seq0 + j) % 60, 1500, 700, 45000, 3100, 120, 3700]) for j in range(per_msg)]
            else:
                rows = [(j, 0, 0xFF, [(seq0 + j) % 300, 20, 30, 420, 610, 900, 3900, 60]) for j in range(per_msg)]
            out.append((f"twin/{city}/{domain}/{node}/up", encode_compact(schema, node, seq0, t0, rows)))
    return out


def _publish_proc(port: int, client_id: str, payloads: list[tuple[str, bytes]], rate_msgs: float,
                  ready: "mp.synchronize.Event", go: "mp.synchronize.Event", result: "mp.Queue[tuple[float, float]]") -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    ready.set()
    go.wait()
    t0 = time.time()
    infos = []
    for i, (topic, payload) in enumerate(payloads):
        infos.append(c.publish(topic, payload, qos=1))
        if rate_msgs:
            ahead = t0 + (i + 1) / rate_msgs - time.time()
            if ahead > 0:
                time.sleep(ahead)
    for info in infos:
        info.wait_for_publish(600)
    t1 = time.time()
    result.put((t0, t1))  # before tearing down: paho's loop_stop() alone can take a second
    c.disconnect()
    c.loop_stop()


class LoadGenerator:
    """One publisher process per payload list, started together."""

    def __init__(self, port: int, payload_lists: list[list[tuple[str, bytes]]], rate_msgs: float = 0.0,
                 tag: str = "bench") -> None:
        ctx = mp.get_context("fork")
        self.go = ctx.Event()
        self.result: mp.Queue[tuple[float, float]] = ctx.Queue()
        self.procs = []
        readies = []
        for i, pl in enumerate(payload_lists):
            ready = ctx.Event()
            p = ctx.Process(target=_publish_proc, args=(port, f"{tag}-pub-{i}", pl, rate_msgs / len(payload_lists),
                                                        ready, self.go, self.result), daemon=True)
            p.start()
            self.procs.append(p)
            readies.append(ready)
        for r in readies:
            r.wait(30)

    def start(self) -> float:
        t = time.time()
        self.go.set()
        return t

    def join(self) -> tuple[float, float]:
        spans = [self.result.get(timeout=900) for _ in self.procs]
        for p in self.procs:
            p.join(10)
        return min(s[0] for s in spans), max(s[1] for s in spans)
