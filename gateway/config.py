"""Gateway configuration: one TOML file plus `TWINEDGE_…` environment overrides, validated at start.

Environment overrides use `__` between levels, e.g. `TWINEDGE_INFLUX__TOKEN`,
`TWINEDGE_MQTT__PASSWORD`, `TWINEDGE_MQTT__PORT=1884`.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from gateway.alarms import DEFAULT_BANDS
from gateway.decode import Limits
from gateway.schema import NAME_RE

ENV_PREFIX = "TWINEDGE_"


class ConfigError(Exception):
    """Carries one line per problem, ready to print."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class MqttConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    client_id: str = Field(default="", description="fixed id for the persistent session; default twinedge-gw-<city>-<instance>")
    username: str = ""
    password: SecretStr = SecretStr("")
    protocol: Literal[4, 5] = Field(default=4, description="4 = MQTT 3.1.1, 5 = MQTT 5 (needed for a v5 broker feature; both work with share_group on Mosquitto)")
    share_group: str = Field(default="", description="MQTT v5 shared subscription group; instances with the same group split the load")
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    receive_maximum: int = Field(default=1000, ge=10, le=65535, description="unacknowledged messages the broker may send us")
    session_expiry_s: int = Field(default=7 * 86400, ge=0)
    tls_ca: Path | None = None
    subscribe_status: bool = True

    @field_validator("share_group")
    @classmethod
    def _share_ok(cls, v: str) -> str:
        if v and not NAME_RE.match(v):
            raise ValueError("use lowercase letters, digits and '-' (e.g. share_group = \"gw\")")
        return v


class InfluxConfig(_Strict):
    url: str = "http://127.0.0.1:8086"
    api: Literal["v1", "v2"] = Field(default="v1", description="v1 = /write (1.x and v1-compat of 2.x/3.x); v2 = /api/v2/write")
    database: str = "twinedge"
    retention_policy: str = ""
    username: str = ""
    password: SecretStr = SecretStr("")
    org: str = ""
    bucket: str = ""
    token: SecretStr = SecretStr("")
    batch_points: int = Field(default=20_000, ge=1, le=100_000, description=(
        "points per write at most; 20,000 against 5,000 saved influxd ~10 % of its CPU per point "
        "(bench/gateway_bench.py, 50 readings/message); a 413 splits the batch"))
    flush_interval_s: float = Field(default=0.1, gt=0, le=60, description="longest wait for a fuller batch")
    flush_when_idle: bool = Field(default=True, description="write as soon as no reading arrived for 5 ms "
                                  "instead of always waiting out flush_interval_s")
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    gzip: bool | Literal["auto"] = Field(
        default="auto", description="auto: gzip unless InfluxDB is on a loopback address, where compressing only "
        "burns CPU on both ends (bench/gateway_bench.py: ~10 % of the gateway's CPU at 50 readings/message)")
    create_database: bool = Field(default=True, description="v1 only: CREATE DATABASE at start")
    max_backoff_s: float = Field(default=30.0, gt=0, le=3600)

    @property
    def compress(self) -> bool:
        if self.gzip != "auto":
            return self.gzip
        host = urllib.parse.urlsplit(self.url).hostname or ""
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host != "localhost"

    @field_validator("url")
    @classmethod
    def _url_ok(cls, v: str) -> str:
        if not (v.startswith("http://") or v.startswith("https://")):
            raise ValueError("must start with http:// or https:// (e.g. url = \"http://127.0.0.1:8086\")")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _v2_needs(self) -> "InfluxConfig":
        if self.api == "v2":
            missing = [n for n in ("org", "bucket") if not getattr(self, n)]
            if not self.token.get_secret_value():
                missing.append("token (or env TWINEDGE_INFLUX__TOKEN)")
            if missing:
                raise ValueError(f"api = \"v2\" needs {', '.join(missing)}")
        return self


class AlarmBand(_Strict):
    lo: float | None = None
    hi: float | None = None


class LogConfig(_Strict):
    max_bytes: int = Field(default=2 * 1024**3, ge=1024 * 1024, description="disk bound of the durable log; when reached the gateway stops acknowledging")
    segment_bytes: int = Field(default=64 * 1024**2, ge=64 * 1024)
    fsync: bool = Field(default=True, description="never turn off in production: PUBACK promises durability")


