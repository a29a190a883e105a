"""A twin-city stack for dashboard query tests: Mosquitto, InfluxDB, two real gateways, simulated nodes.

The gateways (`twinedge gateway run`, via twinedge.gatewayproc) fill one database per city from
compact batches and retained status messages published to the broker. What the gateway does
not write yet is added by `seed_not_yet_written_by_gateway` (see its docstring) and nothing else.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.decode import encode_compact
from gateway.schema import MARINE, MOBILITY, SCHEMAS_BY_DOMAIN
from twinedge.services import Influxd

CITIES = ("copenhagen", "tongyeong")
PARTNER = {"copenhagen": "tongyeong", "tongyeong": "copenhagen"}
DB = {c: f"twinedge_{c}" for c in CITIES}


@dataclass(frozen=True)
class SimNode:
    id: str
    city: str
    domain: str
    site: str
    lat: float
    lon: float


NODES = (
    SimNode("buoy-01", "copenhagen", "marine", "nordhavn", 55.7102, 12.6031),
    SimNode("buoy-02", "copenhagen", "marine", "amager-strand", 55.6534, 12.6472),
    SimNode("cnt-01", "copenhagen", "mobility", "dronning-louises-bro", 55.6880, 12.5650),
    SimNode("buoy-11", "tongyeong", "marine", "gangguan", 34.8402, 128.4238),
    SimNode("buoy-12", "tongyeong", "marine", "hansan-bay", 34.7870, 128.4660),
    SimNode("cnt-11", "tongyeong", "mobility", "seoho-market", 34.8460, 128.4240),
)
READINGS = 20  # per node, one a minute
GAP_NODE, GAP_SEQ = "buoy-01", 10  # a sequence gap, so completeness < 1 somewhere


def write_registry(root: Path) -> Path:
    (root / "nodes").mkdir(parents=True, exist_ok=True)
    for n in NODES:
        (root / "nodes" / f"{n.id}.toml").write_text(
            f'id = "{n.id}"\ncity = "{n.city}"\ndomain = "{n.domain}"\nsite = "{n.site}"\nlat = {n.lat}\nlon = {n.lon}\n'
        )
    return root


def write_cities(path: Path, influx_url: str) -> Path:
    """Test pair with both domains, so one pair exercises all four dashboards."""
    path.write_text(
        "".join(
            f'[cities.{c}]\ntitle = "{c.title()}"\npartner = "{PARTNER[c]}"\ndomains = ["marine", "mobility"]\n'
            f'influx_url = "{influx_url}"\ndatabase = "{DB[c]}"\n\n'
            for c in CITIES
        )
    )
    return path


def wire_row(domain: str, k: int) -> list[int]:
    if domain == "marine":  # pH, temp, DO, conductivity, salinity, turbidity, battery (wire integers)
        return [790 + k % 40, 1400 + 10 * k, 650 + k, 42000 + k, 3000 + k, 100 + 5 * k, 3650 + k]
    # vehicles, bikes, pedestrians, speed mean/p85/max, battery, interval
    return [20 + k, 5 + k % 7, 3 + k % 5, 380 + k, 520 + k, 700 + k, 3800 - k, 60]


def batches(n: SimNode, t_start: int) -> list[bytes]:
    schema = SCHEMAS_BY_DOMAIN[n.domain]
    mask = (1 << len(schema.fields)) - 1
    seqs = [s for s in range(1, READINGS + 1) if not (n.id == GAP_NODE and s == GAP_SEQ)]
    out: list[bytes] = []
    run: list[int] = []
    for s in seqs + [0]:  # split into runs of consecutive sequence numbers
        if run and s != run[-1] + 1:
            t0 = t_start + 60 * (run[0] - 1)
            rows = [(60 * (s2 - run[0]), 0, mask, wire_row(n.domain, s2)) for s2 in run]
            out.append(encode_compact(schema, n.id, run[0], t0, rows))
            run = []
        if s:
            run.append(s)
    return out


def status(n: SimNode, i: int) -> bytes:
    return json.dumps(
        {"v": 1, "node": n.id, "online": True, "fw": "0.1.0", "up_s": 3600 + i, "reset": ("power_on", "wdt")[i % 2],
         "heap": 61000 - 100 * i, "rssi": -60 - 5 * i, "bat_mv": 3700 - 10 * i, "buf": i, "drop": 0, "seq": READINGS,
         "faults": {"ph": "timeout"} if i == 1 else {}, "cfg": 1, "cfg_err": None, "synced": True, "t": int(time.time())}
    ).encode()


def wait_until(pred: Callable[[], bool], timeout: float, what: str, on_retry: Callable[[], None] | None = None) -> None:
    deadline = time.monotonic() + timeout
    next_retry = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        if pred():
            return
        if on_retry and time.monotonic() > next_retry:
            on_retry()  # republishing is idempotent: (node, seq) de-duplication and InfluxDB overwrite
            next_retry = time.monotonic() + 3.0
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def select(influx: Influxd, db: str, q: str) -> list[dict[str, Any]]:
    res = influx.query(q, db=db)["results"][0]
    if "error" in res:
        raise AssertionError(f"InfluxDB error for {q!r}: {res['error']}")
    return res.get("series", [])


def counts(influx: Influxd, db: str, measurement: str, field_name: str, city: str) -> dict[str, int]:
    rows = select(influx, db, f'SELECT count("{field_name}") FROM "{measurement}" WHERE "city" = \'{city}\' GROUP BY "node"')
    return {s["tags"]["node"]: int(s["values"][0][1]) for s in rows}


class Publisher:
    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dashboards-sim", clean_session=True)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.infos.append(self.client.publish(topic, payload, qos=1, retain=retain))

    def wait_all(self, timeout: float = 20.0) -> None:
        for info in self.infos:
            info.wait_for_publish(timeout)
            assert info.is_published(), "broker did not acknowledge a publish"
        self.infos.clear()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Stack:
    influxd: Influxd
    t_start: int
    published: dict[str, int] = field(default_factory=dict)  # node -> readings

    def db_for(self, home: str) -> dict[str, str]:
        """Datasource uid -> database, as the Grafana of city `home` would see them."""
        return {"influx-home": DB[home], "influx-partner": DB[PARTNER[home]]}


def publish_all(pub: Publisher, t_start: int) -> dict[str, int]:
    published: dict[str, int] = {}
    for i, n in enumerate(NODES):
        pub.publish(f"twin/{n.city}/{n.domain}/{n.id}/status", status(n, i % 2), retain=True)
        for b in batches(n, t_start):
            pub.publish(f"twin/{n.city}/{n.domain}/{n.id}/up", b)
        published[n.id] = READINGS - (1 if n.id == GAP_NODE else 0)
    # One message the gateway must refuse (mobility schema on a marine topic): a dead-letter.
    cnt = next(n for n in NODES if n.domain == "mobility" and n.city == "copenhagen")
    bad = encode_compact(MOBILITY, "buoy-01", 900, t_start, [(0, 0, 0xFF, wire_row("mobility", 1))])
    assert MARINE.domain != cnt.domain
    pub.publish("twin/copenhagen/marine/buoy-01/up", bad)
    pub.wait_all()
    return published


def filled_by_gateway(influx: Influxd, published: dict[str, int]) -> Callable[[], bool]:
    def done() -> bool:
        for c in CITIES:
            db = DB[c]
            for m in ("marine", "mobility"):
                want = {n.id: published[n.id] for n in NODES if n.city == c and n.domain == m}
                if counts(influx, db, m, "battery_v", c) != want:
                    return False
            mine = {n.id for n in NODES if n.city == c}
            if set(counts(influx, db, "node_status", "online", c)) != mine:
                return False
            gn = counts(influx, db, "gateway_node", "completeness", c)
            if set(gn) != mine or min(gn.values()) < 3:  # >= 3 stats points: differences are defined
                return False
            if not select(influx, db, f"SELECT count(\"dead_letters\") FROM \"gateway\" WHERE \"city\" = '{c}'"):
                return False
        return True

    return done


def _line(measurement: str, tags: dict[str, str], fields: dict[str, object], t: int) -> str:
    def fv(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return f"{v}i"
        if isinstance(v, float):
            return repr(v)
        return json.dumps(str(v))

    tag_s = "".join(f",{k}={v}" for k, v in sorted(tags.items()) if v)
    field_s = ",".join(f"{k}={fv(v)}" for k, v in sorted(fields.items()) if v is not None)
    return f"{measurement}{tag_s} {field_s} {t}"


def write_lines(influx: Influxd, db: str, lines: list[str]) -> None:
    import urllib.request

    req = urllib.request.Request(f"{influx.url}/write?db={db}&precision=s", data="\n".join(lines).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 204, f"write failed: {r.status}"


def seed_not_yet_written_by_gateway(influx: Influxd, t_start: int) -> None:
    """Line protocol per docs/influx-schema.md for what no running component writes yet.

    - `alarm`: the gateway has no [alarms] stage yet.
    - `gateway.mirror_lag_s` / `gateway.mirror_completeness`: no partner mirror yet.
    - the partner's readings and alarms in each city's database, tagged `origin`: what the
      partner mirror will deliver. Copied from the partner's database (filled by its gateway),
      so values, tags and field types are exactly what the gateway wrote.
    Switch each item to the real component when it exists.
    """
    for c in CITIES:
        lines = []
        for n in (n for n in NODES if n.city == c):
            field_name, state, value, lo, hi = (
                ("ph", "high", 8.71, 7.5, 8.6) if n.domain == "marine" else ("speed_p85_kmh", "ok", 52.0, 0.0, 80.0)
            )
            lines.append(_line("alarm", {"city": c, "domain": n.domain, "node": n.id, "field": field_name},
                               {"state": state, "value": value, "lo": lo, "hi": hi}, t_start + 600))
        for k in range(5):
            lines.append(_line("gateway", {"city": c, "instance": "gw1"},
                               {"mirror_lag_s": 1.5 + k, "mirror_completeness": 0.99 + k / 1000}, t_start + 60 * k))
        write_lines(influx, DB[c], lines)
    for c in CITIES:
        p = PARTNER[c]
        lines = []
        for m in ("marine", "mobility", "alarm"):
            types = {row[0]: row[1] for s in select(influx, DB[p], f'SHOW FIELD KEYS FROM "{m}"') for row in s["values"]}
            for s in select(influx, DB[p], f'SELECT * FROM "{m}" WHERE "city" = \'{p}\' GROUP BY *'):
                cols = s["columns"]
                for row in s["values"]:
                    fields: dict[str, object] = {}
                    for k, v in zip(cols[1:], row[1:]):
                        if v is None:
                            continue
                        t = types[k]
                        fields[k] = int(v) if t == "integer" else float(v) if t == "float" else v
                    lines.append(_line(m, {**s["tags"], "origin": p}, fields, int(row[0])))
        write_lines(influx, DB[c], lines)
