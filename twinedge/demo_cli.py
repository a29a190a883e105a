"""The `twinedge demo` command: start the local twin-city stack and show what flows."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from twinedge.demo import DOMAIN_OF, DemoCity, run_sampler
from twinedge.services import ServiceError

console = Console()
INFLUX_LAG = 'twinedge_sink_lag_seconds{sink="influx"}'


def _sum(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


def _table(cities: list[DemoCity], rates: dict[str, float], started: float) -> Table:
    t = Table(title=f"TwinEdge local demo — {time.time() - started:,.0f} s (Ctrl-C to stop)")
    for col in ("city", "nodes online", "readings/s", "published", "accepted", "InfluxDB lag", "dead letters",
                "log", "health"):
        t.add_column(col, justify="right" if col not in ("city", "health") else "left")
    for c in cities:
        assert c.gateway is not None
        m = c.gateway.metrics()
        now = time.time()
        online = sum(1 for k, v in m.items() if k.startswith("twinedge_node_last_seen_timestamp") and now - v < 120)
        code, text = c.gateway.health()
        t.add_row(c.name, f"{online}/{len(c.nodes)}", f"{rates.get(c.name, 0):,.0f}", f"{c.published:,}",
                  f"{_sum(m, 'twinedge_readings_accepted_total'):,.0f}",
                  f"{m.get(INFLUX_LAG, 0):.1f} s",
                  f"{_sum(m, 'twinedge_dead_letters_total'):,.0f}",
                  f"{m.get('twinedge_log_bytes', 0) / 1e6:.1f} MB",
                  "[green]ok[/green]" if code == 200 else f"[red]{text.strip()[:40]}[/red]")
    return t


def demo(
    cities: str = typer.Option("copenhagen,tongyeong", help="the twin pair, comma-separated (any two names)"),
    nodes: int = typer.Option(6, min=1, max=500, help="simulated nodes per city"),
    duration: float = typer.Option(0, help="seconds to run; 0 = until Ctrl-C"),
    interval: int = typer.Option(2, min=1, help="seconds between samples on every node"),
    batch: int = typer.Option(5, min=1, max=255, help="readings per MQTT message"),
    seed: int = typer.Option(1, help="seed of the simulated signals and faults"),
    workdir: Path = typer.Option(None, help="where the services keep their data (default: ./var/demo-<time>)"),
) -> None:
    """Run a local twin-city stack: per city a Mosquitto, an InfluxDB, a gateway and simulated nodes.

    Example: twinedge demo --cities helsinki,amsterdam --nodes 10 --duration 60

    Everything listens on free loopback ports and keeps its data under --workdir, so two
    demos can run side by side. Ctrl-C stops every process it started.
    """
    names = [c.strip().lower() for c in cities.split(",") if c.strip()]
    if len(names) != 2 or names[0] == names[1]:
        console.print("[red]error:[/red] --cities needs two different names, e.g. copenhagen,tongyeong")
        raise typer.Exit(2)
    workdir = workdir or Path("var") / time.strftime("demo-%Y%m%d-%H%M%S")
    workdir = workdir.resolve()
    domains = [[DOMAIN_OF[n]] if n in DOMAIN_OF else ["marine", "mobility"] for n in names]
    city_objs = [DemoCity(n, d, workdir / n) for n, d in zip(names, domains)]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    started = time.time()
    try:
        with console.status("starting services…"):
            for c in city_objs:
                c.start(nodes, seed)
                console.print(f"  {c.name}: mosquitto 127.0.0.1:{c.broker.port if c.broker else 0}, "
                              f"influxdb {c.influx.url if c.influx else ''}, gateway /metrics on "
                              f"127.0.0.1:{c.gateway.http_port if c.gateway else 0}", highlight=False)
        sampler = threading.Thread(target=run_sampler, args=(city_objs, interval, batch, stop), daemon=True)
        sampler.start()
        last = {c.name: 0.0 for c in city_objs}
        rates: dict[str, float] = {}
        last_t = time.time()
        interactive = sys.stdout.isatty()
        with Live(_table(city_objs, rates, started), console=console, refresh_per_second=2,
                  auto_refresh=False, transient=False) if interactive else _NullLive() as live:
            while not stop.is_set() and (not duration or time.time() - started < duration):
                stop.wait(1.0)
                now = time.time()
                for c in city_objs:
                    assert c.gateway is not None
                    acc = _sum(c.gateway.metrics(), "twinedge_readings_accepted_total")
                    rates[c.name] = (acc - last[c.name]) / max(1e-6, now - last_t)
                    last[c.name] = acc
                last_t = now
                if interactive:
                    live.update(_table(city_objs, rates, started), refresh=True)
                elif int(now - started) % 10 == 0:
                    console.print(_table(city_objs, rates, started))
    except ServiceError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        for c in city_objs:
            c.stop()
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass
    stop.set()
    _summary(city_objs, workdir)


class _NullLive:
    def __enter__(self) -> "_NullLive":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, *a: object, **k: object) -> None:
        return None


def _summary(cities: list[DemoCity], workdir: Path) -> None:
    console.print("stopping… flushing the last readings")
    for c in cities:
        try:
            c.flush()
        except Exception:  # noqa: BLE001 - a broker that is already gone must not hide the summary
            pass
    table = Table(title="demo summary")
    for col in ("city", "published", "in InfluxDB", "dead letters", "verdict"):
        table.add_column(col)
    for c in cities:
        deadline = time.time() + 30
        stored = 0
        while time.time() < deadline:
            try:
                stored = c.stored()
            except Exception:  # noqa: BLE001
                stored = 0
            if stored >= c.published:
                break
            time.sleep(0.2)
        assert c.gateway is not None
        dead = _sum(c.gateway.metrics(), "twinedge_dead_letters_total")
        verdict = "[green]complete[/green]" if stored == c.published else f"[red]{c.published - stored} missing[/red]"
        table.add_row(c.name, f"{c.published:,}", f"{stored:,}", f"{dead:,.0f}", verdict)
    for c in cities:
        c.stop()
    console.print(table)
    console.print(f"data lives in {workdir} (per city: influxdb/, mosquitto/, gw-<city>-gw1/ with the durable log "
                  "and dead letters); every process the demo started has stopped.", highlight=False)
