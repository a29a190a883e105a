"""The four TwinEdge dashboards: Marine, Mobility, Fleet health, Twin view.

One JSON serves both cities of a pair: datasources by fixed uid (`influx-home` is the
city's own InfluxDB, `influx-partner` the partner's), the city chosen by a template
variable, fixed dashboard uids and panel ids (never renumber an existing panel: Grafana
links, annotations and user bookmarks point at `viewPanel=<id>`).

Field names and units come from `gateway.schema`, tags/measurements from
docs/influx-schema.md.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import geomap, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import geomap as gm
from grafana_foundation_sdk.models.common import DataSourceRef

from dashboards.influxql import HOME, PARTNER, InfluxQL, Snapshot, ds
from gateway.alarms import DEFAULT_BANDS
from gateway.schema import SCHEMAS_BY_DOMAIN
from provisioning.registry import Node

MIXED = DataSourceRef(type_val="datasource", uid="-- Mixed --")
TAGS = ["twinedge", "generated"]
REFRESH = "1m"
TIME_FROM = "now-6h"

# Grafana unit ids for the schema's human units; anything else becomes an explicit suffix.
UNIT_IDS = {"°C": "celsius", "V": "volt", "km/h": "velocitykmh", "s": "s", "count": "short", "pH": "none"}

# Operational alarm bands (lo, hi) drawn as thresholds: the gateway's default [alarms] bands, one source.
LIMITS: dict[str, tuple[float | None, float | None]] = dict(DEFAULT_BANDS["marine"])

TITLES = {
    "ph": "pH",
    "do_mgl": "Dissolved oxygen",
    "water_temp_c": "Water temperature",
    "salinity_psu": "Salinity",
    "turbidity_ntu": "Turbidity",
    "conductivity_uscm": "Conductivity",
    "battery_v": "Battery",
    "vehicles": "Vehicles",
    "bikes": "Bikes",
    "pedestrians": "Pedestrians",
}


def unit(domain: str, field: str) -> str:
    f = SCHEMAS_BY_DOMAIN[domain].field(field)
    if f is None:
        raise KeyError(f"{field} is not a {domain} field")
    return UNIT_IDS.get(f.unit, f"suffix:{f.unit}")


class Grid:
    """Flow layout: left to right, wrapping at 24 columns; rows take a full line."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.line_h = 0

    def _newline(self) -> None:
        self.y += self.line_h
        self.x = 0
        self.line_h = 0

    def row(self) -> dm.GridPos:
        self._newline()
        pos = dm.GridPos(h=1, w=24, x=0, y=self.y)
        self.y += 1
        return pos

    def place(self, w: int, h: int) -> dm.GridPos:
        if self.x + w > 24:
            self._newline()
        pos = dm.GridPos(h=h, w=w, x=self.x, y=self.y)
        self.x += w
        self.line_h = max(self.line_h, h)
        return pos


def thresholds(lo: float | None, hi: float | None) -> db.ThresholdsConfig:
    steps = [dm.Threshold(None, "red" if lo is not None else "green")]
    if lo is not None:
        steps.append(dm.Threshold(lo, "green"))
    if hi is not None:
        steps.append(dm.Threshold(hi, "red"))
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps)


def steps(*pairs: tuple[float | None, str]) -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps([dm.Threshold(v, c) for v, c in pairs])


def q(query: str, ref: str = "A", uid: str = HOME, alias: str | None = None) -> InfluxQL:
    b = InfluxQL(query).ref_id(ref).datasource(ds(uid))
    return b.alias(alias) if alias else b


def qt(query: str, ref: str = "A", uid: str = HOME) -> InfluxQL:
    return InfluxQL(query).ref_id(ref).datasource(ds(uid)).table()


