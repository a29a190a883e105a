"""Node status messages (retained JSON, see docs/wire-format.md) to `node_status` records."""

from __future__ import annotations

import json
from typing import Any

from gateway.topics import Topic

RESETS = {"power_on", "hard", "wdt", "deepsleep", "soft", "brownout", "unknown"}


class StatusError(ValueError):
    pass


def status_record(t: Topic, payload: bytes, site: str, received_at: float) -> dict[str, Any]:
    try:
        msg = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise StatusError("status is not valid JSON") from None
    if not isinstance(msg, dict):
        raise StatusError("status must be a JSON object")
    if msg.get("node") != t.node:
        raise StatusError(f"status node {msg.get('node')!r} does not match topic node {t.node!r}")
    if not isinstance(msg.get("online"), bool):
        raise StatusError("status needs a boolean `online`")
    fields: dict[str, Any] = {"online": msg["online"]}
    ints = {"up_s": "up_s", "heap": "heap", "rssi": "rssi", "buf": "buf", "drop": "drop", "cfg": "cfg"}
    for key, name in ints.items():
        v = msg.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            fields[name] = v
    if isinstance(msg.get("bat_mv"), int):
        fields["battery_v"] = msg["bat_mv"] / 1000
    if isinstance(msg.get("fw"), str):
        fields["fw"] = msg["fw"][:40]
    if isinstance(msg.get("reset"), str):
        fields["reset"] = msg["reset"] if msg["reset"] in RESETS else "unknown"
    if isinstance(msg.get("synced"), bool):
        fields["synced"] = msg["synced"]
    faults = msg.get("faults")
    if isinstance(faults, dict):
        fields["faults"] = len(faults)
        fields["fault_list"] = ",".join(f"{k}:{v}" for k, v in sorted(faults.items()))[:200]
    return {
        "a": received_at,
        "m": "node_status",
        "tags": {"city": t.city, "domain": t.domain, "node": t.node, "site": site},
        "rows": [[int(received_at), fields, None, 0]],
    }
