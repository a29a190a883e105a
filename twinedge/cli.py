"""`twinedge`: one command line for gateway, nodes, broker, mirror, dashboards, HIL rig and demo."""

from __future__ import annotations

import typer

from dashboards.cli import app as dashboards_app
from gateway.cli import app as gateway_app
from provisioning.cli import broker_app, node_app

app = typer.Typer(
    help="TwinEdge: edge stack for twin cities sharing marine and mobility sensor networks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(gateway_app, name="gateway", help="Run and inspect the city gateway (MQTT -> log -> InfluxDB).")
app.add_typer(dashboards_app, name="dashboards")
app.add_typer(node_app, name="node")
app.add_typer(broker_app, name="broker")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