def series_query(
    measurement: str, field: str, where: str, agg: str = "mean", by: str = '"node"', fill: str = "null", name: str | None = None
) -> str:
    group = f"time($__interval), {by}" if by else "time($__interval)"
    return (
        f'SELECT {agg}("{field}") AS "{name or field}" FROM "{measurement}" '
        f"WHERE {where} AND $timeFilter GROUP BY {group} fill({fill})"
    )


def ts_panel(pid: int, title: str, pos: dm.GridPos, unit_id: str, uid: str = HOME) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .id(pid)
        .title(title)
        .grid_pos(pos)
        .datasource(ds(uid))
        .unit(unit_id)
        .line_width(1)
        .fill_opacity(10)
        .span_nulls(False)
        .legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST).placement(cm.LegendPlacement.BOTTOM).show_legend(True))
        .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
    )


def stat_panel(pid: int, title: str, pos: dm.GridPos, unit_id: str, uid: str = HOME, calc: str = "lastNotNull") -> stat.Panel:
    return (
        stat.Panel()
        .id(pid)
        .title(title)
        .grid_pos(pos)
        .datasource(ds(uid))
        .unit(unit_id)
        .graph_mode(cm.BigValueGraphMode.NONE)
        .color_mode(cm.BigValueColorMode.VALUE)
        .reduce_options(cb.ReduceDataOptions().calcs([calc]).values(False))
    )


def table_panel(pid: int, title: str, pos: dm.GridPos, uid: str = HOME) -> table.Panel:
    return table.Panel().id(pid).title(title).grid_pos(pos).datasource(ds(uid)).unit("short")


def transform(id_val: str, options: dict[str, object]) -> dm.DataTransformerConfig:
    return dm.DataTransformerConfig(id_val=id_val, options=options)


