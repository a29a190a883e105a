"""The node registry: one TOML file per node under a registry directory.

Files (not a database) so every change is a reviewable diff in git (who recalibrated
which probe, when), a technician can read a node's record offline on the quay, and the
gateway loads it without a server. A few hundred nodes per city load in milliseconds;
should a city outgrow files, `load_registry` is the one seam to swap for a database.

Layout:
    <registry>/nodes/<id>.toml      one node (schema: `Node`)
    <registry>/cities/<city>.toml   optional per-city settings (schema: `City`)

Secrets never live here: `credential_ref`/`wifi_ref` name entries of the secret store
(provisioning/secrets.py), which sits outside the repository.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,31}$"
SENSOR_KINDS = ("ph", "do", "ec", "temp", "turbidity", "radar", "loop", "ir_beam", "battery")
# Which wire-format fields (docs/wire-format.md) each sensor kind feeds: verify uses it to say
# which sensor is faulty when a reading lacks a field.
SENSOR_FIELDS: dict[str, tuple[str, ...]] = {
    "ph": ("ph",),
    "do": ("do_mgl",),
    "ec": ("conductivity_uscm", "salinity_psu"),
    "temp": ("water_temp_c",),
    "turbidity": ("turbidity_ntu",),
    "radar": ("vehicles", "speed_mean_kmh", "speed_p85_kmh", "speed_max_kmh"),
    "loop": ("vehicles",),
    "ir_beam": ("bikes", "pedestrians"),
    "battery": ("battery_v",),
}


class RegistryError(ValueError):
    pass


class Sensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["ph", "do", "ec", "temp", "turbidity", "radar", "loop", "ir_beam", "battery"] = Field(
        description="what it measures"
    )
    model: str = Field(default="", description="manufacturer model, e.g. 'Atlas EZO-pH'")
    serial: str = Field(default="", description="serial number printed on the probe or board")
    bus: str = Field(default="", description="where it is wired, e.g. 'i2c:0x63', 'uart:2', 'adc:34', 'onewire:4'")
    installed: dt.date | None = Field(default=None, description="date the sensor was fitted")


class Calibration(BaseModel):
    """One calibration of one sensor, as recorded by `twinedge node calibrate`."""

    model_config = ConfigDict(extra="forbid")
    date: dt.date
    points: list[tuple[float, float]] = Field(description="[reference value, raw reading] pairs")
    method: str = Field(default="", description="e.g. '3-point' or '2-point'")
    serial: str = Field(default="", description="serial of the calibrated probe")
    cfg_version: int = Field(default=0, ge=0, description="config version that carried it to the node")
    by: str = ""


class NodeConfig(BaseModel):
    """What the node runs with (config as data); limits are the firmware's (docs/wire-format.md)."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(default=1, ge=1, description="increases on every change; the node ignores older")
    interval_s: int = Field(default=60, ge=1, le=3600, description="seconds between readings")
    batch: int = Field(default=10, ge=1, le=50, description="readings per MQTT message")
    keepalive_s: int = Field(default=60, ge=10, le=1200, description="MQTT keepalive, seconds")
    sleep_s: int = Field(default=0, ge=0, le=86400, description="deep sleep between batches, seconds (0 = stay awake)")
    thr: dict[str, tuple[float, float]] = Field(default_factory=dict, description="alarm thresholds [low, high] per field")


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=NAME_PATTERN, description="node id = MQTT username, lowercase, e.g. buoy-07")
    city: str = Field(pattern=NAME_PATTERN, description="city, lowercase, e.g. copenhagen")
    domain: Literal["marine", "mobility"]
    site: str = Field(default="unknown", description="site name shown in dashboards")
    lat: float | None = Field(default=None, ge=-90, le=90, description="degrees north (WGS84)")
    lon: float | None = Field(default=None, ge=-180, le=180, description="degrees east (WGS84)")
    sensors: list[Sensor] = Field(default_factory=list)
    calibration: dict[str, Calibration] = Field(default_factory=dict, description="latest calibration per sensor kind")
    config: NodeConfig = Field(default_factory=NodeConfig)
    firmware: str = Field(default="", description="firmware version installed, e.g. 0.1.0")
    credential_ref: str = Field(default="", description="secret-store entry with the MQTT password")
    wifi_ref: str = Field(default="", description="secret-store entry with the Wi-Fi SSID and key (default wifi/<city>)")
    retired: bool = False
    notes: str = ""


