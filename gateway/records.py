"""Log records and their InfluxDB line protocol.

A record is what one durable-log frame holds: one measurement, one tag set, many rows.
`{"a": receive time, "m": measurement, "tags": {...}, "rows": [[t, {fields}, seq, flags], ...]}`

Frame layouts (the first byte says which):
  1: `<B 1><d received_at><I meta_len>` + record JSON + its line protocol.
  2: `<B 2><d received_at><I meta_len><I payload_len>` + record JSON without "rows" + the node's
     compact payload + its line protocol. For a compact message ingest accepted whole: the rows
     are the payload's readings (`decode.accepted_compact_readings`), so the log keeps the node's
     own ~20 bytes per reading instead of ~150 bytes of JSON rows, and ingest skips dumping them
     (50 readings/message: 0.8 against 9-10 µs per message to make the frame, 11 KB against 18 KB).
The line protocol is rendered once at ingest, so the InfluxDB sink only slices bytes (no
JSON parse on its path: bench/gateway_bench.py measured JSON decode + rendering at ~5 µs
of the ~10 µs per reading the first version spent); the mirror and the sequence replay read the rows.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import orjson

from gateway.decode import Decoded, accepted_compact_readings
from gateway.schema import SCHEMAS_BY_ID

_HEAD = struct.Struct("<BdI")
_HEAD_PAYLOAD = struct.Struct("<BdII")
FRAME_JSON_ROWS = 1
FRAME_PAYLOAD_ROWS = 2

# Per schema: the line-protocol field section for a reading with every field present, in schema order.
_FULL_FORMAT = {
    s.domain: (",".join(f"{f.name}=%di" if f.integer else f"{f.name}=%r" for f in s.fields) + " %d\n", len(s.fields))
    for s in SCHEMAS_BY_ID.values()
}

_TAG_ESC = str.maketrans({",": "\\,", " ": "\\ ", "=": "\\="})
_MEAS_ESC = str.maketrans({",": "\\,", " ": "\\ "})


class _ValueText(dict[int, str]):
    """Line-protocol text of a scaled field's raw values, made once: `repr(raw / scale)`, exactly what
    `%r` of the decoded float writes. Bounded; sensor values repeat, so it mostly hits."""

    __slots__ = ("scale",)

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale

    def __missing__(self, raw: int) -> str:
        if len(self) >= 4096:
            self.clear()
        text = self[raw] = repr(raw / self.scale)
        return text


def _raw_renderer(schema: Any) -> Callable[[str, int, list[tuple[int, ...]]], str]:
    """`render(prefix, t0, rows)`: line protocol of complete compact rows straight from their raw integers
    (Decoded.complete_rows). 50 readings/message: 19-24 µs against 36-46 µs for `%` over the decoded floats,
    whose repr() was ~a quarter of the gateway's CPU (py-spy, bench/gateway_bench.py --mode 2)."""
    namespace: dict[str, Any] = {}
    fields = []
    for j, f in enumerate(schema.fields):
        if f.integer:
            fields.append(f"{f.name}={{r{j}}}i")
        else:
            namespace[f"text{j}"] = _ValueText(f.scale)
            fields.append(f"{f.name}={{text{j}[r{j}]}}")
    args = ", ".join(f"r{j}" for j in range(len(schema.fields)))
    src = (f"def render(prefix, t0, rows):\n"
           f"    return ''.join([f\"{{prefix}}{','.join(fields)} {{t0 + dt}}\\n\" for dt, _flags, _mask, {args} in rows])\n")
    exec(compile(src, f"<records.render_{schema.domain}>", "exec"), namespace)  # names from schema.py only
    return namespace["render"]  # type: ignore[no-any-return]


_RAW_RENDER = {s.domain: _raw_renderer(s) for s in SCHEMAS_BY_ID.values()}


def rows_of(readings: list[Any]) -> list[list[Any]]:
    """A record's rows: `[t, {fields}, seq, flags]`, the unsynced flag also as a field."""
    rows = []
    for r in readings:
        fields = r.values
        if r.flags & 1:
            fields = dict(fields)
            fields["unsynced"] = True
        rows.append([r.t, fields, r.seq, r.flags])
    return rows


def reading_record(dec: Decoded, site: str, received_at: float, readings: list[Any]) -> dict[str, Any]:
    return {
        "a": received_at,
        "m": dec.schema.domain,
        "tags": {"city": dec.topic.city, "domain": dec.topic.domain, "node": dec.node, "site": site},
        "rows": rows_of(readings),
    }


