"""Rendered password/ACL files loaded into a real Mosquitto; TLS with the generated city CA."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

from provisioning.broker import check_password, hash_password, make_ca, mosquitto_tls_listener, render
from provisioning.registry import load_city, load_registry
from tests.provisioning.conftest import Reg
from tests.provisioning.mqttc import Client, refused_publish, try_connect
from twinedge.services import Mosquitto, free_port


def pw(reg: Reg, user: str) -> str:
    return reg.store.get(f"mqtt/{user}")["password"].reveal()


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="mosquitto_passwd not installed")
def test_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(f), "alice", "s3cret!"], check=True)
    enc = f.read_text().strip().split(":", 1)[1]
    salt = base64.b64decode(enc.split("$")[3])
    assert hash_password("s3cret!", salt=salt) == enc
    assert check_password("s3cret!", enc) and not check_password("wrong", enc)


@pytest.fixture
def broker(reg: Reg, tmp_path: Path):
    city = load_city(reg.root, "copenhagen")
    passwd, acl, accounts = render(city, list(load_registry(reg.root).values()), reg.store, tmp_path / "broker")
    assert passwd.stat().st_mode & 0o777 == 0o600
    b = Mosquitto(tmp_path / "mosq", allow_anonymous=False, password_file=passwd, acl_file=acl).start()
    yield b
    b.stop()


def test_render_is_stable_and_excludes_retired(reg: Reg, tmp_path: Path) -> None:
    city = load_city(reg.root, "copenhagen")
    nodes = list(load_registry(reg.root).values())
    p1, acl, accts = render(city, nodes, reg.store, tmp_path / "b")
    first = p1.read_text()
    p2, _, _ = render(city, nodes, reg.store, tmp_path / "b")
    assert p2.read_text() == first  # unchanged passwords keep their hash: no churn in reviews
    users = [a.username for a in accts]
    assert users[:3] == ["gateway-copenhagen", "ops-copenhagen", "partner-tongyeong"]
    assert "buoy-old" not in users and "buoy-old" not in acl.read_text()
    assert "topic write twin/copenhagen/marine/buoy-a/up" in acl.read_text()
    for line in first.splitlines():
        assert line.split(":", 1)[1].startswith("$7$101$")


def test_node_publishes_own_topics_only(reg: Reg, broker: Mosquitto) -> None:
    ops = Client(broker.port, "ops-copenhagen", pw(reg, "ops-copenhagen")).connect()
    ops.subscribe("twin/copenhagen/+/+/up")
    ops.subscribe("twin/copenhagen/+/+/status")
    # Refused: another node's topic, another domain, its own cfg topic, another city.
    for topic in ("twin/copenhagen/marine/buoy-b/up", "twin/copenhagen/mobility/buoy-a/up", "twin/copenhagen/marine/buoy-a/cfg",
                  "twin/tongyeong/marine/buoy-a/up", "twin/copenhagen/marine/buoy-b/status"):
        assert refused_publish(broker.port, "buoy-a", pw(reg, "buoy-a"), topic), topic
    a = Client(broker.port, "buoy-a", pw(reg, "buoy-a")).connect()
    assert not a.publish("twin/copenhagen/marine/buoy-a/up", b"mine").is_failure
    assert not a.publish("twin/copenhagen/marine/buoy-a/status", b'{"online":true}', retain=True).is_failure
    # Per-publisher order is kept, so anything forged would have arrived before these two.
    assert ops.get() == ("twin/copenhagen/marine/buoy-a/up", b"mine", False)
    assert ops.get()[0] == "twin/copenhagen/marine/buoy-a/status"
    assert ops.messages.empty()
    a.close()
    ops.close()


def test_node_reads_own_cfg_only(reg: Reg, broker: Mosquitto) -> None:
    ops = Client(broker.port, "ops-copenhagen", pw(reg, "ops-copenhagen")).connect()
    a = Client(broker.port, "buoy-a", pw(reg, "buoy-a")).connect()
    rcs = a.subscribe("twin/copenhagen/marine/buoy-b/cfg")
    a.subscribe("twin/copenhagen/marine/buoy-a/cfg")
    assert not ops.publish("twin/copenhagen/marine/buoy-b/cfg", b'{"v":9}').is_failure
    assert not ops.publish("twin/copenhagen/marine/buoy-a/cfg", b'{"v":2}').is_failure
    assert a.get() == ("twin/copenhagen/marine/buoy-a/cfg", b'{"v":2}', False)
    assert a.messages.empty(), f"node saw another node's cfg (suback {rcs})"
    a.close()
    ops.close()


def test_gateway_and_partner_accounts(reg: Reg, broker: Mosquitto) -> None:
    assert refused_publish(broker.port, "gateway-copenhagen", pw(reg, "gateway-copenhagen"), "twin/copenhagen/marine/buoy-a/up")
    gw = Client(broker.port, "gateway-copenhagen", pw(reg, "gateway-copenhagen")).connect()
    assert not gw.publish("twin/copenhagen/marine/buoy-a/cmd", b'{"cmd":"status"}').is_failure
    for topic in ("twin/copenhagen/marine/buoy-a/cfg", "mirror/tongyeong/x"):
        assert refused_publish(broker.port, "partner-tongyeong", pw(reg, "partner-tongyeong"), topic), topic
    partner = Client(broker.port, "partner-tongyeong", pw(reg, "partner-tongyeong")).connect()
    partner.subscribe("mirror/copenhagen/#")
    assert not partner.publish("mirror/copenhagen/marine/buoy-a", b"m").is_failure
    assert partner.get()[1] == b"m"
    gw.close()
    partner.close()


def test_wrong_password_unknown_and_retired_refused(reg: Reg, broker: Mosquitto) -> None:
    assert try_connect(broker.port, "buoy-a", pw(reg, "buoy-a")) == "ok"
    assert try_connect(broker.port, "buoy-a", "not-the-password").startswith("refused")
    assert try_connect(broker.port, "buoy-zz", "whatever").startswith("refused")
    assert try_connect(broker.port, "buoy-old", pw(reg, "buoy-old")).startswith("refused")


def test_tls_with_city_ca(reg: Reg, tmp_path: Path) -> None:
    files = make_ca("copenhagen", tmp_path / "ca", hosts=["127.0.0.1", "localhost"])
    assert files.ca_key.stat().st_mode & 0o777 == 0o600
    other = make_ca("elsewhere", tmp_path / "other-ca")
    city = load_city(reg.root, "copenhagen")
    passwd, acl, _ = render(city, list(load_registry(reg.root).values()), reg.store, tmp_path / "broker")
    tls_port = free_port()
    b = Mosquitto(tmp_path / "mosq", allow_anonymous=False, password_file=passwd, acl_file=acl,
                  extra_conf=mosquitto_tls_listener(files, tls_port)).start()
    try:
        c = Client(tls_port, "buoy-a", pw(reg, "buoy-a"), ca=str(files.ca_cert)).connect()
        assert not c.publish("twin/copenhagen/marine/buoy-a/up", b"over tls").is_failure
        c.close()
        assert try_connect(tls_port, "buoy-a", pw(reg, "buoy-a"), ca=str(other.ca_cert)).startswith("tls:")
        # Re-running keeps the CA (nodes already trust it) and issues a new server certificate.
        again = make_ca("copenhagen", tmp_path / "ca")
        assert again.ca_cert.read_bytes() == files.ca_cert.read_bytes()
    finally:
        b.stop()
