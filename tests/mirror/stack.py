"""Two cities on one machine, all real: two Mosquitto brokers (plain listener for the city,
TLS + password listener for the partner), one influxd with a database per city and a partner
database per city, two gateway processes mirroring each other under one policy file.

Used by tests/mirror and bench/mirror_bench.py.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.mirror_wire import decode_body, split_batch
from provisioning.broker import hash_password, make_ca, mosquitto_tls_listener
from twinedge.gatewayproc import GatewayProcess
from twinedge.services import Influxd, Mosquitto, free_port

REPO = Path(__file__).resolve().parents[2]
BLUE_POLICY = REPO / "docs" / "policies" / "blue-city-twins.toml"


def own_db(city: str) -> str:
    return f"twinedge_{city}"


def partner_db(city: str) -> str:
    return f"partner_{city}"


@dataclass
class CitySide:
    city: str
    partner: str
    broker: Mosquitto
    tls_port: int
    ca: Path
    partner_password: str  # what this city issued to its partner
    gw: GatewayProcess | None = None


class RawTap:
    """A plain subscriber on a broker: what actually went over the wire."""

    def __init__(self, port: int, topic_filter: str = "mirror/#") -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tap-{secrets.token_hex(3)}")
        self.client.on_message = self._on_message
        self.topic_filter = topic_filter
        self.client.on_connect = self._on_connect
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, *_a: object) -> None:
        client.subscribe(self.topic_filter, 1)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def batches(self) -> list[tuple[str, dict[str, Any], list[Any], bytes]]:
        """(topic, manifest, points, decompressed body) of every well-formed batch seen."""
        out = []
        with self._lock:
            msgs = list(self.messages)
        for t, payload in msgs:
            if not t.endswith("/batch"):
                continue
            try:
                manifest, body = split_batch(payload)
            except Exception:
                continue
            out.append((t, manifest, decode_body(body), zlib.decompress(body)))
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class TwinStack:
    workdir: Path
    influx: Influxd
    policy: Path = BLUE_POLICY
    cities: tuple[str, str] = ("copenhagen", "tongyeong")
    mirror_overrides: dict[str, Any] = field(default_factory=dict)
    sides: dict[str, CitySide] = field(default_factory=dict)

    def start_brokers(self) -> "TwinStack":
        a, b = self.cities
        for city, partner in ((a, b), (b, a)):
            d = self.workdir / f"broker-{city}"
            d.mkdir(parents=True, exist_ok=True)
            tls = make_ca(city, d / "ca")
            tls_port = free_port()
            pw = secrets.token_urlsafe(12)
            passwd = d / "passwd"
            passwd.write_text(f"partner-{partner}:{hash_password(pw)}\n")
            passwd.chmod(0o600)
            broker = Mosquitto(d, password_file=passwd, extra_conf=mosquitto_tls_listener(tls, tls_port)).start()
            self.sides[city] = CitySide(city, partner, broker, tls_port, tls.ca_cert, pw)
        return self

    def mirror_cfg(self, city: str) -> dict[str, Any]:
        me = self.sides[city]
        them = self.sides[me.partner]
        cfg: dict[str, Any] = {
            "partner": me.partner,
            "policy": str(self.policy),
            # The partner's broker, over TLS, with the account the partner issued to us.
            "partner_broker": {"host": "127.0.0.1", "port": them.tls_port, "username": f"partner-{city}",
                               "password": them.partner_password, "tls_ca": str(them.ca)},
            "inbound": {"database": partner_db(city)},
            "batch_max_age_s": 0.2,
            "ack_timeout_s": 5.0,
            "reconcile_interval_s": 2.0,
            "reconcile_settle_s": 0.0,
            "agg_grace_s": 0.0,
        }
        for k, v in self.mirror_overrides.items():
            if isinstance(v, dict):
                cfg.setdefault(k, {}).update(v)
            else:
                cfg[k] = v
        return cfg

    def start_gateway(self, city: str, mirror: bool = True, **extra: Any) -> GatewayProcess:
        side = self.sides[city]
        if side.gw is None:
            ext: dict[str, Any] = dict(extra)
            if mirror:
                ext["mirror"] = self.mirror_cfg(city)
            side.gw = GatewayProcess(self.workdir / "gateways", city, side.broker.port, self.influx.url,
                                     database=own_db(city), extra=ext)
        side.gw.start()
        return side.gw

    def gw(self, city: str) -> GatewayProcess:
        g = self.sides[city].gw
        assert g is not None
        return g

    def dead_letters(self, city: str) -> list[tuple[str, str, str]]:
        path = self.gw(city).data_dir / "dead_letters.sqlite3"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return [(r[0], r[1], r[2]) for r in db.execute("SELECT stage, reason, detail FROM dead_letter")]
        finally:
            db.close()

    def stop(self) -> None:
        for side in self.sides.values():
            if side.gw is not None:
                side.gw.kill()
            side.broker.stop()


def query_points(influx: Influxd, db: str, q: str) -> list[dict[str, Any]]:
    res = influx.query(q, db=db)
    out = []
    for s in res["results"][0].get("series", []) or []:
        for row in s["values"]:
            d = dict(zip(s["columns"], row))
            d.update(s.get("tags", {}))
            out.append(d)
    return out


def field_keys(influx: Influxd, db: str, measurement: str) -> set[str]:
    res = influx.query(f'SHOW FIELD KEYS FROM "{measurement}"', db=db)
    return {v[0] for s in res["results"][0].get("series", []) or [] for v in s["values"]}


def dumps(x: Any) -> str:
    return json.dumps(x, sort_keys=True)
