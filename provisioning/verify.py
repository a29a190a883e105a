"""Verify a node end to end: its status and first readings at the broker (and in InfluxDB).

Subscribes as the `ops-<city>` account to the node's own `status` and `up` topics, decodes
readings with the gateway's decoder (the same validation the gateway applies), and waits
until it has an online status and the requested number of valid readings, or the deadline.
"""

from __future__ import annotations

import json
import queue
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.decode import Reading, Rejected, decode_up
from gateway.topics import topic_for
from provisioning.errors import ProvisioningError
from provisioning.registry import SENSOR_FIELDS, Node

Progress = Callable[[str, float], None]


@dataclass
class SensorState:
    kind: str
    serial: str
    state: str  # "OK", "faulty: <reason>", "no data"


@dataclass
class VerifyReport:
    node: str
    status: dict[str, object] | None = None
    readings: list[Reading] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    sensors: list[SensorState] = field(default_factory=list)
    influx_points: int | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def _battery(self) -> str:
        s = self.status or {}
        mv = s.get("bat_mv")
        if isinstance(mv, int):
            return f"{mv / 1000:.2f} V"
        # The first status can precede the first battery sample; the readings carry it too.
        for r in reversed(self.readings):
            if "battery_v" in r.values:
                return f"{float(r.values['battery_v']):.2f} V (from readings)"
        return "?"

    def summary_rows(self) -> list[tuple[str, str]]:
        s = self.status or {}
        rows = [
            ("online", str(s.get("online", "?"))),
            ("firmware", str(s.get("fw", "?"))),
            ("config version", str(s.get("cfg", "?")) + (f"  (rejected: {s['cfg_err']})" if s.get("cfg_err") else "")),
            ("RSSI", f"{s['rssi']} dBm" if isinstance(s.get("rssi"), int) else "?"),
            ("battery", self._battery()),
            ("clock synced", str(s.get("synced", "?"))),
            ("readings seen", str(len(self.readings))),
        ]
        if self.influx_points is not None:
            rows.append(("points in InfluxDB", str(self.influx_points)))
        return rows


def sensor_states(node: Node, status: dict[str, object] | None, readings: list[Reading]) -> list[SensorState]:
    faults = (status or {}).get("faults") or {}
    if not isinstance(faults, dict):
        faults = {}
    seen: set[str] = set()
    for r in readings:
        seen.update(r.values)
    out = []
    for s in node.sensors:
        names = SENSOR_FIELDS.get(s.kind, ())
        fault = faults.get(s.kind) or next((faults[n] for n in names if n in faults), None)
        if fault:
            state = f"faulty: {fault}"
        elif any(n in seen for n in names):
            state = "OK"
        elif readings:
            state = "faulty: no value in readings"
        else:
            state = "no data"
        out.append(SensorState(s.kind, s.serial, state))
    return out


