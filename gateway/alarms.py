"""Threshold alarms: a reading leaving its [alarms] band writes an `alarm` point, and so does its return.

Only state changes are recorded (plus the first state seen per node and field), so the
alarm table in Grafana is small and shows exactly when a band was crossed.
"""

from __future__ import annotations

from typing import Any

Band = tuple[float | None, float | None]

DEFAULT_BANDS: dict[str, dict[str, Band]] = {
    "marine": {
        "ph": (7.5, 8.6),
        "do_mgl": (5.0, None),
        "water_temp_c": (None, 24.0),
        "salinity_psu": (2.0, 40.0),
        "turbidity_ntu": (None, 50.0),
        "battery_v": (3.3, None),
    },
    "mobility": {
        "speed_p85_kmh": (None, 70.0),
        "battery_v": (3.3, None),
    },
}


class AlarmTracker:
    def __init__(self, city: str, bands: dict[str, dict[str, Band]]) -> None:
        self.city = city
        self.bands = bands
        inf = float("inf")
        # Per domain: (field, lower, upper, configured lo, configured hi) with open sides as infinities.
        self._limits = {
            domain: [(name, -inf if lo is None else lo, inf if hi is None else hi, lo, hi) for name, (lo, hi) in b.items()]
            for domain, b in bands.items()
        }
        self.state: dict[str, dict[str, str]] = {}  # node -> field -> "low" | "ok" | "high"

    def check(self, domain: str, node: str, rows: list[Any], received_at: float) -> dict[str, Any] | None:
        """Alarm record for the state changes in these readings (or None)."""
        limits = self._limits.get(domain)
        if not limits:
            return None
        states = self.state.get(node)
        if states is None:
            states = self.state[node] = {}
        out_rows: list[list[Any]] = []
        for name, low, high, lo, hi in limits:
            cur = states.get(name)
            for r in rows:
                v = r.values.get(name)
                if v is None:
                    continue
                st = "low" if v < low else "high" if v > high else "ok"
                if st != cur:
                    cur = st
                    fields: dict[str, Any] = {"state": st, "value": float(v)}
                    if lo is not None:
                        fields["lo"] = float(lo)
                    if hi is not None:
                        fields["hi"] = float(hi)
                    out_rows.append([r.t, fields, None, 0, name])
            if cur is not None:
                states[name] = cur
        if not out_rows:
            return None
        out_rows.sort(key=lambda row: row[0])
        return {"a": received_at, "m": "alarm", "tags": {"city": self.city, "domain": domain, "node": node},
                "rows": out_rows}