def var_query(name: str, label: str, query: str, uid: str = HOME, multi: bool = False, regex: str | None = None) -> db.QueryVariable:
    v = (
        db.QueryVariable(name)
        .label(label)
        .datasource(ds(uid))
        .query(query)
        .definition(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(multi)
        .include_all(multi)
    )
    return v.regex(regex) if regex else v


def new_dashboard(uid: str, title: str, description: str) -> db.Dashboard:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # classic model on purpose (v2 needs Grafana 12 /apis)
        d = db.Dashboard(title)
    return (
        d.uid(uid)
        .description(description)
        .tags(TAGS)
        .refresh(REFRESH)
        .time(TIME_FROM, "now")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .editable()
    )


# ---------------------------------------------------------------- node map (registry)


def registry_frame(nodes: Iterable[Node], domain: str, cities: Iterable[str]) -> dict[str, object]:
    """Registry coordinates as one Grafana data frame (node, latitude, longitude, site, city)."""
    wanted = set(cities)
    rows = sorted(
        (n for n in nodes if n.domain == domain and n.city in wanted and not n.retired and n.lat is not None and n.lon is not None),
        key=lambda n: (n.city, n.id),
    )
    names = ("node", "latitude", "longitude", "site", "city")
    types = ("string", "number", "number", "string", "string")
    values: list[list[object]] = [
        [n.id for n in rows],
        [n.lat for n in rows],
        [n.lon for n in rows],
        [n.site for n in rows],
        [n.city for n in rows],
    ]
    return {
        "schema": {"name": f"registry-{domain}", "refId": "B", "fields": [{"name": k, "type": t} for k, t in zip(names, types)]},
        "data": {"values": values},
    }


def node_map(pid: int, title: str, pos: dm.GridPos, domain: str, latest_fields: list[str], frame: dict[str, object]) -> geomap.Panel:
    select = ", ".join(f'last("{f}") AS "{f}"' for f in latest_fields)
    latest = f'SELECT {select} FROM "{domain}" WHERE "city" = \'$city\' AND $timeFilter GROUP BY "node"'
    return (
        geomap.Panel()
        .id(pid)
        .title(title)
        .description("Positions from the node registry (embedded at build time), joined by node with the newest readings.")
        .grid_pos(pos)
        .datasource(MIXED)
        .unit("none")
        .with_target(qt(latest, "A"))
        .with_target(Snapshot("B", frame))
        # Inner join: only the selected city's nodes that reported in the time range get a marker.
        .with_transformation(transform("joinByField", {"byField": "node", "mode": "inner"}))
        .view(geomap.MapViewConfig().id("fit").zoom(10).all_layers(True))
        .controls(geomap.ControlsOptions().show_zoom(True).mouse_wheel_zoom(True).show_attribution(True))
        .basemap(cb.MapLayerOptions().type("default").name("Basemap"))
        .layers(
            [
                cb.MapLayerOptions()
                .type("markers")
                .name("Nodes")
                .location(cb.FrameGeometrySource().mode(cm.FrameGeometrySourceMode.COORDS).latitude("latitude").longitude("longitude"))
                .config({"showLegend": False, "style": {"size": {"fixed": 8}, "text": {"field": "node", "mode": "field"}}})
                .tooltip(True)
            ]
        )
        .tooltip(geomap.TooltipOptions().mode(gm.TooltipMode.DETAILS))
    )


def value_map(options: Mapping[str, tuple[str | None, str]]) -> dm.ValueMap:
    """Text -> (display text, colour). Mappings live in the field defaults: the schema only allows
    object values in overrides, and these keys only ever match one column."""
    return dm.ValueMap(
        {k: dm.ValueMappingResult(text=t, color=c, index=i) for i, (k, (t, c)) in enumerate(options.items())}
    )


def coloured_table(pid: int, title: str, pos: dm.GridPos, mapping: dm.ValueMap) -> table.Panel:
    return (
        table_panel(pid, title, pos)
        .mappings([mapping])
        .cell_options(cm.TableColorTextCellOptions())
        .thresholds(steps((None, "text")))  # unmapped cells keep the normal text colour
    )


def alarm_table(pid: int, pos: dm.GridPos, domain: str) -> table.Panel:
    query = (
        'SELECT last("state") AS "state", last("value") AS "value", last("lo") AS "lo", last("hi") AS "hi" '
        f'FROM "alarm" WHERE "city" = \'$city\' AND "domain" = \'{domain}\' AND "node" =~ /^$node$/ AND $timeFilter '
        'GROUP BY "node", "field"'
    )
    mapping = value_map({"ok": ("OK", "green"), "low": ("LOW", "red"), "high": ("HIGH", "red")})
    return (
        coloured_table(pid, "Alarm states", pos, mapping)
        .description("Latest alarm state per node and field (written by the gateway when a reading crosses its [alarms] band).")
        .with_target(qt(query))
    )


# ---------------------------------------------------------------- dashboards


def marine(frame: dict[str, object]) -> db.Dashboard:
    where = "\"city\" = '$city' AND \"node\" =~ /^$node$/"
    g = Grid()
    d = new_dashboard("twinedge-marine", "TwinEdge / Marine", "Water quality per buoy, alarm states and buoy map.")
    d = d.with_variable(var_query("city", "City", 'SHOW TAG VALUES FROM "marine" WITH KEY = "city"'))
    d = d.with_variable(var_query("node", "Buoy", 'SHOW TAG VALUES FROM "marine" WITH KEY = "node" WHERE "city" = \'$city\'', multi=True))
    d = d.with_row(db.Row("Buoys").id(1).grid_pos(g.row()))
    d = d.with_panel(node_map(2, "Buoys", g.place(12, 10), "marine", ["ph", "do_mgl", "water_temp_c", "battery_v"], frame))
    d = d.with_panel(alarm_table(3, g.place(12, 10), "marine"))
    d = d.with_row(db.Row("Water quality").id(10).grid_pos(g.row()))
    for pid, field in zip(range(11, 17), ("ph", "do_mgl", "water_temp_c", "salinity_psu", "turbidity_ntu", "conductivity_uscm")):
        p = ts_panel(pid, TITLES[field], g.place(12, 8), unit("marine", field))
        p = p.with_target(q(series_query("marine", field, where), alias="$tag_node"))
        if field in LIMITS:
            p = p.thresholds(thresholds(*LIMITS[field])).thresholds_style(
                cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED)
            )
        d = d.with_panel(p)
    d = d.with_row(db.Row("Power").id(20).grid_pos(g.row()))
    d = d.with_panel(
        ts_panel(21, "Battery", g.place(24, 6), unit("marine", "battery_v"))
        .with_target(q(series_query("marine", "battery_v", where), alias="$tag_node"))
        .thresholds(thresholds(*LIMITS["battery_v"]))
    )
    return d


