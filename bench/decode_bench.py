"""Decode micro-benchmark: µs per reading of a 50-reading compact message, generated complete-row
decoder (gateway/decode.py) against the general per-field loop it short-cuts, in the same run.

Run: .venv/bin/python -m bench.decode_bench
"""

from __future__ import annotations

import time
import timeit

from bench._common import build_payloads
from gateway.decode import _PLANS, decode_up
from gateway.topics import parse_topic


def per_reading_us(topic: str, payload: bytes, now: int, n: int = 3000) -> float:
    t = parse_topic(topic)
    return min(timeit.repeat(lambda: decode_up(t, payload, now), number=n, repeat=5)) / n / 50 * 1e6


def main() -> None:
    now = int(time.time())
    for topic, payload in build_payloads("copenhagen", 2, 1, 50, now - 3600):
        plan = _PLANS[payload[1]]
        fast = per_reading_us(topic, payload, now)
        real = plan.complete
        plan.complete = lambda *row: None  # the general loop for every row
        try:
            general = per_reading_us(topic, payload, now)
        finally:
            plan.complete = real
        print(f"{plan.schema.domain:9s} general loop {general:.2f} µs/reading, generated complete-row decoder "
              f"{fast:.2f} µs/reading = {general / fast:.2f}x")


if __name__ == "__main__":
    main()
