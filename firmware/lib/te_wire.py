# TwinEdge wire format v1, node side (docs/wire-format.md is the contract).
# Compact batch: header, then fixed-width little-endian readings packed with
# struct.pack_into into a caller-owned preallocated buffer (no allocation per reading).
import struct
from micropython import const

MAGIC = const(0xE1)
MARINE = const(1)
MOBILITY = const(2)
F_UNSYNCED = const(1)
RSIZE = const(20)  # both v1 schemas: 4 bytes head + 16 bytes values
MAX_BATCH = const(50)

# struct formats per schema id; index 0 unused
FMT = (None, "<HBBhhHIHHH", "<HBBHHHHHHHH")
NFIELDS = (0, 7, 8)
# field names in wire order (used for calibration/config keys and faults)
FIELDS = (
    (),
    ("ph", "water_temp_c", "do_mgl", "conductivity_uscm", "salinity_psu", "turbidity_ntu", "battery_v"),
    ("vehicles", "bikes", "pedestrians", "speed_mean_kmh", "speed_p85_kmh", "speed_max_kmh", "battery_v", "interval_s"),
)
SCALE = ((), (100, 100, 100, 1, 100, 10, 1000), (1, 1, 1, 10, 10, 10, 1000, 1))
# plausible ranges in wire integers (same as the gateway's): a value outside is a "range" fault
LO = ((), (0, -500, 0, 0, 0, 0, 2500), (0, 0, 0, 0, 0, 0, 2500, 1))
HI = ((), (1400, 4000, 2500, 100000, 4500, 40000, 5500), (20000, 20000, 20000, 2500, 2500, 3000, 5500, 3600))


def header_size(node):
    return 12 + len(node)


def pack_header(buf, off, schema, node, seq0, t0, n):
    # node is bytes; returns offset of the first reading
    ln = len(node)
    buf[off] = MAGIC
    buf[off + 1] = schema
    buf[off + 2] = ln
    buf[off + 3:off + 3 + ln] = node
    struct.pack_into("<IIB", buf, off + 3 + ln, seq0, t0, n)
    return off + 12 + ln


def pack_reading(buf, off, schema, dt, flags, mask, vals):
    # vals: sequence of wire integers, one per schema field (0 where the bit is clear)
    if schema == MARINE:
        struct.pack_into(FMT[1], buf, off, dt, flags, mask, vals[0], vals[1], vals[2], vals[3],
                         vals[4], vals[5], vals[6])
    else:
        struct.pack_into(FMT[2], buf, off, dt, flags, mask, vals[0], vals[1], vals[2], vals[3],
                         vals[4], vals[5], vals[6], vals[7])
    return off + RSIZE


def encode(schema, node, seq0, t0, rows):
    # Convenience for tests and tools: rows = [(dt, flags, mask, [wire ints]), ...]
    nb = node.encode() if isinstance(node, str) else node
    buf = bytearray(header_size(nb) + RSIZE * len(rows))
    off = pack_header(buf, 0, schema, nb, seq0, t0, len(rows))
    for r in rows:
        off = pack_reading(buf, off, schema, r[0], r[1], r[2], r[3])
    return bytes(buf)
