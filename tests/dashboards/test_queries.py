"""Every panel and variable query of every dashboard, executed against a real InfluxDB 1.6.7.

The databases are filled by two real gateways (`twinedge gateway run`) from simulated nodes
(see stack.py). Queries are rendered the way Grafana's InfluxDB datasource renders them, for
every value of every variable (each single value and All), in both cities' Grafana (the
datasource uids point at the other database when the partner looks).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from dashboards.build import build_city
from dashboards.config import load_cities
from dashboards.influxql import INFLUX_TYPE, TimeRange, expected_columns, interpolate
from dashboards.lint import panels
from provisioning.registry import load_registry
from tests.dashboards.stack import CITIES, NODES, Stack, select, write_cities

Vars = dict[str, tuple[Sequence[str], bool]]


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory, registry_dir: Path, stack: Stack) -> dict[str, Any]:
    cities = load_cities(write_cities(tmp_path_factory.mktemp("cfg") / "cities.toml", stack.influxd.url))
    nodes = list(load_registry(registry_dir).values())
    return {c: build_city(cities, cities.get(c), nodes) for c in CITIES}


def time_range(stack: Stack) -> TimeRange:
    # 1 s buckets: the gateways ran for seconds, and per-interval differences need two buckets.
    return TimeRange((stack.t_start - 60) * 1000, (int(time.time()) + 60) * 1000, "1s")


def variable_values(stack: Stack, dbs: Mapping[str, str], var: dict[str, Any], ctx: Vars, rng: TimeRange) -> list[str]:
    query = interpolate(var["query"], ctx, rng)
    series = select(stack.influxd, dbs[var["datasource"]["uid"]], query)
    # Grafana takes the last column of SHOW TAG VALUES (key, value) and the first of SHOW FIELD KEYS.
    col = -1 if query.startswith("SHOW TAG VALUES") else 0
    values = sorted({str(row[col]) for s in series for row in s["values"]})
    if var.get("regex"):
        rx = re.compile(var["regex"].strip("/"))
        values = [v for v in values if rx.search(v)]
    return values


def contexts(stack: Stack, dbs: Mapping[str, str], model: dict[str, Any], rng: TimeRange) -> Iterator[Vars]:
    variables = model["templating"]["list"]

    def rec(i: int, ctx: Vars) -> Iterator[Vars]:
        if i == len(variables):
            yield ctx
            return
        var = variables[i]
        values = variable_values(stack, dbs, var, ctx, rng)
        assert values, f"{model['uid']}: variable {var['name']} has no values for {ctx}: {var['query']}"
        multi = bool(var.get("multi") or var.get("includeAll"))
        options: list[list[str]] = [[v] for v in values] + ([values] if multi and len(values) > 1 else [])
        for opt in options:
            yield from rec(i + 1, {**ctx, var["name"]: (opt, multi)})

    yield from rec(0, {})


def check_target(stack: Stack, dbs: Mapping[str, str], model: dict[str, Any], panel: dict[str, Any],
                 target: dict[str, Any], ctx: Vars, rng: TimeRange) -> list[dict[str, Any]]:
    where = f"{model['uid']} panel {panel['id']} {panel['title']!r} target {target['refId']} with {dict((k, v[0]) for k, v in ctx.items())}"
    query = interpolate(target["query"], ctx, rng)
    uid = (target.get("datasource") or panel["datasource"])["uid"]
    series = select(stack.influxd, dbs[uid], query)
    assert series, f"{where}: no result for {query}"
    cols, tags = expected_columns(target["query"])
    for s in series:
        assert s["columns"] == ["time", *cols], f"{where}: columns {s['columns']} != {['time', *cols]}"
        assert sorted(s.get("tags", {})) == sorted(tags), f"{where}: tags {s.get('tags')} != {tags}"
    assert any(v is not None for s in series for row in s["values"] for v in row[1:]), f"{where}: only nulls"
    return series


@pytest.mark.parametrize("home", CITIES)
def test_every_query_answers_for_every_variable_value(stack: Stack, builds: dict[str, Any], home: str) -> None:
    rng = time_range(stack)
    dbs = stack.db_for(home)
    executed = 0
    for rendered in builds[home].dashboards:
        model = rendered.model
        combos = 0
        for ctx in contexts(stack, dbs, model, rng):
            combos += 1
            for panel in panels(model):
                for target in panel.get("targets", []):
                    if (target.get("datasource") or panel["datasource"])["type"] != INFLUX_TYPE:
                        continue
                    series = check_target(stack, dbs, model, panel, target, ctx, rng)
                    executed += 1
                    if panel["type"] == "geomap":
                        check_map_join(model, panel, series, ctx)
        assert combos >= 2, f"{model['uid']}: expected several variable combinations, got {combos}"
    print(f"{home}: executed {executed} queries")
    assert executed > 200, executed


def check_map_join(model: dict[str, Any], panel: dict[str, Any], series: list[dict[str, Any]], ctx: Vars) -> None:
    snap = next(t for t in panel["targets"] if t.get("queryType") == "snapshot")["snapshot"][0]
    names = [f["name"] for f in snap["schema"]["fields"]]
    frame = dict(zip(names, snap["data"]["values"]))
    city = ctx["city"][0][0]
    in_frame = {n for n, c in zip(frame["node"], frame["city"]) if c == city}
    reporting = {s["tags"]["node"] for s in series}
    assert reporting and reporting <= in_frame, f"{model['uid']}: map join would drop {reporting - in_frame}"
    for node, lat, lon in zip(frame["node"], frame["latitude"], frame["longitude"]):
        sim = next(n for n in NODES if n.id == node)
        assert (lat, lon) == (sim.lat, sim.lon)


def test_registry_nodes_of_the_pair_are_on_the_maps(builds: dict[str, Any]) -> None:
    for home in CITIES:
        for r in builds[home].dashboards:
            for p in panels(r.model):
                if p["type"] != "geomap":
                    continue
                snap = next(t for t in p["targets"] if t.get("queryType") == "snapshot")["snapshot"][0]
                nodes = snap["data"]["values"][0]
                domain = r.uid.removeprefix("twinedge-")
                assert nodes == sorted(n.id for n in NODES if n.domain == domain), (r.uid, nodes)


def test_queries_see_what_the_gateway_wrote(stack: Stack, builds: dict[str, Any]) -> None:
    """Spot-check values, not only shapes: the completeness gap and the dead-letter show."""
    rng = time_range(stack)
    fleet = next(r.model for r in builds["copenhagen"].dashboards if r.uid == "twinedge-fleet")
    p4 = next(p for p in panels(fleet) if p["id"] == 4)
    ctx: Vars = {"city": (["copenhagen"], False), "node": (["buoy-01", "buoy-02", "cnt-01"], True)}
    series = check_target(stack, stack.db_for("copenhagen"), fleet, p4, p4["targets"][0], ctx, rng)
    got = {s["tags"]["node"]: s["values"][0][1] for s in series}
    assert got["buoy-01"] == pytest.approx(19 / 20) and got["buoy-02"] == 1.0, got
    p24 = next(p for p in panels(fleet) if p["id"] == 24)
    series = check_target(stack, stack.db_for("copenhagen"), fleet, p24, p24["targets"][0], ctx, rng)
    assert series[0]["values"][0][1] >= 1, "the refused message should count as a dead-letter"
    p3 = next(p for p in panels(fleet) if p["id"] == 3)
    series = check_target(stack, stack.db_for("copenhagen"), fleet, p3, p3["targets"][0], ctx, rng)
    ages = {s["tags"]["node"]: s["values"][0][1] for s in series}
    newest = stack.t_start + 60 * 19  # the last reading of every node
    assert ages == {n: rng.to_ms // 1000 - newest for n in ("buoy-01", "buoy-02", "cnt-01")}, ages