def mobility(frame: dict[str, object]) -> db.Dashboard:
    where = "\"city\" = '$city' AND \"node\" =~ /^$node$/"
    g = Grid()
    d = new_dashboard("twinedge-mobility", "TwinEdge / Mobility", "Traffic counts per counter and interval, speeds, counter map.")
    d = d.with_variable(var_query("city", "City", 'SHOW TAG VALUES FROM "mobility" WITH KEY = "city"'))
    d = d.with_variable(var_query("node", "Counter", 'SHOW TAG VALUES FROM "mobility" WITH KEY = "node" WHERE "city" = \'$city\'', multi=True))
    d = d.with_row(db.Row("Totals").id(1).grid_pos(g.row()))
    totals = (
        'SELECT sum("vehicles") AS "vehicles", sum("bikes") AS "bikes", sum("pedestrians") AS "pedestrians" '
        f'FROM "mobility" WHERE {where} AND $timeFilter'
    )
    d = d.with_panel(
        stat_panel(2, "Counted in range", g.place(12, 6), unit("mobility", "vehicles"), calc="sum")
        .with_target(qt(totals))
        .reduce_options(cb.ReduceDataOptions().calcs(["sum"]).values(False).fields("/^(vehicles|bikes|pedestrians)$/"))
        .thresholds(steps((None, "blue")))
    )
    d = d.with_panel(node_map(3, "Counters", g.place(12, 6), "mobility", ["vehicles", "bikes", "pedestrians"], frame))
    d = d.with_row(db.Row("Counts per interval").id(10).grid_pos(g.row()))
    for pid, field in zip((11, 12, 13), ("vehicles", "bikes", "pedestrians")):
        p = (
            ts_panel(pid, f"{TITLES[field]} per interval", g.place(8, 8), unit("mobility", field))
            .description("Sum of the counters' per-interval counts within each display interval.")
            .draw_style(cm.GraphDrawStyle.BARS)
            .with_target(q(series_query("mobility", field, where, agg="sum", fill="0"), alias="$tag_node"))
        )
        d = d.with_panel(p)
    d = d.with_row(db.Row("Speed").id(20).grid_pos(g.row()))
    d = d.with_panel(
        ts_panel(21, "Speed: mean and p85", g.place(24, 8), unit("mobility", "speed_mean_kmh"))
        .description("Mean of the counters' interval mean speed and of their interval 85th percentile.")
        .with_target(q(series_query("mobility", "speed_mean_kmh", where), "A", alias="$tag_node mean"))
        .with_target(q(series_query("mobility", "speed_p85_kmh", where), "B", alias="$tag_node p85"))
    )
    d = d.with_panel(
        ts_panel(22, "Battery", g.place(24, 6), unit("mobility", "battery_v"))
        .with_target(q(series_query("mobility", "battery_v", where), alias="$tag_node"))
        .thresholds(thresholds(*LIMITS["battery_v"]))
    )
    d = d.with_row(db.Row("Alarms").id(30).grid_pos(g.row()))
    d = d.with_panel(alarm_table(31, g.place(24, 8), "mobility"))
    return d


RESET_COLOURS = {"power_on": "green", "soft": "green", "deepsleep": "green", "hard": "orange",
                 "wdt": "red", "brownout": "red", "unknown": "orange"}


