"""Two real cities mirroring each other: exactly once, policy-filtered on the wire, no loops,
reconciliation at 100 % that finds and replays a deleted range, bad batches dead-lettered,
and a partner outage that ends complete."""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
import pytest

from gateway.mirror_wire import encode_batch, Point
from tests.gateway.helpers import Node, Publisher, counts_by_node, times_for, wait_until
from tests.mirror.stack import RawTap, TwinStack, field_keys, own_db, partner_db, query_points
from twinedge.services import Influxd

CPH, TYG = "copenhagen", "tongyeong"
FORBIDDEN = ("battery_v", "conductivity_uscm")
# The issue asks for a 10-minute partner outage; CI runs a shorter one. Full length:
#   TWINEDGE_MIRROR_OUTAGE_S=600 .venv/bin/python -m pytest tests/mirror -m slow
OUTAGE_S = float(os.environ.get("TWINEDGE_MIRROR_OUTAGE_S", "20"))


@pytest.fixture
def stack(tmp_path: Path, influxd: Influxd) -> Iterator[TwinStack]:
    st = TwinStack(tmp_path, influxd).start_brokers()
    yield st
    st.stop()


def _hour_start(back_hours: int) -> int:
    now = int(time.time())
    return now - now % 3600 - back_hours * 3600


def _publish(pub: Publisher, nodes: list[Node], rounds: int, t0: int, per: int = 20) -> None:
    for k in range(rounds):
        for n in nodes:
            pub.publish(n.topic, n.batch(per, t0 + k * per))
    pub.wait_all()


def _expected(nodes: list[Node]) -> dict[str, int]:
    return {n.node: len(n.published) for n in nodes}


def _metric(stack: TwinStack, city: str, name: str) -> float:
    return stack.gw(city).metrics().get(name, float("nan"))


