from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dashboards.stack import (
    CITIES,
    DB,
    READINGS,
    Publisher,
    Stack,
    filled_by_gateway,
    publish_all,
    seed_not_yet_written_by_gateway,
    wait_until,
    write_registry,
)
from twinedge.gatewayproc import GatewayProcess
from twinedge.services import Influxd, Mosquitto


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_registry(tmp_path_factory.mktemp("registry"))


def republish(pub: Publisher, t_start: int) -> None:
    publish_all(pub, t_start)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, registry_dir: Path) -> Iterator[Stack]:
    """Both cities' gateways filled from simulated nodes, then stopped; InfluxDB stays up."""
    work = tmp_path_factory.mktemp("stack")
    broker = Mosquitto(work / "mosquitto").start()
    influx = Influxd(work / "influxd").start()
    gateways: list[GatewayProcess] = []
    pub: Publisher | None = None
    try:
        for c in CITIES:
            gw = GatewayProcess(
                work / "gateways", c, broker.port, influx.url, database=DB[c],
                extra={"registry": str(registry_dir), "stats_interval_s": 0.5, "influx": {"flush_interval_s": 0.05}},
            )
            gateways.append(gw)
            gw.start()
        t_start = int(time.time()) - 60 * (READINGS + 1)
        pub = Publisher(broker.port)
        published = publish_all(pub, t_start)
        wait_until(filled_by_gateway(influx, published), 60, "the gateways to write every reading, status and stats point",
                   on_retry=lambda: republish(pub, t_start))
        for gw in gateways:
            assert gw.stop() == 0, gw.log_tail()
        seed_not_yet_written_by_gateway(influx, t_start)
        yield Stack(influx, t_start, published)
    finally:
        if pub is not None:
            pub.close()
        for gw in gateways:
            gw.kill()
        influx.stop()
        broker.stop()