def encode(record: dict[str, Any], lines: str | None = None, payload: bytes | None = None) -> bytes:
    """A log frame: the record and its line protocol (rendered here unless given).

    `payload`: the compact payload every row of the record was decoded from, all of its readings
    accepted; the frame then keeps it in place of the JSON rows (layout 2).
    """
    # orjson: 0.3 µs against json.dumps' 4.2 µs for a one-reading record, ~12 % of the gateway's CPU at one
    # reading per message (bench/gateway_bench.py --mode 1). NaN/inf never get here: the decoders reject them.
    if lines is None:
        lines = "".join(line + "\n" for line in to_lines(record))
    if payload is None:
        meta = orjson.dumps(record)
        return _HEAD.pack(FRAME_JSON_ROWS, float(record["a"]), len(meta)) + meta + lines.encode()
    meta = orjson.dumps({"a": record["a"], "m": record["m"], "tags": record["tags"]})
    return _HEAD_PAYLOAD.pack(FRAME_PAYLOAD_ROWS, float(record["a"]), len(meta), len(payload)) + meta + payload + lines.encode()


def _layout(blob: bytes) -> tuple[int, int, int]:
    """(start of the JSON, its length, length of the payload after it) of a frame of either layout."""
    if blob[0] == FRAME_PAYLOAD_ROWS:
        _v, _a, n, p = _HEAD_PAYLOAD.unpack_from(blob)
        return _HEAD_PAYLOAD.size, n, p
    if blob[0] == FRAME_JSON_ROWS:
        return _HEAD.size, _HEAD.unpack_from(blob)[2], 0
    raise ValueError(f"durable-log frame layout {blob[0]} is not one this gateway reads (1 or 2): "
                     "was the log written by a newer version?")


def decode(blob: bytes) -> dict[str, Any]:
    """The record of a frame, rows included."""
    start, n, p = _layout(blob)
    rec: dict[str, Any] = orjson.loads(blob[start : start + n])
    if p:
        rec["rows"] = rows_of(accepted_compact_readings(blob[start + n : start + n + p]))
    return rec


def frame_lines(blob: bytes) -> bytes:
    """The frame's line protocol, newline-terminated lines."""
    start, n, p = _layout(blob)
    return blob[start + n + p :]


def frame_received_at(blob: bytes) -> float:
    return float(_HEAD.unpack_from(blob)[1])


def reading_lines(record: dict[str, Any], dec: Decoded, readings: list[Any], prefix: str | None = None) -> str:
    """Line protocol of a reading record, fast path for compact batches (values in schema order).

    `prefix` (measurement and tags, from `line_prefix`) may be passed in by a caller that caches it per node.
    """
    if dec.fmt != "compact":
        return "".join(line + "\n" for line in to_lines(record))
    if prefix is None:
        prefix = line_prefix(record)
    if dec.complete_rows is not None and readings is dec.readings:
        return _RAW_RENDER[dec.schema.domain](prefix, dec.t0, dec.complete_rows)
    fmt, nfields = _FULL_FORMAT[dec.schema.domain]
    args: list[Any] = []
    add_values = args.extend
    for r in readings:
        if len(r.values) != nfields or r.flags:
            break
        add_values(r.values.values())
        args.append(r.t)
    else:
        # Every reading complete: one % over the whole batch (~20 % cheaper than one per reading).
        return ((prefix + fmt) * len(readings)) % tuple(args)
    fv = _field_value
    parts = []
    for r in readings:
        v = r.values
        if len(v) == nfields and not r.flags:
            parts.append(prefix + fmt % (*v.values(), r.t))
        else:
            fields = ",".join(f"{k}={fv(x)}" for k, x in v.items())
            if r.flags & 1:
                fields += ",unsynced=true"
            parts.append(f"{prefix}{fields} {r.t}\n")
    return "".join(parts)


def escape_tag(v: str) -> str:
    return v.translate(_TAG_ESC)


def _field_value(v: object) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return f"{v}i"
    if isinstance(v, float):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def line_prefix(record: dict[str, Any], extra_tags: dict[str, str] | None = None) -> str:
    tags = dict(record["tags"])
    if extra_tags:
        tags.update(extra_tags)
    parts = [record["m"].translate(_MEAS_ESC)]
    for k in sorted(tags):
        v = tags[k]
        if v != "":
            parts.append(f"{escape_tag(k)}={escape_tag(str(v))}")
    return ",".join(parts) + " "


def to_lines(record: dict[str, Any], extra_tags: dict[str, str] | None = None) -> list[str]:
    """One line per row; seconds precision."""
    prefix = line_prefix(record, extra_tags)
    out = []
    fv = _field_value
    for row in record["rows"]:
        fields = row[1]
        # An optional 5th element is a per-row `field` tag (alarm records).
        p = prefix if len(row) < 5 else prefix[:-1] + f",field={escape_tag(row[4])} "
        out.append(p + ",".join(f"{k}={fv(v)}" for k, v in fields.items()) + f" {row[0]}")
    return out
