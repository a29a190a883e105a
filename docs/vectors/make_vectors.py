"""Writes wire-v1.json. Bytes are packed here with `struct` from the layout in
docs/wire-format.md; expected readings are written out literally, not produced by
the gateway decoder, so the vectors test the decoder rather than restate it.

Run: python docs/vectors/make_vectors.py  (only when the contract changes)
"""
import json
import pathlib
import struct

NOW = 1764237600  # 2025-11-27T10:00:00Z, the gateway clock for every case


def batch(schema_id, node, seq0, t0, rows, fmt):
    nb = node.encode()
    out = bytes((0xE1, schema_id, len(nb))) + nb + struct.pack("<IIB", seq0, t0, len(rows))
    for dt, flags, mask, vals in rows:
        out += struct.pack("<HBB" + fmt, dt, flags, mask, *vals)
    return out


MAR = "hhHIHHH"
MOB = "HHHHHHHH"
cases = []


def add(name, topic, payload, expect, encode=None, **kw):
    c = {"name": name, "topic": topic, "now": NOW}
    if isinstance(payload, bytes):
        c["payload_hex"] = payload.hex()
    else:
        c["payload_json"] = payload
    c.update(expect)
    if encode:
        c["encode"] = encode
    c.update(kw)
    cases.append(c)


# --- compact, valid ---
rows = [(0, 0, 0x7F, [812, 1534, 712, 45210, 3120, 123, 3712]),
        (60, 0, 0x7F, [805, 1530, 708, 45200, 3119, 130, 3711])]
add("marine batch of two, all sensors", "twin/copenhagen/marine/buoy-01/up",
    batch(1, "buoy-01", 41, NOW - 120, rows, MAR),
    {"readings": [
        {"seq": 41, "t": NOW - 120, "flags": 0, "fields": {"ph": 8.12, "water_temp_c": 15.34, "do_mgl": 7.12,
          "conductivity_uscm": 45210.0, "salinity_psu": 31.2, "turbidity_ntu": 12.3, "battery_v": 3.712}},
        {"seq": 42, "t": NOW - 60, "flags": 0, "fields": {"ph": 8.05, "water_temp_c": 15.3, "do_mgl": 7.08,
          "conductivity_uscm": 45200.0, "salinity_psu": 31.19, "turbidity_ntu": 13.0, "battery_v": 3.711}}],
     "rejected_readings": []},
    encode={"schema": 1, "node": "buoy-01", "seq0": 41, "t0": NOW - 120, "rows": [list(r) for r in rows]})

rows = [(0, 0, 0x5D, [-150, 0, 650, 30000, 0, 45, 3300])]  # bits 1 and 5 absent: faulted sensors
add("marine faulted sensors and negative temp slot ignored", "twin/tongyeong/marine/buoy-02/up",
    batch(1, "buoy-02", 7, NOW - 10, rows, MAR),
    {"readings": [{"seq": 7, "t": NOW - 10, "flags": 0, "fields": {"ph": -1.5, "do_mgl": 6.5,
       "conductivity_uscm": 30000.0, "salinity_psu": 0.0, "battery_v": 3.3}}]},
    encode={"schema": 1, "node": "buoy-02", "seq0": 7, "t0": NOW - 10, "rows": [list(r) for r in rows]},
    note="ph=-1.5 is out of range: see the expected rejection")
cases[-1]["readings"] = []
cases[-1]["rejected_readings"] = [{"index": 0, "reason": "range"}]

rows = [(0, 0, 0x5D, [790, 0, 650, 30000, 0, 45, 3300])]
add("marine with two faulted sensors keeps the others", "twin/tongyeong/marine/buoy-02/up",
    batch(1, "buoy-02", 8, NOW - 10, rows, MAR),
    {"readings": [{"seq": 8, "t": NOW - 10, "flags": 0, "fields": {"ph": 7.9, "do_mgl": 6.5,
       "conductivity_uscm": 30000.0, "salinity_psu": 0.0, "battery_v": 3.3}}], "rejected_readings": []},
    encode={"schema": 1, "node": "buoy-02", "seq0": 8, "t0": NOW - 10, "rows": [list(r) for r in rows]})

rows = [(0, 1, 0xFF, [120, 14, 33, 412, 655, 872, 3950, 60]),
        (60, 0, 0xFF, [98, 20, 41, 455, 690, 1010, 3949, 60]),
        (120, 0, 0xFF, [101, 18, 40, 448, 700, 5000, 3948, 60])]
add("mobility batch: unsynced first, one over-range speed", "twin/helsinki/mobility/count-17/up",
    batch(2, "count-17", 1000, NOW - 200, rows, MOB),
    {"readings": [
        {"seq": 1000, "t": NOW - 200, "flags": 1, "fields": {"vehicles": 120, "bikes": 14, "pedestrians": 33,
          "speed_mean_kmh": 41.2, "speed_p85_kmh": 65.5, "speed_max_kmh": 87.2, "battery_v": 3.95, "interval_s": 60}},
        {"seq": 1001, "t": NOW - 140, "flags": 0, "fields": {"vehicles": 98, "bikes": 20, "pedestrians": 41,
          "speed_mean_kmh": 45.5, "speed_p85_kmh": 69.0, "speed_max_kmh": 101.0, "battery_v": 3.949, "interval_s": 60}}],
     "rejected_readings": [{"index": 2, "reason": "range"}]},
    encode={"schema": 2, "node": "count-17", "seq0": 1000, "t0": NOW - 200, "rows": [list(r) for r in rows]})

