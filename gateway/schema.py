"""Per-domain field schemas of wire format v1 (docs/wire-format.md is the contract)."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

MAGIC = 0xE1
HEADER_TAIL = struct.Struct("<IIB")  # seq0, t0, count: after magic, schema id, node id length and node id
FLAG_UNSYNCED = 0x01
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
DOMAINS = ("marine", "mobility")


@dataclass(frozen=True)
class Field:
    name: str
    wire: str  # struct code
    scale: int
    unit: str  # human unit
    senml_unit: str
    lo: float
    hi: float
    integer: bool = False  # written as an InfluxDB integer field


@dataclass(frozen=True)
class Schema:
    schema_id: int
    domain: str
    fields: tuple[Field, ...]

    @property
    def reading_struct(self) -> struct.Struct:
        return struct.Struct("<HBB" + "".join(f.wire for f in self.fields))

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> Field | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None


MARINE = Schema(
    1,
    "marine",
    (
        Field("ph", "h", 100, "pH", "pH", 0.0, 14.0),
        Field("water_temp_c", "h", 100, "°C", "Cel", -5.0, 40.0),
        Field("do_mgl", "H", 100, "mg/L", "mg/L", 0.0, 25.0),
        Field("conductivity_uscm", "I", 1, "µS/cm", "uS/cm", 0.0, 100000.0),
        Field("salinity_psu", "H", 100, "PSU", "PSU", 0.0, 45.0),
        Field("turbidity_ntu", "H", 10, "NTU", "NTU", 0.0, 4000.0),
        Field("battery_v", "H", 1000, "V", "V", 2.5, 5.5),
    ),
)

MOBILITY = Schema(
    2,
    "mobility",
    (
        Field("vehicles", "H", 1, "count", "count", 0, 20000, integer=True),
        Field("bikes", "H", 1, "count", "count", 0, 20000, integer=True),
        Field("pedestrians", "H", 1, "count", "count", 0, 20000, integer=True),
        Field("speed_mean_kmh", "H", 10, "km/h", "km/h", 0.0, 250.0),
        Field("speed_p85_kmh", "H", 10, "km/h", "km/h", 0.0, 250.0),
        Field("speed_max_kmh", "H", 10, "km/h", "km/h", 0.0, 300.0),
        Field("battery_v", "H", 1000, "V", "V", 2.5, 5.5),
        Field("interval_s", "H", 1, "s", "s", 1, 3600, integer=True),
    ),
)

SCHEMAS_BY_ID: dict[int, Schema] = {s.schema_id: s for s in (MARINE, MOBILITY)}
SCHEMAS_BY_DOMAIN: dict[str, Schema] = {s.domain: s for s in (MARINE, MOBILITY)}