def test_two_cities_mirror_exactly_once_filtered_no_loops_reconciled(stack: TwinStack, influxd: Influxd) -> None:
    taps = {c: RawTap(stack.sides[c].broker.port) for c in (CPH, TYG)}
    stack.start_gateway(CPH)
    stack.start_gateway(TYG)
    cph_nodes = [Node(CPH, "marine", f"buoy-{i:02d}") for i in range(4)]
    tyg_nodes = [Node(TYG, "marine", f"tyg-buoy-{i:02d}") for i in range(3)]
    cph_mob = Node(CPH, "mobility", "counter-01")  # mobility is not in the Blue City policy
    t0 = _hour_start(3)  # two closed hours of readings, so reconciliation compares them at once
    pubs = {c: Publisher(stack.sides[c].broker.port, f"pub-{c}") for c in (CPH, TYG)}
    _publish(pubs[CPH], cph_nodes, 200, t0, per=20)   # 4000 readings per node over ~1.1 h
    _publish(pubs[CPH], [cph_mob], 20, t0)
    _publish(pubs[TYG], tyg_nodes, 100, t0 + 600, per=20)

    # All allowed data arrives exactly once, in both directions, tagged with its origin.
    exp_cph, exp_tyg = _expected(cph_nodes), _expected(tyg_nodes)
    wait_until(lambda: counts_by_node(influxd, "marine", "ph", db=partner_db(TYG)) == exp_cph, 90,
               f"{sum(exp_cph.values())} Copenhagen readings at Tongyeong")
    wait_until(lambda: counts_by_node(influxd, "marine", "ph", db=partner_db(CPH)) == exp_tyg, 60,
               f"{sum(exp_tyg.values())} Tongyeong readings at Copenhagen")
    for n in cph_nodes[:2]:
        assert times_for(influxd, "marine", n.node, "ph", db=partner_db(TYG)) == sorted(n.published.values())
    origins = query_points(influxd, partner_db(TYG), 'SELECT count("ph") FROM "marine" GROUP BY "origin", "city"')
    assert [(p["origin"], p["city"]) for p in origins] == [(CPH, CPH)]

    # Transforms: rounded as the policy says (water_temp_c to 0.1), coarse site.
    own = {p["time"]: p for p in query_points(influxd, own_db(CPH), "SELECT * FROM marine WHERE node = 'buoy-01'")}
    theirs = query_points(influxd, partner_db(TYG), "SELECT * FROM marine WHERE node = 'buoy-01'")
    assert len(theirs) == len(own)
    for p in theirs[:300]:
        assert p["water_temp_c"] == round(own[p["time"]]["water_temp_c"], 1)
        assert p["ph"] == own[p["time"]]["ph"]

    # Forbidden fields: absent at the partner and on the wire (raw subscriber on the partner's broker).
    assert not set(FORBIDDEN) & field_keys(influxd, partner_db(TYG), "marine")
    wire = taps[TYG].batches()
    assert sum(m["points"] for t, m, _p, _b in wire if t == f"mirror/{TYG}/{CPH}/batch") >= sum(exp_cph.values())
    for _t, _m, points, body in wire:
        for f in FORBIDDEN:
            assert f.encode() not in body
        assert all(not set(FORBIDDEN) & set(p.fields) for p in points)
    # Not shared by the policy: nothing of the mobility domain left Copenhagen.
    assert not any(p.m == "mobility" for _t, _m, pts, _b in wire for p in pts)
    assert query_points(influxd, partner_db(TYG), "SELECT count(*) FROM mobility") == []

    # No loops: Tongyeong never sent Copenhagen's data back, and nothing in either own DB has an origin.
    back = [p for t, _m, pts, _b in taps[CPH].batches() for p in pts]
    assert back and all(p.tags["city"] == TYG for p in back)
    for c in (CPH, TYG):
        assert query_points(influxd, own_db(c), 'SELECT count("ph") FROM "marine" WHERE "origin" != \'\'') == []
    assert query_points(influxd, partner_db(CPH), f"SELECT count(ph) FROM marine WHERE city = '{CPH}'") == []

    # Reconciliation: the partner holds 100.00 % of what each city sent (metric and InfluxDB field).
    for c in (CPH, TYG):
        wait_until(lambda c=c: _metric(stack, c, "twinedge_mirror_completeness") == 1.0
                   and _metric(stack, c, "twinedge_mirror_compared_points") >= sum((exp_cph if c == CPH else exp_tyg).values()),
                   60, f"{c}: reconciliation at 100 %")
    wait_until(lambda: any(p.get("last") == 1.0 for p in query_points(
        influxd, own_db(CPH), "SELECT last(mirror_completeness) FROM gateway")), 30, "mirror_completeness in InfluxDB")

    # A deliberately deleted range at the partner is found and replayed.
    victim = cph_nodes[1]
    lo, hi = t0 + 600, t0 + 1800
    in_range = sum(1 for t in victim.published.values() if lo <= t < hi)
    influxd.query(f"DELETE FROM marine WHERE node = '{victim.node}' AND time >= {lo}s AND time < {hi}s",
                  db=partner_db(TYG), method="POST")
    assert counts_by_node(influxd, "marine", "ph", db=partner_db(TYG))[victim.node] == exp_cph[victim.node] - in_range
    wait_until(lambda: _metric(stack, CPH, "twinedge_mirror_replayed_points_total") >= in_range, 60,
               "reconciliation to find the deleted range and replay it")
    wait_until(lambda: counts_by_node(influxd, "marine", "ph", db=partner_db(TYG)) == exp_cph, 60, "replayed range")
    assert times_for(influxd, "marine", victim.node, "ph", db=partner_db(TYG)) == sorted(victim.published.values())
    wait_until(lambda: _metric(stack, CPH, "twinedge_mirror_completeness") == 1.0, 60, "100 % again after replay")

    # Bad batches are rejected with a reason (dead-letter at the receiver), nothing is written.
    bad_pt = [Point("marine", {"city": "oslo", "domain": "marine", "node": "x-1"}, t0, {"ph": 7.0}, 1)]
    base = {"dest": TYG, "policy": "blue-city-twins", "policy_version": 1, "created": 0, "replay": False}
    unknown, _ = encode_batch({**base, "origin": "oslo", "batch": "zz-1"}, bad_pt)
    good_pt = [Point("marine", {"city": CPH, "domain": "marine", "node": "evil-1"}, t0, {"ph": 7.0}, 1)]
    broken, _ = encode_batch({**base, "origin": CPH, "batch": "zz-2"}, good_pt)
    broken = broken[:-3] + bytes(b ^ 0xFF for b in broken[-3:])
    forbidden_pt = [Point("marine", {"city": CPH, "domain": "marine", "node": "evil-2"}, t0, {"ph": 7.0, "battery_v": 3.7}, 1)]
    forbidden, _ = encode_batch({**base, "origin": CPH, "batch": "zz-3"}, forbidden_pt)
    raw = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="evil")
    raw.connect("127.0.0.1", stack.sides[TYG].broker.port)
    raw.loop_start()
    for t, payload in ((f"mirror/{TYG}/oslo/batch", unknown), (f"mirror/{TYG}/{CPH}/batch", broken),
                       (f"mirror/{TYG}/{CPH}/batch", forbidden)):
        raw.publish(t, payload, qos=1).wait_for_publish(5)
    raw.loop_stop()
    raw.disconnect()
    wait_until(lambda: {r for s, r, _d in stack.dead_letters(TYG) if s == "mirror"} >= {"unknown_partner", "hash", "policy"},
               30, "dead letters for the unknown partner, broken hash and forbidden field")
    details = {r: d for s, r, d in stack.dead_letters(TYG) if s == "mirror"}
    assert "oslo" in details["unknown_partner"] and "battery_v" in details["policy"]
    assert query_points(influxd, partner_db(TYG), "SELECT count(ph) FROM marine WHERE node =~ /evil|x-1/") == []

    for c in (CPH, TYG):
        assert stack.gw(c).stop() == 0
    for tap in taps.values():
        tap.close()


