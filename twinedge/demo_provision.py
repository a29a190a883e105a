"""Provisioning for the demo, through the technician's own commands.

The demo registers its nodes with `twinedge node add`/`node edit`, stores the Wi-Fi with
`node wifi`, writes each city's broker password and ACL files with `broker render`, and
installs every node with the code behind `twinedge node install` (mpremote over the
emulated board's pty). The command functions run in-process (a subprocess per command
would cost a Python start-up each); what they print goes to `<workdir>/provisioning.log`,
which reads like a technician's terminal.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import typer

from provisioning import cli as pcli
from provisioning import device
from provisioning.calibrate import cfg_document
from provisioning.errors import ProvisioningError
from provisioning.registry import City, Node, get_node, load_city, load_registry, save_city
from provisioning.secrets import SecretStore

CODES = {"copenhagen": "cph", "tongyeong": "tyg", "helsinki": "hel", "amsterdam": "ams"}
CENTRE = {"copenhagen": (55.676, 12.568), "tongyeong": (34.854, 128.433), "helsinki": (60.170, 24.938),
          "amsterdam": (52.373, 4.893)}
SITES = {
    ("copenhagen", "marine"): ["nordhavn-pier-3", "amager-strand-1", "sluseholmen-canal-2", "refshaleoen-quay-1"],
    ("copenhagen", "mobility"): ["langebro-bridge", "norrebrogade-north", "dronning-louises-bro", "oster-voldgade"],
    ("tongyeong", "marine"): ["gangguan-harbour-1", "hansan-bay-2", "mireuk-strait-1", "sanyang-farm-3"],
    ("tongyeong", "mobility"): ["tongyeong-bridge", "jungang-market", "mujeon-crossing", "haean-road"],
    ("helsinki", "marine"): ["kauppatori-quay-1", "suomenlinna-strait-2", "lauttasaari-bay-1", "kalasatama-pier-2"],
    ("helsinki", "mobility"): ["baana-bikeway", "mannerheimintie-north", "hameentie-east", "pitkasilta-bridge"],
    ("amsterdam", "marine"): ["ij-harbour-1", "prinsengracht-canal-2", "amstel-river-1", "houthaven-quay-3"],
    ("amsterdam", "mobility"): ["magere-brug", "wibautstraat-north", "stadhouderskade-west", "ij-tunnel"],
}
MARINE_SENSORS = ["ph:PH-{n}:EZO-pH:i2c:0x63", "do:DO-{n}:EZO-DO:i2c:0x61", "ec:EC-{n}:EZO-EC:i2c:0x64",
                  "temp:T-{n}:DS18B20:onewire:4", "turbidity:TB-{n}:SEN0189:adc:34", "battery"]
MOBILITY_SENSORS = ["radar:R-{n}:OPS243:uart:2", "loop:L-{n}:inductive-loop:gpio:25",
                    "ir_beam:IR-{n}:IR-beam:gpio:26", "battery"]


class ProvisionError(RuntimeError):
    pass


def node_codes(a: str, b: str) -> dict[str, str]:
    """Short node-id prefixes for the two cities (node ids are MQTT usernames, unique per registry)."""
    ca, cb = CODES.get(a, a[:12]), CODES.get(b, b[:12])
    if ca == cb:
        ca, cb = a[:14], b[:14]
    return {a: ca, b: cb}


@dataclass(frozen=True)
class NodePlan:
    id: str
    city: str
    domain: str
    site: str
    lat: float | None
    lon: float | None
    sensors: list[str]


def plan_nodes(city: str, code: str, count: int) -> list[NodePlan]:
    """`count` nodes for a city, buoys and traffic counters alternating."""
    out = []
    per = {"marine": 0, "mobility": 0}
    centre = CENTRE.get(city)
    for i in range(count):
        domain = "marine" if i % 2 == 0 else "mobility"
        per[domain] += 1
        k = per[domain]
        names = SITES.get((city, domain)) or [f"{city}-{'harbour' if domain == 'marine' else 'road'}-{j}" for j in range(1, 5)]
        site = names[(k - 1) % len(names)] + ("" if k <= len(names) else f"-{k}")
        lat = lon = None
        if centre is not None:
            lat = round(centre[0] + 0.004 * ((i * 7) % 11 - 5), 4)
            lon = round(centre[1] + 0.006 * ((i * 5) % 13 - 6), 4)
        kind = "buoy" if domain == "marine" else "count"
        serial = f"{code.upper()}{i + 1:03d}"
        sensors = [s.format(n=serial) for s in (MARINE_SENSORS if domain == "marine" else MOBILITY_SENSORS)]
        out.append(NodePlan(f"{code}-{kind}-{k:02d}", city, domain, site, lat, lon, sensors))
    return out


class Provisioner:
    """The demo's registry and secret store, driven through the provisioning commands."""

    def __init__(self, root: Path, secrets_dir: Path, log_path: Path) -> None:
        self.root = root
        self.store = SecretStore(secrets_dir)
        self.log_path = log_path
        self._lock = threading.Lock()

    # -- running a technician command in-process ------------------------------------------
    @contextlib.contextmanager
    def _captured(self, title: str) -> Iterator[None]:
        buf = io.StringIO()
        old = os.environ.get("TWINEDGE_SECRETS")
        os.environ["TWINEDGE_SECRETS"] = str(self.store.root)  # read by the commands' secret_store()
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                yield
        finally:
            if old is None:
                os.environ.pop("TWINEDGE_SECRETS", None)
            else:
                os.environ["TWINEDGE_SECRETS"] = old
            self.write_log(f"$ twinedge {title}\n{buf.getvalue()}")

    def write_log(self, text: str) -> None:
        with self._lock, open(self.log_path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def run(self, title: str, fn: Callable[..., object], **kwargs: object) -> None:
        try:
            with self._captured(title):
                fn(**kwargs)
        except typer.Exit as e:
            if e.exit_code:
                raise ProvisionError(f"`twinedge {title}` failed (exit {e.exit_code}); see {self.log_path}") from None

    # -- the steps ---------------------------------------------------------------------------
    def add_city(self, city: str, partner: str, broker_port: int) -> None:
        """City file (broker address nodes get at install; partner) and the site Wi-Fi."""
        save_city(self.root, City(name=city, broker_host="127.0.0.1", broker_port=broker_port, partner=partner))
        self.run(f"node wifi {city} --ssid {city}-iot", pcli.wifi, name=city, ssid=f"{city}-iot",
                 key=secrets.token_urlsafe(12))

    def set_broker_port(self, city: str, port: int) -> None:
        c = load_city(self.root, city)
        save_city(self.root, c.model_copy(update={"broker_port": port}))

    def add_node(self, p: NodePlan, interval_s: int, batch: int) -> None:
        args = " ".join(f"--sensor {s}" for s in p.sensors)
        self.run(f"node add {p.id} --city {p.city} --domain {p.domain} --site {p.site} {args} --interval {interval_s}",
                 pcli.add, node_id=p.id, city=p.city, domain=p.domain, site=p.site, lat=p.lat, lon=p.lon,
                 sensor=p.sensors, interval=interval_s, registry=self.root)
        self.run(f"node edit {p.id} --set config.batch={batch}", pcli.edit, node_id=p.id,
                 set_=[f"config.batch={batch}"], registry=self.root)

    def render_broker(self, city: str, partner: str, out_dir: Path) -> tuple[Path, Path]:
        self.run(f"broker render --city {city} --partner {partner} --out {out_dir}", pcli.render_cmd, city=city,
                 out_dir=out_dir, partner=partner, registry=self.root)
        return out_dir / "passwd", out_dir / "acl"

    def password(self, username: str) -> str:
        return self.store.get(f"mqtt/{username}")["password"].reveal()

    def node(self, node_id: str) -> Node:
        return get_node(self.root, node_id)

    def nodes(self, city: str) -> list[Node]:
        return [n for n in load_registry(self.root).values() if n.city == city and not n.retired]

    def prebuild(self) -> None:
        """Compile the firmware once, so parallel installs only read the mpy-cross cache."""
        device.build(device.manifest(pcli.FIRMWARE_DIR), device.default_cache())

    def install(self, node_id: str, port: str) -> device.InstallResult:
        """What `twinedge node install <id> --port <pty>` does (thread-safe: no output capture)."""
        node = self.node(node_id)
        stages: list[str] = []
        try:
            r = pcli.do_install(node, port, self.store, self.root, pcli.FIRMWARE_DIR, None, None, True,
                                lambda name, detail, pct: stages.append(detail))
        except ProvisioningError as e:
            self.write_log(f"$ twinedge node install {node_id} --port {port}\nerror: {e}")
            raise ProvisionError(f"installing {node_id} failed: {e}") from None
        self.write_log(f"$ twinedge node install {node_id} --port {port}\n"
                       f"installed on {node_id}: {len(r.sent)} file(s) sent, {len(r.unchanged)} unchanged, checked, "
                       f"reset ({r.seconds:.1f} s)")
        return r

    def park(self, node_id: str, interval_s: int = 3600) -> dict[str, object]:
        """`node edit --set config.interval_s=N`: the new config document (version bumped) to publish."""
        self.run(f"node edit {node_id} --set config.interval_s={interval_s}", pcli.edit, node_id=node_id,
                 set_=[f"config.interval_s={interval_s}"], registry=self.root)
        return cfg_document(self.node(node_id))

    def publish_cfg(self, node_id: str, doc: dict[str, object], broker_port: int) -> None:
        node = self.node(node_id)
        pcli.publish_cfg(node, doc, "127.0.0.1", broker_port, f"ops-{node.city}", self.password(f"ops-{node.city}"), None)
        self.write_log(f"published config v{doc.get('v')} to twin/{node.city}/{node.domain}/{node_id}/cfg (retained)")
