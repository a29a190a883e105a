"""`twinedge hil run`: run the HIL scenarios (the pytest suite, in-process) and report.

Prints a table (scenario, verdict, samples taken / landed / duplicated / lost, p50/p99
sample-to-queryable latency, recovery time), writes JUnit XML and a JSON report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

HIL_DIR = Path(__file__).resolve().parents[1]

hil_app = typer.Typer(help="Hardware-in-the-loop rig: the real firmware on emulated or real boards, end to end.",
                      no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


class Collector:
    """pytest plugin: the figures each scenario test recorded, and skips/errors."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    @staticmethod
    def _name(nodeid: str) -> str:
        return nodeid.rsplit("[", 1)[-1].rstrip("]") if "[" in nodeid else nodeid

    def pytest_runtest_logreport(self, report: Any) -> None:
        name = self._name(report.nodeid)
        figs = next((json.loads(v) for k, v in report.user_properties if k == "hil_figures"), None)
        if figs is not None and report.when == "call":
            figs["verdict"] = "pass" if report.passed else "fail"
            self.rows[name] = figs
        elif report.skipped and name not in self.rows:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.rows[name] = {"scenario": name, "verdict": "skip", "notes": [reason.removeprefix("Skipped: ")]}
        elif report.failed and name not in self.rows:
            msg = getattr(report.longrepr, "reprcrash", None)
            text = msg.message if msg is not None else str(report.longrepr)
            self.rows[name] = {"scenario": name, "verdict": "error", "problems": [text.splitlines()[0][:300]]}


def _fmt(v: Any, unit: str = "") -> str:
    return "—" if v is None else f"{v}{unit}"


@hil_app.command("run")
def run(
    board: Annotated[list[str] | None, typer.Option("--board", help="serial port of a real board (repeat for several); default: emulated boards")] = None,
    scenario: Annotated[list[str] | None, typer.Option("--scenario", help="run only this scenario (repeat); see `twinedge hil list`")] = None,
    nodes: Annotated[int, typer.Option(help="nodes in the fleet scenario, split over two cities")] = 4,
    out: Annotated[Path, typer.Option(help="folder for hil-junit.xml and hil-report.json")] = Path("hil-report"),
    long: Annotated[bool, typer.Option("--long", help="also run the long scenarios")] = False,
    broker_host: Annotated[str, typer.Option(help="address real boards use to reach this machine (default loopback)")] = "127.0.0.1",
) -> None:
    """Run the scenarios and account for every sample, node to InfluxDB.

    Examples:
      twinedge hil run                               (all scenarios, emulated boards)
      twinedge hil run --scenario steady --scenario blackhole
      twinedge hil run --board /dev/ttyUSB0          (scenarios a real board allows; others skipped)
    """
    import pytest

    from hil_tests.rig.scenarios import SCENARIOS

    console = Console(width=max(Console().width, 110))
    unknown = [s for s in scenario or [] if s not in SCENARIOS]
    if unknown:
        console.print(f"[red]unknown scenario {unknown[0]!r}[/]: choose from {', '.join(SCENARIOS)} (`twinedge hil list`)")
        raise typer.Exit(2)
    if nodes < 1:
        console.print("[red]--nodes must be at least 1[/]")
        raise typer.Exit(2)
    if board:
        from hil_tests.rig.real import BoardUnavailable, check_ports

        try:
            check_ports(board)
        except BoardUnavailable as e:
            console.print(f"[red]{e}[/]")
            raise typer.Exit(2) from None
    out.mkdir(parents=True, exist_ok=True)
    junit, report = (out / "hil-junit.xml").resolve(), (out / "hil-report.json").resolve()
    args = [str(HIL_DIR / "test_scenarios.py"), "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
            f"--hil-nodes={nodes}", "-o", "junit_family=xunit1"]
    args += [f"--board={p}" for p in board or []] + [f"--hil-scenario={s}" for s in scenario or []]
    if long:
        args.append("--hil-long")
    col = Collector()
    t0 = time.monotonic()
    code = pytest.main(args, plugins=[col])
    took = time.monotonic() - t0
    if code not in (0, 1):
        console.print(f"[red]the HIL suite could not run (pytest exit {int(code)})[/]: see the messages above")
        raise typer.Exit(2)

    table = Table(title=f"TwinEdge HIL — {'real boards ' + ', '.join(board) if board else 'emulated boards'}")
    for h in ("scenario", "verdict", "taken", "landed", "dup", "lost", "dropped", "p50", "p99", "recovery"):
        table.add_column(h, justify="right" if h not in ("scenario", "verdict") else "left", no_wrap=True)
    colour = {"pass": "green", "fail": "red", "error": "red", "skip": "yellow"}
    rows = [col.rows[n] for n in SCENARIOS if n in col.rows]
    for r in rows:
        v = r["verdict"]
        table.add_row(r["scenario"], f"[{colour[v]}]{v}[/]", _fmt(r.get("taken")), _fmt(r.get("landed")),
                      _fmt(r.get("duplicated")), _fmt(r.get("lost")), _fmt(r.get("dropped")),
                      _fmt(r.get("p50_ms"), " ms"), _fmt(r.get("p99_ms"), " ms"), _fmt(r.get("recovery_s"), " s"))
    console.print(table)
    for r in rows:  # why a scenario failed or was skipped, one line each
        if r["verdict"] != "pass":
            why = (r.get("problems") or r.get("notes") or [""])[0]
            console.print(f"  {r['scenario']}: {r['verdict']}: {why}")
    doc = {"backend": "real" if board else "emulated", "boards": board or [], "nodes": nodes,
           "wall_s": round(took, 1), "scenarios": rows}
    report.write_text(json.dumps(doc, indent=2))
    passed = sum(1 for r in rows if r["verdict"] == "pass")
    console.print(f"{passed} passed, {sum(1 for r in rows if r['verdict'] in ('fail', 'error'))} failed, "
                  f"{sum(1 for r in rows if r['verdict'] == 'skip')} skipped in {took:.0f} s")
    console.print(f"JUnit XML: {junit}\nJSON report: {report}")
    if code != 0:
        raise typer.Exit(1)


@hil_app.command("list")
def list_() -> None:
    """The scenarios, with what they need from a board."""
    from hil_tests.rig.real import REAL_CAPS
    from hil_tests.rig.scenarios import SCENARIOS

    table = Table(title="HIL scenarios")
    for h in ("scenario", "what it proves", "real board"):
        table.add_column(h)
    for s in SCENARIOS.values():
        real = "yes" if s.needs <= REAL_CAPS else "skipped (" + ", ".join(sorted(s.needs - REAL_CAPS)) + ")"
        table.add_row(s.name + (" (long)" if s.long else ""), s.title, real)
    Console().print(table)
