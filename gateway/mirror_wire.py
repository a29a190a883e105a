"""Mirror batch wire format, shared by the sending and receiving gateway.

One MQTT message = one batch:

    b"TWM1" | u32 manifest length | manifest (JSON) | body (zlib-compressed JSON)

The manifest says who sent what: origin, destination, policy name and version, batch id,
per (measurement, node) the count, sequence ranges and time span, the total point count,
and the SHA-256 of the compressed body.

Body v2 (what we send): a list of segments, one per series (measurement + tag set) and hour:
times and sequence numbers as (first, step) when regular, else delta-encoded, the field names once, then one JSON array per
point (null = absent). The sender renders each point's row text once and uses the same
text for the body and for the reconciliation digest, so it never builds per-point objects
on its hot path. Body v1 (columnar, one value list per field) is still decoded: archives
written before the upgrade are replayed from.

Reconciliation digest of one (measurement, node, hour): count, and BLAKE2b-64 over two
canonical streams in time order — the times (`t,` each) and the rows (`[v,...],` each, the
policy's output fields in name order, rounded fields as `%.Nf`, other numbers as
repr(float), so an InfluxDB round trip keeps it). The sender feeds the streams while it
builds batches; the partner rebuilds them from its InfluxDB.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from itertools import accumulate
from operator import lt, sub
from typing import Any

MAGIC = b"TWM1"
_LEN = struct.Struct("<I")
MAX_MANIFEST = 1024 * 1024
# zlib level 1: bench/mirror_bench.py measured ~7 B/reading (level 6: ~5 B) at a third of the CPU;
# the target is 38 B (5x under line protocol).
ZLIB_LEVEL = 1
WIRE_VERSION = 2
DIGEST_VERSION = 2

# A canonical spec: the output field names of a rule, in name order, each with its decimals
# (round = N, or 9 for a quantum step) or None (a number as repr(float)).
Spec = tuple[tuple[str, int | None], ...]


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


@dataclass(slots=True)
class Segment:
    """Points of one series (measurement + tags) in one hour, rows already rendered."""
    m: str
    tags: dict[str, str]
    hour: int
    names: list[str]
    ts: list[int]
    seqs: list[int | None]
    rows: list[str]              # wire text of each point's values, e.g. "[7.99,15.0]"
    canon: list[str] | None      # canonical text per point where it differs from `rows` (integer columns)
    ordered: bool = True         # times strictly increasing

    @property
    def node(self) -> str:
        return self.tags.get("node", "")

    @property
    def key(self) -> tuple[str, str, int]:
        return self.m, self.tags.get("node", ""), self.hour


def _deltas(xs: list[int]) -> list[int]:
    return [xs[0], *map(sub, xs[1:], xs[:-1])] if xs else []


def _undelta(ds: list[int]) -> list[int]:
    return list(accumulate(ds))


def seq_ranges(seqs: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def _fast_ranges(seqs: list[Any]) -> list[list[int]]:
    """seq_ranges() of the non-null seqs, with a fast path for one consecutive run."""
    if seqs and type(seqs[0]) is int and type(seqs[-1]) is int:
        a = seqs[0]
        if seqs[-1] - a == len(seqs) - 1 and seqs == list(range(a, a + len(seqs))):
            return [[a, seqs[-1]]]
    return seq_ranges([s for s in seqs if s is not None])


def _union(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


# -- canonical text (reconciliation) ----------------------------------------------------------

def canon_value(v: Any, decimals: int | None) -> str:
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        if decimals is None:
            return repr(float(v))
        return "%.0f.0" % v if decimals == 0 else "%.*f" % (decimals, v)
    return json.dumps(str(v))


def canon_row(spec: Spec, fields: dict[str, Any]) -> str:
    """Canonical text of one point's values; fields outside the spec are appended so they never match."""
    text = ",".join(canon_value(fields.get(k), d) for k, d in spec)
    names = {k for k, _d in spec}
    extra = sorted(k for k, v in fields.items() if k not in names and v is not None)
    if extra:
        text += "," + ",".join(f"{json.dumps(k)}:{canon_value(fields[k], None)}" for k in extra)
    return "[" + text + "]"


