"""Bad input gets a reason and loses nothing: decoder properties, dead letters, bad config files."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.decode import _PLANS, Limits, Rejected, decode_up, encode_compact
from gateway.durable_log import DurableLog
from gateway.schema import MARINE, MOBILITY, Schema
from tests.gateway.helpers import Node, Publisher, counts_by_node, wait_until
from twinedge.services import Influxd, Mosquitto

NOW = 1_764_237_600
TOPIC = "twin/copenhagen/marine/buoy-01/up"
GOOD = encode_compact(MARINE, "buoy-01", 1, NOW, [(0, 0, 0x7F, [812, 1534, 712, 45210, 3120, 123, 3712])])
KNOWN_REASONS = {"size", "topic", "truncated", "format", "schema", "identity", "range", "time_future",
                 "time_too_old", "not_finite", "unit", "unknown_field", "empty"}


def _accounted(topic: str, payload: bytes) -> None:
    """Every reading is either decoded or rejected with a known reason; nothing else can happen."""
    try:
        out = decode_up(topic, payload, NOW, Limits())
    except Rejected as e:
        assert e.reason in KNOWN_REASONS and e.detail
        return
    for r in out.rejected:
        assert r.reason in KNOWN_REASONS
    for r in out.readings:
        for v in r.values.values():
            assert math.isfinite(v)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    _accounted(TOPIC, data)
    _accounted(TOPIC, b"\xe1" + data)
    _accounted(TOPIC, b"\xe1\x01\x07buoy-01" + data)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(GOOD) - 1))
def test_truncated_batches_are_rejected(cut: int) -> None:
    try:
        decode_up(TOPIC, GOOD[:cut], NOW)
    except Rejected as e:
        assert e.reason in {"truncated", "format"}
    else:
        raise AssertionError("a truncated batch was accepted")


json_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=10))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(st.sampled_from(["bn", "bt", "n", "u", "v", "t", "vs", "x"]), json_values,
                                max_size=6), max_size=8))
def test_senml_shaped_garbage_is_accounted(pack: list[dict[str, object]]) -> None:
    if pack:
        pack[0]["bn"] = "urn:dev:twin:copenhagen:marine:buoy-01:"
    _accounted(TOPIC, json.dumps(pack).encode())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 65535), st.integers(0, 255), st.integers(0, 255),
                          st.lists(st.integers(-32768, 32767), min_size=7, max_size=7)), min_size=1, max_size=20))
def test_any_compact_rows_are_accounted_one_by_one(rows: list[tuple[int, int, int, list[int]]]) -> None:
    fixed = [(dt, fl, m, [abs(v) if i in (2, 3, 4, 5, 6) else v for i, v in enumerate(vals)]) for dt, fl, m, vals in rows]
    payload = encode_compact(MARINE, "buoy-01", 5, NOW - 1000, fixed)
    out = decode_up(TOPIC, payload, NOW)
    assert len(out.readings) + len(out.rejected) == len(rows)  # one bad reading costs no good ones


def test_torn_log_tail_is_cut_and_earlier_records_survive(tmp_path: Path) -> None:
    log = DurableLog(tmp_path / "log", 10 * 1024 * 1024, 1024 * 1024)
    log.append([b"one", b"two"])
    end = log.append([b"three"])
    log.close()
    seg = next((tmp_path / "log").glob("*.seg"))
    with open(seg, "r+b") as f:
        f.seek(end)
        f.write(struct.pack("<II", 100, 0) + b"partial")  # a crash mid-write of the next frame
    log = DurableLog(tmp_path / "log", 10 * 1024 * 1024, 1024 * 1024)
    assert log.torn_bytes_cut == 15 and log.end == end
    assert [p for _, p in log.read(0)] == [b"one", b"two", b"three"]
    log.append([b"four"])  # appends continue where the valid data ends
    log.close()
    log = DurableLog(tmp_path / "log", 10 * 1024 * 1024, 1024 * 1024)
    assert [p for _, p in log.read(0)] == [b"one", b"two", b"three", b"four"] and log.torn_bytes_cut == 0


def test_group_commit_hides_written_frames_until_they_are_synced(tmp_path: Path) -> None:
    """Sinks must never see (and commit a cursor past) frames a crash could still take away."""
    log = DurableLog(tmp_path / "log", 64 * 1024 * 1024, 64 * 1024)
    log.append([b"durable"])
    log.write([b"x" * 40_000])
    end = log.write([b"y" * 40_000])  # rolls over into a second segment
    assert [p for _, p in log.read(0)] == [b"durable"] and log.durable_end < end
    fds = log.unsynced_fds()
    assert len(fds) == 2  # both segments hold bytes past the durable end
    log.sync(fds)
    log.mark_durable(end)
    assert [len(p) for _, p in log.read(0)] == [7, 40_000, 40_000] and log.unsynced_fds() == []
    log.write([b"z"])
    log.append([b"stats"])  # a synchronous append makes everything before it durable too
    assert [p for _, p in log.read(end)] == [b"z", b"stats"]


def test_log_survives_reopen_across_segments(tmp_path: Path) -> None:
    log = DurableLog(tmp_path / "log", 64 * 1024 * 1024, 64 * 1024)
    recs = [bytes([i % 251 + 1]) * 1000 for i in range(300)]  # ~300 KB over several 64 KB segments
    for i in range(0, 300, 7):
        log.append(recs[i:i + 7])
    end = log.end
    log.close()
    log = DurableLog(tmp_path / "log", 64 * 1024 * 1024, 64 * 1024)
    assert log.end == end and len(list((tmp_path / "log").glob("*.seg"))) > 3
    got, off = [], 0
    while batch := log.read(off, 50_000):
        got += [p for _, p in batch]
        off = batch[-1][0]
    assert got == recs
    freed = log.release(off)
    assert freed > 0 and log.read(0) == []


def test_bad_messages_are_dead_lettered_and_the_gateway_keeps_running(
        mosquitto: Mosquitto, influxd: Influxd, start_gateway, tmp_path: Path) -> None:
    gw = start_gateway(limits={"max_payload_bytes": 2048})
    pub = Publisher(mosquitto.port)
    now = int(time.time())
    good = Node("copenhagen", "marine", "buoy-01")
    bad = {
        "truncated": ("twin/copenhagen/marine/buoy-01/up", good.batch(3, now)[:-5]),
        "identity": ("twin/copenhagen/marine/buoy-66/up", Node("x", "marine", "buoy-01").batch(1, now)),
        "size": ("twin/copenhagen/marine/buoy-01/up", b"\xe1" + bytes(4000)),
        "format": ("twin/copenhagen/marine/buoy-01/up", b"\x00\x01garbage"),
        "topic": ("twin/copenhagen/marine/Not_A_Node/up", good.batch(1, now)),
        "not_finite": ("twin/copenhagen/marine/buoy-01/up",
                       b'[{"bn":"urn:dev:twin:copenhagen:marine:buoy-01:","bt":%d,"n":"ph","v":NaN}]' % now),
        "time_future": ("twin/copenhagen/marine/buoy-01/up",
                        Node("copenhagen", "marine", "buoy-01", next_seq=900).batch(1, now + 86400)),
        "status_format": ("twin/copenhagen/marine/buoy-01/status", b"{not json"),
    }
    good.published.clear()
    for topic, payload in bad.values():
        pub.publish(topic, payload)
    pub.publish(good.topic, good.batch(4, now - 10))
    pub.wait_all()
    wait_until(lambda: counts_by_node(influxd, "marine", "ph").get("buoy-01") == 4, 30, "the good batch")
    listing = subprocess.run([sys.executable, "-m", "twinedge.cli", "gateway", "dead-letters", "-c",
                              str(gw.config_path), "--json", "--limit", "100"], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    items = [json.loads(line) for line in listing.stdout.splitlines()]
    reasons = {i["reason"] for i in items}
    assert set(bad) <= reasons, reasons
    # The first three readings of the truncated message were never acknowledged as good: the message is kept whole.
    trunc = next(i for i in items if i["reason"] == "truncated")
    assert trunc["payload_hex"] and trunc["topic"] == "twin/copenhagen/marine/buoy-01/up"
    assert gw.health()[0] == 200 and gw.proc is not None and gw.proc.poll() is None
    assert gw.metrics()['twinedge_dead_letters_total{reason="size",stage="decode"}'] == 1.0
    assert gw.stop() == 0


BAD_CONFIGS = {
    "missing city": ('data_dir = "x"\n', "city: is required but missing"),
    "bad toml": ('city = "copenhagen\n', "not valid TOML"),
    "bad url": ('city = "copenhagen"\ndata_dir = "x"\n[influx]\nurl = "localhost:8086"\n', "influx.url: must start with http://"),
    "v2 without token": ('city = "copenhagen"\ndata_dir = "x"\n[influx]\napi = "v2"\norg = "o"\nbucket = "b"\n',
                         "api = \"v2\" needs token"),
    "typo": ('city = "copenhagen"\ndata_dir = "x"\n[mqtt]\nhots = "a"\n', "mqtt.hots: is not a known setting"),
    "bad port": ('city = "copenhagen"\ndata_dir = "x"\n[mqtt]\nport = 70000\n', "mqtt.port: Input should be less than"),
    "bad city": ('city = "Copenhagen!"\ndata_dir = "x"\n', "city: use lowercase letters"),
}


def test_bad_config_files_give_one_line_each_and_exit_2(tmp_path: Path) -> None:
    for name, (text, expected) in BAD_CONFIGS.items():
        path = tmp_path / f"{name.replace(' ', '_')}.toml"
        path.write_text(text)
        for cmd in (["check-config", str(path)], ["run", "--config", str(path)]):
            r = subprocess.run([sys.executable, "-m", "twinedge.cli", "gateway", *cmd], capture_output=True, text=True)
            assert r.returncode == 2, (name, r.stdout, r.stderr)
            assert expected in r.stderr, (name, r.stderr)
            assert "Traceback" not in r.stderr + r.stdout
    r = subprocess.run([sys.executable, "-m", "twinedge.cli", "gateway", "check-config", str(tmp_path / "nope.toml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_secrets_never_printed(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('city = "copenhagen"\ndata_dir = "x"\n[influx]\napi = "v2"\norg = "o"\nbucket = "b"\n')
    env = {"TWINEDGE_INFLUX__TOKEN": "s3cret-token-value", "TWINEDGE_MQTT__PASSWORD": "mqtt-pass-xyz"}
    import os

    r = subprocess.run([sys.executable, "-m", "twinedge.cli", "gateway", "check-config", str(path)],
                       capture_output=True, text=True, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    assert "s3cret-token-value" not in r.stdout + r.stderr and "mqtt-pass-xyz" not in r.stdout + r.stderr
    assert "********" in r.stdout


def test_sequence_fast_path_matches_reading_by_reading() -> None:
    from gateway.sequence import SequenceTracker

    runs = [(1, 5), (6, 5), (20, 3), (12, 4), (23, 10), (23, 2), (100, 1), (40, 5)]
    slow, fast = SequenceTracker(), SequenceTracker()
    for seq0, n in runs:
        for s in range(seq0, seq0 + n):
            if slow.is_new("a", s):
                slow.commit("a", s, s)
            else:
                slow.duplicate("a")
        if not fast.commit_run("a", seq0, n, seq0 + n - 1):
            for s in range(seq0, seq0 + n):
                if fast.is_new("a", s):
                    fast.commit("a", s, s)
                else:
                    fast.duplicate("a")
    assert slow.nodes["a"] == fast.nodes["a"]
    st = fast.nodes["a"]
    assert (st.received, st.duplicates, st.hi) == (len(set(s for a, n in runs for s in range(a, a + n))), 2, 100)


_IN_RANGE = [st.integers(lo, hi) for _j, _n, _s, _i, lo, hi in _PLANS[MARINE.schema_id].cols]  # plausible raw values


@settings(max_examples=200, deadline=None)
@given(st.booleans(), st.lists(st.tuples(st.integers(0, 600), st.sampled_from([0, 0, 0, 1, 2]), st.sampled_from([0x7F, 0x7F, 0x3F, 0x41]),
                                         st.tuples(*_IN_RANGE)), min_size=1, max_size=60))
def test_fast_line_rendering_matches_the_general_one(complete: bool, rows: list[tuple[int, int, int, tuple[int, ...]]]) -> None:
    """The gateway's batch renderer writes exactly what the general record renderer would, flags and gaps included."""
    from gateway import records

    wire = [(dt, 0 if complete else fl, 0x7F if complete else m, list(v)) for dt, fl, m, v in rows]
    out = decode_up(TOPIC, encode_compact(MARINE, "buoy-01", 5, NOW - 1000, wire), NOW)
    assert len(out.readings) == len(rows)
    rec = records.reading_record(out, "quay 3", 0.0, out.readings)
    assert records.reading_lines(rec, out, out.readings) == "".join(line + "\n" for line in records.to_lines(rec))