def _outage(stack: TwinStack, influxd: Influxd, what: str, seconds: float) -> None:
    stack.start_gateway(CPH)
    stack.start_gateway(TYG)
    nodes = [Node(CPH, "marine", f"buoy-{i:02d}") for i in range(5)]
    pub = Publisher(stack.sides[CPH].broker.port, "outage-pub")
    t0 = _hour_start(3)
    _publish(pub, nodes, 10, t0)
    wait_until(lambda: sum(counts_by_node(influxd, "marine", "ph", db=partner_db(TYG)).values()) > 0, 60, "first mirrored")
    if what == "broker":
        stack.sides[TYG].broker.stop()
    else:
        stack.gw(TYG).kill()
    start = time.monotonic()
    k = 10
    while time.monotonic() - start < seconds:  # Copenhagen keeps receiving readings all through the outage
        _publish(pub, nodes, 1, t0 + k * 20)
        k += 1
        time.sleep(0.5)
    # Meanwhile Copenhagen's own InfluxDB was not blocked.
    wait_until(lambda: counts_by_node(influxd, "marine", "ph", db=own_db(CPH)) == _expected(nodes), 60, "own DB complete")
    assert _metric(stack, CPH, "twinedge_mirror_pending_batches") > 0
    assert _metric(stack, CPH, "twinedge_mirror_lag_seconds") > 0
    if what == "broker":
        stack.sides[TYG].broker.start()
    else:
        stack.start_gateway(TYG)
    wait_until(lambda: counts_by_node(influxd, "marine", "ph", db=partner_db(TYG)) == _expected(nodes), 120,
               "partner complete after the outage")
    wait_until(lambda: _metric(stack, CPH, "twinedge_mirror_pending_batches") == 0, 60, "no pending batches")
    wait_until(lambda: _metric(stack, CPH, "twinedge_mirror_completeness") == 1.0, 60, "reconciled at 100 %")
    pub.close()


def test_partner_broker_outage_ends_complete(stack: TwinStack, influxd: Influxd) -> None:
    _outage(stack, influxd, "broker", OUTAGE_S)


def test_partner_gateway_outage_ends_complete(stack: TwinStack, influxd: Influxd) -> None:
    _outage(stack, influxd, "gateway", min(OUTAGE_S, 15))


@pytest.mark.slow
@pytest.mark.skipif(OUTAGE_S < 600, reason="set TWINEDGE_MIRROR_OUTAGE_S=600 for the full 10-minute outage")
def test_partner_outage_10_minutes(stack: TwinStack, influxd: Influxd) -> None:
    _outage(stack, influxd, "broker", OUTAGE_S)


def test_aggregated_policy_sends_bins_only(tmp_path: Path, influxd: Influxd) -> None:
    """Smart Mobility Twins: 15-minute bins with count/mean/max; per-interval counts never leave."""
    from tests.mirror.stack import REPO

    st = TwinStack(tmp_path, influxd, policy=REPO / "docs" / "policies" / "smart-mobility-twins.toml",
                   cities=("helsinki", "amsterdam")).start_brokers()
    try:
        tap = RawTap(st.sides["amsterdam"].broker.port)
        st.start_gateway("helsinki")
        st.start_gateway("amsterdam")
        node = Node("helsinki", "mobility", "counter-07")
        pub = Publisher(st.sides["helsinki"].broker.port, "agg-pub")
        t0 = _hour_start(2)
        _publish(pub, [node], 12, t0, per=10)  # readings every second for 120 s: one 15-minute bin
        _publish(pub, [node], 6, t0 + 1800, per=10)  # 60 more in the bin at +30 min
        own = query_points
        # A closed bin is sent as soon as readings arrive and re-sent (cumulative) as more arrive: wait for the end state.
        wait_until(lambda: [b.get("vehicles_count") for b in own(influxd, partner_db("amsterdam"), "SELECT * FROM mobility")]
                   == [120, 60], 60, "two complete bins")
        wait_until(lambda: len(own(influxd, own_db("helsinki"), "SELECT * FROM mobility")) == 180, 30, "own raw readings")
        bins = own(influxd, partner_db("amsterdam"), "SELECT * FROM mobility")
        raw = own(influxd, own_db("helsinki"), "SELECT * FROM mobility")
        assert [b["time"] for b in bins] == [t0, t0 + 1800]
        first = [r for r in raw if r["time"] < t0 + 900]
        assert bins[0]["vehicles_count"] == len(first) == 120
        assert bins[0]["vehicles_max"] == max(r["vehicles"] for r in first)
        assert bins[0]["vehicles_mean"] == pytest.approx(sum(r["vehicles"] for r in first) / 120)
        assert bins[0]["speed_mean_kmh_mean"] == round(sum(r["speed_mean_kmh"] for r in first) / 120)
        keys = field_keys(influxd, partner_db("amsterdam"), "mobility")
        assert "vehicles_mean" in keys and not {"vehicles", "pedestrians_count", "battery_v_mean", "pedestrians"} & keys
        for _t, _m, points, body in tap.batches():
            assert b"pedestrians" not in body and all(p.t % 900 == 0 for p in points)
        wait_until(lambda: st.gw("helsinki").metrics().get("twinedge_mirror_completeness") == 1.0, 60, "reconciled bins")
        tap.close()
        pub.close()
    finally:
        st.stop()