def verify(
    node: Node,
    host: str,
    port: int,
    username: str,
    password: str,
    ca: str | None = None,
    timeout: float = 120.0,
    min_readings: int = 1,
    since: float | None = None,
    influx: tuple[str, str] | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Wait for an online status and `min_readings` valid readings from `node`.

    A retained status counts only when it is online and (when `since` is given) its node
    time `t` is not older than `since` - 60 s, so a stale status from an earlier life of the
    node does not pass for a fresh one.
    """
    t0 = time.monotonic()
    rep = VerifyReport(node.id)
    status_t = topic_for(node.city, node.domain, node.id, "status")
    up_t = topic_for(node.city, node.domain, node.id, "up")
    events: "queue.Queue[tuple[str, object]]" = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"verify-{node.id}-{int(time.time())}", protocol=mqtt.MQTTv311)
    c.username_pw_set(username, password)
    if ca:
        c.tls_set(ca_certs=ca)

    def on_connect(cl: mqtt.Client, u: object, flags: object, rc: object, props: object) -> None:
        events.put(("connack", rc))
        if not getattr(rc, "is_failure", False):
            cl.subscribe([(status_t, 1), (up_t, 1)])

    c.on_connect = on_connect
    c.on_message = lambda cl, u, m: events.put(("msg", (m.topic, bytes(m.payload), bool(m.retain))))
    try:
        c.connect(host, port, keepalive=30)
    except ssl.SSLError as e:
        raise ProvisioningError(f"TLS to {host}:{port} failed ({e.reason}): pass the city CA with --ca (from `twinedge broker ca`)") from None
    except OSError as e:
        raise ProvisioningError(f"cannot reach the broker at {host}:{port} ({e.strerror or e}): check --broker and the network") from None
    c.loop_start()
    deadline = t0 + timeout
    try:
        while time.monotonic() < deadline:
            if rep.status and _alive(rep.status) and len(rep.readings) >= min_readings:
                break
            try:
                kind, val = events.get(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if kind == "connack":
                if getattr(val, "is_failure", False):
                    raise ProvisioningError(
                        f"the broker refused ops-{node.city} ({val}): run `twinedge broker render` and reload Mosquitto"
                    )
                if progress:
                    progress("broker", 10.0)
                continue
            topic, payload, retained = val  # type: ignore[misc]
            if topic == status_t:
                try:
                    st = json.loads(payload)
                except ValueError:
                    rep.rejected.append("status is not JSON")
                    continue
                if not isinstance(st, dict):
                    continue
                t_node = st.get("t")
                stale = retained and since is not None and isinstance(t_node, int) and t_node < since - 60
                if not stale:
                    rep.status = st
                    if progress:
                        progress("status", 40.0)
            else:
                try:
                    d = decode_up(topic, payload, int(time.time()))
                except Rejected as e:
                    rep.rejected.append(f"{e.reason}: {e.detail}")
                    continue
                rep.readings += d.readings
                rep.rejected += [f"{r.reason}: {r.detail}" for r in d.rejected]
                if progress:
                    progress("readings", 40.0 + 50.0 * min(1.0, len(rep.readings) / min_readings))
    finally:
        c.disconnect()
        c.loop_stop()
    if influx and rep.readings:
        rep.influx_points = _influx_count(node, influx, deadline)
    rep.sensors = sensor_states(node, rep.status, rep.readings)
    rep.seconds = time.monotonic() - t0
    rep.problems = problems(rep, min_readings, influx is not None, timeout)
    if progress:
        progress("done", 100.0)
    return rep


def problems(rep: VerifyReport, min_readings: int, influx: bool, timeout: float) -> list[str]:
    out = []
    if rep.status is None:
        out.append(f"no status from the node within {timeout:.0f} s: check power, Wi-Fi and the broker address in its config")
    elif not _alive(rep.status):
        out.append("the node's last status says offline: check power and Wi-Fi, then press RESET")
    if len(rep.readings) < min_readings:
        why = f" ({rep.rejected[-1]})" if rep.rejected else ""
        out.append(f"only {len(rep.readings)} of {min_readings} readings arrived{why}: wait one interval or check the sensors")
    if rep.status and rep.status.get("cfg_err"):
        out.append(f"the node rejected its config: {rep.status['cfg_err']}")
    for s in rep.sensors:
        if s.state.startswith("faulty"):
            out.append(f"sensor {s.kind} {s.serial}: {s.state}; check its wiring and connector")
    if influx and not rep.influx_points:
        out.append("readings reached the broker but not InfluxDB: check the gateway is running (`twinedge gateway status`)")
    return out


def _alive(status: dict[str, object]) -> bool:
    # A duty-cycling buoy's last status before deep sleep says offline with its sleep time.
    return bool(status.get("online")) or bool(status.get("sleep_s"))


def _influx_count(node: Node, influx: tuple[str, str], deadline: float) -> int:
    url, db = influx
    q = f"SELECT count(*) FROM \"{node.domain}\" WHERE \"node\"='{node.id}' AND time > now() - 1d"
    full = url.rstrip("/") + "/query?" + urllib.parse.urlencode({"db": db, "q": q})
    while True:
        try:
            with urllib.request.urlopen(full, timeout=5) as r:
                body = json.loads(r.read())
            series = body.get("results", [{}])[0].get("series") or []
            if series:
                counts = [v for v in series[0]["values"][0][1:] if isinstance(v, int)]
                if counts and max(counts) > 0:
                    return max(counts)
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError):
            pass
        if time.monotonic() >= deadline:
            return 0
        time.sleep(0.5)  # poll interval of a deadline-bounded wait
