"""`twinedge gateway …`: run, check-config, dead-letters."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gateway.config import ConfigError, GatewayConfig, load_config

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
err = Console(stderr=True)
out = Console()

CONFIG_HELP = "Gateway TOML config (see docs/operations.md). Environment TWINEDGE_SECTION__KEY overrides a key."


def _load(path: Path) -> GatewayConfig:
    try:
        return load_config(path)
    except ConfigError as e:
        for line in e.problems:
            err.print(f"[red]config error:[/red] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def run(config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
        log_level: str = typer.Option("info", help="debug, info, warning or error")) -> None:
    """Run the gateway: MQTT in -> durable log -> InfluxDB (and partner mirror).

    Example: twinedge gateway run --config /etc/twinedge/gateway.toml

    Stops on SIGTERM/SIGINT after draining to InfluxDB for at most drain_timeout_s;
    whatever is not written stays in the durable log for the next start.
    """
    from gateway.logsetup import setup_logging
    from gateway.service import Gateway

    cfg = _load(config)
    setup_logging(log_level)
    try:
        gw = Gateway(cfg)
    except OSError as e:
        err.print(f"[red]error:[/red] cannot open data dir {cfg.data_dir}: {e.strerror}", highlight=False)
        raise typer.Exit(2) from None
    code = asyncio.run(gw.run())
    raise typer.Exit(code)


@app.command("check-config")
def check_config(config: Path = typer.Argument(..., help=CONFIG_HELP)) -> None:
    """Validate a gateway config and print what it resolves to (secrets hidden).

    Exit code 0 when valid, 2 with one line per problem when not.
    Example: twinedge gateway check-config gateway.toml
    """
    cfg = _load(config)
    shown = cfg.model_dump(mode="json")
    for section, key in (("mqtt", "password"), ("influx", "password"), ("influx", "token")):
        if shown[section].get(key):
            shown[section][key] = "********"
    out.print(f"[green]ok[/green] {config}: city {cfg.city}, instance {cfg.instance}, "
              f"broker {cfg.mqtt.host}:{cfg.mqtt.port}, influx {cfg.influx.api} {cfg.influx.url}", highlight=False)
    out.print_json(json.dumps(shown))


@app.command("dead-letters")
def dead_letters(
    config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
    reason: str = typer.Option(None, help="only this reason, e.g. range, identity, time_future"),
    node: str = typer.Option(None, help="only this node"),
    limit: int = typer.Option(50, min=1, help="newest N entries"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line (payload in hex)"),
) -> None:
    """List what the gateway rejected and why (newest first), with counts per reason.

    Example: twinedge gateway dead-letters -c gateway.toml --reason range --limit 20
    """
    from gateway.dead_letter import open_readonly

    cfg = _load(config)
    path = cfg.data_dir / "dead_letters.sqlite3"
    try:
        store = open_readonly(path)
    except FileNotFoundError:
        err.print(f"no dead-letter store at {path}: the gateway has not run with this config yet", highlight=False)
        raise typer.Exit(1) from None
    items = store.list(limit=limit, reason=reason, node=node)
    if as_json:
        for d in items:
            sys.stdout.write(json.dumps({
                "id": d.id, "at": d.at, "stage": d.stage, "reason": d.reason, "detail": d.detail, "topic": d.topic,
                "node": d.node, "payload_hex": d.payload.hex() if d.payload else None, "item": d.item}) + "\n")
        return
    counts = store.counts_by_reason()
    out.print(f"{sum(counts.values())} dead letters: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
              highlight=False)
    table = Table("id", "time (UTC)", "stage", "reason", "node", "detail", "topic")
    for d in items:
        table.add_row(str(d.id), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.at)), d.stage, d.reason,
                      d.node or "", d.detail, d.topic)
    out.print(table)