rows = [(0, 0, 0x7F, [812, 1534, 712, 45210, 3120, 123, 3712]), (900, 0, 0x7F, [812, 1534, 712, 45210, 3120, 123, 3712])]
add("far-future reading rejected, earlier one kept", "twin/copenhagen/marine/buoy-01/up",
    batch(1, "buoy-01", 50, NOW, rows, MAR),
    {"readings": [{"seq": 50, "t": NOW, "flags": 0, "fields": {"ph": 8.12, "water_temp_c": 15.34, "do_mgl": 7.12,
       "conductivity_uscm": 45210.0, "salinity_psu": 31.2, "turbidity_ntu": 12.3, "battery_v": 3.712}}],
     "rejected_readings": [{"index": 1, "reason": "time_future"}]})

rows = [(0, 0, 0x7F, [812, 1534, 712, 45210, 3120, 123, 3712])]
add("backfill older than the horizon", "twin/copenhagen/marine/buoy-01/up",
    batch(1, "buoy-01", 60, NOW - 40 * 86400, rows, MAR),
    {"readings": [], "rejected_readings": [{"index": 0, "reason": "time_too_old"}]})

rows = [(0, 0, 0x00, [0] * 7)]
add("no value present at all", "twin/copenhagen/marine/buoy-01/up",
    batch(1, "buoy-01", 61, NOW, rows, MAR),
    {"readings": [], "rejected_readings": [{"index": 0, "reason": "empty"}]})

# --- compact, rejected whole ---
good = batch(1, "buoy-01", 1, NOW, [(0, 0, 0x7F, [812, 1534, 712, 45210, 3120, 123, 3712])], MAR)
add("spoofed node id", "twin/copenhagen/marine/buoy-99/up", good, {"reject": "identity"})
add("truncated batch", "twin/copenhagen/marine/buoy-01/up", good[:-3], {"reject": "truncated"})
add("truncated header", "twin/copenhagen/marine/buoy-01/up", good[:9], {"reject": "truncated"})
add("marine schema on a mobility topic", "twin/copenhagen/mobility/buoy-01/up", good, {"reject": "schema"})
add("unknown schema id", "twin/copenhagen/marine/buoy-01/up", bytes([0xE1, 9]) + good[2:], {"reject": "schema"})
add("wrong topic kind", "twin/copenhagen/marine/buoy-01/status", good, {"reject": "topic"})
add("topic outside the tree", "city/copenhagen/buoy-01", good, {"reject": "topic"})
add("unknown payload format", "twin/copenhagen/marine/buoy-01/up", b"hello", {"reject": "format"})
add("oversize payload", "twin/copenhagen/marine/buoy-01/up", bytes([0xE1]) + bytes(20000), {"reject": "size"})
add("sequence zero", "twin/copenhagen/marine/buoy-01/up",
    batch(1, "buoy-01", 0, NOW, [(0, 0, 0x7F, [812, 1534, 712, 45210, 3120, 123, 3712])], MAR), {"reject": "format"})

# --- SenML ---
bn = "urn:dev:twin:copenhagen:marine:buoy-07:"
add("senml pack, two times", "twin/copenhagen/marine/buoy-07/up",
    [{"bn": bn, "bt": NOW - 60, "n": "ph", "u": "pH", "v": 8.12},
     {"n": "water_temp_c", "u": "Cel", "v": 15.34},
     {"n": "ph", "u": "pH", "v": 8.11, "t": 60}],
    {"readings": [{"seq": None, "t": NOW - 60, "flags": 0, "fields": {"ph": 8.12, "water_temp_c": 15.34}},
                  {"seq": None, "t": NOW, "flags": 0, "fields": {"ph": 8.11}}], "rejected_readings": []})
add("senml wrong unit and unknown field rejected per record", "twin/copenhagen/marine/buoy-07/up",
    [{"bn": bn, "bt": NOW, "n": "ph", "u": "pH", "v": 8.0},
     {"n": "water_temp_c", "u": "K", "v": 288.0},
     {"n": "chlorophyll", "v": 2.0}],
    {"readings": [{"seq": None, "t": NOW, "flags": 0, "fields": {"ph": 8.0}}],
     "rejected_readings": [{"index": 1, "reason": "unit"}, {"index": 2, "reason": "unknown_field"}]})
add("senml base name of another node", "twin/copenhagen/marine/buoy-07/up",
    [{"bn": "urn:dev:twin:copenhagen:marine:buoy-08:", "bt": NOW, "n": "ph", "v": 8.0}], {"reject": "identity"})
add("senml not an array", "twin/copenhagen/marine/buoy-07/up", {"bn": bn}, {"reject": "format"})
add("senml integer count must be integral", "twin/amsterdam/mobility/count-01/up",
    [{"bn": "urn:dev:twin:amsterdam:mobility:count-01:", "bt": NOW, "n": "vehicles", "u": "count", "v": 12.5},
     {"n": "bikes", "u": "count", "v": 40}],
    {"readings": [{"seq": None, "t": NOW, "flags": 0, "fields": {"bikes": 40}}],
     "rejected_readings": [{"index": 0, "reason": "format"}]})

out = pathlib.Path(__file__).with_name("wire-v1.json")
out.write_text(json.dumps({"version": 1, "now": NOW, "cases": cases}, indent=1) + "\n")
print(f"wrote {len(cases)} cases to {out}")
