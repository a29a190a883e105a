"""Firmware benchmark: the real firmware (.mpy build) on the MicroPython unix port against a
real Mosquitto on loopback, through a byte-counting TCP proxy that can also black-hole the link.

Prints: bytes on the wire per 5-value buoy reading at the default batch size (baselines in the
same run: a plain JSON object per reading, SenML JSON packs of the same batch); 24 simulated
hours under `-X heapsize=96K` (MemoryError?, min free heap, heap drift per hour); QoS 1 publish
->PUBACK p50/p95; sampling jitter during a broker outage; silent link loss detection time vs
keepalive; reconnect time after the broker returns; total deployed .mpy size.

    .venv/bin/python bench/firmware_bench.py [--hours 24] [--speed 1200]
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.decode import decode_up  # noqa: E402
from hil_tests.board.runner import NodeProcess, build_mpy  # noqa: E402
from twinedge.services import Mosquitto, free_port  # noqa: E402

VALUES = {"ph": [8.0, 8.2], "temp": [15.0, 15.6], "do": [7.0, 7.3], "turb": [10, 14], "bat": [3.70, 3.72]}


class Proxy:
    """TCP proxy node->broker counting upstream bytes, parsing MQTT packets, able to black-hole."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.blackhole = False
        self.packets: list[bytes] = []  # node -> broker MQTT packets
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", self.port))
        self.lsock.listen(8)
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
            except OSError:
                c.close()
                continue
            for s in (c, u):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()

    def _pump(self, c: socket.socket, u: socket.socket) -> None:
        buf = bytearray()
        socks = [c, u]
        try:
            while True:
                r, _, _ = select.select(socks, [], [], 0.5)
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    if self.blackhole:
                        continue  # silently swallowed: no RST, no FIN
                    (u if s is c else c).sendall(data)
                    if s is c:
                        buf += data
                        self._split(buf)
        except OSError:
            pass
        finally:
            c.close()
            u.close()

    def _split(self, buf: bytearray) -> None:
        while len(buf) >= 2:
            n, mult, i = 0, 1, 1
            while i < len(buf):
                b = buf[i]
                n += (b & 0x7F) * mult
                mult <<= 7
                i += 1
                if not b & 0x80:
                    break
            else:
                return
            if len(buf) < i + n:
                return
            self.packets.append(bytes(buf[: i + n]))
            del buf[: i + n]


def publish_packet_size(topic: str, payload_len: int) -> int:
    n = 2 + len(topic) + 2 + payload_len
    rl = 1 if n < 128 else 2 if n < 16384 else 3
    return 1 + rl + n


def wire_figures(proxy: Proxy, topic: str) -> dict:
    ups = []
    for p in proxy.packets:
        if p[0] & 0xF0 == 0x30:
            i = 1
            while p[i] & 0x80:
                i += 1
            i += 1
            tl = struct.unpack_from(">H", p, i)[0]
            if p[i + 2 : i + 2 + tl].decode() == topic and not p[0] & 0x08:
                ups.append((p, p[i + 2 + tl + 2 :]))
    full = [(p, pl) for p, pl in ups if pl[11 + pl[2]] == 10]
    now = int(time.time())
    n_read = sum(pl[11 + pl[2]] for _, pl in full)
    if not n_read:
        raise SystemExit(f"bench: no full batch seen on the wire ({len(ups)} up messages)")
    wire = sum(len(p) for p, _ in full) + 4 * len(full)  # + PUBACK per batch
    payload = sum(len(pl) for _, pl in full)
    json_pkt = json_pl = senml_pkt = senml_pl = 0
    values_n = []
    for p, pl in full:
        d = decode_up(topic, pl, now)
        senml = []
        for k, r in enumerate(d.readings):
            values_n.append(len(r.values))
            obj = {"node": d.node, "seq": r.seq, "t": r.t, **r.values}
            js = json.dumps(obj, separators=(",", ":"))
            json_pl += len(js)
            json_pkt += publish_packet_size(topic, len(js)) + 4
            recs = [{"n": name, "v": v} for name, v in r.values.items()]
            if k == 0:
                recs[0] = {"bn": f"urn:dev:twin:copenhagen:marine:{d.node}:", "bt": r.t, **recs[0]}
            else:
                recs[0]["t"] = r.t - d.readings[0].t
            senml += recs
        s = json.dumps(senml, separators=(",", ":"))
        senml_pl += len(s)
        senml_pkt += publish_packet_size(topic, len(s)) + 4
    return {
        "batches": len(full), "readings": n_read, "values_per_reading": statistics.mean(values_n) if values_n else 0,
        "compact_wire_B": wire / n_read, "compact_payload_B": payload / n_read,
        "json_wire_B": json_pkt / n_read, "json_payload_B": json_pl / n_read,
        "senml_wire_B": senml_pkt / n_read, "senml_payload_B": senml_pl / n_read,
    }


