"""Fast checks without services: wire format, policy and config validation, the CLI."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from hypothesis import example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gateway.config import ConfigError
from gateway.mirror import validate_mirror_config
from gateway.mirror_archive import Archive
from gateway.mirror_wire import segments_from_points
from gateway.mirror_policy import PolicyError, load_policy, parse_policy
from gateway.mirror_wire import (KeyDigest, Point, WireError, canon_columns, check_manifest, decode_body, digest_points,
                                 encode_batch, encode_segments, seq_ranges, split_batch)
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
    a = {t: {"ph": 7.0, "temp": 15.0, "x": 3.0} for t in range(10)}
    b = {t: {"x": 3, "temp": 15, "ph": 7} for t in reversed(range(10))}
    assert digest_points(a, spec) == digest_points(b, spec)
    b[3] = {"ph": 7.01, "temp": 15.0, "x": 3}
    assert digest_points(a, spec) != digest_points(b, spec)
    b[3] = {"ph": 7.0, "temp": 15.0, "x": 3, "extra": 1}  # a field we never sent
    assert digest_points(a, spec) != digest_points(b, spec)
    b[3] = {"ph": 7.0, "temp": 15.0}  # an absent value is not a zero
    c = dict(a)
    c[3] = {"ph": 7.0, "temp": 15.0, "x": 0.0}
    assert digest_points(b, spec) != digest_points(c, spec) != digest_points(a, spec)
    b[3] = {"ph": 7.0, "temp": 15.0, "x": True}  # a boolean is not 1
    c[3] = {"ph": 7.0, "temp": 15.0, "x": 1}
    assert digest_points(b, spec) != digest_points(c, spec)
    # Fed in pieces (any batch boundaries) = computed at once; a repeated time invalidates it.
    b = dict(a)
    b[4] = {"ph": 7.0, "x": "text"}
    k = KeyDigest(len(spec))
    for lo, hi in ((0, 3), (3, 10)):
        canon, others = canon_columns(spec, [b[t] for t in range(lo, hi)])
        k.feed(list(range(lo, hi)), canon, others)
    assert k.valid and k.result() == digest_points(b, spec) != digest_points(a, spec)
    k.feed([9], *canon_columns(spec, [a[9]]))
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
    st.sampled_from(["ph", "water_temp_c", "do_mgl", "turbidity_ntu", "salinity_psu", "battery_v"]), row_values)),
    min_size=1, max_size=8), st.booleans())
def test_fast_columns_equal_the_field_rules(rows: list[tuple[int, dict[str, Any]]], homogeneous: bool) -> None:
    """The vectorised column path gives exactly what the field rules (FieldRule.apply)
    give, on the wire and in the digest streams; anything it cannot take goes the value-by-value way."""
    from gateway.mirror import Plan, _Pending, _Route
    rule = load_policy(BLUE).rule("marine")
    assert rule is not None
    plan = Plan(rule)
    if homogeneous:  # the common case: every shared field present, one type per field
        rows = [(t, {k: float(abs(hash((t, k))) % 10**6) / 997 for k in plan.names} | {"battery_v": 3.7}) for t, _f in rows]
    route = _Route(rule, plan, {"city": "c", "node": "n-1"}, ("marine", ()), "n-1", "")
    pend = _Pending(route, 7200)
    for i, (_t, f) in enumerate(rows):  # as MirrorSink.transform takes a record's rows
        row = [7200 + 7 * i, f, i + 1, 0]
        if pend.flat is not None and plan.flat_values([row], pend.flat) is None:
            pend.unflatten()
        if pend.flat is None:
            pend.recs.append([row])
        pend.ts.append(row[0])
        pend.seqs.append(row[2])
    if homogeneous:
        assert pend.flat is not None  # the all-float way (float_columns)
    fast_segs = plan.segments([pend])
    slow = plan.slow_segment(pend, pend.ts.tolist(), pend.seqs, True)
    if slow is None:
        assert fast_segs == []
        return
    assert len(fast_segs) == 1
    fast = fast_segs[0]
    if homogeneous:
        assert fast.cols is not None and fast.kinds is not None and all(k[:1] == "f" for k in fast.kinds)
    want = [{k: rule.fields[k].apply(v) for k, v in f.items() if k in rule.fields and v is not None} for _t, f in rows]
    want = [w for w in want if w]
    for seg in (fast, slow):
        _m, body = split_batch(encode_segments({"batch": "e-1"}, [seg])[0])
        got = [p.fields for p in decode_body(body)]
        assert got == want
        assert [{k: type(v) for k, v in g.items()} for g in got] == [{k: type(v) for k, v in w.items()} for w in want]
    ref_canon, ref_others = canon_columns(plan.spec, want)
    for seg in (fast, slow):
        assert [np.ascontiguousarray(c).tobytes() for c in seg.canon] == [c.tobytes() for c in ref_canon]
        assert seg.others == ref_others
    for w in want:  # what the policy keeps: at most N decimals
        assert all(rule.fields[k].holds(v) for k, v in w.items())


def test_record_feed_hands_over_and_stays_bounded() -> None:
    from gateway.durable_log import _FRAME
    from gateway.mirror import LOG_FRAME_OVERHEAD, RecordFeed
    assert LOG_FRAME_OVERHEAD == _FRAME.size
    feed = RecordFeed(max_rows=10)
    frames = [b"x" * 10, b"y" * 20]
    recs = [{"a": 1.0, "rows": [[1]] * 4}, {"a": 2.0, "rows": [[1]] * 4}]
    feed.put(100 + 18 + 28, frames, recs)  # frames at 100 and 118, ending at 146
    assert feed.chain(100, 146, 10) == [118, 146] and feed.chain(100, 145, 10) == [118]  # never past `limit`
    assert feed.received_at(118) == 2.0
    assert feed.take(100) == (1.0, recs[0], None, None, 118) and feed.take(100) is None
    assert feed.take(118) == (2.0, recs[1], None, None, 146)
    feed.put(200, frames, recs)
    feed.put(300, frames, recs)  # 16 rows > 10: the oldest go
    assert feed.take(154) is None and feed.take(272) == (2.0, recs[1], None, None, 300)


def test_regular_times_and_sequences_round_trip() -> None:
    pts = [Point("marine", {"city": "c", "node": "n-1"}, 7200 + 10 * i, {"ph": 7.0 + i / 100}, 5 + i) for i in range(30)]
    pts += [Point("marine", {"city": "c", "node": "n-2"}, 7200 + i * i, {"ph": 7.0}, None if i % 2 else i) for i in range(5)]
    msg, manifest = encode_batch({"origin": "c", "batch": "e-1"}, pts)
    _m, body = split_batch(msg)
    assert b'"tr":[7200,10]' in zlib.decompress(body) and b'"qr":[5,1]' in zlib.decompress(body)
    back = decode_body(body)
    check_manifest(manifest, back)
    assert [(p.node, p.t, p.seq, p.fields) for p in back] == [(p.node, p.t, p.seq, p.fields) for p in pts]


def test_binary_columns_are_narrowed_and_checked() -> None:
    from gateway.mirror_wire import BODY3, ZLIB_LEVEL, _LEN
    spec = (("big", 0), ("ph", 2), ("x", None))
    pts = [Point("marine", {"city": "c", "node": "n-1"}, 7200 + i, {"ph": 7.0 + i / 100, "big": 2**40 + i, "x": 0.1 * i}, i)
           for i in range(20)]
    msg, manifest = encode_batch({"origin": "c", "batch": "e-1"}, pts, lambda m: spec)
    _m, body = split_batch(msg)
    raw = zlib.decompress(body)
    assert raw[:4] == BODY3 and b'"c":["i","f2/2","d"]' in raw
    assert len(raw) - raw.index(b"]}]}") - 4 == 20 * (8 + 2 + 8)  # int64, int16, float64 columns
    back = decode_body(body)
    check_manifest(manifest, back)
    assert [p.fields for p in back] == [p.fields for p in pts]
    (n,) = _LEN.unpack_from(raw, 4)
    head, blob = raw[8 : 8 + n], raw[8 + n :]

    def rebuilt(h: bytes, b: bytes) -> bytes:
        return zlib.compress(BODY3 + _LEN.pack(len(h)) + h + b, ZLIB_LEVEL)

    for h, b in [(head, blob[:-1]), (head, blob + b"\0"), (head.replace(b'"f2/2"', b'"f2/3"'), blob),
                 (head.replace(b'"f2/2"', b'"f12"'), blob),
                 (head, blob[:320] + np.array([np.inf], dtype="<f8").tobytes() + blob[328:])]:
        with pytest.raises(WireError) as e:
            decode_body(rebuilt(h, b))
        assert e.value.reason == "format"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(-1e9, 1e9, allow_nan=False), st.integers(-10**8, 10**8).map(lambda i: i / 200)),
                min_size=1, max_size=50), st.integers(0, 9))
def test_vectorised_rounding_is_pythons_round(vals: list[float], d: int) -> None:
    from gateway.mirror_wire import fast_columns
    vals = [15.05, 0.125, 2.675, -15.05, *vals]  # halves in decimal that binary puts above, at, below the tie
    fast = fast_columns((("v", d),), [vals])
    if fast is None:  # out of the int64 range at this many decimals
        assert max(abs(v) for v in vals) * 10**d >= 2**49
        return
    assert fast[2][0].tolist() == [round(round(v, d) * 10**d) for v in vals]


def _bare_sink(policy: Any) -> Any:
    """A MirrorSink with only what transform() needs (no gateway, log or archive)."""
    from gateway.mirror import MirrorSink
    sink = MirrorSink.__new__(MirrorSink)
    sink.policy, sink.city = policy, "copenhagen"
    sink._routes, sink._plans, sink._filtered, sink._bins = {}, {}, {}, {}
    return sink


def _field_ints(f: Any) -> Any:
    import math as _m
    bounds = {"h": (-(2**15), 2**15 - 1), "H": (0, 2**16 - 1), "I": (0, 2**32 - 1)}[f.wire]
    lo, hi = _m.ceil(f.lo * f.scale), _m.floor(f.hi * f.scale)
    return st.integers(max(bounds[0], lo - 3), min(bounds[1], hi + 3))  # a few just outside: rejected readings


_reading = st.tuples(st.integers(0, 5000), st.sampled_from([0, 0, 1]),
                     st.sampled_from([0x7F, 0x7F, 0x7F, 0x3F, 0x7E, 0x77]),
                     st.tuples(*[_field_ints(f) for f in __import__("gateway.schema", fromlist=["MARINE"]).MARINE.fields]))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from(["buoy-1", "buoy-2"]), st.integers(1, 40), st.integers(0, 7200),
                                   st.booleans(), st.lists(_reading, min_size=1, max_size=6)),
                         min_size=1, max_size=4), min_size=1, max_size=4), st.sampled_from(["regular", "spanning", "any"]),
       st.booleans())
def test_compact_payload_way_equals_the_rows_way(batches: list[list[Any]], mode: str, as_ingest: bool) -> None:
    """The sink taking a record's values from its compact payload (RecordFeed with the ingest batch's messages)
    sends exactly what it sends from ingest's per-reading dicts: same wire points, digest bytes, order flags.
    Records that do not hold their whole payload (a rejected or de-duplicated reading), resends within one
    batch, absent shared values, times spanning hours or out of order all fall back to the rows.
    `as_ingest`: as the gateway does it, a record holding its whole payload comes without rows, with the payload
    beside it (`wholes`), and is logged as it (frame layout 2)."""
    from gateway import records
    from gateway.decode import Rejected, decode_up, encode_compact
    from gateway.ingest_mqtt import Inbound
    from gateway.mirror import RecordFeed, _segments
    from gateway.schema import MARINE
    policy = load_policy(BLUE)
    base = 1_800_000_000 - 1_800_000_000 % 3600 - 3600
    now = base + 20_000
    raw_sink, row_sink = _bare_sink(policy), _bare_sink(policy)
    raw_buf: dict[Any, Any] = {}
    row_buf: dict[Any, Any] = {}
    feed = raw_sink.feed = RecordFeed(sink=raw_sink)
    end = 0
    used_raw = False
    for batch in batches:
        msgs, recs, full, wholes, frames = [], [], [], [], []
        for node, seq0, t0, drop_first, readings in batch:
            if mode != "any":  # the usual message: in order, every value present and plausible
                # inside one hour, or (spanning) across one or two hour boundaries
                t0, step = (t0 % 3000, 10) if mode == "regular" else (3000 + t0 % 6 * 100, 600)
                readings = [(i * step, 0, 0x7F, tuple(int(f.lo * f.scale + f.hi * f.scale) // 2 + i for f in MARINE.fields))
                            for i in range(len(readings))]
            payload = encode_compact(MARINE, node, seq0, base + t0, [(dt, fl, m, list(v)) for dt, fl, m, v in readings])
            topic = f"twin/copenhagen/marine/{node}/up"
            msgs.append(Inbound(topic, payload, 0, 1, 0, 1.0))
            try:
                dec = decode_up(topic, payload, now)
            except Rejected:
                continue
            fresh = dec.readings[1:] if drop_first and mode == "any" else dec.readings  # de-duplicated first reading
            if fresh:
                whole = as_ingest and fresh is dec.readings and not dec.rejected
                full.append(records.reading_record(dec, "harbour-north-1", 1.0, fresh))
                recs.append(records.reading_record(dec, "harbour-north-1", 1.0, [] if whole else fresh))
                wholes.append(payload if whole else None)
                frames.append(records.encode(recs[-1], records.reading_lines(full[-1], dec, fresh), payload) if whole
                              else records.encode(recs[-1]))
        end += sum(len(f) + 8 for f in frames)
        feed.put(end, frames, recs, msgs, wholes if as_ingest else ())
        off = end - sum(len(f) + 8 for f in frames)
        for f, r, fr in zip(frames, recs, full):
            start, off = off, off + len(f) + 8
            got = feed._recs.get(start)
            assert got is not None and got[0] == r["a"] and got[4] == off
            used_raw |= got[3] is not None
            assert got[1] is (r if got[3] is None else None)  # a record taken from its payload: rows not kept
            assert raw_sink.take(start, off, f if start % 2 else None, raw_buf) == row_sink.transform(fr, row_buf)
    assert not feed._recs
    unique = any([(m[0], m[1]) for m in batch].count((node, seq0)) == 1 for batch in batches for node, seq0, *_ in batch)
    if mode != "any" and unique:  # (a resend within one ingest batch is not matched: either could be the one kept)
        assert used_raw
    for k in raw_buf.keys() - row_buf.keys():  # (a record the rows' way puts row by row: no series of its own)
        assert not raw_buf[k].ts and not raw_buf[k].raw
    segs = {s.key: s for s in _segments(raw_buf)}
    want = {s.key: s for s in _segments(row_buf)}
    assert segs.keys() == want.keys()
    for k, s in segs.items():
        w = want[k]
        assert (s.ts, list(s.seqs), s.ordered, s.kinds, s.names) == (w.ts, list(w.seqs), w.ordered, w.kinds, w.names)
        assert [np.ascontiguousarray(c).tobytes() for c in s.canon] == [np.ascontiguousarray(c).tobytes() for c in w.canon]
        got_msg, got_manifest = encode_segments({"batch": "e-1"}, [s])
        want_msg, want_manifest = encode_segments({"batch": "e-1"}, [w])
        assert got_manifest["entries"] == want_manifest["entries"]  # sequence ranges, counts, times
        got_pts, want_pts = decode_body(split_batch(got_msg)[1]), decode_body(split_batch(want_msg)[1])
        check_manifest(got_manifest, got_pts)
        assert [(p.t, p.seq, p.fields) for p in got_pts] == [(p.t, p.seq, p.fields) for p in want_pts]


def _policy_ok(policy: Any, pts: list[Point], origin: str) -> bool:
    """Oracle: every point within the policy, checked point by point (what the receiver must decide)."""
    for p in pts:
        rule = policy.rule(p.m)
        if rule is None or set(p.tags) - {"city", "domain", "node", "site"} or p.tags.get("city") != origin:
            return False
        if (p.tags.get("domain") and p.tags["domain"] not in rule.domains) or not rule.node_ok(p.node):
            return False
        allowed = rule.out_fields()
        if any(k not in allowed or not allowed[k].holds(v) for k, v in p.fields.items()):
            return False
        if rule.aggregate_minutes and p.t % (rule.aggregate_minutes * 60):
            return False
        if isinstance(rule.site, int) and p.tags.get("site", "").count("-") >= rule.site:
            return False
        if rule.site == "drop" and "site" in p.tags:
            return False
    return True


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["buoy-1", "buoy-2", "test-3"]), st.sampled_from(["harbour", "harbour-north", None]),
                          st.integers(0, 50), st.dictionaries(st.sampled_from(["ph", "water_temp_c", "battery_v"]),
                                                              st.sampled_from([7.0, 7.25, 7.123, 8, True, 15.05, 15.1]),
                                                              min_size=1)), min_size=1, max_size=30))
@example([("buoy-1", "harbour", 0, {"ph": 7.25}), ("buoy-1", "harbour", 1, {"water_temp_c": 7.25})])  # 7.25: ph yes, temp no
@example([("buoy-1", "harbour", 0, {"ph": 7.0}), ("test-3", "harbour", 1, {"ph": 7.0})])  # excluded node, same values
@example([("buoy-1", "harbour", 0, {"ph": 7.0}), ("buoy-2", "harbour-north", 1, {"ph": 7.0})])  # site too fine
def test_receiver_policy_check_equals_point_by_point(rows: list[tuple[str, str | None, int, dict[str, Any]]]) -> None:
    """The receiver checks each series once and each (field, value) once per batch: same verdict as
    checking every point (forbidden field, too many decimals, excluded node, too fine a site)."""
    from gateway.mirror import Receiver
    policy = load_policy(BLUE)
    rx = Receiver.__new__(Receiver)
    rx.city, rx.policy = "tongyeong", policy
    rx.cfg = type("Cfg", (), {"partner": "copenhagen"})()
    pts = [Point("marine", {"city": "copenhagen", "domain": "marine", "node": n} | ({"site": site} if site else {}),
                 7200 + t, f, t + 1) for n, site, t, f in rows]
    pts = list({(p.node, p.t): p for p in pts}.values())  # one point per node and time, as a batch holds
    msg, _ = encode_batch({"origin": "copenhagen", "dest": "tongyeong", "policy": policy.policy,
                           "policy_version": policy.version, "batch": "e-1"}, pts)
    want = _policy_ok(policy, decode_body(split_batch(msg)[1]), "copenhagen")
    try:
        rx.validate("copenhagen", msg)
        got = True
    except WireError as e:
        assert e.reason == "policy", e
        got = False
    assert got == want


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.integers(7200, 10800), st.one_of(
    st.fixed_dictionaries({"ph": st.floats(0, 14, allow_nan=False).map(lambda v: round(v, 2)),
                           "water_temp_c": st.floats(-5, 40, allow_nan=False).map(lambda v: round(v, 1))}),
    st.fixed_dictionaries({"ph": st.integers(0, 14), "water_temp_c": st.floats(-5, 40, allow_nan=False)}),
    st.dictionaries(st.sampled_from(["ph", "water_temp_c", "x"]), values)), min_size=1, max_size=20))
def test_digest_points_fast_way_equals_value_by_value(points: dict[int, dict[str, Any]]) -> None:
    """digest_points() takes vectorised columns when it can; the digest is the one of canon_columns()."""
    from gateway.mirror_wire import KeyDigest
    spec = (("ph", 2), ("water_temp_c", 1))
    ts = sorted(points)
    canon, others = canon_columns(spec, [points[t] for t in ts])
    ref = KeyDigest(len(spec))
    ref.feed(ts, canon, others)
    assert digest_points(points, spec) == ref.result()
