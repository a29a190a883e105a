"""`twinedge`: one command line for gateway, nodes, broker, mirror, dashboards, HIL rig and demo.

Sub-apps are imported inside `build_app()` so that `twinedge gateway run` (a long-running
service) does not carry the dashboard and provisioning libraries in its memory.
"""

from __future__ import annotations

import sys

import typer


def build_app() -> typer.Typer:
    from dashboards.cli import app as dashboards_app
    from gateway.cli import app as gateway_app
    from gateway.mirror_cli import app as mirror_app
    from hil_tests.rig.cli import hil_app
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
    app.add_typer(mirror_app, name="mirror")
    app.add_typer(hil_app, name="hil")
    from twinedge.demo_cli import demo

    app.command("demo")(demo)
    return app


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "gateway":
        from gateway.cli import app as gateway_app

        gateway_app(args=sys.argv[2:], prog_name="twinedge gateway")
        return
    build_app()()


if __name__ == "__main__":
    main()
