"""Baselines measured in the same run as the gateway.

  bare:  a paho subscriber that only counts messages (auto-ack): the broker's delivery limit.
  naive: the bridge people glue together today: paho on_message -> decode (our published decoder)
         -> one point dict per reading -> buffer 1,000 points -> `influxdb.InfluxDBClient.write_points`
         (the InfluxDB 1.x Python client). Acks before writing, so it loses data in an outage.
  tuned: the same bridge with the gateway's own hot paths (line protocol rendered once per message,
         cached tag prefix, raw HTTP POST): what a careful hand-written bridge reaches without any
         durability. Not what the issue calls naive; measured so the gateway's figure has a hard rival.

Run as: python -m bench._contenders {bare|naive|tuned} PORT CITY EXPECTED_MSGS [INFLUX_URL DB]
Prints "done <first_msg_time> <last_msg_time> <count> <cpu_s>" when EXPECTED_MSGS messages arrived
(and, for the bridges, were written).
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
import urllib.parse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway import records
from gateway.decode import Rejected, decode_up


def main() -> None:
    kind, port, city, expected = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    influx = sys.argv[5] if len(sys.argv) > 5 else ""
    db = sys.argv[6] if len(sys.argv) > 6 else ""
    state = {"n": 0, "first": 0.0, "last": 0.0, "buffered": 0}
    done = threading.Event()
    buf: list[str] = []
    points: list[dict[str, object]] = []
    conn = None
    client = None
    u = urllib.parse.urlparse(influx)
    host, http_port = u.hostname or "127.0.0.1", u.port or 8086
    path = f"/write?db={db}&precision=s"
    if kind == "tuned":
        conn = http.client.HTTPConnection(host, http_port, timeout=30)
    elif kind == "naive":
        from influxdb import InfluxDBClient

        client = InfluxDBClient(host, http_port, database=db, timeout=30)

    def flush() -> None:
        if buf and conn is not None:
            conn.request("POST", path, body="".join(buf).encode())  # each item: newline-terminated lines
            conn.getresponse().read()
            buf.clear()
            state["buffered"] = 0
        if points and client is not None:
            client.write_points(points, time_precision="s")
            points.clear()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        if not state["n"]:
            state["first"] = now
        state["n"] += 1
        state["last"] = now
        if kind in ("naive", "tuned"):
            try:
                dec = decode_up(msg.topic, bytes(msg.payload), int(now))
            except Rejected:
                return
            if kind == "tuned":
                rec = records.reading_record(dec, "unknown", now, dec.readings)
                buf.append(records.reading_lines(rec, dec, dec.readings))
                state["buffered"] += len(dec.readings)
                if state["buffered"] >= 1000:
                    flush()
            else:
                tags = {"city": dec.topic.city, "domain": dec.topic.domain, "node": dec.node, "site": "unknown"}
                for r in dec.readings:
                    points.append({"measurement": dec.schema.domain, "tags": tags, "time": r.t, "fields": r.values})
                if len(points) >= 1000:
                    flush()
        if state["n"] >= expected:
            flush()
            done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{kind}-{city}", protocol=mqtt.MQTTv311)
    c.on_message = on_message
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()

    def on_connect(cl: mqtt.Client, *_a: object) -> None:
        cl.subscribe(f"twin/{city}/+/+/up", qos=1)

    c.on_connect = on_connect
    c.connect("127.0.0.1", port)
    c.loop_start()
    subscribed.wait(10)
    cpu0 = time.process_time()
    print("ready", flush=True)
    done.wait()
    print(f"done {state['first']} {state['last']} {state['n']} {time.process_time() - cpu0}", flush=True)
    c.loop_stop()


if __name__ == "__main__":
    main()
