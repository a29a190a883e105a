"""Durable-log frames: a compact message accepted whole is logged as its payload (layout 2), and reads
back exactly as the JSON rows (layout 1) would have: the mirror and the sequence replay depend on it."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import records
from gateway.decode import decode_up
from gateway.schema import MARINE, MOBILITY, Schema
from gateway.topics import parse_topic

NOW = 1_780_000_000


@st.composite
def accepted_payloads(draw: st.DrawFn) -> tuple[Schema, str, bytes]:
    from gateway.decode import encode_compact

    schema = draw(st.sampled_from([MARINE, MOBILITY]))
    node = draw(st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True))
    count = draw(st.integers(1, 20))
    full = (1 << len(schema.fields)) - 1
    plain = draw(st.booleans())  # every reading complete and without flags: the raw-integer renderer's case
    rows = []
    for _ in range(count):
        mask = full if plain else draw(st.sampled_from([full, draw(st.integers(1, full))]))
        vals = [draw(st.integers(math.ceil(f.lo * f.scale), math.floor(f.hi * f.scale))) for f in schema.fields]
        rows.append((draw(st.integers(0, 600)), 0 if plain else draw(st.sampled_from([0, 1])), mask, vals))
    payload = encode_compact(schema, node, draw(st.integers(1, 2**31)), NOW - 3600, rows)
    return schema, node, payload


@settings(max_examples=300, deadline=None)
@given(accepted_payloads())
def test_a_payload_frame_reads_back_as_the_json_frame(case: tuple[Schema, str, bytes]) -> None:
    schema, node, payload = case
    topic = parse_topic(f"twin/copenhagen/{schema.domain}/{node}/up")
    dec = decode_up(topic, payload, NOW)
    assert not dec.rejected and dec.readings
    rec = records.reading_record(dec, "quay 3", 1234.5, dec.readings)
    lines = records.reading_lines(rec, dec, dec.readings)
    as_json = records.encode(rec, lines)
    as_payload = records.encode(rec, lines, payload)
    assert as_payload[0] == records.FRAME_PAYLOAD_ROWS and as_json[0] == records.FRAME_JSON_ROWS
    back = records.decode(as_payload)
    assert back == records.decode(as_json)
    # same types too (an int field must not come back as a float, nor the other way round)
    assert [[type(v) for v in r[1].values()] for r in back["rows"]] == [[type(v) for v in r[1].values()] for r in rec["rows"]]
    assert records.frame_lines(as_payload) == records.frame_lines(as_json) == lines.encode()
    # whichever renderer ran (raw integers, one % over the floats, or field by field), the lines are the general ones
    assert lines == "".join(line + "\n" for line in records.to_lines(rec))
    plain = all(r.flags == 0 and len(r.values) == len(schema.fields) for r in dec.readings)
    assert (dec.complete_rows is not None) == plain
    assert records.frame_received_at(as_payload) == 1234.5


def test_a_logged_payload_reads_back_after_its_readings_passed_the_backfill_horizon() -> None:
    from gateway.decode import encode_compact

    payload = encode_compact(MARINE, "b1", 7, NOW - 60, [(0, 0, 0x7F, [800, 1500, 700, 45000, 3100, 120, 3700])])
    dec = decode_up(parse_topic("twin/copenhagen/marine/b1/up"), payload, NOW)
    frame = records.encode(records.reading_record(dec, "unknown", NOW, dec.readings), None, payload)
    # a year later (a restart replaying an old log) the rows are still there, unchanged
    assert records.decode(frame)["rows"] == [[NOW - 60, {"ph": 8.0, "water_temp_c": 15.0, "do_mgl": 7.0,
                                                          "conductivity_uscm": 45000.0, "salinity_psu": 31.0,
                                                          "turbidity_ntu": 12.0, "battery_v": 3.7}, 7, 0]]


def test_an_unknown_frame_layout_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="layout 9 is not one this gateway reads"):
        records.decode(b"\x09" + bytes(20))
