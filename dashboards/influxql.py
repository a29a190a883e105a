"""A small InfluxQL query type for grafana-foundation-sdk (it ships none), plus Grafana's interpolation.

The query type follows the SDK's documented custom-query route: a `Dataquery` variant with
`to_json`, a builder, and a registered `DataqueryConfig`, so the SDK can also read it back.

`interpolate` renders a query the way Grafana's InfluxDB datasource does for the variables we
use, so the tests can execute every panel query against a real InfluxDB.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models.common import DataSourceRef

INFLUX_TYPE = "influxdb"
HOME = "influx-home"
PARTNER = "influx-partner"
DATASOURCE_UIDS = (HOME, PARTNER)

ResultFormat = Literal["time_series", "table"]


def ds(uid: str) -> DataSourceRef:
    if uid not in DATASOURCE_UIDS:
        raise ValueError(f"datasource uid {uid!r} is not one of {DATASOURCE_UIDS}")
    return DataSourceRef(type_val=INFLUX_TYPE, uid=uid)


class InfluxQLQuery(cogvariants.Dataquery):
    """A raw InfluxQL target of Grafana's InfluxDB datasource (InfluxQL mode)."""

    def __init__(
        self,
        query: str,
        ref_id: str | None = None,
        datasource: DataSourceRef | None = None,
        result_format: ResultFormat = "time_series",
        alias: str | None = None,
        hide: bool | None = None,
    ) -> None:
        self.query = query
        self.ref_id = ref_id
        self.datasource = datasource
        self.result_format = result_format
        self.alias = alias
        self.hide = hide

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {"query": self.query, "rawQuery": True, "resultFormat": self.result_format}
        if self.ref_id is not None:
            payload["refId"] = self.ref_id
        if self.datasource is not None:
            payload["datasource"] = self.datasource.to_json()
        if self.alias is not None:
            payload["alias"] = self.alias
        if self.hide is not None:
            payload["hide"] = self.hide
        return payload

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        dsj = data.get("datasource")
        return cls(
            query=data.get("query", ""),
            ref_id=data.get("refId"),
            datasource=DataSourceRef.from_json(dsj) if isinstance(dsj, dict) else None,
            result_format=data.get("resultFormat", "time_series"),
            alias=data.get("alias"),
            hide=data.get("hide"),
        )


class InfluxQL(cogbuilder.Builder[cogvariants.Dataquery]):
    def __init__(self, query: str) -> None:
        self._internal = InfluxQLQuery(query)

    def build(self) -> InfluxQLQuery:
        return self._internal

    def ref_id(self, ref_id: str) -> Self:
        self._internal.ref_id = ref_id
        return self

    def datasource(self, ref: DataSourceRef) -> Self:
        self._internal.datasource = ref
        return self

    def table(self) -> Self:
        self._internal.result_format = "table"
        return self

    def alias(self, alias: str) -> Self:
        self._internal.alias = alias
        return self


