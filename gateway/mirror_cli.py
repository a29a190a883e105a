"""`twinedge mirror …`: read and check the partnership policy, see what the partner holds."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gateway.config import ConfigError, load_config
from gateway.mirror_policy import Policy, PolicyError, load_policy

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Partner-city mirroring: policy and reconciliation status (docs/mirroring.md).")
policy_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                         help="The versioned partnership policy both cities deploy.")
app.add_typer(policy_app, name="policy")
err = Console(stderr=True)
out = Console()


def _policy(path: Path) -> Policy:
    try:
        return load_policy(path)
    except PolicyError as e:
        for line in e.problems:
            err.print(f"[red]policy error:[/red] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _describe(p: Policy) -> None:
    out.print(f"[bold]{p.policy}[/bold] version {p.version}: {p.cities[0]} <-> {p.cities[1]}, "
              f"rate cap {p.max_points_per_s:g} points/s per city", highlight=False)
    if p.description:
        out.print(p.description, highlight=False)
    t = Table("measurement", "domains", "nodes", "site", "granularity", "shared fields (transform)")
    for r in p.share:
        nodes = ", ".join(r.nodes) + (f" except {', '.join(r.exclude_nodes)}" if r.exclude_nodes else "")
        site = r.site if isinstance(r.site, str) else f"first {r.site} part(s)"
        gran = f"{r.aggregate_minutes}-min bins: {', '.join(r.stats)}" if r.aggregate_minutes else "raw readings"
        fields = []
        for name, fr in r.fields.items():
            tr = [f"round {fr.round}" for _ in [0] if fr.round is not None] + [f"step {fr.quantum:g}" for _ in [0] if fr.quantum]
            fields.append(f"{name} ({', '.join(tr)})" if tr else name)
        t.add_row(r.measurement, ", ".join(r.domains), nodes, str(site), gran, "\n".join(fields))
    out.print(t)
    never = {m: fs for m, fs in p.forbidden().items() if fs}
    for m, fs in never.items():
        out.print(f"[yellow]never leaves the city[/yellow] ({m}): {', '.join(fs)}", highlight=False)
    out.print("not listed measurements (gateway, gateway_node, ...) never leave the city either", highlight=False)


@policy_app.command("show")
def policy_show(path: Path = typer.Argument(..., help="policy TOML, e.g. docs/policies/blue-city-twins.toml")) -> None:
    """Print what the policy shares, how it transforms it, and what never leaves the city.

    Example: twinedge mirror policy show docs/policies/blue-city-twins.toml
    """
    _describe(_policy(path))


@policy_app.command("check")
def policy_check(path: Path = typer.Argument(..., help="policy TOML"),
                 city: str = typer.Option(None, help="check that this city is one of the two partners"),
                 other: Path = typer.Option(None, "--against", help="the partner's copy: must be identical in content")) -> None:
    """Validate a policy file (exit 0 when valid, 2 with one line per problem).

    Example: twinedge mirror policy check blue-city-twins.toml --city copenhagen --against their-copy.toml
    """
    p = _policy(path)
    problems: list[str] = []
    if city is not None:
        try:
            p.partner_of(city)
        except PolicyError as e:
            problems += e.problems
    if other is not None:
        q = _policy(other)
        if q != p:
            problems.append(f"{other}: differs from {path} (theirs: {q.policy} v{q.version}, ours: {p.policy} v{p.version}); "
                            "both cities must deploy the same file")
        elif q.version == p.version and other.read_bytes() != path.read_bytes():
            out.print("[yellow]note:[/yellow] same content, different formatting", highlight=False)
    if problems:
        for line in problems:
            err.print(f"[red]policy error:[/red] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    out.print(f"[green]ok[/green] {path}: {p.policy} v{p.version} between {p.cities[0]} and {p.cities[1]}, "
              f"{len(p.share)} shared measurement(s)", highlight=False)


@app.command("status")
def status(config: Path = typer.Option(..., "--config", "-c", help="the gateway TOML with a [mirror] section"),
           hours: int = typer.Option(24, min=1, help="show reconciliation of the last N hours"),
           per_node: bool = typer.Option(False, "--per-node", help="one row per node and hour")) -> None:
    """Reconciliation status: pending batches and how much of what we sent the partner holds.

    Reads the mirror archive in the gateway's data dir (safe while the gateway runs).
    Example: twinedge mirror status -c /etc/twinedge/gateway.toml
    """
    from gateway.mirror import validate_mirror_config
    from gateway.mirror_archive import summary

    try:
        cfg = load_config(config)
        if not cfg.mirror:
            raise ConfigError([f"{config}: has no [mirror] section; mirroring is off (see docs/mirroring.md)"])
        mcfg = validate_mirror_config(cfg.mirror, cfg.city)
    except ConfigError as e:
        for line in e.problems:
            err.print(f"[red]config error:[/red] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    path = cfg.data_dir / "mirror" / f"archive-{mcfg.partner}.sqlite3"
    if not path.exists():
        err.print(f"[red]error:[/red] no mirror archive at {path}: has the gateway run with [mirror] yet?", highlight=False)
        raise typer.Exit(2)
    since = int(time.time()) - hours * 3600
    s = summary(path, since - since % 3600)
    b = s["batches"]
    lag = f", oldest pending {time.time() - s['oldest_pending_at']:.0f} s ago" if s["oldest_pending_at"] else ""
    out.print(f"{cfg.city} -> {mcfg.partner}: batches acknowledged {b['acked']}, pending {b['pending']} "
              f"({s['pending_points']} points{lag}), rejected {b['rejected']}", highlight=False)
    for reason, n in s["rejected_reasons"].items():
        out.print(f"[red]rejected[/red] {n}: {reason}", highlight=False)
    rows: dict[tuple[int, str], list[int]] = {}
    for m, node, hour, count, pcount, matched, dirty in s["keys"]:
        key = (hour, f"{m}/{node}" if per_node else m)
        r = rows.setdefault(key, [0, 0, 0, 0])
        r[0] += count
        r[1] += pcount if pcount is not None else 0
        r[2] += 1 if matched else 0
        r[3] += 1
    t = Table("hour (UTC)", "series", "sent", "partner holds", "node-hours matched")
    sent_total = held_total = 0
    for (hour, name), (sent, held, matched, n) in sorted(rows.items()):
        sent_total += sent
        held_total += min(held, sent)
        t.add_row(dt.datetime.fromtimestamp(hour, dt.timezone.utc).strftime("%Y-%m-%d %H:00"), name, str(sent),
                  str(held), f"{matched}/{n}")
    out.print(t)
    if sent_total:
        out.print(f"the partner holds {100.0 * held_total / sent_total:.2f}% of what we sent (last {hours} h, compared hours)",
                  highlight=False)
    else:
        out.print("nothing compared yet in this window", highlight=False)
