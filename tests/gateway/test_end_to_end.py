"""Readings in, points out: real Mosquitto, real influxd, the gateway as a real process."""

from __future__ import annotations

import json
import time

from tests.gateway.helpers import Node, Publisher, counts_by_node, wait_until
from twinedge.services import Influxd, Mosquitto


def test_compact_and_senml_land_with_values_and_tags(mosquitto: Mosquitto, influxd: Influxd, start_gateway) -> None:
    gw = start_gateway()
    pub = Publisher(mosquitto.port)
    now = int(time.time())
    buoy = Node("copenhagen", "marine", "buoy-01")
    counter = Node("copenhagen", "mobility", "count-01")
    pub.publish(buoy.topic, buoy.batch(10, now - 600))
    pub.publish(counter.topic, counter.batch(5, now - 300))
    senml = [
        {"bn": "urn:dev:twin:copenhagen:marine:buoy-07:", "bt": now - 60, "n": "ph", "u": "pH", "v": 8.05},
        {"n": "water_temp_c", "u": "Cel", "v": 12.25},
        {"n": "ph", "u": "pH", "v": 8.07, "t": 30},
    ]
    pub.publish("twin/copenhagen/marine/buoy-07/up", json.dumps(senml).encode())
    pub.wait_all()

    wait_until(lambda: counts_by_node(influxd, "marine", "ph").get("buoy-07") == 2
               and counts_by_node(influxd, "marine", "ph").get("buoy-01") == 10
               and counts_by_node(influxd, "mobility", "vehicles").get("count-01") == 5, 30, "points in InfluxDB")

    res = influxd.query("SELECT * FROM marine WHERE node = 'buoy-07'", db="twinedge")
    s = res["results"][0]["series"][0]
    rows = [dict(zip(s["columns"], v)) for v in s["values"]]
    assert rows[0]["time"] == now - 60 and rows[0]["ph"] == 8.05 and rows[0]["water_temp_c"] == 12.25
    assert rows[1]["time"] == now - 30 and rows[1]["ph"] == 8.07 and rows[1]["water_temp_c"] is None
    assert rows[0]["city"] == "copenhagen" and rows[0]["domain"] == "marine" and rows[0]["site"] == "unknown"

    res = influxd.query("SELECT * FROM marine WHERE node = 'buoy-01' ORDER BY time ASC LIMIT 1", db="twinedge")
    s = res["results"][0]["series"][0]
    first = dict(zip(s["columns"], s["values"][0]))
    assert first["time"] == now - 600
    assert first == {**first, "ph": 8.01, "water_temp_c": 15.01, "do_mgl": 7.0, "conductivity_uscm": 45001.0,
                     "salinity_psu": 31.0, "turbidity_ntu": 12.0, "battery_v": 3.7}

    res = influxd.query("SELECT vehicles, interval_s, speed_p85_kmh FROM mobility ORDER BY time ASC LIMIT 1", db="twinedge")
    assert res["results"][0]["series"][0]["values"][0][1:] == [1, 60, 60.0]
    # Integer counts stay integers in InfluxDB (no float/int field conflict with SenML writers).
    res = influxd.query("SHOW FIELD KEYS FROM mobility", db="twinedge")
    types = dict(res["results"][0]["series"][0]["values"])
    assert types["vehicles"] == "integer" and types["speed_mean_kmh"] == "float"
    pub.close()
    assert gw.stop() == 0


def test_duplicates_are_skipped_and_gaps_counted(mosquitto: Mosquitto, influxd: Influxd, start_gateway) -> None:
    gw = start_gateway()
    pub = Publisher(mosquitto.port)
    now = int(time.time())
    n = Node("copenhagen", "marine", "buoy-02")
    first = n.batch(5, now - 100)   # seq 1..5
    n.batch(5, now - 90)            # seq 6..10: never sent -> a gap of 5
    third = n.batch(5, now - 80)    # seq 11..15
    pub.publish(n.topic, first)
    pub.publish(n.topic, first)     # a redelivery
    pub.publish(n.topic, third)
    pub.wait_all()
    wait_until(lambda: counts_by_node(influxd, "marine", "ph").get("buoy-02") == 10, 30, "10 points")
    wait_until(lambda: gw.metrics().get('twinedge_node_gaps{node="buoy-02"}') == 5.0, 10, "gap metric")
    m = gw.metrics()
    assert m["twinedge_duplicates_total"] == 5.0
    assert abs(m['twinedge_node_completeness{node="buoy-02"}'] - 10 / 15) < 1e-9
    # The status stats land in InfluxDB as well, for the fleet dashboard.
    wait_until(lambda: bool(influxd.query("SELECT gaps FROM gateway_node WHERE node = 'buoy-02'", db="twinedge")
                            ["results"][0].get("series")), 15, "gateway_node stats")
    assert gw.stop() == 0


