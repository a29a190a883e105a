"""The node registry: one TOML file per node under a registry directory.

Files (not a database) so every change is a reviewable diff in git, a technician can
read a node's record offline on the quay, and the gateway loads it without a server.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,31}$"


class RegistryError(ValueError):
    pass


class Sensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(description="ph, do, ec, temp, turbidity, radar, loop, ir_beam, battery")
    model: str = ""
    serial: str = ""


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=NAME_PATTERN)
    city: str = Field(pattern=NAME_PATTERN)
    domain: Literal["marine", "mobility"]
    site: str = "unknown"
    lat: float | None = Field(default=None, ge=-90, le=90, description="degrees north (WGS84)")
    lon: float | None = Field(default=None, ge=-180, le=180, description="degrees east (WGS84)")
    sensors: list[Sensor] = Field(default_factory=list)
    calibration: dict[str, dict[str, object]] = Field(default_factory=dict)
    firmware: str = ""
    credential_ref: str = ""
    retired: bool = False


def node_path(root: Path, node_id: str) -> Path:
    return root / "nodes" / f"{node_id}.toml"


def load_node(path: Path) -> Node:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise RegistryError(f"{path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise RegistryError(f"{path}: not valid TOML ({e})") from None
    try:
        node = Node.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise RegistryError(f"{path}: field {loc}: {err['msg']}") from None
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
