"""Nothing is lost: InfluxDB outage, gateway SIGKILLs, broker restart, shared subscription."""

from __future__ import annotations

import threading
import time

import pytest

from tests.gateway.helpers import Node, Publisher, counts_by_node, run_in_thread, times_for, wait_until
from twinedge.services import Influxd, Mosquitto


def _nodes(n: int, city: str = "copenhagen") -> list[Node]:
    return [Node(city, "marine", f"buoy-{i:02d}") for i in range(n)]


def _assert_exactly_once(influxd: Influxd, nodes: list[Node], timeout: float = 60) -> None:
    expected = {n.node: len(n.published) for n in nodes}
    got: dict[str, int] = {}

    def check() -> bool:
        got.clear()
        got.update(counts_by_node(influxd, "marine", "ph"))
        return got == expected

    try:
        wait_until(check, timeout, f"exactly {sum(expected.values())} points")
    except AssertionError:
        diff = {n: (got.get(n, 0), e) for n, e in expected.items() if got.get(n, 0) != e}
        raise AssertionError(f"points per node (got, expected) differ: {diff}") from None
    for n in nodes[:3]:
        assert times_for(influxd, "marine", n.node, "ph") == sorted(n.published.values())


def test_influxdb_outage_of_30s_loses_nothing(mosquitto: Mosquitto, influxd: Influxd, start_gateway) -> None:
    gw = start_gateway()
    pub = Publisher(mosquitto.port)
    nodes = _nodes(5)
    t0 = int(time.time()) - 3600
    for k in range(10):
        for n in nodes:
            pub.publish(n.topic, n.batch(20, t0 + k * 20))
    pub.wait_all()
    wait_until(lambda: sum(counts_by_node(influxd, "marine", "ph").values()) > 0, 30, "first points")
    influxd.stop()
    outage_start = time.monotonic()
    k = 10
    while time.monotonic() - outage_start < 30:  # keep publishing through a 30 s outage
        for n in nodes:
            pub.publish(n.topic, n.batch(20, t0 + k * 20))
        k += 1
        pub.wait_all()
        time.sleep(0.5)
    wait_until(lambda: gw.metrics().get('twinedge_sink_lag_bytes{sink="influx"}', 0) > 0, 10, "sink lag during outage")
    influxd.start()
    _assert_exactly_once(influxd, nodes)
    assert gw.metrics().get('twinedge_sink_errors_total{kind="connection",sink="influx"}', 0) > 0
    assert gw.stop() == 0


def test_gateway_sigkill_mid_load_every_reading_lands_once(mosquitto: Mosquitto, influxd: Influxd, start_gateway) -> None:
    gw = start_gateway()
    nodes = _nodes(10)
    t0 = int(time.time()) - 7200
    kills_done = threading.Event()
    done = []

    def load() -> None:
        # Publishes until the three kills are over (bounded), so every kill lands mid-load.
        pub = Publisher(mosquitto.port, "sigkill-publisher")
        k = 0
        while not kills_done.is_set() and k < 600:
            for n in nodes:
                pub.publish(n.topic, n.batch(10, t0 + k * 10))
            k += 1
            time.sleep(0.02)
        pub.wait_all(120)
        pub.close()
        done.append(k)

    th = run_in_thread(load)
    accepted = 'twinedge_readings_accepted_total{domain="marine"}'
    for round_ in range(3):
        wait_until(lambda: gw.metrics().get(accepted, 0.0) > 50, 60, f"progress before kill {round_}")
        gw.kill()
        gw.start()
    kills_done.set()
    th.join(180)
    assert done, "publisher did not finish"
    _assert_exactly_once(influxd, nodes, timeout=180)
    assert gw.stop() == 0


def test_broker_restart_mid_load_loses_nothing(mosquitto: Mosquitto, influxd: Influxd, start_gateway) -> None:
    gw = start_gateway()
    pub = Publisher(mosquitto.port)
    nodes = _nodes(5)
    t0 = int(time.time()) - 3600
    for k in range(20):
        for n in nodes:
            pub.publish(n.topic, n.batch(10, t0 + k * 10))
    pub.wait_all()
    # Gateway down: the broker holds a backlog for its persistent session...
    gw.kill()
    for k in range(20, 40):
        for n in nodes:
            pub.publish(n.topic, n.batch(10, t0 + k * 10))
    pub.wait_all()
    # ...which must survive a broker restart, as must what the gateway had in flight.
    mosquitto.stop()
    mosquitto.start()
    gw.start()
    wait_until(lambda: pub.client.is_connected(), 20, "publisher reconnected")
    for k in range(40, 60):
        for n in nodes:
            pub.publish(n.topic, n.batch(10, t0 + k * 10))
    pub.wait_all()
    mosquitto.stop()  # and once more while the gateway is consuming
    mosquitto.start()
    _assert_exactly_once(influxd, nodes)
    wait_until(lambda: gw.health()[0] == 200, 20, "gateway healthy again")
    pub.close()
    assert gw.stop() == 0


@pytest.mark.parametrize("protocol", [4, 5])
def test_two_instances_on_a_shared_subscription_split_the_load(mosquitto: Mosquitto, influxd: Influxd,
                                                                start_gateway, protocol: int) -> None:
    mq = {"share_group": "gw", "subscribe_status": False, "protocol": protocol}
    a = start_gateway(instance="gw-a", mqtt=mq)
    b = start_gateway(instance="gw-b", mqtt=mq)
    pub = Publisher(mosquitto.port)
    nodes = _nodes(20)
    t0 = int(time.time()) - 3600
    for k in range(10):
        for n in nodes:
            pub.publish(n.topic, n.batch(5, t0 + k * 5))
    pub.wait_all()
    _assert_exactly_once(influxd, nodes)
    got_a = a.metrics().get('twinedge_readings_accepted_total{domain="marine"}', 0)
    got_b = b.metrics().get('twinedge_readings_accepted_total{domain="marine"}', 0)
    assert got_a > 0 and got_b > 0, (got_a, got_b)
    assert got_a + got_b == 1000  # each message went to exactly one instance
    assert a.stop() == 0 and b.stop() == 0


def test_log_full_stops_acknowledging_and_recovers(mosquitto: Mosquitto, influxd: Influxd, start_gateway) -> None:
    # A tiny log bound and InfluxDB down: the gateway must stop acking (broker keeps the backlog), say so in
    # /healthz and the alarm metric, and land everything once InfluxDB is back.
    influxd.stop()
    gw = start_gateway(log={"max_bytes": 1024 * 1024, "segment_bytes": 65536},
                       limits={"max_payload_bytes": 4096}, mqtt={"receive_maximum": 50})
    pub = Publisher(mosquitto.port)
    nodes = _nodes(4)
    t0 = int(time.time()) - 4 * 3600
    for k in range(150):
        for n in nodes:
            pub.publish(n.topic, n.batch(40, t0 + k * 40))
    pub.wait_all()
    wait_until(lambda: gw.metrics().get("twinedge_log_full") == 1.0, 30, "log-full alarm")
    code, text = gw.health()
    assert code == 503 and "durable log full" in text
    # The gateway's own memory stays bounded whatever the broker sends: the reader pauses at the window.
    wait_until(lambda: gw.metrics().get("twinedge_ingest_backpressure_waits", 0) > 0, 20, "reader paused")
    assert gw.metrics()["twinedge_ingest_queue"] <= 50
    influxd.start()
    _assert_exactly_once(influxd, nodes, timeout=90)
    wait_until(lambda: gw.metrics().get("twinedge_log_full") == 0.0, 20, "alarm cleared")
    assert gw.stop() == 0
