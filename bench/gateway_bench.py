"""Gateway benchmark (issue 2). Not a test: prints figures and compares with baselines run alongside.

  python -m bench.gateway_bench            # full run (~10 min on 2 cores)
  python -m bench.gateway_bench --quick    # smaller workloads, same shape

Everything runs on this machine: one Mosquitto and one influxd (started here), 200 simulated
nodes in two cities (100 each), QoS 1. Contenders per workload, each on a fresh database:
  gateway : two `twinedge gateway run` processes (one per city)
  naive   : paho on_message -> buffer 1,000 points -> HTTP write with the InfluxDB 1.x Python client
            (`influxdb` package, bench extra), the usual hand-glued bridge (bench/_contenders.py)
  tuned   : the same bridge on the gateway's own decoder and pre-rendered line protocol, raw HTTP:
            a careful bridge without any durability, reported alongside so the ratio is not flattered
  bare    : a subscriber that only counts messages (the broker's limit)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from paho.mqtt.enums import CallbackAPIVersion

from bench._common import LoadGenerator, build_payloads, cpu_seconds, node_ids, rss_mb
from twinedge.gatewayproc import GatewayProcess
from twinedge.services import Influxd, Mosquitto

CITIES = ("copenhagen", "tongyeong")
PROTOCOL = 4  # MQTT 3.1.1 for every contender (paho in the baselines parses v5 properties ~10% slower)


def count_points(influx: Influxd, db: str, since_s: int | None = None) -> int:
    total = 0
    where = f" WHERE time >= {since_s * 10**9}" if since_s is not None else ""
    for meas, field in (("marine", "ph"), ("mobility", "vehicles")):
        res = influx.query(f'SELECT count("{field}") FROM "{meas}"{where}', db=db)
        series = res["results"][0].get("series")
        if series:
            total += int(series[0]["values"][0][1])
    return total


def wait_points(influx: Influxd, db: str, n: int, timeout: float = 900, interval: float = 0.1,
                tail: tuple[int, int] | None = None) -> float:
    """Time when all `n` points are queryable.

    A full count scans every point and costs influxd ~0.04 s of CPU at 400k points, so polling it every
    0.1 s took ~0.7 s of influxd CPU from the contender being measured. With `tail` = (first timestamp of
    the last messages, their point count), poll that small window often instead and confirm with one full
    count (repeated if short): the returned time is always after a full count that saw all `n`.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        if tail is not None and count_points(influx, db, tail[0]) < tail[1]:
            time.sleep(0.02)
            continue
        if count_points(influx, db) >= n:
            return time.time()
        time.sleep(interval)
    raise RuntimeError(f"only {count_points(influx, db)} of {n} points in {db} after {timeout} s")


def retire(gws: list[GatewayProcess], broker: Mosquitto) -> None:
    """Stop the gateways and end their persistent sessions: the broker would otherwise queue every later
    run's messages for them (max_queued_messages 0) and grow slower run after run (seen: 1.5 GB RSS)."""
    import paho.mqtt.client as mqtt

    for g in gws:
        g.stop()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"twinedge-gw-{g.city}-{g.instance}",
                        clean_session=True, protocol=mqtt.MQTTv311)
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        deadline = time.time() + 10
        while not c.is_connected() and time.time() < deadline:
            time.sleep(0.01)
        c.disconnect()
        c.loop_stop()


def start_gateways(work: Path, broker: Mosquitto, influx: Influxd, db: str, **extra: object) -> list[GatewayProcess]:
    gws = []
    for city in CITIES:
        # Instance (and so MQTT client id) per database: a fresh session, not one that queued earlier runs' load.
        gw = GatewayProcess(work / db, city, broker.port, influx.url, database=db, instance=f"gw-{db.replace('_', '-')}",
                            extra={"stats_interval_s": 10.0, "influx": {"max_backoff_s": 1.0}, "mqtt": {"protocol": PROTOCOL}, **extra})
        gws.append(gw.start())
    return gws