class City(BaseModel):
    """Per-city settings: where nodes find the broker, and who the partner is."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    broker_host: str = Field(default="127.0.0.1", description="broker address nodes connect to")
    broker_port: int = Field(default=1883, ge=1, le=65535)
    tls: bool = Field(default=False, description="nodes connect with TLS and verify the city CA")
    partner: str = Field(default="", description="partner city name (gets the partner-<name> broker account)")
    mirror_topics: list[str] = Field(
        default_factory=lambda: ["mirror/{city}/#"], description="what the partner account may read and write"
    )
    influx_url: str = ""
    influx_db: str = ""


def node_path(root: Path, node_id: str) -> Path:
    return root / "nodes" / f"{node_id}.toml"


def city_path(root: Path, city: str) -> Path:
    return root / "cities" / f"{city}.toml"


def describe_validation_error(e: ValidationError, where: str) -> str:
    """One line naming the field, what is wrong and the allowed values or range."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    ctx = err.get("ctx") or {}
    msg = err["msg"]
    hint = ""
    if err["type"] == "extra_forbidden":
        hint = "; remove it or check its spelling"
    elif "pattern" in ctx:
        hint = "; use lowercase letters, digits and '-', starting with a letter, at most 32 characters"
    return f"{where}: field {loc}: {msg}{hint}"


def _load_toml(path: Path) -> dict[str, object]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as e:
        raise RegistryError(f"{path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise RegistryError(f"{path}: not valid TOML ({e}); fix the file or restore it from git") from None


def load_node(path: Path) -> Node:
    data = _load_toml(path)
    try:
        node = Node.model_validate(data)
    except ValidationError as e:
        raise RegistryError(describe_validation_error(e, str(path))) from None
    if node.id != path.stem:
        raise RegistryError(f"{path}: id {node.id!r} does not match the file name; rename the file to {node.id}.toml")
    return node


def load_registry(root: Path) -> dict[str, Node]:
    """All nodes under `root/nodes/*.toml`, keyed by id. Raises RegistryError with a one-line reason."""
    nodes: dict[str, Node] = {}
    folder = root / "nodes"
    if not folder.is_dir():
        raise RegistryError(f"{root}: no nodes/ folder; create one with `twinedge node add`")
    for path in sorted(folder.glob("*.toml")):
        node = load_node(path)
        nodes[node.id] = node
    return nodes


def get_node(root: Path, node_id: str) -> Node:
    path = node_path(root, node_id)
    if not path.exists():
        raise RegistryError(f"node {node_id!r} is not in the registry {root}; add it with `twinedge node add {node_id} ...`")
    return load_node(path)


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write via a temp file and rename, so the gateway never reads a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_node(root: Path, node: Node) -> Path:
    path = node_path(root, node.id)
    data = node.model_dump(mode="json", exclude_none=True)
    _atomic_write(path, tomli_w.dumps(data))
    return path


def load_city(root: Path, city: str) -> City:
    path = city_path(root, city)
    if not path.exists():
        try:
            return City(name=city)
        except ValidationError as e:
            raise RegistryError(describe_validation_error(e, f"city {city!r}")) from None
    data = _load_toml(path)
    try:
        c = City.model_validate(data)
    except ValidationError as e:
        raise RegistryError(describe_validation_error(e, str(path))) from None
    if c.name != city:
        raise RegistryError(f"{path}: name {c.name!r} does not match the file name; rename the file to {c.name}.toml")
    return c


def save_city(root: Path, city: City) -> Path:
    path = city_path(root, city.name)
    _atomic_write(path, tomli_w.dumps(city.model_dump(mode="json", exclude_none=True)))
    return path
