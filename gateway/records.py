"""Log records and their InfluxDB line protocol.

A record is what one durable-log frame holds: one measurement, one tag set, many rows.
`{"a": receive time, "m": measurement, "tags": {...}, "rows": [[t, {fields}, seq, flags], ...]}`
JSON keeps the log readable with standard tools and portable across Python versions; the
per-reading cost is measured in bench/gateway_bench.py.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.decode import Decoded

_TAG_ESC = str.maketrans({",": "\\,", " ": "\\ ", "=": "\\="})
_MEAS_ESC = str.maketrans({",": "\\,", " ": "\\ "})


def reading_record(dec: Decoded, site: str, received_at: float, readings: list[Any]) -> dict[str, Any]:
    rows = []
    for r in readings:
        fields = r.values
        if r.flags & 1:
            fields = dict(fields)
            fields["unsynced"] = True
        rows.append([r.t, fields, r.seq, r.flags])
    return {
        "a": received_at,
        "m": dec.schema.domain,
        "tags": {"city": dec.topic.city, "domain": dec.topic.domain, "node": dec.node, "site": site},
        "rows": rows,
    }


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode()


def decode(blob: bytes) -> dict[str, Any]:
    return json.loads(blob)  # type: ignore[no-any-return]


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