def fleet() -> db.Dashboard:
    where = "\"city\" = '$city' AND \"node\" =~ /^$node$/"
    g = Grid()
    d = new_dashboard(
        "twinedge-fleet", "TwinEdge / Fleet health",
        "Node status, completeness, staleness and gateway health for one city.",
    )
    d = d.with_variable(var_query("city", "City", 'SHOW TAG VALUES FROM "node_status" WITH KEY = "city"'))
    d = d.with_variable(var_query("node", "Node", 'SHOW TAG VALUES FROM "node_status" WITH KEY = "node" WHERE "city" = \'$city\'', multi=True))

    d = d.with_row(db.Row("Nodes").id(1).grid_pos(g.row()))
    status = (
        'SELECT last("online") AS "online", last("fw") AS "fw", last("reset") AS "reset", last("buf") AS "buf", '
        'last("drop") AS "drop", last("faults") AS "faults", last("fault_list") AS "fault_list" '
        f'FROM "node_status" WHERE {where} AND $timeFilter GROUP BY "node", "domain"'
    )
    status_map: dict[str, tuple[str | None, str]] = {"true": ("online", "green"), "false": ("OFFLINE", "red")}
    status_map |= {k: (None, c) for k, c in RESET_COLOURS.items()}
    d = d.with_panel(
        coloured_table(2, "Node status (latest)", g.place(24, 7), value_map(status_map))
        .description("reset: cause of the node's last restart (wdt/brownout in red). buf: readings waiting on the node.")
        .with_target(qt(status))
    )
    # Grafana renders ${__to:date:seconds} as the end of the time range: the age is relative to "now".
    age = (
        'SELECT ${__to:date:seconds} - last("last_seen") AS "age_s" '
        f'FROM "gateway_node" WHERE {where} AND $timeFilter GROUP BY "node"'
    )
    d = d.with_panel(
        stat_panel(3, "Time since newest reading (stale after 15 min)", g.place(12, 6), "dtdurations")
        .description("End of the time range minus the node's newest reading time, as last reported by the gateway.")
        .with_target(q(age, alias="$tag_node"))
        .thresholds(steps((None, "green"), (300, "orange"), (900, "red")))
    )
    d = d.with_panel(
        stat_panel(4, "Completeness per node", g.place(12, 6), "percentunit")
        .description("received / (received + sequence gaps) since gateway start.")
        .with_target(q(f'SELECT last("completeness") AS "completeness" FROM "gateway_node" WHERE {where} AND $timeFilter GROUP BY "node"', alias="$tag_node"))
        .thresholds(steps((None, "red"), (0.95, "orange"), (0.99, "green")))
        .min(0)
        .max(1)
    )
    for pid, field, title, u, th in (
        (5, "battery_v", "Battery (latest)", "volt", thresholds(*LIMITS["battery_v"])),
        (6, "rssi", "RSSI (latest)", "dBm", steps((None, "red"), (-85, "orange"), (-75, "green"))),
        (7, "heap", "Free heap (latest)", "bytes", steps((None, "red"), (16384, "orange"), (32768, "green"))),
    ):
        d = d.with_panel(
            stat_panel(pid, title, g.place(8, 5), u)
            .with_target(q(f'SELECT last("{field}") AS "{field}" FROM "node_status" WHERE {where} AND $timeFilter GROUP BY "node"', alias="$tag_node"))
            .thresholds(th)
        )
    d = d.with_row(db.Row("Node vitals").id(10).grid_pos(g.row()))
    vitals = (("battery_v", "Battery", "volt", 11), ("rssi", "RSSI", "dBm", 12), ("heap", "Free heap", "bytes", 13),
              ("buf", "Buffer depth (readings waiting on node)", "short", 14))
    for field, title, u, pid in vitals:
        p = ts_panel(pid, title, g.place(12, 7), u).with_target(q(series_query("node_status", field, where), alias="$tag_node"))
        if field == "battery_v":
            p = p.thresholds(thresholds(*LIMITS["battery_v"]))
        d = d.with_panel(p)
    d = d.with_panel(
        ts_panel(15, "Completeness over time", g.place(12, 7), "percentunit")
        .with_target(q(series_query("gateway_node", "completeness", where), alias="$tag_node"))
        .min(0).max(1)
    )
    d = d.with_panel(
        ts_panel(16, "Sequence gaps (new per interval)", g.place(12, 7), "short")
        .draw_style(cm.GraphDrawStyle.BARS)
        .with_target(q(
            'SELECT non_negative_difference(last("gaps")) AS "gaps" FROM "gateway_node" '
            f'WHERE {where} AND $timeFilter GROUP BY time($__interval), "node" fill(null)', alias="$tag_node"))
    )
    d = d.with_row(db.Row("Gateway").id(20).grid_pos(g.row()))
    gw = "\"city\" = '$city'"
    d = d.with_panel(
        ts_panel(21, "Gateway lag to InfluxDB", g.place(12, 7), "s")
        .with_target(q(series_query("gateway", "sink_lag_s", gw, by='"instance"'), alias="$tag_instance"))
        .thresholds(steps((None, "green"), (30, "orange"), (300, "red")))
    )
    d = d.with_panel(
        ts_panel(22, "Sink backlog (points)", g.place(12, 7), "short")
        .with_target(q(series_query("gateway", "sink_lag_points", gw, by='"instance"'), alias="$tag_instance"))
    )
    d = d.with_panel(
        ts_panel(23, "Dead-letters (new per interval)", g.place(12, 7), "short")
        .draw_style(cm.GraphDrawStyle.BARS)
        .with_target(q(
            'SELECT non_negative_difference(last("dead_letters")) AS "dead_letters" FROM "gateway" '
            f"WHERE {gw} AND $timeFilter GROUP BY time($__interval), \"instance\" fill(null)", alias="$tag_instance"))
    )
    d = d.with_panel(
        stat_panel(24, "Dead-letters since gateway start", g.place(6, 7), "short")
        .with_target(q(f'SELECT last("dead_letters") AS "dead_letters" FROM "gateway" WHERE {gw} AND $timeFilter GROUP BY "instance"', alias="$tag_instance"))
        .thresholds(steps((None, "green"), (1, "orange")))
    )
    d = d.with_panel(
        stat_panel(25, "Accepted readings since gateway start", g.place(6, 7), "short")
        .with_target(q(f'SELECT last("accepted_readings") AS "accepted_readings" FROM "gateway" WHERE {gw} AND $timeFilter GROUP BY "instance"', alias="$tag_instance"))
        .thresholds(steps((None, "blue")))
    )
    return d


