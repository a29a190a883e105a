"""`twinedge dashboards build|push|diff`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dashboards.build import CityBuild, build_city, write_build
from dashboards.config import Cities, ConfigError, load_cities
from dashboards.grafana import TOKEN_ENV, URL_ENV, GrafanaError, GrafanaSetupError, connect, diff_city, push_city
from dashboards.lint import lint_dashboard
from provisioning.registry import Node, RegistryError, load_registry

app = typer.Typer(
    help="Grafana dashboards as code: build files, push to a city's Grafana, report drift.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out_console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

CitiesOpt = Annotated[Path | None, typer.Option("--cities", help="City pairs TOML (default: the built-in pairs).", envvar="TWINEDGE_CITIES")]
RegistryOpt = Annotated[
    Path | None,
    typer.Option("--registry", help="Node registry folder (with nodes/*.toml) for map coordinates.", envvar="TWINEDGE_REGISTRY"),
]
UrlOpt = Annotated[str | None, typer.Option("--url", help=f"Grafana base URL (default: ${URL_ENV}, else the city's grafana_url).")]


def fail(msg: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {msg}", soft_wrap=True)
    return typer.Exit(code)


def _load(cities_file: Path | None, registry: Path | None) -> tuple[Cities, list[Node]]:
    try:
        cities = load_cities(cities_file)
    except ConfigError as e:
        raise fail(str(e)) from None
    if registry is None:
        default = Path("registry")
        if not (default / "nodes").is_dir():
            err_console.print("warning: no node registry (pass --registry DIR); map panels will have no positions", soft_wrap=True)
            return cities, []
        registry = default
    try:
        nodes = list(load_registry(registry).values())
    except RegistryError as e:
        raise fail(str(e)) from None
    return cities, nodes


def _builds(cities: Cities, nodes: list[Node], names: list[str]) -> list[CityBuild]:
    try:
        selected = [cities.get(n) for n in names] if names else [cities.cities[k] for k in sorted(cities.cities)]
    except ConfigError as e:
        raise fail(str(e)) from None
    builds = [build_city(cities, c, nodes) for c in selected]
    problems = [p for b in builds for r in b.dashboards for p in lint_dashboard(r.model)]
    if problems:
        for p in problems:
            err_console.print(f"lint: {p}", soft_wrap=True)
        raise fail(f"{len(problems)} lint problem(s) in the generated dashboards; nothing written", 1)
    return builds


@app.command()
def build(
    out: Annotated[Path, typer.Option("--out", help="Output folder; one sub-folder per city.")],
    city: Annotated[list[str] | None, typer.Option("--city", help="Only this city (repeatable). Default: all cities.")] = None,
    cities_file: CitiesOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Write dashboards JSON and Grafana provisioning YAML (datasources, dashboard provider) per city."""
    cities, nodes = _load(cities_file, registry)
    builds = _builds(cities, nodes, city or [])
    try:
        for b in builds:
            paths = write_build(out, b)
            out_console.print(f"{b.city.name}: {len(b.dashboards)} dashboards, {len(paths)} files in {out / b.city.name}")
    except OSError as e:
        raise fail(f"cannot write to {out}: {e.strerror}; choose a writable --out folder") from None


def _resolve_url(url: str | None, city_url: str) -> str:
    return url or os.environ.get(URL_ENV) or city_url


@app.command()
def push(
    city: Annotated[str, typer.Option("--city", help="City whose Grafana to update.")],
    url: UrlOpt = None,
    message: Annotated[str, typer.Option("--message", "-m", help="Version message stored with each saved dashboard.")] = "twinedge dashboards push",
    cities_file: CitiesOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Ensure folder and datasources, then upsert every dashboard by uid (unchanged ones are skipped)."""
    cities, nodes = _load(cities_file, registry)
    (b,) = _builds(cities, nodes, [city])
    try:
        api = connect(_resolve_url(url, b.city.grafana_url), os.environ.get(TOKEN_ENV))
        rep = push_city(api, cities, b, message)
    except GrafanaSetupError as e:
        raise fail(str(e)) from None
    except GrafanaError as e:
        raise fail(str(e), 3) from None
    for line in rep.lines:
        out_console.print(line, soft_wrap=True)
    out_console.print(f"[green]pushed[/green] {len(b.dashboards)} dashboards to {city}")


@app.command()
def diff(
    city: Annotated[str, typer.Option("--city", help="City whose Grafana to compare with the code.")],
    url: UrlOpt = None,
    cities_file: CitiesOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Report drift between the code and the city's Grafana (ignores id, version and other server-owned fields).

    Exit 0 in sync, 1 drift, 2 bad usage/config, 3 Grafana unreachable or refusing.
    """
    cities, nodes = _load(cities_file, registry)
    (b,) = _builds(cities, nodes, [city])
    try:
        api = connect(_resolve_url(url, b.city.grafana_url), os.environ.get(TOKEN_ENV))
        rep = diff_city(api, cities, b)
    except GrafanaSetupError as e:
        raise fail(str(e)) from None
    except GrafanaError as e:
        raise fail(str(e), 3) from None
    for line in rep.lines:
        out_console.print(line, soft_wrap=True, markup=False)
    if rep.drift:
        out_console.print(f"[yellow]drift[/yellow] in {city}: run `twinedge dashboards push --city {city}`")
        raise typer.Exit(1)
    out_console.print(f"[green]in sync[/green]: {city}")
