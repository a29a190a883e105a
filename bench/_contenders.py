"""Baselines measured in the same run as the gateway.

  bare:  a paho subscriber that only counts messages (auto-ack): the broker's delivery limit.
  naive: paho on_message -> decode -> buffer 1,000 points -> HTTP /write (acks before writing;
         what people glue together today, and what loses data in an outage).

Run as: python -m bench._contenders {bare|naive} PORT CITY EXPECTED_MSGS [INFLUX_URL DB]
Prints "done <first_msg_time> <last_msg_time> <count>" when EXPECTED_MSGS messages arrived.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
import urllib.parse

import paho.mqtt.client as mqtt

from gateway import records
from gateway.decode import Rejected, decode_up


def main() -> None:
    kind, port, city, expected = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    influx = sys.argv[5] if len(sys.argv) > 5 else ""
    db = sys.argv[6] if len(sys.argv) > 6 else ""
    state = {"n": 0, "first": 0.0, "last": 0.0}
    done = threading.Event()
    buf: list[str] = []
    conn = None
    if kind == "naive":
        u = urllib.parse.urlparse(influx)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        path = f"/write?db={db}&precision=s"

    def flush() -> None:
        if buf and conn is not None:
            body = ("\n".join(buf) + "\n").encode()
            conn.request("POST", path, body=body)
            conn.getresponse().read()
            buf.clear()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        if not state["n"]:
            state["first"] = now
        state["n"] += 1
        state["last"] = now
        if kind == "naive":
            try:
                dec = decode_up(msg.topic, msg.payload, int(now))
            except Rejected:
                return
            rec = records.reading_record(dec, "unknown", now, dec.readings)
            buf.extend(records.to_lines(rec))
            if len(buf) >= 1000:
                flush()
        if state["n"] >= expected:
            flush()
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{kind}-{city}", protocol=mqtt.MQTTv311)
    c.on_message = on_message
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    c.on_connect = lambda cl, *a: cl.subscribe(f"twin/{city}/+/+/up", qos=1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    subscribed.wait(10)
    print("ready", flush=True)
    done.wait()
    print(f"done {state['first']} {state['last']} {state['n']}", flush=True)
    c.loop_stop()


if __name__ == "__main__":
    main()
