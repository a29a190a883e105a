"""Mirror batch wire format, shared by the sending and receiving gateway.

One MQTT message = one batch:

    b"TWM1" | u32 manifest length | manifest (JSON) | body (zlib level 1)

The manifest says who sent what: origin, destination, policy name and version, batch id,
per (measurement, node) the count, sequence ranges and time span, the total point count,
and the SHA-256 of the compressed body.

Body v3 (what we send), before compression: `b"TWB3" | u32 header length | header JSON | columns`.
The header lists segments, one per series (measurement + tag set) and hour: times and sequence
numbers as (first, step) when regular, else delta-encoded, the field names once (`k`), and
either the kinds of one binary column per field (`c`) or, for points the columns cannot hold
(absent values, booleans, mixed types), one JSON array per point (`v`, null = absent). The
columns follow the header in segment and field order, little-endian: `"i"` int64 (integer
field), `"d"` float64 (number kept as is), `"fN"` int64 fixed point (a `round = N` field: the
value is q / 10**N); `"/2"` or `"/4"` after an integer kind means int16 / int32. The sender builds
the columns of a whole flush with a few vectorised calls per field instead of formatting every
value as text. Bodies v2
(JSON rows) and v1 (JSON columns) are still decoded: archives written before an upgrade replay.

Reconciliation digest of one (measurement, node, hour), version 3: count, and BLAKE2b-64 over
canonical streams in time order: the times (int64), one stream per output field of the policy
(name order) — int64 round(v, N) * 10**N for a field with N decimals (round = N, or 9 for a
quantum step), float64 for a field kept as is, a sentinel for absent — and one text stream
for what is not a number (booleans, strings, fields outside the policy, so they never match).
For the common case these streams are the very bytes of the body's columns, so the sender
feeds its running digests with them; the partner rebuilds them from its InfluxDB (an integral
float read back as an int gives the same stream).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from operator import lt, sub
from typing import Any

import numpy as np

MAGIC = b"TWM1"
BODY3 = b"TWB3"
_LEN = struct.Struct("<I")
MAX_MANIFEST = 1024 * 1024
MAX_BODY = 256 * 1024 * 1024
# zlib level 1: bench/mirror_bench.py measured it at a third of level 6's CPU; the target is 38 B
# per reading (5x under line protocol), level 1 gives a few bytes.
ZLIB_LEVEL = 1
WIRE_VERSION = 3
DIGEST_VERSION = 3
_LITTLE = sys.byteorder == "little"
_I2, _I4, _I8, _F8 = np.dtype("<i2"), np.dtype("<i4"), np.dtype("<i8"), np.dtype("<f8")
_WIDTHS = {"2": _I2, "4": _I4, "": _I8}
# Digest sentinels for "no number here" (absent, or see the text stream).
_NO_Q = -(2**63)
_NO_D = float("nan")
# Fixed-point values the fast way takes: below 2**50, q / 10**N read back from InfluxDB and scaled again
# gives q exactly (larger ones go value by value, where both sides compute from the same double).
_Q_MAX = 2.0**50

# A canonical spec: the output field names of a rule, in name order, each with its decimals
# (round = N, or 9 for a quantum step) or None (a number kept as is).
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
    """Points of one series (measurement + tags) in one hour, values already in wire and digest form."""
    m: str
    tags: dict[str, str]
    hour: int
    names: list[str]
    ts: list[int]
    seqs: Sequence[int | None]   # a list, or a range (the sender's usual consecutive numbers)
    kinds: list[str] | None      # binary columns: kind per field ("i", "d", "fN"); None = JSON rows
    cols: list[Any] | None       # binary columns (wire; numpy, little-endian), one per field
    rows: list[str] | None       # JSON rows, e.g. "[7.99,null]", when the columns cannot hold the points
    canon: list[Any]             # digest stream per field (numpy int64/float64; often the wire column)
    others: list[tuple[int, str]]  # digest text of values that are not numbers: (index in segment, text)
    ordered: bool = True         # times strictly increasing
    head: str = ""               # cached JSON of m, tags and field names (the sender's routes keep it)

    @property
    def node(self) -> str:
        return self.tags.get("node", "")

    @property
    def key(self) -> tuple[str, str, int]:
        return self.m, self.tags.get("node", ""), self.hour

    def slice(self, a: int, b: int) -> "Segment":
        ts = self.ts[a:b]
        return Segment(self.m, self.tags, self.hour, self.names, ts, self.seqs[a:b], self.kinds,
                       None if self.cols is None else [c[a:b] for c in self.cols],
                       None if self.rows is None else self.rows[a:b], [c[a:b] for c in self.canon],
                       [(i - a, x) for i, x in self.others if a <= i < b], self.ordered or strictly_increasing(ts), self.head)


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


def _fast_ranges(seqs: Sequence[Any]) -> list[list[int]]:
    """seq_ranges() of the non-null seqs, with a fast path for one consecutive run."""
    if isinstance(seqs, range) and seqs.step == 1:
        return [[seqs.start, seqs[-1]]] if seqs else []
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


# -- columns and the reconciliation digest ------------------------------------------------------

def fast_columns(spec: Spec, cols: Sequence[Sequence[Any]]) -> tuple[list[str], list[Any], list[Any]] | None:
    """Wire kinds, wire columns and digest streams of value columns (one per spec field, every value
    present), or None when a column is not all floats or all ints (or not finite, or out of range):
    then the caller takes the value-by-value way. Vectorised (numpy): a `round = N` column of floats
    becomes round(v, N) * 10**N, exactly what FieldRule.apply() keeps; wire columns are narrowed to
    int16/int32 when their values fit (zlib then has less to chew)."""
    kinds: list[str] = []
    wire: list[Any] = []
    canon: list[Any] = []
    if len(cols) != len(spec):
        return None
    try:
        for (_k, d), col in zip(spec, cols):
            types = set(map(type, col))
            if len(types) != 1:
                return None
            kind = types.pop()
            if kind is float:
                got = _float_column(np.array(col, dtype=_F8), d)
                if got is None:
                    return None
                kinds.append(got[0])
                wire.append(got[1])
                canon.append(got[2])
                continue
            if kind is not int:
                return None
            q = np.array(col, dtype=_I8)
            lo, hi = int(q.min()), int(q.max())
            canon.append(q.astype(_F8) if d is None else q if d == 0 else _scaled(q, lo, hi, d))
            code, w = _narrow("i", q, lo, hi)
            kinds.append(code)
            wire.append(w)
    except (OverflowError, ValueError, TypeError):
        return None
    return kinds, wire, canon


def float_columns(spec: Spec, cols: list[Any]) -> tuple[list[str], list[Any], list[Any]] | None:
    """fast_columns() of float64 columns (numpy, one per spec field)."""
    kinds: list[str] = []
    wire: list[Any] = []
    canon: list[Any] = []
    if len(cols) != len(spec):
        return None
    for x, (_k, d) in zip(cols, spec):
        got = _float_column(x, d)
        if got is None:
            return None
        kinds.append(got[0])
        wire.append(got[1])
        canon.append(got[2])
    return kinds, wire, canon


def _float_column(x: Any, d: int | None) -> tuple[str, Any, Any] | None:
    """(kind code, wire array, canonical array) of one float64 column; None if it has no exact fixed-point form."""
    if d is None:
        if not np.isfinite(x).all():
            return None
        return "d", x, x
    y = _round_scaled(x, d)
    if not (np.abs(y) < _Q_MAX).all():  # also false for inf/nan
        return None
    q = y.astype(_I8)
    code, w = _narrow(f"f{d}", q, int(q.min()), int(q.max())) if len(q) else (f"f{d}", q)
    return code, w, q


def _narrow(code: str, q: Any, lo: int, hi: int) -> tuple[str, Any]:
    if -(2**15) <= lo and hi < 2**15:
        return code + "/2", q.astype(_I2)
    if -(2**31) <= lo and hi < 2**31:
        return code + "/4", q.astype(_I4)
    return code, q


def _round_scaled(x: Any, d: int) -> Any:
    """round(v, d) * 10**d for every v of x (float64), as floats holding integers: exactly Python's
    correctly rounded round(v, d), vectorised. rint(v * 10**d) is right unless the product lands on a
    half (k + 0.5); there the exact product decides, from its rounding error (Dekker's two-product),
    and an exact half goes to even, like round()."""
    s = float(10**d)
    y = x * s
    q = np.rint(y)
    fl = np.floor(y)
    tie = (y - fl) == 0.5
    if tie.any():
        xt, yt, ft = x[tie], y[tie], fl[tie]
        c = 134217729.0  # 2**27 + 1: Veltkamp split into 26-bit halves
        t = c * xt
        xh = t - (t - xt)
        xl = xt - xh
        t = c * s
        sh = t - (t - s)
        sl = s - sh
        err = ((xh * sh - yt) + xh * sl + xl * sh) + xl * sl  # exact v * 10**d == y + err
        q[tie] = np.where(err > 0, ft + 1, np.where(err < 0, ft, q[tie]))
    return q


def _scaled(q: Any, lo: int, hi: int, d: int) -> Any:
    if max(-lo, hi) * 10**d >= 2**63:
        raise OverflowError("integer too large for its decimals")
    return q * (10**d)


def canon_columns(spec: Spec, points: Sequence[dict[str, Any]]) -> tuple[list[Any], list[tuple[int, str]]]:
    """Digest streams value by value (any values; fields outside the spec go to the text stream).
    The reference for fast_columns(), and what the partner computes from its InfluxDB."""
    canon: list[Any] = []
    others: list[tuple[int, str]] = []
    for k, d in spec:
        a: list[Any] = []
        scale = None if d is None else 10**d
        for i, f in enumerate(points):
            v = f.get(k)
            q: Any = None
            if v is not None and v is not True and v is not False and isinstance(v, (int, float)):
                if scale is None:
                    q = float(v)
                elif isinstance(v, int):
                    q = v * scale
                elif math.isfinite(v):
                    q = round(round(v, d) * float(scale))  # d is set here
                if q is not None and scale is not None and not -(2**63) < q < 2**63:
                    q = None
            if q is None:
                a.append(_NO_D if scale is None else _NO_Q)
                if v is not None:
                    others.append((i, f"{json.dumps(k)}:{json.dumps(v)}"))
            else:
                a.append(q)
        canon.append(np.array(a, dtype=_F8 if scale is None else _I8))
    names = {k for k, _d in spec}
    for i, f in enumerate(points):
        extra = sorted(k for k, v in f.items() if k not in names and v is not None)
        for k in extra:
            others.append((i, f"{json.dumps(k)}:{json.dumps(f[k])}"))
    others.sort(key=lambda o: o[0])
    return canon, others


class KeyDigest:
    """Running digest of one (measurement, node, hour), fed in time order."""

    __slots__ = ("_ts", "_cols", "_others", "count", "last_t", "valid")

    def __init__(self, ncols: int, valid: bool = True) -> None:
        self._ts = hashlib.blake2b(digest_size=16)
        self._cols = [hashlib.blake2b(digest_size=16) for _ in range(ncols)]
        self._others = hashlib.blake2b(digest_size=16)
        self.count = 0
        self.last_t: int | None = None
        self.valid = valid

    def feed(self, ts: list[int], canon: list[Any], others: list[tuple[int, str]], ordered: bool = True) -> None:
        """Times strictly increasing and after everything fed before, or the digest becomes invalid."""
        if not self.valid or not ts:
            return
        if not ordered or (self.last_t is not None and ts[0] <= self.last_t) or len(canon) != len(self._cols):
            self.valid = False  # out of order, a duplicate time, another spec: recomputed from the archive
            return
        self._ts.update(_le(array("q", ts)))
        for h, c in zip(self._cols, canon):
            h.update(c.data)  # 1-D slices of contiguous columns: contiguous
        if others:
            base = self.count
            self._others.update("".join(f"{base + i}:{x};" for i, x in others).encode())
        self.count += len(ts)
        self.last_t = ts[-1]

    def result(self) -> tuple[int, str]:
        parts = [self._ts.digest(), *(h.digest() for h in self._cols), self._others.digest()]
        return self.count, hashlib.blake2b(b"".join(parts), digest_size=8).hexdigest()


def digest_points(points: dict[int, dict[str, Any]], spec: Spec) -> tuple[int, str]:
    """(count, hash) of {t: fields} (the last-write-wins view of one key)."""
    ts = sorted(points)
    rows = [points[t] for t in ts]
    canon: list[Any] | None = None
    others: list[tuple[int, str]] = []
    names = [k for k, _d in spec]
    # Every point with exactly the policy's fields, one number type per field (what the partner's InfluxDB
    # holds for raw readings): the vectorised columns, the same streams as canon_columns() (the sender's
    # running digests rely on it too). Value by value took most of a receiving gateway's CPU when it
    # answered a reconciliation round with full digests (py-spy, bench/mirror_bench.py).
    if names and all(len(f) == len(names) for f in rows):
        try:
            fast = fast_columns(spec, [[f[k] for f in rows] for k in names])
        except KeyError:
            fast = None
        if fast is not None:
            canon = fast[2]
    if canon is None:
        canon, others = canon_columns(spec, rows)
    k = KeyDigest(len(spec))
    k.feed(ts, canon, others)
    return k.result()


def _le(a: array) -> array:
    """The array in little-endian byte order (the wire's and the digest's)."""
    if _LITTLE:
        return a
    b = array(a.typecode, a)
    b.byteswap()
    return b


def strictly_increasing(ts: Sequence[int]) -> bool:
    return all(map(lt, ts, ts[1:])) if len(ts) > 1 else True


# -- segments from points (the generic path: aggregated bins, replays, slow records, tests) --------

def make_segment(m: str, tags: dict[str, str], hour: int, spec: Spec, ts: list[int], seqs: list[Any],
                 points: list[dict[str, Any]], ordered: bool) -> Segment:
    """A segment of points whose values already follow the policy (binary columns when they fit)."""
    names = [k for k, _d in spec]
    if all(len(f) == len(names) for f in points):
        try:
            cols = [[f[k] for f in points] for k in names]
        except KeyError:
            cols = []
        fast = fast_columns(spec, cols) if cols else None
        if fast is not None:
            kinds, wire, canon = fast
            return Segment(m, tags, hour, names, ts, seqs, kinds, wire, None, canon, [], ordered)
    rows = [json.dumps([f.get(k) for k in names], separators=(",", ":"), allow_nan=False) for f in points]
    canon, others = canon_columns(spec, points)
    return Segment(m, tags, hour, names, ts, seqs, None, None, rows, canon, others, ordered)


def segments_from_points(points: list[Point], spec_for: Any = None) -> list[Segment]:
    """Group points into segments (dropping points without any value). spec_for(m) -> Spec gives the field order and canonical form;
    without it, the fields present in name order, numbers kept as is."""
    groups: dict[tuple[str, tuple[tuple[str, str], ...], int], list[Point]] = {}
    for p in points:
        if any(v is not None for v in p.fields.values()):  # a point without values is no point in InfluxDB
            groups.setdefault((p.m, tuple(sorted(p.tags.items())), p.t - p.t % 3600), []).append(p)
    out: list[Segment] = []
    for (m, tags, hour), pts in groups.items():
        spec: Spec | None = spec_for(m) if spec_for is not None else None
        if spec is None:
            spec = tuple((k, None) for k in sorted({k for p in pts for k, v in p.fields.items() if v is not None}))
        ts = [int(p.t) for p in pts]
        fields = [{k: v for k, v in p.fields.items() if v is not None} for p in pts]
        out.append(make_segment(m, dict(tags), hour, spec, ts, [p.seq for p in pts], fields, strictly_increasing(ts)))
    return out


# -- batch encode / decode --------------------------------------------------------------------------

def _dump(x: Any) -> str:
    return json.dumps(x, separators=(",", ":"))


def _progression(xs: Sequence[Any]) -> tuple[int, int] | None:
    """(first, step) when xs is first, first+step, ... with an integer step >= 1 (regular sampling)."""
    if isinstance(xs, range):
        return (xs.start, xs.step) if len(xs) >= 2 and xs.step >= 1 else None
    if len(xs) < 2 or type(xs[0]) is not int or type(xs[1]) is not int:
        return None
    a, step = xs[0], xs[1] - xs[0]
    if step < 1 or xs[-1] != a + step * (len(xs) - 1) or xs != list(range(a, a + step * len(xs), step)):
        return None
    return a, step


def segment_head(m: str, tags: dict[str, str], names: list[str]) -> str:
    return '"m":%s,"tags":%s,"k":%s' % (_dump(m), _dump(tags), _dump(names))


def encode_body(segments: list[Segment]) -> bytes:
    parts = []
    blobs: list[Any] = []
    kinds_json: dict[int, str] = {}
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
            q = '"qa":' + _dump(list(s.seqs))
        if s.cols is not None and s.kinds is not None:
            kj = kinds_json.get(id(s.kinds))
            if kj is None:
                kj = kinds_json[id(s.kinds)] = _dump(s.kinds)
            vals = f'"n":{len(s.ts)},"c":{kj}'
            blobs.extend(s.cols)
        else:
            vals = '"v":[' + ",".join(s.rows or ()) + "]"
        parts.append("{%s,%s,%s,%s}" % (s.head or segment_head(s.m, s.tags, s.names), t, q, vals))
    head = ('{"s":[' + ",".join(parts) + "]}").encode()
    return zlib.compress(b"".join([BODY3, _LEN.pack(len(head)), head, *blobs]), ZLIB_LEVEL)


def _expand(pair: list[Any], n: int) -> list[int]:
    a, step = int(pair[0]), int(pair[1])
    if step < 1:
        raise ValueError("progression step must be >= 1")
    return list(range(a, a + step * n, step))


def _parse_kind(kind: str) -> tuple[str, Any]:
    base, _, width = kind.partition("/")
    dt = _WIDTHS.get(width)
    if dt is None or (base == "d" and width) or not (base in ("i", "d") or (
            base[:1] == "f" and base[1:].isdigit() and int(base[1:]) <= 9)):
        raise ValueError(f"unknown column kind {kind!r}")
    return base, _F8 if base == "d" else dt


def _column(base: str, dt: Any, raw: bytes) -> list[Any]:
    vals = np.frombuffer(raw, dtype=dt)
    if base == "i":
        return vals.astype(_I8).tolist()  # type: ignore[no-any-return]
    if base == "d":
        if not np.isfinite(vals).all():
            raise ValueError("a float column holds inf or nan")
        return vals.tolist()  # type: ignore[no-any-return]
    scale = 10 ** int(base[1:])
    return [q / scale for q in vals.tolist()]


def decode_body(body: bytes) -> list[Point]:
    try:
        zd = zlib.decompressobj()
        raw = zd.decompress(body, MAX_BODY)
        if zd.unconsumed_tail:
            raise ValueError(f"body larger than {MAX_BODY} bytes")
        blob = b""
        pos = 0
        if raw[:4] == BODY3:
            (n,) = _LEN.unpack_from(raw, 4)
            doc = json.loads(raw[8 : 8 + n])
            blob = raw[8 + n :]
        else:  # v1/v2: JSON
            doc = json.loads(raw)
        points: list[Point] = []
        for s in doc["s"]:
            n = len(s["v"]) if "v" in s else int(s["n"]) if "n" in s else None
            if "tr" in s:
                if n is None or n < 0:
                    raise ValueError("a time progression needs a point count")
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
            if "c" in s:  # v3: binary columns
                if n is not None and n != len(ts):
                    raise ValueError("point count and times differ")
                names = [str(k) for k in s["k"]]
                kinds = s["c"]
                if len(kinds) != len(names):
                    raise ValueError("column kinds and field names differ")
                cols = []
                for kind in kinds:
                    base, dt = _parse_kind(str(kind))
                    width = dt.itemsize * len(ts)
                    if pos + width > len(blob):
                        raise ValueError("columns shorter than the header says")
                    cols.append(_column(base, dt, blob[pos : pos + width]))
                    pos += width
                for i, (t, q) in enumerate(zip(ts, qs)):
                    points.append(Point(m, tags, int(t), {k: c[i] for k, c in zip(names, cols)}, q))
            elif "v" in s:  # v2: rows
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
                cols1: dict[str, list[Any]] = s["f"]
                if any(len(c) != len(ts) for c in cols1.values()):
                    raise ValueError("column lengths differ")
                for i, t in enumerate(ts):
                    fields = {k: c[i] for k, c in cols1.items() if c[i] is not None}
                    points.append(Point(m, tags, int(t), fields, qs[i]))
        if pos != len(blob):
            raise ValueError("columns longer than the header says")
        return points
    except (zlib.error, ValueError, KeyError, TypeError, AttributeError, struct.error, OverflowError) as e:
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