class SnapshotQuery(cogvariants.Dataquery):
    """A static data frame served by Grafana's built-in `-- Grafana --` datasource (query type `snapshot`).

    Used for the registry's node coordinates: they change with the registry (a rebuild and
    push), not with the data, and InfluxQL cannot emit constants.
    """

    def __init__(self, ref_id: str, frame: dict[str, object]) -> None:
        self.ref_id = ref_id
        self.frame = frame

    def to_json(self) -> dict[str, object]:
        return {
            "refId": self.ref_id,
            "datasource": {"type": "datasource", "uid": "grafana"},
            "queryType": "snapshot",
            "snapshot": [self.frame],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        return cls(data.get("refId", ""), (data.get("snapshot") or [{}])[0])


class Snapshot(cogbuilder.Builder[cogvariants.Dataquery]):
    def __init__(self, ref_id: str, frame: dict[str, object]) -> None:
        self._internal = SnapshotQuery(ref_id, frame)

    def build(self) -> SnapshotQuery:
        return self._internal


def register() -> None:
    """Let the SDK decode our targets when it reads a dashboard back (idempotent)."""
    cogruntime.register_dataquery_variant(cogruntime.DataqueryConfig(INFLUX_TYPE, InfluxQLQuery.from_json))


# ---- Grafana-style interpolation (what the InfluxDB datasource does before sending) ----

VAR_RE = re.compile(r"\$(\w+)|\$\{(\w+)(?::([\w:]+))?\}|\[\[(\w+)(?::(\w+))?\]\]")
# Variables Grafana provides itself, or the InfluxDB datasource resolves in aliases.
BUILTINS = frozenset(
    {"timeFilter", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms", "__from", "__to",
     "__timeFilter", "__dashboard", "__org", "__user", "__rate_interval", "col", "m", "measurement"}
)
BUILTIN_PREFIXES = ("tag_",)
REGEX_SPECIAL = re.compile(r"([\\/^$.|?*+()\[\]{}])")


def referenced_variables(text: str) -> set[str]:
    names: set[str] = set()
    for m in VAR_RE.finditer(text):
        names.add(m.group(1) or m.group(2) or m.group(4))
    return names


def is_builtin(name: str) -> bool:
    return name in BUILTINS or name.startswith(BUILTIN_PREFIXES)


@dataclass(frozen=True)
class TimeRange:
    from_ms: int
    to_ms: int
    interval: str = "1m"


def _format(values: Sequence[str], multi: bool) -> str:
    # Grafana's InfluxDB datasource: regex-escape and join as (a|b) for multi/All variables,
    # the raw value for a single-value variable.
    if not multi:
        return values[0]
    escaped = [REGEX_SPECIAL.sub(r"\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def interpolate(query: str, variables: Mapping[str, tuple[Sequence[str], bool]], rng: TimeRange) -> str:
    """`variables` maps a name to (selected values, multi-or-includeAll)."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        if name == "timeFilter" or name == "__timeFilter":
            return f"time >= {rng.from_ms}ms and time <= {rng.to_ms}ms"
        if name == "__interval":
            return rng.interval
        if name in ("__from", "__to"):
            ms = rng.from_ms if name == "__from" else rng.to_ms
            fmt = m.group(3)
            if fmt in (None, "date:ms"):
                return str(ms)
            if fmt == "date:seconds":
                return str(ms // 1000)
            raise KeyError(f"format {fmt!r} of ${name} is not supported here")
        if name in variables:
            values, multi = variables[name]
            if not values:
                raise KeyError(f"variable ${name} has no value")
            return _format(list(values), multi)
        if is_builtin(name):
            return m.group(0)
        raise KeyError(f"undefined variable ${name}")

    return VAR_RE.sub(repl, query)


SELECT_RE = re.compile(r"^SELECT (?P<select>.+?) FROM (?P<from>.+?)(?: WHERE (?P<where>.+?))?(?: GROUP BY (?P<group>.+?))?$")
ALIAS_RE = re.compile(r'\bAS "(\w+)"')
GROUP_TAG_RE = re.compile(r'"(\w+)"')


def expected_columns(query: str) -> tuple[list[str], list[str]]:
    """(value columns, group-by tags) a SELECT promises; every expression is aliased by convention."""
    m = SELECT_RE.match(query)
    if not m:
        raise ValueError(f"not a simple SELECT: {query}")
    cols = ALIAS_RE.findall(m.group("select"))
    group = m.group("group") or ""
    group = re.sub(r"time\([^)]*\)", "", group)
    group = re.sub(r"fill\([^)]*\)", "", group)
    return cols, GROUP_TAG_RE.findall(group)


def split_select(select: str) -> list[str]:
    """Top-level comma split of a SELECT list (commas inside parentheses do not split)."""
    parts: list[str] = []
    depth = 0
    cur = ""
    for ch in select:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts
