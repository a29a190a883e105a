"""Project lints for generated dashboards: what the JSON schemas cannot see.

Each check returns human-readable problems (empty list = clean); `lint_dashboard` runs all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from grafana_foundation_sdk.models import units as sdk_units

from dashboards.influxql import (
    DATASOURCE_UIDS,
    INFLUX_TYPE,
    SELECT_RE,
    is_builtin,
    referenced_variables,
    split_select,
)

UNIT_IDS = frozenset(v for k, v in vars(sdk_units).items() if not k.startswith("_") and isinstance(v, str))
BUILTIN_DATASOURCES = {("datasource", "-- Mixed --"), ("datasource", "grafana")}
PLACEHOLDER_RE = re.compile(r"\$\{DS_|__inputs|__requires|\bTODO\b|\bFIXME\b|\bXXX\b")
# A simple InfluxQL subset every InfluxDB version answers (3.x lacks SLIMIT/SOFFSET, INTO is a write).
FORBIDDEN_INFLUXQL = re.compile(r"\b(SLIMIT|SOFFSET|INTO)\b|FROM \(", re.IGNORECASE)
UNIT_REQUIRED = {"timeseries", "stat", "geomap", "table"}


def panels(model: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in model.get("panels", []):
        yield p
        yield from p.get("panels", []) or []


def targets(model: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for p in panels(model):
        for t in p.get("targets", []) or []:
            yield p, t


def strings(obj: object, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield path + "." + str(k), str(k)
            yield from strings(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from strings(v, f"{path}[{i}]")


def check_ids(model: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if not model.get("uid") or not re.fullmatch(r"[a-z0-9-]{8,40}", str(model["uid"])):
        out.append(f"dashboard uid {model.get('uid')!r} must be a fixed 8-40 char [a-z0-9-] string")
    if model.get("id") is not None:
        out.append("dashboard id must be null (server-owned)")
    seen: dict[int, str] = {}
    for p in panels(model):
        pid = p.get("id")
        if not isinstance(pid, int):
            out.append(f"panel {p.get('title')!r} has no integer id")
            continue
        if pid in seen:
            out.append(f"panel id {pid} used by both {seen[pid]!r} and {p.get('title')!r}")
        seen[pid] = str(p.get("title"))
    return out


def check_units(model: dict[str, Any]) -> list[str]:
    out: list[str] = []

    def ok(u: object) -> bool:
        return isinstance(u, str) and (u in UNIT_IDS or (u.startswith("suffix:") and len(u) > len("suffix:")))

    for p in panels(model):
        if p.get("type") == "row":
            continue
        fc = p.get("fieldConfig") or {}
        u = (fc.get("defaults") or {}).get("unit")
        if u is None and p.get("type") in UNIT_REQUIRED:
            out.append(f"panel {p.get('id')} {p.get('title')!r}: no unit (use a Grafana unit id or suffix:...)")
        elif u is not None and not ok(u):
            out.append(f"panel {p.get('id')} {p.get('title')!r}: unit {u!r} is not a Grafana unit id")
        for o in fc.get("overrides") or []:
            for prop in o.get("properties") or []:
                if prop.get("id") == "unit" and not ok(prop.get("value")):
                    out.append(f"panel {p.get('id')}: override unit {prop.get('value')!r} is not a Grafana unit id")
    return out


def _ds_problem(where: str, ref: object, allow_builtin: bool) -> str | None:
    if not isinstance(ref, dict):
        return f"{where}: datasource must be an object with type and uid, got {ref!r}"
    pair = (ref.get("type"), ref.get("uid"))
    if pair[0] == INFLUX_TYPE and pair[1] in DATASOURCE_UIDS:
        return None
    if allow_builtin and pair in BUILTIN_DATASOURCES:
        return None
    return f"{where}: datasource {pair} is not one of the fixed uids {DATASOURCE_UIDS}"


def check_datasources(model: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for p in panels(model):
        if p.get("type") == "row":
            continue
        where = f"panel {p.get('id')}"
        prob = _ds_problem(where, p.get("datasource"), allow_builtin=True)
        if prob:
            out.append(prob)
        mixed = (p.get("datasource") or {}).get("uid") == "-- Mixed --"
        for t in p.get("targets") or []:
            tds = t.get("datasource")
            if tds is None and mixed:
                out.append(f"{where} target {t.get('refId')}: a mixed panel needs a datasource on each target")
            elif tds is not None:
                prob = _ds_problem(f"{where} target {t.get('refId')}", tds, allow_builtin=True)
                if prob:
                    out.append(prob)
            if not mixed and tds is not None and tds != p.get("datasource"):
                out.append(f"{where} target {t.get('refId')}: datasource differs from the panel's (make the panel mixed)")
    for v in (model.get("templating") or {}).get("list", []):
        if v.get("type") == "query":
            prob = _ds_problem(f"variable {v.get('name')}", v.get("datasource"), allow_builtin=False)
            if prob:
                out.append(prob)
    return out


def check_placeholders(model: dict[str, Any]) -> list[str]:
    return [f"{path}: placeholder {s!r}" for path, s in strings(model) if PLACEHOLDER_RE.search(s)]


def check_overlaps(model: dict[str, Any]) -> list[str]:
    out: list[str] = []
    boxes: list[tuple[int, str, int, int, int, int]] = []
    for p in panels(model):
        g = p.get("gridPos")
        if not g:
            out.append(f"panel {p.get('id')} has no gridPos")
            continue
        x, y, w, h = g["x"], g["y"], g["w"], g["h"]
        if x < 0 or w < 1 or x + w > 24 or y < 0 or h < 1:
            out.append(f"panel {p.get('id')} gridPos {g} is outside the 24-column grid")
        for oid, otitle, ox, oy, ow, oh in boxes:
            if x < ox + ow and ox < x + w and y < oy + oh and oy < y + h:
                out.append(f"panel {p.get('id')} {p.get('title')!r} overlaps panel {oid} {otitle!r}")
        boxes.append((p.get("id", -1), str(p.get("title")), x, y, w, h))
    return out


def check_variables(model: dict[str, Any]) -> list[str]:
    out: list[str] = []
    defined: list[str] = []
    for v in (model.get("templating") or {}).get("list", []):
        name = v.get("name")
        # A variable may only use variables defined before it (Grafana resolves them in order).
        for ref in sorted(referenced_variables(str(v.get("query", "")))):
            if ref not in defined and not is_builtin(ref):
                out.append(f"variable {name}: query uses ${ref}, not defined before it")
        defined.append(name)
    for path, s in strings(model.get("panels", []), "panels"):
        for ref in sorted(referenced_variables(s)):
            if ref not in defined and not is_builtin(ref):
                out.append(f"{path}: undefined variable ${ref}")
    return out


def check_queries(model: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for p, t in targets(model):
        if (t.get("datasource") or p.get("datasource") or {}).get("type") != INFLUX_TYPE:
            continue
        where = f"panel {p.get('id')} target {t.get('refId')}"
        query = t.get("query", "")
        if not t.get("rawQuery") or not query:
            out.append(f"{where}: needs a raw InfluxQL query")
            continue
        if FORBIDDEN_INFLUXQL.search(query):
            out.append(f"{where}: outside the portable InfluxQL subset (no SLIMIT/SOFFSET/INTO/subqueries): {query}")
        m = SELECT_RE.match(query)
        if not m:
            out.append(f"{where}: not a single simple SELECT: {query}")
            continue
        for expr in split_select(m.group("select")):
            if not re.search(r' AS "\w+"$', expr):
                out.append(f"{where}: select expression {expr!r} needs an explicit AS \"name\"")
        if "$timeFilter" not in query:
            out.append(f"{where}: no $timeFilter (would scan all of history)")
        if not t.get("refId"):
            out.append(f"{where}: no refId")
    return out


CHECKS = (check_ids, check_units, check_datasources, check_placeholders, check_overlaps, check_variables, check_queries)


def lint_dashboard(model: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for check in CHECKS:
        out += [f"{model.get('uid')}: {msg}" for msg in check(model)]
    return out