def wait(pred, timeout: float, what: str):  # noqa: ANN001, ANN201
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise SystemExit(f"bench: timed out waiting for {what}")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--speed", type=float, default=1200.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fwbench-"))
    build = build_mpy(tmp / "build")
    mpy_size = sum(p.stat().st_size for p in (build / "lib").glob("*.mpy"))
    main_size = (build / "main.py").stat().st_size
    print(f"deployed: {len(list((build / 'lib').glob('*.mpy')))} .mpy files, {mpy_size} B + main.py {main_size} B "
          f"= {mpy_size + main_size} B")

    broker = Mosquitto(tmp / "mq").start()
    proxy = Proxy(broker.port)
    try:
        # ---- 1+2+3: long run under a 96K heap, default batch (10), 5-value readings --------
        samples = int(args.hours * 60)
        node = NodeProcess("buoy-01", "copenhagen", "marine", "127.0.0.1", proxy.port, tmp / "n1",
                           scenario={"values": VALUES, "missing": ["ec"]}, speed=args.speed, mpy_dir=build,
                           heapsize="96K", node_extra={"ring": 4096}, trace=True)
        (tmp / "n1" / "cfg.json").write_text(json.dumps({"v": 1, "keepalive_s": 60}))
        t0 = time.monotonic()
        node.start()
        wait(lambda: sum(1 for t in node.traces() if t["ev"] == "sample") >= samples or not node.running,
             samples * 60 / args.speed * 3 + 60, f"{samples} samples")
        wall = time.monotonic() - t0
        node.stop()
        con = node.console()
        tr = node.traces()
        heap = [t["free"] for t in tr if t["ev"] == "heap"]
        lat = [t["lat"] for t in tr if t["ev"] == "ack"]
        n_s = sum(1 for t in tr if t["ev"] == "sample")
        print(f"\n24 h run: {n_s} samples ({n_s / 60:.1f} simulated hours at interval 60 s) in {wall:.0f} s wall, "
              f"-X heapsize=96K, .mpy build")
        print(f"  MemoryError: {'YES' if 'MemoryError' in con else 'no'}; interpreter exits: "
              f"{con.count('[runner] interpreter exited')} (the last one is our SIGTERM)")
        if "MemoryError" in con:
            print("  " + "\n  ".join(ln for ln in con.splitlines() if not ln.startswith("TE "))[-1500:])
        warm = heap[len(heap) // 10 :]
        if len(warm) > 2:
            xs = list(range(len(warm)))
            slope = statistics.linear_regression(xs, warm).slope * 60  # bytes per simulated hour
            print(f"  free heap after gc: min {min(heap)} B, max {max(heap)} B, mean after warm-up "
                  f"{statistics.mean(warm):.0f} B, drift {slope:+.1f} B per simulated hour")
        if lat:
            print(f"  QoS 1 publish->PUBACK on loopback (through the proxy): n={len(lat)} p50 {pct(lat, .5)} ms, "
                  f"p95 {pct(lat, .95)} ms, max {max(lat)} ms")
        wf = wire_figures(proxy, "twin/copenhagen/marine/buoy-01/up")
        print(f"\nbytes per reading, batch 10, {wf['values_per_reading']:.1f} values per reading "
              f"({wf['batches']} batches measured on the wire):")
        print(f"  compact v1 : {wf['compact_wire_B']:6.1f} B MQTT (payload {wf['compact_payload_B']:.1f} B)")
        print(f"  JSON object: {wf['json_wire_B']:6.1f} B MQTT (payload {wf['json_payload_B']:.1f} B), one message per reading")
        print(f"  SenML JSON : {wf['senml_wire_B']:6.1f} B MQTT (payload {wf['senml_payload_B']:.1f} B), one pack per batch")

        # ---- 4+5+6: outage jitter, reconnect time, silent link loss --------------------
        ka = 10
        node = NodeProcess("buoy-02", "copenhagen", "marine", "127.0.0.1", proxy.port, tmp / "n2",
                           scenario={"values": VALUES}, speed=60, mpy_dir=build, trace=True)
        (tmp / "n2" / "cfg.json").write_text(json.dumps({"v": 1, "batch": 1, "keepalive_s": ka, "interval_s": 6}))
        node.start()

        def conns() -> int:
            return sum(1 for t in node.traces() if t["ev"] == "conn")

        wait(lambda: conns() >= 1, 20, "first connect")
        time.sleep(2)
        n_before = len(node.traces())
        broker.stop()
        time.sleep(20)
        during = [t["late"] for t in node.traces()[n_before:] if t["ev"] == "tick"]
        c0 = conns()
        broker.start()
        t_up = time.monotonic()
        wait(lambda: conns() > c0, 30, "reconnect")
        reconnect = time.monotonic() - t_up
        print(f"\nbroker outage 20 s wall (node interval 0.1 s wall): {len(during)} samples, jitter max "
              f"{max(during)} ms, p95 {pct(during, .95)} ms")
        print(f"reconnect after the broker returned: {reconnect:.2f} s (backoff capped at 4 s)")
        time.sleep(2)
        downs0 = sum(1 for t in node.traces() if t["ev"] == "down")
        proxy.blackhole = True
        t_bh = time.monotonic()
        try:
            wait(lambda: sum(1 for t in node.traces() if t["ev"] == "down") > downs0, ka * 3, "link loss detection")
        except SystemExit:
            print(node.console()[-2000:])
            raise
        det = time.monotonic() - t_bh
        proxy.blackhole = False
        print(f"silent link loss (black-holed proxy) detected after {det:.1f} s = {det / ka:.2f} x keepalive ({ka} s)")
        node.stop()
    finally:
        proxy.stop = True
        proxy.lsock.close()
        broker.stop()


if __name__ == "__main__":
    main()