def test_status_is_recorded_and_health_reports(mosquitto: Mosquitto, influxd: Influxd, start_gateway) -> None:
    gw = start_gateway()
    pub = Publisher(mosquitto.port)
    status = {"v": 1, "node": "buoy-03", "online": True, "fw": "0.1.0", "up_s": 42, "reset": "wdt", "heap": 50000,
              "rssi": -70, "bat_mv": 3650, "buf": 3, "drop": 0, "faults": {"ph": "timeout"}, "cfg": 2, "synced": True}
    pub.publish("twin/copenhagen/marine/buoy-03/status", json.dumps(status).encode(), retain=True)
    pub.wait_all()

    def got() -> bool:
        return bool(influxd.query("SELECT * FROM node_status", db="twinedge")["results"][0].get("series"))

    wait_until(got, 20, "node_status point")
    s = influxd.query("SELECT * FROM node_status", db="twinedge")["results"][0]["series"][0]
    row = dict(zip(s["columns"], s["values"][0]))
    assert row["reset"] == "wdt" and row["faults"] == 1 and row["fault_list"] == "ph:timeout"
    assert row["battery_v"] == 3.65 and row["online"] is True and row["node"] == "buoy-03"
    assert gw.health()[0] == 200
    assert gw.stop() == 0


def test_alarm_band_crossings_are_written(mosquitto: Mosquitto, influxd: Influxd, start_gateway) -> None:
    gw = start_gateway(alarms={"marine": {"ph": {"lo": 7.5, "hi": 8.6}}})
    pub = Publisher(mosquitto.port)
    now = int(time.time())
    from gateway.decode import encode_compact
    from gateway.schema import MARINE

    rows = [(i, 0, 0x01, [ph, 0, 0, 0, 0, 0, 0]) for i, ph in enumerate([800, 810, 880, 890, 820, 700])]
    pub.publish("twin/copenhagen/marine/buoy-09/up", encode_compact(MARINE, "buoy-09", 1, now - 100, rows))
    pub.wait_all()

    def states() -> list[tuple[int, str]]:
        res = influxd.query("SELECT \"state\" FROM \"alarm\" WHERE \"node\" = 'buoy-09' AND \"field\" = 'ph'", db="twinedge")
        series = res["results"][0].get("series", [])
        return [(v[0], v[1]) for v in series[0]["values"]] if series else []

    wait_until(lambda: len(states()) == 4, 20, "four alarm state changes")
    assert states() == [(now - 100, "ok"), (now - 98, "high"), (now - 96, "ok"), (now - 95, "low")]
    assert gw.stop() == 0


def test_point_influxdb_refuses_is_dead_lettered_and_the_rest_written(mosquitto: Mosquitto, influxd: Influxd,
                                                                      start_gateway) -> None:
    import urllib.request

    from gateway.decode import encode_compact
    from gateway.schema import MARINE

    now = int(time.time())
    influxd.create_db("twinedge")
    # Someone else wrote `unsynced` as a string in this shard: our boolean will be refused (field type conflict).
    req = urllib.request.Request(f"{influxd.url}/write?db=twinedge&precision=s",
                                 data=f'marine,node=other unsynced="yes" {now}\n'.encode(), method="POST")
    urllib.request.urlopen(req, timeout=10).read()
    gw = start_gateway()
    pub = Publisher(mosquitto.port)
    rows = [(i, 1 if i == 3 else 0, 0x7F, [810, 1500, 700, 45000, 3100, 120, 3700]) for i in range(8)]
    pub.publish("twin/copenhagen/marine/buoy-05/up", encode_compact(MARINE, "buoy-05", 1, now - 50, rows))
    pub.wait_all()
    wait_until(lambda: counts_by_node(influxd, "marine", "ph").get("buoy-05") == 7, 20, "the 7 acceptable points")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "gateway", "dead-letters", "-c", str(gw.config_path), "--json"],
                       capture_output=True, text=True)
    items = [json.loads(line) for line in r.stdout.splitlines()]
    assert [i["reason"] for i in items] == ["influx_rejected"]
    assert "unsynced=true" in items[0]["item"]["line"] and f" {now - 47}" in items[0]["item"]["line"]
    assert "conflict" in items[0]["detail"]
    assert gw.stop() == 0


