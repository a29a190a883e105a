"""Realistic synthetic signals for demo and load: tides, day/night, rush hours, flaky sensors.

Values are wire integers (fixed point, docs/wire-format.md), computed from the reading's
own timestamp so any node can be replayed deterministically from a seed.
"""

from __future__ import annotations

import math
import random

TIDE_PERIOD_S = 12.42 * 3600
DAY_S = 86400


def marine_row(t: int, phase: float, rng: random.Random, fault_rate: float = 0.01) -> tuple[int, list[int]]:
    """(present mask, values) for a buoy at time t."""
    day = math.sin(2 * math.pi * ((t % DAY_S) / DAY_S - 0.35))         # warmest mid-afternoon
    tide = math.sin(2 * math.pi * (t / TIDE_PERIOD_S) + phase)
    temp = 14.0 + 2.5 * day + rng.gauss(0, 0.05)
    salinity = 30.0 + 2.0 * tide + rng.gauss(0, 0.05)
    conductivity = salinity * 1450 + (temp - 15) * 900
    do = 9.5 - 0.18 * (temp - 10) + rng.gauss(0, 0.05)
    ph = 8.08 + 0.05 * day + rng.gauss(0, 0.01)
    turbidity = max(0.5, 4 + 3 * max(0.0, tide) + (rng.expovariate(0.3) if rng.random() < 0.02 else 0))
    battery = 3.95 + 0.15 * max(0.0, day) - 0.05 * (1 - max(0.0, day))
    vals = [round(ph * 100), round(temp * 100), round(do * 100), round(conductivity), round(salinity * 100),
            round(turbidity * 10), round(battery * 1000)]
    mask = 0x7F
    if rng.random() < fault_rate:          # a sensor fails now and then: no value is invented
        bit = rng.randrange(0, 6)
        mask &= ~(1 << bit)
        vals[bit] = 0
    return mask, vals


def mobility_row(t: int, scale: float, interval_s: int, rng: random.Random,
                 fault_rate: float = 0.01) -> tuple[int, list[int]]:
    """(present mask, values) for a traffic counter at time t: rush hours at 08:00 and 17:00 local."""
    hour = (t % DAY_S) / 3600
    rush = math.exp(-((hour - 8) ** 2) / 1.5) + 0.9 * math.exp(-((hour - 17) ** 2) / 2.0)
    base = 0.15 + 0.6 * math.exp(-((hour - 13) ** 2) / 18)
    per_min = scale * (base + 2.2 * rush)
    k = interval_s / 60
    vehicles = max(0, round(rng.gauss(per_min * 20 * k, 2)))
    bikes = max(0, round(rng.gauss(per_min * 8 * k, 1)))
    peds = max(0, round(rng.gauss(per_min * 5 * k, 1)))
    congestion = min(1.0, rush)
    mean = 48 - 22 * congestion + rng.gauss(0, 1.5)
    p85 = mean * 1.22
    vmax = p85 * 1.3 + rng.expovariate(0.2)
    battery = 4.05 + rng.gauss(0, 0.005)
    vals = [vehicles, bikes, peds, round(mean * 10), round(p85 * 10), round(min(vmax, 290) * 10), round(battery * 1000),
            interval_s]
    mask = 0xFF
    if vehicles == 0:
        mask &= ~0b111000  # no vehicle, no speed statistics (absent, not zero)
        vals[3] = vals[4] = vals[5] = 0
    if rng.random() < fault_rate:
        mask &= ~0b111000  # the radar dropped out
        vals[3] = vals[4] = vals[5] = 0
    return mask, vals


# -- the simulated world of the demo (engineering units, fed to the emulated boards' sensors) --

def marine_world(t_local: float, phase: float, base_temp_c: float = 14.0) -> dict[str, float]:
    """What a buoy's probes measure at local world time t_local (seconds; day/night, tide).

    Keys are the scenario names of hil_tests/board/te_sim.py: ph, temp (°C), do (mg/L),
    ec (µS/cm), sal (PSU), turb (NTU), bat (V)."""
    day = math.sin(2 * math.pi * ((t_local % DAY_S) / DAY_S - 0.35))   # warmest mid-afternoon
    tide = math.sin(2 * math.pi * (t_local / TIDE_PERIOD_S) + phase)
    sun = max(0.0, day)
    temp = base_temp_c + 2.5 * day
    sal = 30.0 + 2.0 * tide
    return {
        "ph": 8.08 + 0.05 * day,
        "temp": temp,
        "do": 9.5 - 0.18 * (temp - 10) + 0.6 * sun,        # photosynthesis by day
        "ec": sal * 1450 + (temp - 15) * 900,
        "sal": sal,
        "turb": 4 + 3 * max(0.0, tide),                      # ebb stirs up sediment
        "bat": 3.95 + 0.15 * sun - 0.05 * (1 - sun),         # solar panel
    }


def mobility_world(t_local: float, scale: float) -> dict[str, float]:
    """Traffic past a counter at local world time t_local: per-minute rates and speeds.

    Rush hours at 08:00 and 17:00; `scale` is how busy the road is."""
    hour = (t_local % DAY_S) / 3600
    rush = math.exp(-((hour - 8) ** 2) / 1.5) + 0.9 * math.exp(-((hour - 17) ** 2) / 2.0)
    base = 0.1 + 0.6 * math.exp(-((hour - 13) ** 2) / 18)
    per_min = scale * (base + 2.2 * rush)
    congestion = min(1.0, rush)
    return {
        "vehicles_per_min": 20 * per_min,
        "bikes_per_min": 8 * per_min,
        "peds_per_min": 5 * per_min,
        "speed_kmh": 48 - 22 * congestion,
        "bat": 4.05,
    }
