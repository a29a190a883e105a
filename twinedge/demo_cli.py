"""The `twinedge demo` command: start two partner cities, show them live, account for every reading."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType

import typer
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from twinedge.demo import DemoConfig, DemoError, TwinDemo, check_tools, lock_workdir
from twinedge.demo_provision import ProvisionError
from twinedge.demo_view import LiveState, grafana_lines, headless_line, live_view, summary_table, where_lines
from twinedge.services import ServiceError

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


def _interrupt(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the demo the same way as Ctrl-C


def demo(
    cities: str = typer.Option("copenhagen,tongyeong", help="the twin pair, comma-separated (any two city names)"),
    nodes: int = typer.Option(6, min=2, max=16, help="emulated nodes per city (buoys and traffic counters alternate)"),
    duration: float = typer.Option(0, min=0, help="seconds to run once everything reports; 0 = until Ctrl-C"),
    seed: int = typer.Option(1, help="seed of the simulated world (signals, probe faults, events)"),
    interval: int = typer.Option(2, min=2, max=60, help="the nodes' sample interval, seconds (node config interval_s; at least 2, so two readings never share a timestamp second)"),
    batch: int = typer.Option(5, min=1, max=50, help="readings per MQTT message (node config batch)"),
    world_speed: float = typer.Option(120.0, min=1.0, max=3600.0,
                                      help="how much faster the simulated world's clock runs (120: a day in 12 minutes)"),
    workdir: Path = typer.Option(None, help="where everything keeps its data (default: ./var/demo-<date>-<time>)"),
) -> None:
    """Run two partner cities on this machine and watch them exchange live sensor data.

    Per city: Mosquitto with the password/ACL files `twinedge broker render` writes, an InfluxDB,
    a gateway mirroring to the partner under the partnership policy, and emulated ESP32 buoys
    and traffic counters running the real firmware, registered and installed with the
    provisioning commands. Dashboards and Grafana provisioning are built for both cities.
    Ctrl-C (or --duration) drains the nodes, checks every reading landed, stops every
    process and says where the data lives.

    Examples:
      twinedge demo
      twinedge demo --cities helsinki,amsterdam --nodes 8 --duration 300 --seed 7
    """
    console = Console(highlight=False, file=sys.stdout)
    if not console.is_terminal:
        console = Console(highlight=False, file=sys.stdout, width=200)  # logs: keep the summary table readable
    names = [c.strip().lower() for c in cities.split(",") if c.strip()]
    if len(names) != 2 or names[0] == names[1]:
        console.print("[red]error:[/red] --cities needs two different names, e.g. copenhagen,tongyeong")
        raise typer.Exit(2)
    bad = [n for n in names if not NAME_RE.match(n)]
    if bad:
        console.print(f"[red]error:[/red] --cities: {bad[0]!r} is not a city name; use lowercase letters, digits "
                      "and '-', starting with a letter (e.g. helsinki,amsterdam)")
        raise typer.Exit(2)
    try:
        check_tools()
    except DemoError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(e.code) from None
    if workdir is None:
        workdir = Path("var") / time.strftime("demo-%Y%m%d-%H%M%S")
        if workdir.exists():
            workdir = workdir.with_name(f"{workdir.name}-{os.getpid()}")
    workdir = workdir.resolve()
    try:
        lock_fd = lock_workdir(workdir)
    except DemoError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(e.code) from None
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`cmd &`)
    cfg = DemoConfig((names[0], names[1]), nodes, interval, batch, seed, world_speed, workdir)
    d = TwinDemo(cfg, say=lambda s: console.print(f"[green]✓[/green] {s}"))
    code = 0
    try:
        code = _run(console, d, duration)
    finally:
        d.stop()
        os.close(lock_fd)
    raise typer.Exit(code)


def _run(console: Console, d: TwinDemo, duration: float) -> int:
    console.print(f"TwinEdge demo: {d.cfg.cities[0]} ⇄ {d.cfg.cities[1]}, {d.cfg.nodes} nodes per city, "
                  f"seed {d.cfg.seed}, data in {d.workdir}")
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task("starting", total=None)

            def on_progress(what: str, k: int, n: int) -> None:
                progress.update(task, description=what, completed=k, total=n or None)

            d.say = lambda s: progress.console.print(f"[green]✓[/green] {s}")
            d.start(on_progress)
    except KeyboardInterrupt:
        console.print("interrupted while starting; stopping everything the demo started")
        return 130
    except (DemoError, ProvisionError, ServiceError) as e:
        console.print(f"[red]error:[/red] {e}")
        console.print("stopped everything the demo started")
        return e.code if isinstance(e, DemoError) else 1
    except Exception as e:  # noqa: BLE001 - one line for the operator, the details in a file
        return _internal(console, d, e)
    console.print("Grafana: point a Grafana at these (datasources `influx-home`/`influx-partner` and dashboards):")
    for line in grafana_lines(d):
        console.print(line)

    st = LiveState()
    interactive = console.is_terminal
    try:
        st.refresh(d)
        if interactive:
            with Live(live_view(d, st, duration, console.width), console=console, refresh_per_second=2, transient=False) as live:
                while not duration or time.time() - d.started_at < duration:
                    time.sleep(1.0)
                    st.refresh(d)
                    live.update(live_view(d, st, duration, console.width))
        else:
            last_print = 0.0
            while not duration or time.time() - d.started_at < duration:
                time.sleep(1.0)
                st.refresh(d)
                if time.time() - last_print >= 10:
                    last_print = time.time()
                    for side in d.sides.values():
                        console.print(headless_line(d, st, side))
    except KeyboardInterrupt:
        console.print("Ctrl-C: stopping")
    except Exception as e:  # noqa: BLE001
        return _internal(console, d, e)
    return _finish(console, d)


def _finish(console: Console, d: TwinDemo) -> int:
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task("parking the nodes (config interval 3600 s) and sending what they hold", total=None)
            d.drain_nodes(on_progress=lambda w, k, n: progress.update(task, completed=k, total=n or None))
            progress.update(task, description="checking every reading in InfluxDB and at the partner", total=None)
            summary = d.account()
    except KeyboardInterrupt:
        console.print("interrupted again: skipping the accounting, stopping everything")
        return 130
    except Exception as e:  # noqa: BLE001
        return _internal(console, d, e)
    console.print("stopping gateways, brokers and InfluxDB…")
    d.stop()
    console.print(summary_table(summary))
    for c in summary.cities:
        if c.gw_completeness is not None and c.gw_completeness == c.gw_completeness:
            console.print(f"{c.city}: gateway reconciliation says the partner holds {100 * c.gw_completeness:.2f} % "
                          "of the closed hours it compared")
        for note in c.mirror_notes:
            console.print(f"{c.city}: {note}")
    for line in where_lines(d):
        console.print(line)
    console.print("Grafana files:")
    for line in grafana_lines(d):
        console.print(line)
    console.print("every process the demo started has stopped.")
    if summary.complete:
        console.print("[bold green]✓ every node reported, every reading is in InfluxDB, the partner holds everything "
                      "the policy shares[/bold green]")
        return 0
    console.print("[bold red]✗ not everything arrived; see the summary above and the gateway logs[/bold red]")
    return 1


def _internal(console: Console, d: TwinDemo, e: BaseException) -> int:
    path = d.workdir / "demo-error.log"
    try:
        path.write_text("".join(traceback.format_exception(e)))
    except OSError:
        path = Path("(could not write the details)")
    console.print(f"[red]error:[/red] the demo failed unexpectedly ({type(e).__name__}: {str(e)[:200]}); "
                  f"details in {path}. Stopping everything it started.")
    return 1
