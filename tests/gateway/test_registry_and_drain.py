"""Registry checks (unknown node, site tags) and a SIGTERM that drains what was acknowledged."""

from __future__ import annotations

import time
from pathlib import Path

from provisioning.registry import Node as RegNode
from provisioning.registry import save_node
from tests.gateway.helpers import Node, Publisher, counts_by_node, wait_until
from twinedge.services import Influxd, Mosquitto


def test_unknown_node_dead_lettered_and_site_tagged(mosquitto: Mosquitto, influxd: Influxd, start_gateway,
                                                    tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    save_node(reg, RegNode(id="buoy-01", city="copenhagen", domain="marine", site="nyhavn", lat=55.68, lon=12.59))
    save_node(reg, RegNode(id="count-01", city="helsinki", domain="mobility", site="mannerheimintie"))
    gw = start_gateway(registry=str(reg), require_registration=True)
    pub = Publisher(mosquitto.port)
    now = int(time.time())
    known = Node("copenhagen", "marine", "buoy-01")
    stranger = Node("copenhagen", "marine", "buoy-77")
    elsewhere = Node("copenhagen", "mobility", "count-01")  # registered in another city
    pub.publish(known.topic, known.batch(3, now - 30))
    pub.publish(stranger.topic, stranger.batch(3, now - 30))
    pub.publish(elsewhere.topic, elsewhere.batch(2, now - 30))
    pub.wait_all()
    wait_until(lambda: counts_by_node(influxd, "marine", "ph").get("buoy-01") == 3, 20, "known node's points")
    wait_until(lambda: gw.metrics().get('twinedge_dead_letters_total{reason="domain_mismatch",stage="decode"}') == 1.0,
               10, "domain mismatch dead letter")
    m = gw.metrics()
    assert m['twinedge_dead_letters_total{reason="unknown_node",stage="decode"}'] == 1.0
    res = influxd.query("SHOW TAG VALUES FROM marine WITH KEY = \"site\"", db="twinedge")
    assert res["results"][0]["series"][0]["values"] == [["site", "nyhavn"]]
    assert "buoy-77" not in counts_by_node(influxd, "marine", "ph")
    # Registering the node later is picked up without a restart.
    save_node(reg, RegNode(id="buoy-77", city="copenhagen", domain="marine", site="harbour"))
    time.sleep(0)  # the gateway reloads the registry when it meets an unknown node (rate-limited to 5 s)
    late = Node("copenhagen", "marine", "buoy-77", next_seq=100)

    def republish_and_check() -> bool:
        pub.publish(late.topic, late.batch(1, now - 10))
        pub.wait_all()
        return counts_by_node(influxd, "marine", "ph").get("buoy-77", 0) > 0

    wait_until(republish_and_check, 30, "newly registered node accepted", interval=1.0)
    assert gw.stop() == 0


def test_sigterm_drains_acknowledged_readings_to_influxdb(mosquitto: Mosquitto, influxd: Influxd,
                                                          start_gateway) -> None:
    gw = start_gateway(influx={"flush_interval_s": 60.0, "batch_points": 100000, "flush_when_idle": False})  # hold writes back
    pub = Publisher(mosquitto.port)
    now = int(time.time())
    nodes = [Node("copenhagen", "marine", f"buoy-{i}") for i in range(5)]
    for n in nodes:
        pub.publish(n.topic, n.batch(20, now - 100))
    pub.wait_all()
    wait_until(lambda: gw.metrics().get('twinedge_readings_accepted_total{domain="marine"}') == 100.0, 20,
               "all readings durable")
    assert counts_by_node(influxd, "marine", "ph") == {}  # still held back by the flush interval
    assert gw.stop(timeout=30) == 0  # SIGTERM: drains now instead of waiting for the 60 s flush
    assert counts_by_node(influxd, "marine", "ph") == {n.node: 20 for n in nodes}
    events = [e["msg"] for e in gw.log_events()] if gw.log_path.exists() else []
    assert "gateway stopped" in events
