"""Prometheus metrics (one registry per gateway, no global state) and the /metrics, /healthz server."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(self, city: str, instance: str) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.received = Counter("twinedge_messages_received", "MQTT messages received", ["kind"], registry=r)
        self.accepted = Counter("twinedge_readings_accepted", "Readings made durable in the log", ["domain"], registry=r)
        self.dead_letters = Counter("twinedge_dead_letters", "Messages or readings dead-lettered", ["stage", "reason"], registry=r)
        self.duplicates = Counter("twinedge_duplicates", "Readings skipped as already received", registry=r)
        self.log_bytes = Gauge("twinedge_log_bytes", "Bytes held by the durable log", registry=r)
        self.log_full = Gauge("twinedge_log_full", "1 while the durable log is full and the gateway stops acknowledging", registry=r)
        self.log_appends = Counter("twinedge_log_appends", "Group commits (fdatasync) of the durable log", registry=r)
        self.sink_lag_bytes = Gauge("twinedge_sink_lag_bytes", "Log bytes a sink still has to process", ["sink"], registry=r)
        self.sink_lag_seconds = Gauge("twinedge_sink_lag_seconds", "Age of the oldest record a sink has not written", ["sink"], registry=r)
        self.sink_points = Counter("twinedge_sink_points", "Points written by a sink", ["sink"], registry=r)
        self.sink_errors = Counter("twinedge_sink_errors", "Failed write attempts by a sink", ["sink", "kind"], registry=r)
        self.write_latency = Histogram(
            "twinedge_sink_write_seconds", "Duration of one sink write request", ["sink"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.node_last_seen = Gauge("twinedge_node_last_seen_timestamp", "Time of a node's newest reading", ["node"], registry=r)
        self.node_gaps = Gauge("twinedge_node_gaps", "Missing sequence numbers per node", ["node"], registry=r)
        self.node_duplicates = Gauge("twinedge_node_duplicates", "Duplicate readings per node", ["node"], registry=r)
        self.node_completeness = Gauge("twinedge_node_completeness", "received / (received + gaps) per node", ["node"], registry=r)
        self.mqtt_unacked = Gauge("twinedge_mqtt_unacked", "Messages received and not yet acknowledged", registry=r)
        self.backpressure = Gauge("twinedge_ingest_backpressure_waits", "Times the MQTT reader paused because the ingest queue was full", registry=r)
        self.ingest_queue = Gauge("twinedge_ingest_queue", "Messages received from the broker, not yet durable", registry=r)
        self.mqtt_connected = Gauge("twinedge_mqtt_connected", "1 while connected to the broker", registry=r)
        self.info = Gauge("twinedge_gateway_info", "Gateway identity", ["city", "instance"], registry=r)
        self.info.labels(city, instance).set(1)


class HealthState:
    """Reasons the gateway is unhealthy; empty = healthy."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        self.started = time.time()

    def set(self, key: str, reason: str | None) -> None:
        if reason:
            self.reasons[key] = reason
        else:
            self.reasons.pop(key, None)


async def start_http(host: str, port: int, metrics: GatewayMetrics, health: HealthState,
                     refresh: Callable[[], None]) -> tuple[web.AppRunner, int]:
    async def get_metrics(_req: web.Request) -> web.Response:
        refresh()
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def get_health(_req: web.Request) -> web.Response:
        refresh()
        if health.reasons:
            text = "unhealthy: " + "; ".join(f"{k}: {v}" for k, v in sorted(health.reasons.items()))
            return web.Response(status=503, text=text + "\n")
        return web.Response(status=200, text="ok\n")

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", get_health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
