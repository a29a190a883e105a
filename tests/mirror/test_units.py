"""Fast checks without services: wire format, policy and config validation, the CLI."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gateway.config import ConfigError
from gateway.mirror import validate_mirror_config
from gateway.mirror_archive import Archive
from gateway.mirror_wire import segments_from_points
from gateway.mirror_policy import PolicyError, load_policy, parse_policy
from gateway.mirror_wire import (KeyDigest, Point, WireError, canon_row, check_manifest, decode_body, digest_points,
                                 encode_batch, seq_ranges, split_batch)
from twinedge.cli import build_app

POLICIES = Path(__file__).resolve().parents[2] / "docs" / "policies"
BLUE = POLICIES / "blue-city-twins.toml"

values = st.one_of(st.none(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False, width=32),
                   st.booleans())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["n-1", "n-2"]), st.integers(0, 2**31), st.integers(1, 2**31),
                          st.dictionaries(st.sampled_from(["ph", "a", "b"]), values, min_size=1)), max_size=40))
def test_batch_round_trip_keeps_every_point(rows: list[tuple[str, int, int, dict[str, object]]]) -> None:
    pts = [Point("marine", {"city": "c", "node": n}, t, {k: v for k, v in f.items()}, s) for n, t, s, f in rows]
    msg, manifest = encode_batch({"origin": "c", "batch": "e-1"}, pts)
    m2, body = split_batch(msg)
    assert m2 == manifest
    back = decode_body(body)
    check_manifest(manifest, back)
    want = sorted((p.node, p.t, p.seq, sorted((k, v) for k, v in p.fields.items() if v is not None)) for p in pts
                  if any(v is not None for v in p.fields.values()))
    got = sorted((p.node, p.t, p.seq, sorted(p.fields.items())) for p in back)
    assert got == want


def test_broken_hash_and_forged_manifest_are_detected() -> None:
    pts = [Point("marine", {"city": "c", "node": "n-1"}, 100 + i, {"ph": 7.0 + i / 100}, i + 1) for i in range(50)]
    msg, manifest = encode_batch({"origin": "c", "batch": "e-1"}, pts)
    with pytest.raises(WireError) as e:
        split_batch(msg[:-1] + bytes([msg[-1] ^ 1]))
    assert e.value.reason == "hash"
    with pytest.raises(WireError) as e:
        check_manifest({**manifest, "points": 49}, decode_body(split_batch(msg)[1]))
    assert e.value.reason == "manifest"
    with pytest.raises(WireError) as e:
        split_batch(b"XXXX" + msg[4:])
    assert e.value.reason == "format"
    assert manifest["entries"] == [{"m": "marine", "node": "n-1", "n": 50, "seq": [[1, 50]], "t": [100, 149]}]


def test_seq_ranges_and_digest_canonical_forms() -> None:
    assert seq_ranges([5, 1, 2, 3, 7, 8]) == [[1, 3], [5, 5], [7, 8]]
    spec = (("ph", 2), ("temp", 1), ("x", None))
    # What the sender sent and what InfluxDB gives back (ints for integral floats, any order) digest alike.
    a = {t: canon_row(spec, {"ph": 7.0, "temp": 15.0, "x": 3.0}) for t in range(10)}
    b = {t: canon_row(spec, {"x": 3, "temp": 15, "ph": 7}) for t in reversed(range(10))}
    assert digest_points(a) == digest_points(b)
    b[3] = canon_row(spec, {"ph": 7.01, "temp": 15.0, "x": 3})
    assert digest_points(a) != digest_points(b)
    b[3] = canon_row(spec, {"ph": 7.0, "temp": 15.0, "x": 3, "extra": 1})  # a field we never sent
    assert digest_points(a) != digest_points(b)
    # Fed in pieces (any batch boundaries) = computed at once; a repeated time invalidates it.
    k = KeyDigest()
    k.feed([0, 1, 2], [a[0], a[1], a[2]])
    k.feed([3, 4, 5, 6, 7, 8, 9], [a[t] for t in range(3, 10)])
    assert k.valid and k.result() == digest_points(a)
    k.feed([9], [a[9]])
    assert not k.valid


def test_example_policies_are_valid_and_transform_as_documented() -> None:
    blue = load_policy(BLUE)
    assert blue.forbidden()["marine"] == ["conductivity_uscm", "battery_v"]
    rule = blue.rule("marine")
    assert rule is not None and rule.fields["water_temp_c"].apply(15.37) == 15.4
    assert rule.site_value("harbour-north-3") == "harbour"
    assert not rule.node_ok("test-01") and rule.node_ok("buoy-01")
    mob = load_policy(POLICIES / "smart-mobility-twins.toml")
    r = mob.rule("mobility")
    assert r is not None and "vehicles_mean" in r.out_fields() and "pedestrians_mean" not in r.out_fields()
    assert mob.partner_of("helsinki") == "amsterdam"


def test_bad_policy_gives_one_line_per_problem() -> None:
    with pytest.raises(PolicyError) as e:
        parse_policy({"policy": "X", "version": 0, "cities": ["a"], "share": [
            {"measurement": "marine", "fields": {"ph": {}, "nitrate": {}}}]})
    text = "\n".join(e.value.problems)
    assert "policy:" in text and "version" in text and "cities" in text and "nitrate" in text
    assert all("\n" not in p for p in e.value.problems)


def test_mirror_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        validate_mirror_config({"partner": "Tongyeong", "policy": str(BLUE), "partner_broker": {"host": "h"}, "bogus": 1})
    text = "\n".join(e.value.problems)
    assert "mirror.bogus" in text and "tls_ca is required" in text
    with pytest.raises(ConfigError) as e:
        validate_mirror_config({"partner": "amsterdam", "policy": str(BLUE),
                                "partner_broker": {"host": "h", "insecure": True}}, city="copenhagen")
    assert "partners copenhagen with tongyeong" in e.value.problems[0]
    cfg = validate_mirror_config({"partner": "tongyeong", "policy": str(BLUE),
                                  "partner_broker": {"host": "h", "tls_ca": str(tmp_path / "ca.crt")}}, city="copenhagen")
    assert cfg.inbound.database == "twinedge_partner" and cfg.partner_broker.port == 8883


def test_cli_policy_show_check_and_status(tmp_path: Path) -> None:
    runner = CliRunner()
    app = build_app()
    r = runner.invoke(app, ["mirror", "policy", "show", str(BLUE)])
    assert r.exit_code == 0 and "never leaves the city" in r.output and "battery_v" in r.output
    r = runner.invoke(app, ["mirror", "policy", "check", str(BLUE), "--city", "copenhagen", "--against", str(BLUE)])
    assert r.exit_code == 0 and "ok" in r.output
    other = tmp_path / "theirs.toml"
    other.write_text(BLUE.read_text().replace("version = 1", "version = 2"))
    r = runner.invoke(app, ["mirror", "policy", "check", str(BLUE), "--against", str(other)])
    assert r.exit_code == 2 and "must deploy the same file" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text("policy = 'x'\nversion = 1\n")
    r = runner.invoke(app, ["mirror", "policy", "check", str(bad)])
    assert r.exit_code == 2 and "Traceback" not in r.output

    # status reads the archive the gateway keeps in its data dir
    data = tmp_path / "gw"
    cfgfile = tmp_path / "gw.toml"
    cfgfile.write_text(tomli_w.dumps({"city": "copenhagen", "data_dir": str(data), "mirror": {
        "partner": "tongyeong", "policy": str(BLUE), "partner_broker": {"host": "h", "insecure": True}}}))
    r = runner.invoke(app, ["mirror", "status", "-c", str(cfgfile)])
    assert r.exit_code == 2 and "no mirror archive" in r.output
    arch = Archive(data / "mirror" / "archive-tongyeong.sqlite3")
    hour = int(time.time()) // 3600 * 3600 - 7200
    pts = [Point("marine", {"city": "copenhagen", "node": "buoy-01"}, hour + i, {"ph": 7.0}, i + 1) for i in range(10)]
    msg, _ = encode_batch({"batch": arch.bid(1)}, pts)
    arch.commit_batch(1, msg, segments_from_points(pts), time.time(), False, 100, [])
    arch.mark([(1, 1, None)])
    assert arch.refresh_digests(time.time(), lambda m: None) == 1
    k = arch.keys(0)[0]
    arch.record_partner([(k.m, k.node, k.hour, 9, "x", False, None)])
    arch.close()
    r = runner.invoke(app, ["mirror", "status", "-c", str(cfgfile), "--per-node"])
    assert r.exit_code == 0, r.output
    assert "holds 90.00%" in r.output and "buoy-01" in r.output
    json.dumps(r.output)


row_values = st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.integers(-10**6, 10**6), st.none(), st.booleans())


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**31), st.dictionaries(
    st.sampled_from(["ph", "water_temp_c", "do_mgl", "turbidity_ntu", "battery_v"]), row_values)), min_size=1, max_size=8),
    st.booleans())
def test_fast_rendering_equals_the_field_rules(rows: list[tuple[int, dict[str, Any]]], homogeneous: bool) -> None:
    """The per-row %-format path gives exactly what the field rules (FieldRule.apply) give, on the wire and in
    the canonical digest text; anything it cannot take goes the value-by-value way."""
    from gateway.mirror import Plan, render_fast, render_slow
    rule = load_policy(BLUE).rule("marine")
    assert rule is not None
    plan = Plan(rule)
    if homogeneous:  # the common case: every shared field present, one type per field
        rows = [(t, {k: float(abs(hash((t, k))) % 10**6) / 997 for k in plan.names} | {"battery_v": 3.7}) for t, _f in rows]
    recs = [[t, f, i + 1, 0] for i, (t, f) in enumerate(rows)]
    slow_ts, _seqs, slow_texts, slow_canon = render_slow(rule, plan, recs)
    fast = render_fast(plan, recs)
    if homogeneous:
        assert fast is not None
    if fast is None:
        return
    texts, canon = fast
    assert len(texts) == len(slow_texts) == len(recs)
    for (t, f), text, ctext, stext, sc in zip(rows, texts, canon or texts, slow_texts, slow_canon):
        want = {k: rule.fields[k].apply(v) for k, v in f.items() if k in rule.fields and v is not None}
        got = dict(zip(plan.names, json.loads(text)))
        assert got == want and [type(got[k]) for k in plan.names] == [type(want[k]) for k in plan.names]
        assert json.loads(text) == json.loads(stext)
        assert ctext == sc == canon_row(plan.spec, want)


def test_record_feed_hands_over_and_stays_bounded() -> None:
    from gateway.durable_log import _FRAME
    from gateway.mirror import LOG_FRAME_OVERHEAD, RecordFeed
    assert LOG_FRAME_OVERHEAD == _FRAME.size
    feed = RecordFeed(max_rows=10)
    frames = [b"x" * 10, b"y" * 20]
    recs = [{"a": 1.0, "rows": [[1]] * 4}, {"a": 2.0, "rows": [[1]] * 4}]
    feed.put(100 + 18 + 28, frames, recs)
    assert feed.take(118) is recs[0] and feed.take(118) is None and feed.take(146) is recs[1]
    feed.put(200, frames, recs)
    feed.put(300, frames, recs)  # 16 rows > 10: the oldest go
    assert feed.take(172) is None and feed.take(300) is recs[1]


def test_regular_times_and_sequences_round_trip() -> None:
    pts = [Point("marine", {"city": "c", "node": "n-1"}, 7200 + 10 * i, {"ph": 7.0 + i / 100}, 5 + i) for i in range(30)]
    pts += [Point("marine", {"city": "c", "node": "n-2"}, 7200 + i * i, {"ph": 7.0}, None if i % 2 else i) for i in range(5)]
    msg, manifest = encode_batch({"origin": "c", "batch": "e-1"}, pts)
    _m, body = split_batch(msg)
    assert b'"tr":[7200,10]' in zlib.decompress(body) and b'"qr":[5,1]' in zlib.decompress(body)
    back = decode_body(body)
    check_manifest(manifest, back)
    assert [(p.node, p.t, p.seq, p.fields) for p in back] == [(p.node, p.t, p.seq, p.fields) for p in pts]