class KeyDigest:
    """Running digest of one (measurement, node, hour), fed in time order."""

    __slots__ = ("_ts", "_rows", "count", "last_t", "valid")

    def __init__(self, valid: bool = True) -> None:
        self._ts = hashlib.blake2b(digest_size=16)
        self._rows = hashlib.blake2b(digest_size=16)
        self.count = 0
        self.last_t: int | None = None
        self.valid = valid

    def feed(self, ts: list[int], rows: list[str], ordered: bool = True) -> None:
        """Times strictly increasing and after everything fed before, or the digest becomes invalid."""
        if not self.valid or not ts:
            return
        if not ordered or (self.last_t is not None and ts[0] <= self.last_t):
            self.valid = False  # out of order or a duplicate time: recomputed from the archive
            return
        self._ts.update((",".join(map(str, ts)) + ",").encode())
        self._rows.update((",".join(rows) + ",").encode())
        self.count += len(ts)
        self.last_t = ts[-1]

    def result(self) -> tuple[int, str]:
        return self.count, hashlib.blake2b(self._ts.digest() + self._rows.digest(), digest_size=8).hexdigest()


def digest_points(points: dict[int, str]) -> tuple[int, str]:
    """(count, hash) of {t: canonical row} (the last-write-wins view of one key)."""
    k = KeyDigest()
    ts = sorted(points)
    k.feed(ts, [points[t] for t in ts])
    return k.result()


def strictly_increasing(ts: list[int]) -> bool:
    return all(map(lt, ts, ts[1:])) if len(ts) > 1 else True


# -- segments from points (the generic path: aggregated bins, replays, tests) -------------------

def segments_from_points(points: list[Point], spec_for: Any = None) -> list[Segment]:
    """Group points into segments (dropping points without any value). spec_for(m) -> Spec gives the field order and canonical form;
    without it, the fields present in name order, numbers canonical as repr(float)."""
    groups: dict[tuple[str, tuple[tuple[str, str], ...], int], list[Point]] = {}
    for p in points:
        if any(v is not None for v in p.fields.values()):  # a point without values is no point in InfluxDB
            groups.setdefault((p.m, tuple(sorted(p.tags.items())), p.t - p.t % 3600), []).append(p)
    out: list[Segment] = []
    for (m, tags, hour), pts in groups.items():
        spec: Spec | None = spec_for(m) if spec_for is not None else None
        if spec is None:
            spec = tuple((k, None) for k in sorted({k for p in pts for k, v in p.fields.items() if v is not None}))
        names = [k for k, _d in spec]
        rows = [json.dumps([p.fields.get(k) for k in names], separators=(",", ":"), allow_nan=False) for p in pts]
        canon = [canon_row(spec, p.fields) for p in pts]
        ts = [int(p.t) for p in pts]
        out.append(Segment(m, dict(tags), hour, names, ts, [p.seq for p in pts], rows, canon, strictly_increasing(ts)))
    return out


# -- batch encode / decode --------------------------------------------------------------------------

def _dump(x: Any) -> str:
    return json.dumps(x, separators=(",", ":"))


def _progression(xs: list[Any]) -> tuple[int, int] | None:
    """(first, step) when xs is first, first+step, ... with an integer step >= 1 (regular sampling)."""
    if len(xs) < 2 or type(xs[0]) is not int or type(xs[1]) is not int:
        return None
    a, step = xs[0], xs[1] - xs[0]
    if step < 1 or xs[-1] != a + step * (len(xs) - 1) or xs != list(range(a, a + step * len(xs), step)):
        return None
    return a, step


def encode_body(segments: list[Segment]) -> bytes:
    parts = []
    for s in segments:
        # Times and sequence numbers: (first, step) for the regular case, else deltas (or raw with nulls).
        tp = _progression(s.ts)
        t = f'"tr":[{tp[0]},{tp[1]}]' if tp else '"t":' + _dump(_deltas(s.ts))
        qp = _progression(s.seqs)
        if qp:
            q = f'"qr":[{qp[0]},{qp[1]}]'
        elif s.seqs and None not in s.seqs:
            q = '"q":' + _dump(_deltas(s.seqs))  # type: ignore[arg-type]
        else:
            q = '"qa":' + _dump(s.seqs)
        parts.append('{"m":%s,"tags":%s,%s,%s,"k":%s,"v":[%s]}' % (
            _dump(s.m), _dump(s.tags), t, q, _dump(s.names), ",".join(s.rows)))
    return zlib.compress(('{"s":[' + ",".join(parts) + "]}").encode(), ZLIB_LEVEL)