def twin() -> db.Dashboard:
    g = Grid()
    d = new_dashboard(
        "twinedge-twin", "TwinEdge / Twin view",
        "This city beside its partner (partner data as mirrored here), mirror lag and reconciliation completeness.",
    )
    d = d.with_variable(var_query("home", "This city", 'SHOW TAG VALUES FROM "gateway" WITH KEY = "city"'))
    d = d.with_variable(var_query("partner", "Partner city", 'SHOW TAG VALUES FROM "gateway" WITH KEY = "city"', uid=PARTNER))
    d = d.with_variable(var_query("domain", "Domain", 'SHOW TAG VALUES FROM "gateway_node" WITH KEY = "domain" WHERE "city" = \'$home\''))
    # SHOW FIELD KEYS lists the flag `unsynced` (boolean) too: keep numeric reading fields only.
    d = d.with_variable(var_query("field", "Reading", 'SHOW FIELD KEYS FROM "$domain"', regex="/^(?!unsynced$).+$/"))

    d = d.with_row(db.Row("Side by side").id(1).grid_pos(g.row()))
    for pid, city, title in ((2, "$home", "$field in $home"), (3, "$partner", "$field in $partner (mirrored here)")):
        d = d.with_panel(
            ts_panel(pid, title, g.place(12, 8), "short")
            .with_target(q(series_query("$domain", "$field", f"\"city\" = '{city}'", name="value"), alias="$tag_node"))
        )
    for pid, city, title in ((4, "$home", "Readings per interval in $home"), (5, "$partner", "Readings per interval from $partner (mirrored here)")):
        d = d.with_panel(
            ts_panel(pid, title, g.place(12, 6), "short")
            .draw_style(cm.GraphDrawStyle.BARS)
            .with_target(q(series_query("$domain", "battery_v", f"\"city\" = '{city}'", agg="count", by="", fill="0", name="readings"), alias=city))
        )
    d = d.with_row(db.Row("Mirror").id(10).grid_pos(g.row()))
    for pid, uid, src, dst in ((11, HOME, "$home", "$partner"), (12, PARTNER, "$partner", "$home")):
        d = d.with_panel(
            ts_panel(pid, f"Mirror lag {src} → {dst}", g.place(12, 7), "s", uid=uid)
            .with_target(q(series_query("gateway", "mirror_lag_s", f"\"city\" = '{src}'", by='"instance"'), uid=uid, alias="$tag_instance"))
            .thresholds(steps((None, "green"), (60, "orange"), (600, "red")))
        )
    for pid, uid, src, dst in ((13, HOME, "$home", "$partner"), (14, PARTNER, "$partner", "$home")):
        d = d.with_panel(
            stat_panel(pid, f"Reconciliation completeness {src} → {dst}", g.place(6, 6), "percentunit", uid=uid)
            .description("Share of the source's mirrorable readings the partner has acknowledged (reported by the source gateway).")
            .with_target(q(f'SELECT last("mirror_completeness") AS "mirror_completeness" FROM "gateway" WHERE "city" = \'{src}\' AND $timeFilter', uid=uid))
            .thresholds(steps((None, "red"), (0.99, "orange"), (0.999, "green")))
            .min(0).max(1)
        )
    for pid, uid, title in ((15, PARTNER, "$partner readings at source"), (16, HOME, "$partner readings mirrored here")):
        d = d.with_panel(
            stat_panel(pid, title, g.place(6, 6), "short", uid=uid, calc="sum")
            .description("Compare the two: equal once the mirror has caught up over the selected range.")
            .with_target(q(f'SELECT count("battery_v") AS "readings" FROM "$domain" WHERE "city" = \'$partner\' AND $timeFilter', uid=uid))
            .thresholds(steps((None, "blue")))
        )
    return d


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Rendered:
    uid: str
    filename: str
    model: dict[str, object]

    def to_bytes(self) -> bytes:
        return to_json_bytes(self.model)


def to_json_bytes(model: object) -> bytes:
    # sort_keys + fixed separators: byte-identical output across runs and machines.
    return (json.dumps(model, cls=JSONEncoder, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def to_model(builder: db.Dashboard) -> dict[str, object]:
    model = json.loads(json.dumps(builder.build(), cls=JSONEncoder, sort_keys=True))
    model["id"] = None  # server-owned; `null` lets any Grafana accept the same JSON
    return model


def render_dashboards(domains: Iterable[str], nodes: Iterable[Node], pair: tuple[str, str]) -> list[Rendered]:
    """Every dashboard for a city whose pair is `pair` (sorted city names) and domains `domains`."""
    node_list = list(nodes)
    out: list[Rendered] = []
    doms = sorted(set(domains))
    if "marine" in doms:
        out.append(Rendered("twinedge-marine", "marine.json", to_model(marine(registry_frame(node_list, "marine", pair)))))
    if "mobility" in doms:
        out.append(Rendered("twinedge-mobility", "mobility.json", to_model(mobility(registry_frame(node_list, "mobility", pair)))))
    out.append(Rendered("twinedge-fleet", "fleet.json", to_model(fleet())))
    out.append(Rendered("twinedge-twin", "twin.json", to_model(twin())))
    return out
