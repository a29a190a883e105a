"""Shared data of the rig: node identity, the wire schemas (from docs/wire-format.md, written
here again on purpose: the rig checks the firmware and the gateway, so it does not reuse
their code), and the node's flash ring, which is the node's own record of what it sampled."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

CITIES = ("copenhagen", "tongyeong")  # the marine twin pair; nodes alternate between them
DOMAIN_PREFIX = {"marine": "buoy", "mobility": "count"}

# field name, wire format char, scale -- per docs/wire-format.md "Schemas"
MARINE = (("ph", "h", 100), ("water_temp_c", "h", 100), ("do_mgl", "H", 100), ("conductivity_uscm", "I", 1),
          ("salinity_psu", "H", 100), ("turbidity_ntu", "H", 10), ("battery_v", "H", 1000))
MOBILITY = (("vehicles", "H", 1), ("bikes", "H", 1), ("pedestrians", "H", 1), ("speed_mean_kmh", "H", 10),
            ("speed_p85_kmh", "H", 10), ("speed_max_kmh", "H", 10), ("battery_v", "H", 1000), ("interval_s", "H", 1))
SCHEMAS = {"marine": MARINE, "mobility": MOBILITY}
INTEGER_FIELDS = {"vehicles", "bikes", "pedestrians", "interval_s"}
F_UNSYNCED = 1

# ring.bin record (docs/firmware.md "Store-and-forward"): seq u32, t u32, 20-byte reading
REC = 28
META = "<4sIIII"  # magic, cap, lo, drop, boot


@dataclass(frozen=True)
class NodeSpec:
    node: str
    city: str
    domain: str
    site: str

    @property
    def measurement(self) -> str:
        return self.domain


def fleet(count: int, cities: tuple[str, ...] = CITIES, domains: tuple[str, ...] = ("marine", "mobility")) -> list[NodeSpec]:
    """`count` nodes: cities alternate first, then domains (1 node: one marine buoy)."""
    out = []
    for i in range(count):
        city = cities[i % len(cities)]
        domain = domains[(i // len(cities)) % len(domains)]
        out.append(NodeSpec(f"{DOMAIN_PREFIX[domain]}-{i + 1:02d}", city, domain, f"{city}-site-{i + 1}"))
    return out


@dataclass
class Sample:
    """One reading as the node stored it in flash."""

    seq: int
    t: int
    flags: int
    mask: int
    values: dict[str, float]  # present fields only, engineering units


@dataclass
class Ring:
    cap: int
    lo: int
    drop: int
    boot: int
    samples: dict[int, Sample] = field(default_factory=dict)


def parse_ring(domain: str, ring: bytes | None, meta: bytes | None) -> Ring:
    schema = SCHEMAS[domain]
    fmt = "<" + "".join(c for _, c, _ in schema)
    cap, lo, drop, boot = len(ring or b"") // REC, 1, 0, 0
    if meta and len(meta) >= struct.calcsize(META):
        magic, mcap, lo, drop, boot = struct.unpack_from(META, meta)
        if magic == b"TER1":
            cap = mcap
    out = Ring(cap, lo, drop, boot)
    if not ring or not cap:
        return out
    for slot in range(min(cap, len(ring) // REC)):
        off = slot * REC
        seq, t = struct.unpack_from("<II", ring, off)
        if not seq or seq % cap != slot:
            continue  # never written, or a torn write
        flags, mask = ring[off + 10], ring[off + 11]
        raw = struct.unpack_from(fmt, ring, off + 12)
        vals = {name: raw[i] / scale for i, (name, _, scale) in enumerate(schema) if mask & (1 << i)}
        out.samples[seq] = Sample(seq, t, flags, mask, vals)
    return out


def present_fields(domain: str, mask: int) -> set[str]:
    return {name for i, (name, _, _) in enumerate(SCHEMAS[domain]) if mask & (1 << i)}


def scale_of(domain: str, name: str) -> int:
    return {n: s for n, _, s in SCHEMAS[domain]}[name]