def _expand(pair: list[Any], n: int) -> list[int]:
    a, step = int(pair[0]), int(pair[1])
    if step < 1:
        raise ValueError("progression step must be >= 1")
    return list(range(a, a + step * n, step))


def decode_body(body: bytes) -> list[Point]:
    try:
        doc = json.loads(zlib.decompress(body))
        points: list[Point] = []
        for s in doc["s"]:
            n = len(s["v"]) if "v" in s else None
            if "tr" in s:
                if n is None:
                    raise ValueError("a time progression needs rows")
                ts = _expand(s["tr"], n)
            else:
                ts = _undelta(s["t"])
            if "qr" in s:
                qs: list[int | None] = list(_expand(s["qr"], len(ts)))
            elif s.get("q") is not None:
                qs = list(_undelta(s["q"]))
            elif "qa" in s:
                qs = list(s["qa"])
            else:
                qs = [None] * len(ts)
            tags = {str(k): str(v) for k, v in s["tags"].items()}
            m = str(s["m"])
            if len(qs) != len(ts):
                raise ValueError("column lengths differ")
            if "v" in s:  # v2: rows
                names = [str(k) for k in s["k"]]
                rows = s["v"]
                if len(rows) != len(ts) or any(len(r) != len(names) for r in rows):
                    raise ValueError("row lengths differ")
                for t, q, row in zip(ts, qs, rows):
                    fields = {k: v for k, v in zip(names, row) if v is not None}
                    if not fields:
                        raise ValueError(f"a point at {t} has no field")
                    points.append(Point(m, tags, int(t), fields, q))
            else:  # v1: columns
                cols: dict[str, list[Any]] = s["f"]
                if any(len(c) != len(ts) for c in cols.values()):
                    raise ValueError("column lengths differ")
                for i, t in enumerate(ts):
                    fields = {k: c[i] for k, c in cols.items() if c[i] is not None}
                    points.append(Point(m, tags, int(t), fields, qs[i]))
        return points
    except (zlib.error, ValueError, KeyError, TypeError, AttributeError) as e:
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


def segment_entries(segments: list[Segment]) -> list[dict[str, Any]]:
    """manifest_entries() of the points the segments hold, without building them."""
    groups: dict[tuple[str, str], list[Any]] = {}
    for s in segments:
        if not s.ts:
            continue
        lo, hi = (s.ts[0], s.ts[-1]) if s.ordered else (min(s.ts), max(s.ts))
        g = groups.get((s.m, s.node))
        if g is None:
            groups[(s.m, s.node)] = [len(s.ts), _fast_ranges(s.seqs), lo, hi]
        else:
            g[0] += len(s.ts)
            g[1] = g[1] + _fast_ranges(s.seqs)
            g[2], g[3] = min(g[2], lo), max(g[3], hi)
    return [{"m": m, "node": node, "n": n, "seq": _union(r), "t": [lo, hi]}
            for (m, node), (n, r, lo, hi) in sorted(groups.items())]


def encode_segments(manifest_base: dict[str, Any], segments: list[Segment]) -> tuple[bytes, dict[str, Any]]:
    body = encode_body(segments)
    manifest = dict(manifest_base)
    manifest.update({"v": WIRE_VERSION, "points": sum(len(s.ts) for s in segments), "entries": segment_entries(segments),
                     "sha256": hashlib.sha256(body).hexdigest()})
    mbytes = json.dumps(manifest, separators=(",", ":")).encode()
    return MAGIC + _LEN.pack(len(mbytes)) + mbytes + body, manifest


def encode_batch(manifest_base: dict[str, Any], points: list[Point], spec_for: Any = None) -> tuple[bytes, dict[str, Any]]:
    return encode_segments(manifest_base, segments_from_points(points, spec_for))


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