def _near_bounds(schema: Schema) -> st.SearchStrategy[tuple[int, ...]]:
    """Raw values inside, at and just outside each field's plausible range, within the wire type."""
    parts = []
    for (_j, _n, _s, _i, lo, hi), f in zip(_PLANS[schema.schema_id].cols, schema.fields):
        bits = 8 * struct.calcsize(f.wire)
        wire_lo, wire_hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if f.wire.islower() else (0, 2**bits - 1)
        parts.append(st.one_of(st.integers(max(lo - 2, wire_lo), lo + 2), st.integers(lo, hi),
                               st.integers(hi - 2, min(hi + 2, wire_hi))))
    return st.tuples(*parts)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_generated_complete_row_decoder_agrees_with_the_general_loop(data: st.DataObject) -> None:
    """Same readings (values and their int/float types), same rejections and reasons, with or without the fast path."""
    schema = data.draw(st.sampled_from([MARINE, MOBILITY]))
    full = (1 << len(schema.fields)) - 1
    rows = data.draw(st.lists(st.tuples(st.integers(0, 65535), st.sampled_from([0, 0, 1, 2, 3]),
                                        st.sampled_from([full, full, full, full >> 1, 0xFF]), _near_bounds(schema)),
                              min_size=1, max_size=40))
    node = "buoy-01" if schema is MARINE else "count-01"
    payload = encode_compact(schema, node, 5, NOW - 40_000, [(dt, fl, m, list(v)) for dt, fl, m, v in rows])
    topic = f"twin/copenhagen/{schema.domain}/{node}/up"
    plan = _PLANS[schema.schema_id]
    fast = decode_up(topic, payload, NOW)
    real = plan.complete
    try:
        plan.complete = lambda *row: None  # every row through the general loop
        general = decode_up(topic, payload, NOW)
    finally:
        plan.complete = real
    assert fast.readings == general.readings
    assert [[type(v) for v in r.values.values()] for r in fast.readings] == \
        [[type(v) for v in r.values.values()] for r in general.readings]
    assert [(r.index, r.reason, r.detail) for r in fast.rejected] == [(r.index, r.reason, r.detail) for r in general.rejected]


def test_a_damaged_sequence_snapshot_is_set_aside_not_fatal(tmp_path: Path) -> None:
    from gateway.config import GatewayConfig
    from gateway.service import Gateway

    for bad in (b"{not json", b'{"log_offset": 0, "nodes": {"b1": {"hi": "x"}}}', b"[]"):
        (tmp_path / "sequence.json").write_bytes(bad)
        gw = Gateway(GatewayConfig(city="copenhagen", data_dir=tmp_path))
        assert gw.seq.nodes == {}  # counting afresh, with a warning in the log
        gw.log.close()
        gw.dead.close()
