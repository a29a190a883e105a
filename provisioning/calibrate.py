"""Two- or three-point calibration at the node's REPL, recorded in the registry and pushed as config.

The raw reading comes from the node itself (its probe, its ADC/EZO circuit), read through the
raw REPL with a small snippet (`RAW_READ`, default: the firmware's `te_cal.raw(<field>)`),
repeated until it is stable. The points go into the versioned config as
`cal.<field>.points = [[reference, raw], ...]` (docs/wire-format.md), which the firmware
applies as a piecewise-linear correction.
"""

from __future__ import annotations

import ast
import datetime as dt
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from provisioning.errors import ProvisioningError, UsageError
from provisioning.registry import SENSOR_FIELDS, Calibration, Node

DEFAULT_POINTS = {"ph": [7.0, 4.0, 10.0], "do": [0.0, 9.09], "ec": [12880.0, 80000.0], "temp": [0.0, 100.0], "turbidity": [0.0, 100.0]}
# Raw readings straight from the firmware's own drivers (firmware/lib/te_drivers.py): an EZO
# circuit's "R" answer before TwinEdge's calibration is applied. (I2C address, wait ms.)
EZO = {"ph": (0x63, 900), "do": (0x61, 600), "ec": (0x64, 600)}
EZO_READ = """
import json, asyncio
from te_hal import Board
from te_drivers import Ezo
_b = Board(json.load(open('node.json')))
_e = Ezo(_b.i2c(), %d, %d)
asyncio.new_event_loop()  # no leftover application tasks may share the bus
_r = asyncio.run(_e.ask(_b, b'R', %d))
print(repr(float(_r.split(',')[0]) if _r else 'fault: ' + str(_e.fault)))
"""


def raw_snippet(kind: str) -> str:
    if kind not in EZO:
        raise UsageError(f"reading a raw {kind} value at the REPL is not supported; calibrate one of: {', '.join(EZO)}")
    addr, wait = EZO[kind]
    return EZO_READ % (addr, wait, wait)


@dataclass(frozen=True)
class Stability:
    samples: int = 3  # consecutive readings that must agree
    tolerance: float = 0.02  # relative spread allowed among them (2 %), absolute when near 0
    max_seconds: float = 60.0


def cal_field(kind: str) -> str:
    fields = SENSOR_FIELDS.get(kind, ())
    if not fields or kind in ("radar", "loop", "ir_beam", "battery"):
        raise UsageError(f"sensor {kind!r} is not calibrated with reference points; calibrate one of: {', '.join(DEFAULT_POINTS)}")
    return fields[0]


def parse_points(text: str | None, kind: str) -> list[float]:
    if not text:
        return list(DEFAULT_POINTS[kind])
    try:
        pts = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--points {text!r}: give 2 or 3 reference values separated by commas, e.g. 7,4,10") from None
    if len(pts) not in (2, 3) or len(set(pts)) != len(pts):
        raise UsageError(f"--points {text!r}: give 2 or 3 different reference values, e.g. 7,4,10")
    return pts


def read_stable(read: Callable[[], float], stab: Stability, on_sample: Callable[[float], None] | None = None) -> float:
    """Read until `samples` consecutive values agree within `tolerance`; their median."""
    window: list[float] = []
    deadline = time.monotonic() + stab.max_seconds
    while time.monotonic() < deadline:
        v = read()
        if on_sample:
            on_sample(v)
        window = (window + [v])[-stab.samples:]
        if len(window) == stab.samples:
            mid = statistics.median(window)
            if max(window) - min(window) <= stab.tolerance * max(abs(mid), 1.0):
                return mid
    raise ProvisioningError(
        f"the reading did not settle within {stab.max_seconds:.0f} s (last {window}): rinse the probe, "
        "let it sit in the buffer a minute, and run calibrate again"
    )


def check_points(points: list[tuple[float, float]], kind: str) -> None:
    raws = [p[1] for p in points]
    if len(set(raws)) != len(raws):
        raise ProvisioningError(f"two buffers gave the same raw reading {raws}: the {kind} probe does not respond; check it is connected")
    # The raw reading must move monotonically with the reference, or a buffer was mixed up.
    srt = sorted(points)
    diffs = [b[1] - a[1] for a, b in zip(srt, srt[1:])]
    if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ProvisioningError(f"raw readings {raws} do not follow the buffers {[p[0] for p in points]}: a buffer was probably mixed up; redo the calibration")


def device_reader(board: object, kind: str) -> Callable[[], float]:
    snippet = raw_snippet(kind)

    def read() -> float:
        out = board.exec(snippet)  # type: ignore[attr-defined]
        try:
            v = ast.literal_eval(out.strip().splitlines()[-1])
        except (ValueError, SyntaxError, IndexError):
            raise ProvisioningError(f"the node answered {out.strip()[:60]!r} instead of a reading: update the firmware") from None
        if isinstance(v, str):
            raise ProvisioningError(f"the {kind} probe does not answer ({v}): check its cable and connector, then retry")
        return float(v)

    return read


def record(node: Node, kind: str, points: list[tuple[float, float]], by: str = "") -> tuple[Node, dict[str, object]]:
    """The node with the calibration recorded and the config version bumped, and its new cfg document."""
    serial = next((s.serial for s in node.sensors if s.kind == kind), "")
    cfg = node.config.model_copy(update={"version": node.config.version + 1})
    cal = dict(node.calibration)
    cal[kind] = Calibration(date=dt.date.today(), points=points, method=f"{len(points)}-point", serial=serial,
                            cfg_version=cfg.version, by=by)
    new = node.model_copy(update={"calibration": cal, "config": cfg})
    return new, cfg_document(new)


def cfg_document(node: Node) -> dict[str, object]:
    """The retained `cfg` JSON for the node (wire format), from its registry record."""
    c = node.config
    doc: dict[str, object] = {"v": c.version, "interval_s": c.interval_s, "batch": c.batch, "keepalive_s": c.keepalive_s, "sleep_s": c.sleep_s}
    cal: dict[str, object] = {}
    for kind, rec in node.calibration.items():
        if kind in SENSOR_FIELDS and rec.points:
            cal[cal_field(kind)] = {"points": [[float(r), float(w)] for r, w in rec.points]}
    doc["cal"] = cal
    doc["thr"] = {k: [float(v[0]), float(v[1])] for k, v in c.thr.items()}
    return doc
