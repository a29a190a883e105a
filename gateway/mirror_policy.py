"""Partnership policy: what one city may mirror to its partner, and how it is transformed.

Both cities keep an identical copy of one versioned TOML file (docs/mirroring.md, examples in
docs/policies/). The sender applies it before anything leaves the city (fields not listed
are dropped, never sent); the receiver checks every point of every batch against its own
copy and refuses batches that fall outside it.
"""

from __future__ import annotations

import fnmatch
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.schema import NAME_RE, SCHEMAS_BY_DOMAIN

MEASUREMENTS = ("marine", "mobility", "node_status", "gateway_node", "gateway")
STATS = ("count", "mean", "max", "min")
# Tags a mirrored point may carry (plus `origin`, added by the receiver).
POINT_TAGS = ("city", "domain", "node", "site")


class PolicyError(Exception):
    """Carries one line per problem, ready to print."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldRule(_Strict):
    round: int | None = Field(None, ge=0, le=9, description="keep this many decimals")
    quantum: float | None = Field(None, gt=0, description="coarsen to a multiple of this step (e.g. 0.01 deg)")

    def apply(self, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, int) and self.quantum is None):
            return v  # integer fields stay integers (InfluxDB field types must not change)
        if self.quantum is not None:
            v = round(v / self.quantum) * self.quantum
        if not math.isfinite(v):
            return v
        if self.round is not None:
            v = round(float(v), self.round)
        elif self.quantum is not None:
            v = round(float(v), 9)
        return v

    def holds(self, v: Any) -> bool:
        """True when v could be an output of this rule (receiver-side check)."""
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return True
        if self.round is not None and abs(round(float(v), self.round) - float(v)) > 1e-9:
            return False
        if self.quantum is not None:
            k = float(v) / self.quantum
            if abs(k - round(k)) > 1e-6:
                return False
        return True


class ShareRule(_Strict):
    measurement: Literal["marine", "mobility", "node_status", "gateway_node", "gateway"]
    domains: list[Literal["marine", "mobility"]] = Field(default_factory=lambda: ["marine", "mobility"])
    nodes: list[str] = Field(default_factory=lambda: ["*"], description="fnmatch patterns of node ids")
    exclude_nodes: list[str] = Field(default_factory=list)
    site: Literal["keep", "drop"] | int = Field("keep", description="keep, drop, or N = keep the first N '-'-parts (coarse location)")
    aggregate_minutes: int = Field(0, ge=0, le=1440, description="0 = raw readings; N = N-minute bins")
    stats: list[Literal["count", "mean", "max", "min"]] = Field(default_factory=lambda: ["count", "mean", "max"])
    fields: dict[str, FieldRule] = Field(..., description="allow-list: a field not listed never leaves the city")

    @field_validator("site")
    @classmethod
    def _site_ok(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 8:
            raise ValueError("site = N needs 1 <= N <= 8 (number of '-'-separated parts kept)")
        return v

    @model_validator(mode="after")
    def _check(self) -> "ShareRule":
        if not self.fields:
            raise ValueError(f"share {self.measurement}: fields is empty; list at least one field to share")
        schema = SCHEMAS_BY_DOMAIN.get(self.measurement)
        if schema is not None:
            known = set(schema.field_names) | {"unsynced"}
            bad = sorted(set(self.fields) - known)
            if bad:
                raise ValueError(f"share {self.measurement}: unknown field(s) {', '.join(bad)} "
                                 f"(known: {', '.join(schema.field_names)})")
        if self.aggregate_minutes:
            if self.measurement not in ("marine", "mobility"):
                raise ValueError(f"share {self.measurement}: aggregate_minutes works only for marine/mobility readings")
            if not self.stats:
                raise ValueError(f"share {self.measurement}: aggregate_minutes needs stats (count, mean, max, min)")
            if "unsynced" in self.fields:
                raise ValueError(f"share {self.measurement}: unsynced cannot be aggregated; remove it from fields")
        return self

    def node_ok(self, node: str) -> bool:
        return any(fnmatch.fnmatchcase(node, p) for p in self.nodes) and not any(
            fnmatch.fnmatchcase(node, p) for p in self.exclude_nodes)

    def out_fields(self) -> dict[str, FieldRule]:
        """Field names a mirrored point may carry, each with the rule its value must satisfy."""
        if not self.aggregate_minutes:
            return dict(self.fields)
        out: dict[str, FieldRule] = {}
        for f, rule in self.fields.items():
            for s in self.stats:
                out[f"{f}_{s}"] = FieldRule.model_validate({}) if s == "count" else rule
        return out

    def canon_spec(self) -> tuple[tuple[str, int | None], ...]:
        """Output fields in name order with the decimals their values carry (see mirror_wire, canonical text)."""
        out = []
        for k, fr in sorted(self.out_fields().items()):
            out.append((k, fr.round if fr.round is not None else (9 if fr.quantum is not None else None)))
        return tuple(out)

    def site_value(self, site: str) -> str:
        if self.site == "keep":
            return site
        if self.site == "drop":
            return ""
        return "-".join(site.split("-")[: int(self.site)])


class Policy(_Strict):
    policy: str = Field(..., description="name of the partnership, e.g. blue-city-twins")
    version: int = Field(..., ge=1, description="raise on every change; both cities must run the same version")
    cities: list[str] = Field(..., min_length=2, max_length=2)
    max_points_per_s: float = Field(5000.0, gt=0, description="rate cap of mirrored points per second, per sending city")
    share: list[ShareRule] = Field(..., min_length=1)
    description: str = ""

    @field_validator("policy")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("use lowercase letters, digits and '-' (e.g. policy = \"blue-city-twins\")")
        return v

    @field_validator("cities")
    @classmethod
    def _cities_ok(cls, v: list[str]) -> list[str]:
        for c in v:
            if not NAME_RE.match(c):
                raise ValueError(f"city {c!r} is not a valid name (lowercase letters, digits, '-')")
        if v[0] == v[1]:
            raise ValueError("the two cities must differ")
        return v

    @model_validator(mode="after")
    def _unique(self) -> "Policy":
        seen = [r.measurement for r in self.share]
        dup = sorted({m for m in seen if seen.count(m) > 1})
        if dup:
            raise ValueError(f"measurement(s) {', '.join(dup)} listed in more than one [[share]]; merge them")
        return self

    def rule(self, measurement: str) -> ShareRule | None:
        for r in self.share:
            if r.measurement == measurement:
                return r
        return None

    def partner_of(self, city: str) -> str:
        if city not in self.cities:
            raise PolicyError([f"policy {self.policy} v{self.version} is between {' and '.join(self.cities)}, "
                               f"not for {city}; use the partnership's policy file"])
        return self.cities[1] if self.cities[0] == city else self.cities[0]

    def forbidden(self) -> dict[str, list[str]]:
        """Per reading measurement, the schema fields that never leave the city."""
        out: dict[str, list[str]] = {}
        for dom, schema in SCHEMAS_BY_DOMAIN.items():
            r = self.rule(dom)
            out[dom] = list(schema.field_names) if r is None else [f for f in schema.field_names if f not in r.fields]
        return out


def _fmt(err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "is required but missing"
    elif err["type"] == "extra_forbidden":
        msg = "is not a known policy setting (see docs/mirroring.md, policy format)"
    return f"{loc}: {msg}"


def parse_policy(data: dict[str, Any], source: str = "policy") -> Policy:
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        raise PolicyError([f"{source}: {_fmt(err)}" for err in e.errors()]) from None


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PolicyError([f"{path}: no such policy file (see docs/policies/ for examples)"]) from None
    except OSError as e:
        raise PolicyError([f"{path}: cannot read ({e.strerror})"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError([f"{path}: not valid TOML: {e}"]) from None
    return parse_policy(data, str(path))


def finite(v: Any) -> bool:
    return not isinstance(v, float) or math.isfinite(v)