def start_contender(kind: str, broker: Mosquitto, influx: Influxd, db: str, expected_per_city: int) -> list[subprocess.Popen[str]]:
    procs = []
    for city in CITIES:
        p = subprocess.Popen([sys.executable, "-m", "bench._contenders", kind, str(broker.port), city,
                              str(expected_per_city), influx.url, db], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        procs.append(p)
    return procs


def throughput(kind: str, per_msg: int, msgs_per_node: int, broker: Mosquitto, influx: Influxd, work: Path,
               nodes_per_city: int = 100, rep: int = 0) -> dict[str, float]:
    db = f"bench_{kind}_{per_msg}_{rep}"  # fresh data dir and database per repetition
    influx.create_db(db)
    t_base = int(time.time()) - 20 * 86400
    payloads = [build_payloads(c, nodes_per_city, msgs_per_node, per_msg, t_base) for c in CITIES]
    n_msgs = sum(len(p) for p in payloads)
    n_readings = n_msgs * per_msg
    gws: list[GatewayProcess] = []
    cpu0 = 0.0
    procs: list[subprocess.Popen[str]] = []
    if kind == "gateway":
        gws = start_gateways(work, broker, influx, db)
        cpu0 = sum(cpu_seconds(g.proc.pid) for g in gws if g.proc)
    else:
        procs = start_contender(kind, broker, influx, db, len(payloads[0]))
    load = LoadGenerator(broker.port, payloads, tag=f"{kind}{per_msg}")
    assert influx.proc is not None
    assert broker.proc is not None
    influx_cpu0, broker_cpu0 = cpu_seconds(influx.proc.pid), cpu_seconds(broker.proc.pid)
    t0 = load.start()
    pub_span = load.join()
    if kind == "bare":
        t_end = 0.0
    else:
        # The last message of every node carries the newest timestamps: a cheap window to poll.
        t_end = wait_points(influx, db, n_readings,
                            tail=(t_base + (msgs_per_node - 1) * per_msg, 2 * nodes_per_city * per_msg))
    contender_cpu = 0.0
    for p in procs:
        assert p.stdout is not None
        done = p.stdout.readline().split()  # "done first last count cpu_s"
        contender_cpu += float(done[4])
        if kind == "bare":
            t_end = max(t_end, float(done[2]))
    out = {"readings": n_readings, "messages": n_msgs, "seconds": t_end - t0,
           "readings_per_s": n_readings / (t_end - t0), "msgs_per_s": n_msgs / (t_end - t0),
           "publish_s": pub_span[1] - pub_span[0], "influxd_cpu_s": cpu_seconds(influx.proc.pid) - influx_cpu0,
           "broker_cpu_s": cpu_seconds(broker.proc.pid) - broker_cpu0,
           "cpu_s": contender_cpu}
    if gws:
        out["cpu_s"] = sum(cpu_seconds(g.proc.pid) for g in gws if g.proc) - cpu0
        out["gateway_cpu_s"] = out["cpu_s"]
        out["gateway_rss_mb"] = max(rss_mb(g.proc.pid)[1] for g in gws if g.proc)
        retire(gws, broker)
    for p in procs:
        p.kill()
    influx.query(f'DROP DATABASE "{db}"', method="POST")
    return out


def latency_and_outage(broker: Mosquitto, influx: Influxd, work: Path, rate: int, steady_s: float,
                       outage_s: float) -> dict[str, float]:
    """Steady `rate` readings/s from 200 nodes; probes measure publish-to-queryable; then an InfluxDB outage."""
    import paho.mqtt.client as mqtt

    from gateway.decode import encode_compact
    from gateway.schema import MARINE

    db = "bench_latency"
    influx.create_db(db)
    gws = start_gateways(work, broker, influx, db)
    per_msg = 10
    probes = [f"probe-{i:02d}" for i in range(20)]
    bg_nodes = node_ids(CITIES[0], 90) + node_ids(CITIES[1], 90)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-steady")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    stop = threading.Event()
    sent_probe: dict[tuple[str, int], float] = {}
    seqs: dict[str, int] = {}
    published = {"readings": 0}

    def publisher() -> None:
        msgs_per_s = (rate - len(probes)) / per_msg
        t_start = time.time()
        i = 0
        last_probe_sec = 0
        while not stop.is_set():
            now = time.time()
            sec = int(now)
            if sec != last_probe_sec:  # each probe: one single-reading message per second, time = that second
                last_probe_sec = sec
                for p in probes:
                    s = seqs.get(p, 0) + 1
                    seqs[p] = s
                    payload = encode_compact(MARINE, p, s, sec, [(0, 0, 0x01, [810, 0, 0, 0, 0, 0, 0])])
                    client.publish(f"twin/{CITIES[0]}/marine/{p}/up", payload, qos=1)
                    sent_probe[(p, sec)] = time.time()
                    published["readings"] += 1
            domain, node = bg_nodes[i % len(bg_nodes)]
            city = CITIES[0] if node.split("-")[1] == CITIES[0][:3] else CITIES[1]
            s = seqs.get(node, 0) + 1
            seqs[node] = s + per_msg - 1
            schema = MARINE if domain == "marine" else None
            if schema is None:
                from gateway.schema import MOBILITY as schema  # noqa: N811
            vals = [810, 1500, 700, 45000, 3100, 120, 3700] if domain == "marine" else [5, 2, 1, 400, 600, 800, 3900, 60]
            mask = 0x7F if domain == "marine" else 0xFF
            t0 = int(now) - per_msg * 2 - 86400 + (s % 86400)
            payload = encode_compact(schema, node, s, t0, [(j, 0, mask, vals) for j in range(per_msg)])
            client.publish(f"twin/{city}/{domain}/{node}/up", payload, qos=1)
            published["readings"] += per_msg
            i += 1
            ahead = t_start + i / msgs_per_s - time.time()
            if ahead > 0:
                time.sleep(ahead)

    landed: dict[tuple[str, int], float] = {}

    def poller() -> None:
        while not stop.is_set() or len(landed) < len(sent_probe):
            try:
                res = influx.query('SELECT last("ph") FROM "marine" WHERE "node" =~ /^probe/ AND time > now() - 1h '
                                   'GROUP BY "node"', db=db)
            except Exception:  # noqa: BLE001 - influx is down during the outage phase
                time.sleep(0.05)
                continue
            now = time.time()
            for s in res["results"][0].get("series", []):
                node = s["tags"]["node"]
                newest = int(s["values"][0][0])
                for (p, sec), _t in list(sent_probe.items()):
                    if p == node and sec <= newest and (p, sec) not in landed:
                        landed[(p, sec)] = now
            if stop.is_set() and time.time() > stop_time + 120:
                return
            time.sleep(0.02)

    stop_time = float("inf")
    pth = threading.Thread(target=publisher, daemon=True)
    qth = threading.Thread(target=poller, daemon=True)
    pth.start()
    qth.start()
    time.sleep(steady_s)
    lats = sorted(landed[k] - sent_probe[k] for k in list(landed) if k in sent_probe)
    out: dict[str, float] = {"latency_samples": len(lats),
                             "latency_p50_s": statistics.median(lats) if lats else float("nan"),
                             "latency_p99_s": lats[int(len(lats) * 0.99) - 1] if lats else float("nan"),
                             "steady_rate": published["readings"] / steady_s}
    # InfluxDB outage under the same live load, then measure how fast the backlog drains.
    influx.stop()
    t_out = time.time()
    time.sleep(outage_s)
    influx.start()
    t_back = time.time()
    backlog_bytes = sum(g.metrics().get('twinedge_sink_lag_bytes{sink="influx"}', 0) for g in gws)

    def lag() -> float:
        return max(g.metrics().get('twinedge_sink_lag_seconds{sink="influx"}', 0) for g in gws)

    while lag() > 1.0 and time.time() - t_back < 600:
        time.sleep(0.1)
    t_caught = time.time()
    stop.set()
    stop_time = time.time()
    pth.join(5)
    outage_readings = rate * (t_back - t_out)
    drain = t_caught - t_back
    out.update({"outage_s": t_back - t_out, "catch_up_s": drain, "backlog_bytes": backlog_bytes,
                "catch_up_rate": (outage_readings + rate * drain) / drain if drain > 0 else float("inf")})
    out["catch_up_ratio"] = out["catch_up_rate"] / rate
    client.loop_stop()
    retire(gws, broker)
    influx.query(f'DROP DATABASE "{db}"', method="POST")
    return out


def backlog_rss(broker: Mosquitto, influx: Influxd, work: Path, n_readings: int) -> dict[str, float]:
    """RSS of a gateway holding an n-reading backlog (InfluxDB unreachable), then its drain rate."""
    db = "bench_backlog"
    influx.create_db(db)
    gw = GatewayProcess(work / db, CITIES[0], broker.port, influx.url, database=db,
                        extra={"influx": {"url": "http://127.0.0.1:9", "max_backoff_s": 1.0},
                               "log": {"max_bytes": 8 * 1024**3}}).start()
    per_msg = 50
    nodes = 200
    msgs_per_node = max(1, n_readings // (nodes * per_msg))
    payloads = build_payloads(CITIES[0], nodes, msgs_per_node, per_msg, int(time.time()) - 20 * 86400)
    half = len(payloads) // 2
    load = LoadGenerator(broker.port, [payloads[:half], payloads[half:]], tag="backlog")
    load.start()
    load.join()
    total = len(payloads) * per_msg
    while gw.metrics().get('twinedge_readings_accepted_total{domain="marine"}', 0) + \
            gw.metrics().get('twinedge_readings_accepted_total{domain="mobility"}', 0) < total:
        time.sleep(0.5)
    assert gw.proc is not None
    rss_now, rss_peak = rss_mb(gw.proc.pid)
    log_bytes = gw.metrics().get("twinedge_log_bytes", 0)
    gw.stop()
    # Same data dir, InfluxDB reachable now: time the drain.
    gw.extra["influx"] = {"url": influx.url, "max_backoff_s": 1.0}
    t0 = time.time()
    gw.start()
    t_end = wait_points(influx, db, total, timeout=1200, interval=0.5)
    assert gw.proc is not None
    drain_rss = rss_mb(gw.proc.pid)[1]
    retire([gw], broker)
    influx.query(f'DROP DATABASE "{db}"', method="POST")
    return {"backlog_readings": total, "rss_mb": rss_now, "rss_peak_mb": rss_peak, "log_mb": log_bytes / 1e6,
            "drain_s": t_end - t0, "drain_rate": total / (t_end - t0), "drain_rss_peak_mb": drain_rss}


def scaleout(broker: Mosquitto, influx: Influxd, work: Path, msgs_per_node: int) -> dict[str, float]:
    """One city, 200 nodes, 50 readings/message: one gateway vs two on a shared subscription."""
    out: dict[str, float] = {}
    for instances in (1, 2):
        db = f"bench_share_{instances}"
        influx.create_db(db)
        gws = [GatewayProcess(work / db, CITIES[0], broker.port, influx.url, database=db, instance=f"gw{i}",
                              extra={"stats_interval_s": 10.0, "mqtt": {"protocol": 5, "share_group": "gw",
                                                                        "subscribe_status": False}}).start()
               for i in range(instances)]
        payloads = build_payloads(CITIES[0], 200, msgs_per_node, 50, int(time.time()) - 20 * 86400)
        n = len(payloads) * 50
        load = LoadGenerator(broker.port, [payloads[: len(payloads) // 2], payloads[len(payloads) // 2:]],
                             tag=f"share{instances}")
        cpu0 = [cpu_seconds(g.proc.pid) for g in gws if g.proc]
        t0 = load.start()
        load.join()
        t1 = wait_points(influx, db, n)
        cpu = [cpu_seconds(g.proc.pid) - c for g, c in zip(gws, cpu0) if g.proc]
        out[f"{instances}_instances_readings_per_s"] = n / (t1 - t0)
        out[f"{instances}_instances_cpu_us_per_reading"] = sum(cpu) / n * 1e6
        retire(gws, broker)
        influx.query(f'DROP DATABASE "{db}"', method="POST")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller workloads (~3 min)")
    ap.add_argument("--only", choices=["throughput", "latency", "backlog", "scaleout"], help="run one part")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--mode", type=int, choices=[1, 2], help="throughput: only (1) or (2)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="throughput: alternate the contenders N times and compare medians (short runs are noisy)")
    args = ap.parse_args()
    q = args.quick
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="twinedge-bench-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "mosquitto", extra_conf=["max_inflight_messages 1000"]).start()
        influx = Influxd(work / "influxd").start()
        try:
            if args.only in (None, "throughput"):
                # (1): 600 messages per node, 120,000 in all (~9 s a run): at 250 (~3.5 s) the start and the
                # last flush weighed a few % and runs spread 12.6-14.0k; 600 is near what one paho publisher
                # can hold unacknowledged (16-bit message ids: 60,000 of 65,535).
                for label, per_msg, mpn in ((("(2) 50 readings/message", 50, 40 if q else 100),) if args.mode in (None, 2) else ()) + ((
                                            ("(1) 1 reading/message", 1, 100 if q else 600),) if args.mode in (None, 1) else ()):
                    row = {}
                    kinds = ("bare", "naive", "tuned", "gateway")
                    runs: dict[str, list[float]] = {k: [] for k in kinds}
                    for rep, kind in [(i, k) for i in range(args.repeat) for k in kinds]:
                        row[kind] = throughput(kind, per_msg, mpn, broker, influx, work, rep=rep)
                        r = row[kind]
                        runs[kind].append(r["readings_per_s"])
                        print(f"{label:26s} {kind:8s} {r['readings']:>9,d} readings in {r['seconds']:6.2f} s = "
                              f"{r['readings_per_s']:>10,.0f} readings/s ({r['msgs_per_s']:,.0f} msg/s, publishers done in {r['publish_s']:.2f} s)"
                              f"  CPU: {kind} {r['cpu_s']:.2f} s, influxd {r['influxd_cpu_s']:.2f} s, broker {r['broker_cpu_s']:.2f} s"
                              + (f", peak RSS {r['gateway_rss_mb']:.0f} MB" if kind == "gateway" else ""), flush=True)
                    g, n, t, b = (statistics.median(runs[k]) for k in ("gateway", "naive", "tuned", "bare"))
                    if args.repeat > 1:
                        print(f"{label:26s} medians of {args.repeat} alternating runs: gateway {g:,.0f}, naive {n:,.0f}, "
                              f"tuned {t:,.0f}, bare {b:,.0f} readings/s", flush=True)
                    print(f"{label:26s} gateway/naive = {g / n:.2f}x   gateway/tuned = {g / t:.2f}x   "
                          f"gateway/bare = {g / b:.2f}x", flush=True)
                    row["runs"] = runs  # type: ignore[assignment]
                    results[f"throughput_{per_msg}"] = row
            if args.only in (None, "latency"):
                r = latency_and_outage(broker, influx, work, 5000, 15 if q else 30, 20 if q else 60)
                print(f"steady {r['steady_rate']:,.0f} readings/s: publish-to-queryable p50 {r['latency_p50_s'] * 1000:.0f} ms, "
                      f"p99 {r['latency_p99_s'] * 1000:.0f} ms ({r['latency_samples']:.0f} probes)", flush=True)
                print(f"InfluxDB outage {r['outage_s']:.0f} s under live load: caught up in {r['catch_up_s']:.1f} s, "
                      f"catch-up rate {r['catch_up_rate']:,.0f} readings/s = {r['catch_up_ratio']:.1f}x the live rate",
                      flush=True)
                results["latency_outage"] = r
            if args.only in (None, "backlog"):
                r = backlog_rss(broker, influx, work, 1_000_000 if q else 5_000_000)
                print(f"backlog {r['backlog_readings']:,.0f} readings ({r['log_mb']:.0f} MB log): gateway RSS "
                      f"{r['rss_mb']:.0f} MB (peak {r['rss_peak_mb']:.0f} MB); drained in {r['drain_s']:.1f} s = "
                      f"{r['drain_rate']:,.0f} readings/s (peak RSS while draining {r['drain_rss_peak_mb']:.0f} MB)",
                      flush=True)
                results["backlog"] = r
            if args.only in (None, "scaleout"):
                r = scaleout(broker, influx, work, 20 if q else 50)
                print(f"scale-out, one city, 50 readings/message: 1 instance {r['1_instances_readings_per_s']:,.0f} "
                      f"readings/s ({r['1_instances_cpu_us_per_reading']:.1f} µs CPU/reading); 2 instances on "
                      f"$share/gw: {r['2_instances_readings_per_s']:,.0f} readings/s "
                      f"({r['2_instances_cpu_us_per_reading']:.1f} µs CPU/reading)", flush=True)
                results["scaleout"] = r
        finally:
            broker.stop()
            influx.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