def test_v2_write_api_with_token_to_a_real_v2_server(mosquitto: Mosquitto, start_gateway,
                                                      tmp_path) -> None:
    from twinedge.services import VictoriaMetrics

    vm = VictoriaMetrics(tmp_path / "vm").start()
    try:
        gw = start_gateway(influx={"url": vm.url, "api": "v2", "org": "city", "bucket": "twinedge", "token": "t0ken"},
                           stats_interval_s=3600.0)
        assert gw is not None
        pub = Publisher(mosquitto.port)
        now = int(time.time())
        n = Node("copenhagen", "mobility", "count-02")
        pub.publish(n.topic, n.batch(6, now - 60))
        pub.wait_all()

        def exported() -> list[dict]:
            return vm.export('{__name__="mobility_vehicles"}')

        wait_until(lambda: sum(len(s["values"]) for s in exported()) == 6, 20, "6 points in VictoriaMetrics")
        series = exported()[0]
        assert series["metric"]["node"] == "count-02" and series["metric"]["city"] == "copenhagen"
        assert series["values"] == [1, 2, 3, 4, 5, 6]
        assert series["timestamps"][0] == (now - 60) * 1000
    finally:
        vm.stop()


def test_a_burst_is_written_when_it_ends_not_when_the_flush_interval_does(mosquitto: Mosquitto, influxd: Influxd,
                                                                          start_gateway) -> None:
    gw = start_gateway(influx={"flush_interval_s": 60.0, "batch_points": 100000})  # only the idle rule can flush
    pub = Publisher(mosquitto.port)
    buoy = Node("copenhagen", "marine", "buoy-01")
    pub.publish(buoy.topic, buoy.batch(10, int(time.time()) - 600))
    pub.wait_all()
    # Well inside the 60 s interval: written because the flow paused (5 ms), not because the interval ran out.
    wait_until(lambda: counts_by_node(influxd, "marine", "ph").get("buoy-01") == 10, 30, "points in InfluxDB")
    assert gw.stop(timeout=30) == 0


def test_gaps_and_duplicates_stay_counted_across_a_restart_and_a_crash(mosquitto: Mosquitto, influxd: Influxd,
                                                                       start_gateway) -> None:
    """The sequence state survives SIGTERM (snapshot) and SIGKILL (the log's readings after the snapshot)."""
    gw = start_gateway(stats_interval_s=3600.0)  # no periodic snapshot: the crash case relies on the log alone
    pub = Publisher(mosquitto.port)
    now = int(time.time())
    n = Node("copenhagen", "marine", "buoy-05")
    first, second, third, fourth = (n.batch(5, now - 300 + 10 * i) for i in range(4))  # seq 1-5, 6-10, 11-15, 16-20
    accepted = 'twinedge_readings_accepted_total{domain="marine"}'
    pub.publish(n.topic, first)
    pub.wait_all()
    wait_until(lambda: gw.metrics().get(accepted) == 5.0, 20, "first batch durable")
    gw.kill()  # crash: no snapshot was ever written
    gw.start()
    pub.publish(n.topic, first)  # a node resending what the gateway already holds
    pub.publish(n.topic, third)  # 6-10 never sent: a gap of 5
    pub.wait_all()
    wait_until(lambda: gw.metrics().get('twinedge_node_gaps{node="buoy-05"}') == 5.0, 20, "gap after the crash")
    assert gw.metrics().get('twinedge_node_duplicates{node="buoy-05"}') == 5.0
    assert gw.stop() == 0  # orderly stop: snapshot
    gw.start()
    pub.publish(n.topic, third)
    pub.publish(n.topic, fourth)
    pub.wait_all()
    wait_until(lambda: gw.metrics().get('twinedge_node_duplicates{node="buoy-05"}') == 10.0, 20, "duplicates after restart")
    assert gw.metrics().get('twinedge_node_gaps{node="buoy-05"}') == 5.0
    wait_until(lambda: counts_by_node(influxd, "marine", "ph").get("buoy-05") == 15, 30, "15 distinct points")
    assert gw.stop() == 0
