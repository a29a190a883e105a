from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from twinedge.gatewayproc import GatewayProcess
from twinedge.services import Influxd, Mosquitto


@pytest.fixture
def start_gateway(tmp_path: Path, mosquitto: Mosquitto, influxd: Influxd) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def _start(city: str = "copenhagen", instance: str = "gw1", **extra: object) -> GatewayProcess:
        gw = GatewayProcess(tmp_path / "gateways", city, mosquitto.port, influxd.url, instance=instance, extra=dict(extra))
        started.append(gw)
        return gw.start()

    yield _start
    for gw in started:
        gw.kill()
