"""What a sample should hold, from the simulated world and the node's config in force.

Derived from the documents, not from the firmware: sensor behaviour from the simulated
parts (hil_tests/board: EZO answers with 3 or 2 decimals, DS18B20 in 1/16 °C, ADC noise
±0.2 mV), calibration and faults from docs/firmware.md, fixed-point scales and plausible
ranges from docs/wire-format.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# plausible ranges (docs/wire-format.md): outside -> "range" fault, value absent
RANGES = {"ph": (0, 14), "water_temp_c": (-5, 40), "do_mgl": (0, 25), "conductivity_uscm": (0, 100000),
          "salinity_psu": (0, 45), "turbidity_ntu": (0, 4000), "battery_v": (2.5, 5.5),
          "speed_mean_kmh": (0, 250), "speed_p85_kmh": (0, 250), "speed_max_kmh": (0, 300)}
SCALE = {"ph": 100, "water_temp_c": 100, "do_mgl": 100, "conductivity_uscm": 1, "salinity_psu": 100,
         "turbidity_ntu": 10, "battery_v": 1000, "speed_mean_kmh": 10, "speed_p85_kmh": 10, "speed_max_kmh": 10,
         "vehicles": 1, "bikes": 1, "pedestrians": 1, "interval_s": 1}
DEFAULTS = {"ph": 8.12, "temp": 15.34, "do": 7.12, "ec": 45210, "sal": 31.2, "turb": 12.3, "bat": 3.712}


@dataclass
class Expected:
    values: dict[str, float]
    present: set[str]  # must be present
    optional: set[str] = field(default_factory=set)  # may be present or absent (chance)
    tolerance: dict[str, float] = field(default_factory=dict)


def calibrate(cal: dict[str, Any] | None, x: float) -> float:
    if not cal:
        return x
    if "points" in cal:
        pts = sorted((float(raw), float(ref)) for ref, raw in cal["points"])
        i = 1 if len(pts) == 3 and x > pts[1][0] else 0
        (x0, y0), (x1, y1) = pts[i], pts[i + 1]
        return y0 + (x - x0) * (y1 - y0) / (x1 - x0)
    return x * float(cal.get("gain", 1)) + float(cal.get("offset", 0))


def _num(v: Any) -> tuple[float, float]:
    """A world value: a number, or [lo, hi] drawn uniformly -> (centre, half-span)."""
    if isinstance(v, list):
        return (v[0] + v[1]) / 2, (v[1] - v[0]) / 2
    return float(v), 0.0


def expect(domain: str, world: dict[str, Any], cfg: dict[str, Any]) -> Expected:
    vals = {**DEFAULTS, **world.get("values", {})}
    missing = set(world.get("missing", [])) | set(world.get("timeout", []))
    cal = cfg.get("cal", {})
    e = Expected({}, set())

    def put(name: str, raw: float, tol: float, fault: bool) -> None:
        if fault:
            return
        x = calibrate(cal.get(name), raw)
        lo, hi = RANGES.get(name, (float("-inf"), float("inf")))
        if x < lo or x > hi:
            return  # range fault: absent, nothing invented
        e.values[name] = round(x * SCALE[name]) / SCALE[name]
        e.present.add(name)
        e.tolerance[name] = tol + 0.5 / SCALE[name]

    if domain == "marine":
        ph, s = _num(vals["ph"])
        put("ph", float("%.3f" % ph), s, "ph" in missing)
        t, s = _num(vals["temp"])
        put("water_temp_c", round(t * 16) / 16, s, "temp" in missing)
        do, s = _num(vals["do"])
        put("do_mgl", float("%.2f" % do), s, "do" in missing)
        ec, s = _num(vals["ec"])
        put("conductivity_uscm", float(int(ec)), s, "ec" in missing)
        sal, s = _num(vals["sal"])
        put("salinity_psu", float("%.2f" % sal), s, "ec" in missing)
        tu, s = _num(vals["turb"])
        put("turbidity_ntu", tu, s + 1.0, "turb" in missing)  # ±0.2 mV ADC noise = ±0.8 NTU
    else:
        ivl = int(cfg.get("interval_s", 60))
        for name, pin in (("vehicles", "25"), ("bikes", "26"), ("pedestrians", "27")):
            rate = float(world.get("pulses_per_min", {}).get(pin, 0))
            n = rate * ivl / 60
            # the first interval after a boot is shorter; accept 0..n+1
            e.values[name], e.tolerance[name] = n / 2, n / 2 + 1
            e.present.add(name)
        lo, hi = world.get("radar_kmh", [30, 60])
        for name in ("speed_mean_kmh", "speed_p85_kmh", "speed_max_kmh"):
            if "radar" not in missing:
                e.values[name], e.tolerance[name] = (lo + hi) / 2, (hi - lo) / 2 + 0.1
                e.optional.add(name)  # an interval without vehicles has no speeds
        e.values["interval_s"] = ivl
        e.present.add("interval_s")
    bat, s = _num(vals["bat"])
    put("battery_v", bat, s + 0.002, bat < 0.2)
    return e