class LimitsConfig(_Strict):
    max_payload_bytes: int = Field(default=16384, ge=64, le=1024 * 1024)
    max_future_s: int = Field(default=300, ge=0)
    backfill_horizon_s: int = Field(default=30 * 86400, ge=60)

    def to_limits(self) -> Limits:
        return Limits(self.max_payload_bytes, self.max_future_s, self.backfill_horizon_s)


class HttpConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535, description="0 = pick a free port (written to <data_dir>/http.port)")
    enabled: bool = True


class GatewayConfig(_Strict):
    city: str
    instance: str = "gw1"
    data_dir: Path
    registry: Path | None = Field(default=None, description="node registry folder (twinedge node add); enables site tags")
    require_registration: bool = Field(default=False, description="dead-letter readings from nodes not in the registry")
    stats_interval_s: float = Field(default=10.0, gt=0)
    drain_timeout_s: float = Field(default=10.0, ge=0)
    ingest_batch: int = Field(default=2000, ge=1, description="messages made durable per fsync at most")
    ingest_batch_bytes: int = Field(default=128 * 1024, ge=1024, description="payload bytes per fsync at most (bounds memory)")
    mqtt: MqttConfig = Field(default_factory=lambda: MqttConfig())
    influx: InfluxConfig = Field(default_factory=lambda: InfluxConfig())
    log: LogConfig = Field(default_factory=lambda: LogConfig())
    limits: LimitsConfig = Field(default_factory=lambda: LimitsConfig())
    http: HttpConfig = Field(default_factory=lambda: HttpConfig())
    mirror: dict[str, Any] | None = Field(default=None, description="partner mirroring, see docs/mirroring.md")
    alarms: dict[str, dict[str, AlarmBand]] = Field(
        default_factory=lambda: {d: {f: AlarmBand(lo=lo, hi=hi) for f, (lo, hi) in b.items()}
                                 for d, b in DEFAULT_BANDS.items()},
        description="[alarms.<domain>] <field> = { lo = 7.5, hi = 8.6 }; leave a side out for no bound",
    )

    def alarm_bands(self) -> dict[str, dict[str, tuple[float | None, float | None]]]:
        return {d: {f: (b.lo, b.hi) for f, b in fields.items()} for d, fields in self.alarms.items()}

    @field_validator("city", "instance")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("use lowercase letters, digits and '-', starting with a letter (e.g. \"copenhagen\")")
        return v

    @model_validator(mode="after")
    def _defaults(self) -> "GatewayConfig":
        if not self.mqtt.client_id:
            self.mqtt.client_id = f"twinedge-gw-{self.city}-{self.instance}"
        if self.require_registration and self.registry is None:
            raise ValueError("require_registration = true needs registry = \"<folder>\"")
        return self


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> None:
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX):].lower().split("__")
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[path[-1]] = value


def _format_error(err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "is required but missing"
    elif err["type"] == "extra_forbidden":
        msg = "is not a known setting (check the spelling; see `twinedge gateway check-config --help`)"
    return f"{loc}: {msg}"


def load_config(path: Path, environ: dict[str, str] | None = None) -> GatewayConfig:
    """Read, override from the environment, validate. Raises ConfigError (one line per problem)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read ({e.strerror})"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    _apply_env(data, dict(os.environ if environ is None else environ))
    base = path.parent
    try:
        cfg = GatewayConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError([f"{path}: {_format_error(err)}" for err in e.errors()]) from None
    if not cfg.data_dir.is_absolute():
        cfg.data_dir = (base / cfg.data_dir).resolve()
    if cfg.registry is not None and not cfg.registry.is_absolute():
        cfg.registry = (base / cfg.registry).resolve()
    if cfg.mirror is not None:
        from gateway.mirror import validate_mirror_config

        policy = cfg.mirror.get("policy")
        if isinstance(policy, str) and not Path(policy).is_absolute():
            cfg.mirror["policy"] = str((base / policy).resolve())
        validate_mirror_config(cfg.mirror, cfg.city)
    if cfg.registry is not None and not (cfg.registry / "nodes").is_dir():
        raise ConfigError([f"{path}: registry: {cfg.registry} has no nodes/ folder (create nodes with `twinedge node add`)"])
    return cfg
