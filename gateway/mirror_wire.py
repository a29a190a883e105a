"""Mirror batch wire format, shared by the sending and receiving gateway.

One MQTT message = one batch:

    b"TWM1" | u32 manifest length | manifest (JSON) | body (zlib-compressed JSON)

The manifest says who sent what: origin, destination, policy name and version, batch id,
per (measurement, node) the count, sequence ranges and time span, the total point count,
and the SHA-256 of the compressed body. The body is columnar per series (one
measurement + tag set): times and sequence numbers delta-encoded, one value column per
field (null = absent), which zlib compresses far better than line protocol.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

MAGIC = b"TWM1"
_LEN = struct.Struct("<I")
MAX_MANIFEST = 1024 * 1024


class WireError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class Point:
    m: str
    tags: dict[str, str]
    t: int
    fields: dict[str, Any]
    seq: int | None = None

    @property
    def node(self) -> str:
        return self.tags.get("node", "")


def _deltas(xs: list[int]) -> list[int]:
    return [xs[0]] + [b - a for a, b in zip(xs, xs[1:])] if xs else []


def _undelta(ds: list[int]) -> list[int]:
    out: list[int] = []
    acc = 0
    for i, d in enumerate(ds):
        acc = d if i == 0 else acc + d
        out.append(acc)
    return out


def seq_ranges(seqs: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def encode_body(points: list[Point]) -> bytes:
    series: dict[tuple[str, tuple[tuple[str, str], ...]], list[Point]] = {}
    for p in points:
        series.setdefault((p.m, tuple(sorted(p.tags.items()))), []).append(p)
    out = []
    for (m, tags), pts in series.items():
        names: list[str] = []
        for p in pts:
            for k in p.fields:
                if k not in names:
                    names.append(k)
        seqs = [p.seq for p in pts]
        out.append({
            "m": m, "tags": dict(tags), "t": _deltas([p.t for p in pts]),
            "q": _deltas([s for s in seqs if s is not None]) if all(s is not None for s in seqs) else None,
            "f": {k: [p.fields.get(k) for p in pts] for k in names},
        })
    return zlib.compress(json.dumps({"s": out}, separators=(",", ":"), allow_nan=False).encode(), 6)


def decode_body(body: bytes) -> list[Point]:
    try:
        doc = json.loads(zlib.decompress(body))
        points: list[Point] = []
        for s in doc["s"]:
            ts = _undelta(s["t"])
            qs: list[int | None] = list(_undelta(s["q"])) if s["q"] is not None else [None] * len(ts)
            cols: dict[str, list[Any]] = s["f"]
            tags = {str(k): str(v) for k, v in s["tags"].items()}
            if len(qs) != len(ts) or any(len(c) != len(ts) for c in cols.values()):
                raise ValueError("column lengths differ")
            for i, t in enumerate(ts):
                fields = {k: c[i] for k, c in cols.items() if c[i] is not None}
                points.append(Point(str(s["m"]), tags, int(t), fields, qs[i]))
        return points
    except (zlib.error, ValueError, KeyError, TypeError) as e:
        raise WireError("format", f"batch body cannot be decoded: {e}") from None


def manifest_entries(points: list[Point]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        groups.setdefault((p.m, p.node), []).append(p)
    out = []
    for (m, node), pts in sorted(groups.items()):
        seqs = [p.seq for p in pts if p.seq is not None]
        out.append({"m": m, "node": node, "n": len(pts), "seq": seq_ranges(seqs),
                    "t": [min(p.t for p in pts), max(p.t for p in pts)]})
    return out


def encode_batch(manifest_base: dict[str, Any], points: list[Point]) -> tuple[bytes, dict[str, Any]]:
    body = encode_body(points)
    manifest = dict(manifest_base)
    manifest.update({"v": 1, "points": len(points), "entries": manifest_entries(points),
                     "sha256": hashlib.sha256(body).hexdigest()})
    mbytes = json.dumps(manifest, separators=(",", ":")).encode()
    return MAGIC + _LEN.pack(len(mbytes)) + mbytes + body, manifest


def split_batch(msg: bytes) -> tuple[dict[str, Any], bytes]:
    """Manifest and body, with the body's hash checked. Raises WireError(format|hash)."""
    if len(msg) < 8 or msg[:4] != MAGIC:
        raise WireError("format", "not a TwinEdge mirror batch (bad magic)")
    (n,) = _LEN.unpack_from(msg, 4)
    if n > MAX_MANIFEST or 8 + n > len(msg):
        raise WireError("format", f"manifest length {n} does not fit the message of {len(msg)} bytes")
    try:
        manifest = json.loads(msg[8 : 8 + n])
        if not isinstance(manifest, dict):
            raise ValueError("manifest is not an object")
    except ValueError as e:
        raise WireError("format", f"manifest is not JSON: {e}") from None
    body = msg[8 + n :]
    want = manifest.get("sha256")
    got = hashlib.sha256(body).hexdigest()
    if want != got:
        raise WireError("hash", f"body SHA-256 {got[:16]}… does not match the manifest's {str(want)[:16]}…")
    return manifest, body


def check_manifest(manifest: dict[str, Any], points: list[Point]) -> None:
    """The decoded body must be exactly what the manifest claims."""
    if manifest.get("points") != len(points):
        raise WireError("manifest", f"manifest claims {manifest.get('points')} points, body has {len(points)}")
    if manifest.get("entries") != manifest_entries(points):
        raise WireError("manifest", "manifest entries (nodes, counts, sequence ranges) do not match the body")


# -- digests for reconciliation ---------------------------------------------------------------

def _canon(v: Any) -> str:
    if v is True:
        return "T"
    if v is False:
        return "F"
    if isinstance(v, (int, float)):
        return repr(float(v))
    return "s" + str(v)


def point_hash(m: str, node: str, t: int, fields: dict[str, Any]) -> int:
    """Order-independent digest part of one point; InfluxDB round trips keep it (ints/floats normalised)."""
    text = f"{m}|{node}|{t}|" + ";".join(f"{k}={_canon(fields[k])}" for k in sorted(fields) if fields[k] is not None)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def digest(points: dict[int, int]) -> tuple[int, str]:
    """(count, hex sum mod 2^64) of {t: point hash} for one measurement/node/hour."""
    return len(points), format(sum(points.values()) % (1 << 64), "016x")
