"""`twinedge node ...` and `twinedge broker ...`: the technician's command line.

Every command is safe to re-run. Errors are one line saying what to do next; exit code 2
for usage/configuration problems, 1 for everything that went wrong at run time.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from provisioning import broker as brk
from provisioning import calibrate as cal
from provisioning import device
from provisioning import flash as fl
from provisioning.errors import ProvisioningError, UsageError
from provisioning.registry import (
    City,
    Node,
    RegistryError,
    Sensor,
    describe_validation_error,
    get_node,
    load_city,
    load_registry,
    node_path,
    save_city,
    save_node,
)
from provisioning.secrets import SecretError, SecretStore
from provisioning.verify import VerifyReport, verify

F = TypeVar("F", bound=Callable[..., Any])
FIRMWARE_DIR = Path(__file__).resolve().parent.parent / "firmware"

node_app = typer.Typer(
    help="Register, flash, install, verify and calibrate sensor nodes.\n\n"
    "Quick start on site:  twinedge node setup buoy-07 --port /dev/ttyUSB0 --firmware ESP32_GENERIC.bin",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
broker_app = typer.Typer(
    help="Broker access: Mosquitto password/ACL files from the registry, and the city CA for TLS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


# -- shared plumbing ------------------------------------------------------------------------------


def out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def fail(message: str, code: int) -> typer.Exit:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", markup=True)
    return typer.Exit(code)


def friendly(fn: F) -> F:
    """Turn our error types into one red line and an exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ProvisioningError as e:
            raise fail(str(e), e.exit_code) from None
        except (RegistryError, SecretError, brk.BrokerError) as e:
            raise fail(str(e), 2) from None
        except ValidationError as e:  # a model built from options we did not wrap ourselves
            raise fail(describe_validation_error(e, "input"), 2) from None
        except KeyboardInterrupt:
            raise fail("interrupted; nothing half-done is left behind, run the command again", 130) from None

    return wrapper  # type: ignore[return-value]


def registry_root() -> Path:
    return Path(os.environ.get("TWINEDGE_REGISTRY", "registry"))


def secret_store() -> SecretStore:
    default = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "twinedge" / "secrets"
    return SecretStore(Path(os.environ.get("TWINEDGE_SECRETS", str(default))))


RegistryOpt = Annotated[
    Path | None,
    typer.Option("--registry", help="registry folder (default: $TWINEDGE_REGISTRY or ./registry)", show_default=False),
]


def root_of(opt: Path | None) -> Path:
    return opt if opt is not None else registry_root()


def parse_hostport(text: str, default_port: int = 1883) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", str(default_port))
    try:
        p = int(port)
        if not 0 < p < 65536:
            raise ValueError
    except ValueError:
        raise UsageError(f"--broker {text!r}: give host:port, e.g. 192.168.4.2:1883") from None
    return host or "127.0.0.1", p


def parse_sensor(text: str) -> Sensor:
    """`kind[:serial[:model[:bus]]]` or `kind,serial=..,model=..,bus=..`."""
    if "=" in text:
        kind, *rest = text.split(",")
        kv = dict(x.split("=", 1) for x in rest if "=" in x)
    else:
        kind, *parts = text.split(":", 3)
        kv = dict(zip(("serial", "model", "bus"), parts))
    try:
        return Sensor(kind=kind.strip(), **{k.strip(): v.strip() for k, v in kv.items()})  # type: ignore[arg-type]
    except ValidationError as e:
        raise UsageError(describe_validation_error(e, f"--sensor {text!r}")) from None


def node_row_table(nodes: list[Node]) -> Table:
    t = Table("id", "city", "domain", "site", "sensors", "firmware", "cfg v", "state")
    for n in nodes:
        t.add_row(n.id, n.city, n.domain, n.site, ", ".join(s.kind for s in n.sensors), n.firmware or "-",
                  str(n.config.version), "retired" if n.retired else "active")
    return t


def mqtt_login(store: SecretStore, username: str) -> tuple[str, str]:
    s = store.get(f"mqtt/{username}")
    return username, s["password"].reveal()


# -- registry commands --------------------------------------------------------------------------


@node_app.command("add")
@friendly
def add(
    node_id: Annotated[str, typer.Argument(help="node id = its MQTT username, e.g. buoy-07")],
    city: Annotated[str, typer.Option(help="city, lowercase, e.g. copenhagen")],
    domain: Annotated[str, typer.Option(help="marine or mobility")],
    site: Annotated[str, typer.Option(help="site name shown in dashboards")] = "unknown",
    lat: Annotated[float | None, typer.Option(help="latitude, degrees north")] = None,
    lon: Annotated[float | None, typer.Option(help="longitude, degrees east")] = None,
    sensor: Annotated[list[str] | None, typer.Option(help="kind[:serial[:model[:bus]]], repeat per sensor, e.g. ph:PH-1234:EZO-pH:i2c:0x63")] = None,
    interval: Annotated[int, typer.Option(help="seconds between readings (1..3600)")] = 60,
    registry: RegistryOpt = None,
) -> None:
    """Register a node and create its MQTT credential (stored in the secret store, never shown).

    Example:
      twinedge node add buoy-07 --city copenhagen --domain marine --site Nordhavn \\
        --lat 55.7105 --lon 12.5950 --sensor ph:PH-1234 --sensor temp:T-88 --sensor battery
    """
    root = root_of(registry)
    if node_path(root, node_id).exists():
        raise UsageError(f"node {node_id!r} already exists: change it with `twinedge node edit {node_id} --set key=value`")
    sensors = [parse_sensor(s) for s in sensor or []]
    store = secret_store()
    try:
        node = Node.model_validate({"id": node_id, "city": city, "domain": domain, "site": site, "lat": lat, "lon": lon,
                                    "sensors": sensors, "config": {"interval_s": interval}, "wifi_ref": f"wifi/{city}"})
    except ValidationError as e:
        raise UsageError(describe_validation_error(e, f"node {node_id}")) from None
    node = node.model_copy(update={"credential_ref": store.ensure_mqtt(node_id)})
    path = save_node(root, node)
    o = out()
    o.print(f"added {node_id} ({city}/{domain}, {site}) -> {path}")
    o.print(f"MQTT credential stored as {node.credential_ref} in {store.root} (not shown)")
    if not store.exists(node.wifi_ref):
        o.print(f"next: store the site Wi-Fi once per city with `twinedge node wifi {city} --ssid NAME`")
    o.print("then: `twinedge broker render --city " + city + "` so the broker knows the node")


@node_app.command("list")
@friendly
def list_(
    city: Annotated[str | None, typer.Option(help="only this city")] = None,
    all_: Annotated[bool, typer.Option("--all", help="include retired nodes")] = False,
    registry: RegistryOpt = None,
) -> None:
    """List registered nodes.  Example: twinedge node list --city copenhagen"""
    nodes = [n for n in load_registry(root_of(registry)).values() if (all_ or not n.retired) and (city is None or n.city == city)]
    out().print(node_row_table(nodes))


@node_app.command("show")
@friendly
def show(node_id: str, registry: RegistryOpt = None) -> None:
    """Show one node: place, sensors, calibrations, config, credential reference (never the secret).

    Example: twinedge node show buoy-07
    """
    n = get_node(root_of(registry), node_id)
    store = secret_store()
    t = Table(show_header=False)
    for k, v in (
        ("id", n.id), ("city / domain", f"{n.city} / {n.domain}"), ("site", n.site),
        ("position", f"{n.lat}, {n.lon}" if n.lat is not None else "-"), ("firmware", n.firmware or "-"),
        ("config", f"v{n.config.version}: every {n.config.interval_s} s, batch {n.config.batch}, sleep {n.config.sleep_s} s"),
        ("credential", f"{n.credential_ref} ({'present' if n.credential_ref and store.exists(n.credential_ref) else 'MISSING'})"),
        ("wifi", f"{n.wifi_ref} ({'present' if n.wifi_ref and store.exists(n.wifi_ref) else 'MISSING'})"),
        ("state", "retired" if n.retired else "active"),
    ):
        t.add_row(k, v)
    for s in n.sensors:
        c = n.calibration.get(s.kind)
        t.add_row(f"sensor {s.kind}", f"{s.model} serial {s.serial or '-'} {s.bus}".strip()
                  + (f"; calibrated {c.date} ({c.method}, cfg v{c.cfg_version})" if c else "; not calibrated"))
    out().print(t)


def _set_path(data: dict[str, Any], dotted: str, value: str) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
        if not isinstance(cur, dict):
            raise UsageError(f"--set {dotted}: {k} is not a section")
    v: Any = value
    if value.lower() in ("true", "false"):
        v = value.lower() == "true"
    else:
        for conv in (int, float):
            try:
                v = conv(value)
                break
            except ValueError:
                pass
    cur[keys[-1]] = v


@node_app.command("edit")
@friendly
def edit(
    node_id: str,
    set_: Annotated[list[str] | None, typer.Option("--set", help="field=value, dotted for nested, e.g. config.interval_s=30")] = None,
    add_sensor: Annotated[list[str] | None, typer.Option(help="add a sensor, kind[:serial[:model[:bus]]]")] = None,
    remove_sensor: Annotated[list[str] | None, typer.Option(help="remove the sensor of this kind")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Change a node's record; config changes bump the config version.

    Examples:
      twinedge node edit buoy-07 --set site="Nordhavn pier 3" --set lat=55.71
      twinedge node edit buoy-07 --set config.interval_s=30
      twinedge node edit buoy-07 --remove-sensor ph --add-sensor ph:PH-9999
    """
    root = root_of(registry)
    n = get_node(root, node_id)
    data = n.model_dump(mode="json")
    for item in set_ or []:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: write field=value, e.g. --set site=Nordhavn")
        key, value = item.split("=", 1)
        if key in ("id", "credential_ref"):
            raise UsageError(f"--set {key}: cannot be changed; retire the node and add a new one instead")
        _set_path(data, key, value)
    kinds = set(remove_sensor or [])
    missing = kinds - {s["kind"] for s in data["sensors"]}
    if missing:
        raise UsageError(f"--remove-sensor {', '.join(sorted(missing))}: the node has no such sensor; see `twinedge node show {node_id}`")
    data["sensors"] = [s for s in data["sensors"] if s["kind"] not in kinds] + [parse_sensor(s).model_dump(mode="json") for s in add_sensor or []]
    try:
        new = Node.model_validate(data)
    except ValidationError as e:
        raise UsageError(describe_validation_error(e, f"node {node_id}")) from None
    if new.config != n.config and new.config.version == n.config.version:
        new = new.model_copy(update={"config": new.config.model_copy(update={"version": n.config.version + 1})})
    save_node(root, new)
    out().print(f"updated {node_id}" + (f"; config now v{new.config.version}: run `twinedge node install {node_id}` or publish it" if new.config != n.config else ""))


@node_app.command("retire")
@friendly
def retire(node_id: str, registry: RegistryOpt = None) -> None:
    """Retire a node: it keeps its history but loses broker access at the next `broker render`.

    Example: twinedge node retire buoy-07 && twinedge broker render --city copenhagen --out /etc/mosquitto/twinedge
    """
    root = root_of(registry)
    n = get_node(root, node_id)
    if n.retired:
        out().print(f"{node_id} was already retired")
        return
    save_node(root, n.model_copy(update={"retired": True}))
    out().print(f"retired {node_id}; run `twinedge broker render --city {n.city}` and reload Mosquitto to revoke its access")


@node_app.command("wifi")
@friendly
def wifi(
    name: Annotated[str, typer.Argument(help="usually the city; nodes use wifi/<city> unless their wifi_ref says otherwise")],
    ssid: Annotated[str, typer.Option(help="network name")],
    key: Annotated[str, typer.Option(prompt=True, hide_input=True, help="Wi-Fi key (asked for, hidden, when not given)")],
) -> None:
    """Store a Wi-Fi network in the secret store (the key is never shown again).

    Example: twinedge node wifi copenhagen --ssid harbour-iot
    """
    ref = f"wifi/{name}"
    secret_store().put(ref, {"ssid": ssid, "psk": key})
    out().print(f"stored {ref} (ssid {ssid})")


# -- flash / install / verify -------------------------------------------------------------------


@contextmanager
def stage_progress(console: Console) -> Iterator[Callable[[str, str, float], None]]:
    """One progress display; the callback is (task name, detail, percent)."""
    with Progress(
        TextColumn("{task.description:<12}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console, transient=False,
    ) as p:
        tasks: dict[str, TaskID] = {}

        def update(name: str, detail: str, pct: float) -> None:
            if name not in tasks:
                tasks[name] = p.add_task(name, total=100.0, detail="")
            p.update(tasks[name], completed=pct, detail=detail)

        yield update


def do_flash(port: str, firmware: Path, chip: str, erase: bool, baud: int, connect_attempts: int,
             update: Callable[[str, str, float], None]) -> fl.FlashResult:
    return fl.flash(port, firmware, chip=chip, baud=baud, erase=erase, connect_attempts=connect_attempts,
                    progress=lambda stage, pct: update("flash", stage, pct))


@node_app.command("flash")
@friendly
def flash_cmd(
    port: Annotated[str, typer.Option(help="serial port, e.g. /dev/ttyUSB0 (Linux), /dev/cu.usbserial-0001 (macOS)")],
    firmware: Annotated[Path, typer.Option(help="MicroPython .bin for the board (micropython.org/download/ESP32_GENERIC)")],
    chip: Annotated[str, typer.Option(help="esp32, esp32s3, esp32c3, ...")] = "esp32",
    erase: Annotated[bool, typer.Option(help="erase the whole flash first (wipes files and config)")] = False,
    baud: Annotated[int, typer.Option(help="lower it (115200) on long or poor cables")] = 460800,
    connect_attempts: Annotated[int, typer.Option(help="esptool connection attempts")] = 7,
) -> None:
    """Write MicroPython onto a bare ESP32 with esptool, and verify it.

    Example: twinedge node flash --port /dev/ttyUSB0 --firmware ESP32_GENERIC-v1.29.bin --erase
    """
    console = out()
    with stage_progress(console) as update:
        r = do_flash(port, firmware, chip, erase, baud, connect_attempts, update)
    console.print(f"flashed {firmware.name} to {r.chip} {r.mac} in {r.seconds:.1f} s, verified")


def deployment(node: Node, store: SecretStore, root: Path, firmware_dir: Path, broker: str | None,
               ca: Path | None) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Files and secret files to put on the node."""
    city = load_city(root, node.city)
    host, port = parse_hostport(broker) if broker else (city.broker_host, city.broker_port)
    user, password = mqtt_login(store, node.id) if node.credential_ref else (None, None)
    if user is None or password is None:
        raise UsageError(f"node {node.id} has no credential_ref: run `twinedge node add` again or set it with `twinedge node edit`")
    wifi_ref = node.wifi_ref or f"wifi/{node.city}"
    w = store.get(wifi_ref)
    files = device.build(device.manifest(firmware_dir), device.default_cache())
    tls = city.tls or ca is not None
    if tls:
        ca_path = ca or Path(os.environ.get("TWINEDGE_CA", ""))
        if not ca_path or not Path(ca_path).is_file():
            raise UsageError("the city broker uses TLS but no CA file was given: pass --ca ca.crt (from `twinedge broker ca`)")
        files["ca.crt"] = Path(ca_path).read_bytes()
    doc = device.node_config(node.id, node.city, node.domain, host, port, user, password,
                             w["ssid"].reveal() if "ssid" in w else "", w["psk"].reveal() if "psk" in w else "", tls)
    secret_files = {device.CONFIG_FILE: device.dumps(doc), device.CFG_FILE: device.dumps(cal.cfg_document(node))}
    return files, secret_files


def do_install(node: Node, port: str, store: SecretStore, root: Path, firmware_dir: Path, broker: str | None,
               ca: Path | None, reset: bool, update: Callable[[str, str, float], None]) -> device.InstallResult:
    files, secrets_ = deployment(node, store, root, firmware_dir, broker, ca)
    update("install", "build", 5.0)
    r = device.install(port, files, secrets_, progress=lambda stage, pct: update("install", stage, 5 + 0.95 * pct), reset=reset)
    return r


FirmwareDirOpt = Annotated[Path, typer.Option(help="the TwinEdge firmware folder (main.py + lib/)")]
BrokerOpt = Annotated[str | None, typer.Option(help="broker host:port (default: from registry/cities/<city>.toml)")]
CaOpt = Annotated[Path | None, typer.Option(help="city CA certificate for TLS (from `twinedge broker ca`)")]


@node_app.command("install")
@friendly
def install_cmd(
    node_id: str,
    port: Annotated[str, typer.Option(help="serial port of the node, e.g. /dev/ttyUSB0")],
    firmware_dir: FirmwareDirOpt = FIRMWARE_DIR,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    reset: Annotated[bool, typer.Option(help="soft-reset the node afterwards so it starts the new files")] = True,
    registry: RegistryOpt = None,
) -> None:
    """Install the TwinEdge firmware files and the node's config; copies only what changed.

    Compiles lib/ with mpy-cross, compares sha256 with the files on the board, copies the changed
    ones with mpremote, writes node.json (Wi-Fi and MQTT secrets, never printed) and cfg.json,
    reads every hash back, then resets the node.

    Example: twinedge node install buoy-07 --port /dev/ttyUSB0
    """
    root = root_of(registry)
    node = get_node(root, node_id)
    if node.retired:
        raise UsageError(f"{node_id} is retired: un-retire it with `twinedge node edit {node_id} --set retired=false` first")
    console = out()
    with stage_progress(console) as update:
        r = do_install(node, port, secret_store(), root, firmware_dir, broker, ca, reset, update)
    console.print(f"installed on {node_id}: {len(r.sent)} file(s) sent, {len(r.unchanged)} unchanged, checked, "
                  f"{'reset' if reset else 'not reset'} ({r.seconds:.1f} s)")


def print_report(console: Console, rep: VerifyReport) -> None:
    t = Table(show_header=False, title=f"node {rep.node}")
    for k, v in rep.summary_rows():
        t.add_row(k, v)
    for s in rep.sensors:
        colour = "green" if s.state == "OK" else "red"
        t.add_row(f"sensor {s.kind} {s.serial}".strip(), f"[{colour}]{escape(s.state)}[/]")
    console.print(t)


def do_verify(node: Node, store: SecretStore, root: Path, broker: str | None, ca: Path | None, timeout: float,
              readings: int, influx: str | None, influx_db: str | None, since: float | None,
              update: Callable[[str, str, float], None]) -> VerifyReport:
    city = load_city(root, node.city)
    host, port = parse_hostport(broker) if broker else (city.broker_host, city.broker_port)
    user, password = mqtt_login(store, f"ops-{node.city}")
    url = influx or city.influx_url or None
    db = influx_db or city.influx_db or f"twin_{node.city}"
    return verify(node, host, port, user, password, ca=str(ca) if ca else None, timeout=timeout, min_readings=readings,
                  since=since, influx=(url, db) if url else None, progress=lambda st, pct: update("verify", st, pct))


@node_app.command("verify")
@friendly
def verify_cmd(
    node_id: str,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for status and readings")] = 180.0,
    readings: Annotated[int, typer.Option(help="valid readings to wait for")] = 1,
    influx: Annotated[str | None, typer.Option(help="InfluxDB URL to check too, e.g. http://gateway:8086")] = None,
    influx_db: Annotated[str | None, typer.Option(help="InfluxDB database (default twin_<city>)")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Wait for the node's status and first readings at the broker (and InfluxDB) and report.

    Prints firmware and config version, RSSI, battery and each sensor OK or faulty; exits 1 when
    something is wrong, with what to check.

    Example: twinedge node verify buoy-07 --broker 10.0.0.5:1883 --influx http://10.0.0.5:8086
    """
    root = root_of(registry)
    node = get_node(root, node_id)
    console = out()
    with stage_progress(console) as update:
        rep = do_verify(node, secret_store(), root, broker, ca, timeout, readings, influx, influx_db, None, update)
    print_report(console, rep)
    verdict(console, rep.problems, f"{node_id} verified")


def verdict(console: Console, problems: list[str], ok_text: str) -> None:
    if problems:
        for p in problems:
            console.print(f"[red]✗[/] {escape(p)}")
        raise fail(f"{len(problems)} problem(s); fix the first one and run the command again", 1)
    console.print(f"[bold green]✓ {ok_text}[/]")


@node_app.command("setup")
@friendly
def setup(
    node_id: str,
    port: Annotated[str, typer.Option(help="serial port of the node, e.g. /dev/ttyUSB0")],
    firmware: Annotated[Path | None, typer.Option(help="MicroPython .bin to flash first")] = None,
    flash: Annotated[bool, typer.Option("--flash/--no-flash", help="flash MicroPython first (needs --firmware)")] = True,
    chip: Annotated[str, typer.Option(help="esp32, esp32s3, ...")] = "esp32",
    firmware_dir: FirmwareDirOpt = FIRMWARE_DIR,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the node to report")] = 180.0,
    influx: Annotated[str | None, typer.Option(help="InfluxDB URL to check too")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Bare ESP32 to verified node in one go: registry check, credentials, flash, install, verify.

    Examples:
      twinedge node setup buoy-07 --port /dev/ttyUSB0 --firmware ESP32_GENERIC-v1.29.bin
      twinedge node setup buoy-07 --port /dev/ttyUSB0 --no-flash      (MicroPython already on it)
    """
    t0 = time.monotonic()
    root = root_of(registry)
    store = secret_store()
    console = out()
    if flash and firmware is None:
        raise UsageError("--firmware is missing: pass the MicroPython .bin, or --no-flash if the board already runs MicroPython")
    timings: dict[str, float] = {}
    with stage_progress(console) as update:
        t = time.monotonic()
        node = get_node(root, node_id)
        if node.retired:
            raise UsageError(f"{node_id} is retired: un-retire it with `twinedge node edit {node_id} --set retired=false` first")
        update("register", node.site, 100.0)
        ref = store.ensure_mqtt(node.id)
        if node.credential_ref != ref:
            node = node.model_copy(update={"credential_ref": ref})
            save_node(root, node)
        store.get(node.wifi_ref or f"wifi/{node.city}")  # fail before flashing when Wi-Fi is unknown
        store.get(f"mqtt/ops-{node.city}")
        update("credentials", ref, 100.0)
        timings["register+credentials"] = time.monotonic() - t
        if flash and firmware is not None:
            t = time.monotonic()
            do_flash(port, firmware, chip, False, 460800, 7, update)
            timings["flash"] = time.monotonic() - t
        t = time.monotonic()
        since = time.time()
        r = do_install(node, port, store, root, firmware_dir, broker, ca, True, update)
        timings["install"] = time.monotonic() - t
        t = time.monotonic()
        rep = do_verify(node, store, root, broker, ca, timeout, 1, influx, None, since, update)
        timings["verify"] = time.monotonic() - t
    if rep.status and rep.status.get("fw"):
        save_node(root, get_node(root, node_id).model_copy(update={"firmware": str(rep.status["fw"])}))
    print_report(console, rep)
    total = time.monotonic() - t0
    console.print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + f"; total {total:.1f} s"
                  + f"; {len(r.sent)} file(s) sent")
    verdict(console, rep.problems, f"{node_id} is set up and reporting")


@node_app.command("calibrate")
@friendly
def calibrate_cmd(
    node_id: str,
    sensor: Annotated[str, typer.Option(help="sensor kind: ph, do, ec, temp, turbidity")],
    port: Annotated[str, typer.Option(help="serial port of the node")],
    points: Annotated[str | None, typer.Option(help="reference values, e.g. 7,4,10 (3-point) or 7,4 (2-point)")] = None,
    broker: Annotated[str | None, typer.Option(help="also publish the new config to the node's retained cfg topic, host:port")] = None,
    ca: CaOpt = None,
    samples: Annotated[int, typer.Option(help="consecutive readings that must agree")] = 3,
    tolerance: Annotated[float, typer.Option(help="allowed relative spread of those readings")] = 0.02,
    settle: Annotated[float, typer.Option(help="max seconds to wait for a stable reading per point")] = 60.0,
    yes: Annotated[bool, typer.Option("--yes", help="do not wait for Enter between buffers (scripted use)")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Two- or three-point calibration at the node, recorded in the registry and pushed as config.

    Reads the node's raw value in each buffer until it is stable, records the points with
    today's date in the registry, writes the new config version to the node and, with
    --broker, publishes it to the node's retained cfg topic.

    Example (pH, buffers 7, 4, 10):
      twinedge node calibrate buoy-07 --sensor ph --port /dev/ttyUSB0 --broker 10.0.0.5:1883
    """
    root = root_of(registry)
    node = get_node(root, node_id)
    cal.cal_field(sensor)  # refuses kinds that take no reference points
    if sensor not in {s.kind for s in node.sensors}:
        raise UsageError(f"{node_id} has no {sensor} sensor; add it with `twinedge node edit {node_id} --add-sensor {sensor}:SERIAL`")
    refs = cal.parse_points(points, sensor)
    console = out()
    stab = cal.Stability(samples, tolerance, settle)
    got: list[tuple[float, float]] = []
    with device.board(port, clean=True) as b:
        read = cal.device_reader(b, sensor)
        for ref in refs:
            console.print(f"Rinse the probe and put it in the {ref:g} buffer.")
            if not yes:
                typer.prompt("Press Enter when it is in the buffer", default="", show_default=False)
            raw = cal.read_stable(read, stab, on_sample=lambda v: console.print(f"  raw {v:.4g}"))
            console.print(f"  point {ref:g} -> raw {raw:.4g} (stable)")
            got.append((ref, raw))
        cal.check_points(got, sensor)
        new, doc = cal.record(node, sensor, got, by=os.environ.get("USER", ""))
        b.write(device.CFG_FILE, device.dumps(doc))
        b.soft_reset()
    save_node(root, new)
    msg = f"calibrated {sensor} on {node_id} ({len(got)}-point, {dt.date.today()}); config v{new.config.version} written to the node"
    if broker:
        host, bport = parse_hostport(broker)
        user, password = mqtt_login(secret_store(), f"ops-{node.city}")
        publish_cfg(new, doc, host, bport, user, password, str(ca) if ca else None)
        msg += " and published as retained cfg"
    console.print(f"[bold green]✓ {msg}[/]")


def publish_cfg(node: Node, doc: dict[str, object], host: str, port: int, user: str, password: str, ca: str | None) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from gateway.topics import topic_for

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"cal-{node.id}-{int(time.time())}")
    c.username_pw_set(user, password)
    if ca:
        c.tls_set(ca_certs=ca)
    try:
        c.connect(host, port, keepalive=30)
    except OSError as e:
        raise ProvisioningError(f"calibration saved, but the broker at {host}:{port} is unreachable ({e}): publish later with the same command") from None
    c.loop_start()
    try:
        info = c.publish(topic_for(node.city, node.domain, node.id, "cfg"), device.dumps(doc), qos=1, retain=True)
        info.wait_for_publish(timeout=10)
        if not info.is_published():
            raise ProvisioningError("calibration saved, but the broker did not acknowledge the config: check `twinedge broker render` ran")
    finally:
        c.disconnect()
        c.loop_stop()


# -- broker commands ----------------------------------------------------------------------------


@broker_app.command("render")
@friendly
def render_cmd(
    city: Annotated[str, typer.Option(help="the city whose broker this is")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for passwd and acl (point mosquitto.conf at them)")],
    partner: Annotated[str | None, typer.Option(help="partner city (saved in registry/cities/<city>.toml)")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Write Mosquitto's password file (mosquitto_passwd $7$ format) and ACL file from the registry.

    Creates missing passwords for nodes and for gateway-<city>, ops-<city> and partner-<partner>.
    Re-run after add/retire, then reload Mosquitto (`systemctl reload mosquitto`).

    Example: twinedge broker render --city copenhagen --partner tongyeong --out /etc/mosquitto/twinedge
      mosquitto.conf:  password_file /etc/mosquitto/twinedge/passwd
                       acl_file /etc/mosquitto/twinedge/acl
    """
    root = root_of(registry)
    c = load_city(root, city)
    if partner is not None and partner != c.partner:
        try:
            c = City.model_validate({**c.model_dump(), "partner": partner})
        except ValidationError as e:
            raise UsageError(describe_validation_error(e, "--partner")) from None
        save_city(root, c)
    nodes = list(load_registry(root).values())
    passwd, acl, accounts = brk.render(c, nodes, secret_store(), out_dir)
    n_nodes = sum(1 for a in accounts if not a.username.startswith(("gateway-", "ops-", "partner-")))
    out().print(f"wrote {passwd} and {acl}: {len(accounts)} accounts ({n_nodes} nodes); reload Mosquitto to apply")


@broker_app.command("ca")
@friendly
def ca_cmd(
    city: Annotated[str, typer.Option(help="city the CA belongs to")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for ca.crt, ca.key, server.crt, server.key")],
    host: Annotated[list[str] | None, typer.Option(help="broker name or IP nodes connect to (repeat)")] = None,
    days: Annotated[int, typer.Option(help="server certificate validity, days")] = 825,
) -> None:
    """Create the city CA (kept if it exists) and a new broker server certificate (cryptography, EC P-256).

    Keep ca.key offline. Nodes get ca.crt at install (--ca).

    Example: twinedge broker ca --city copenhagen --out ./pki --host broker.cph.example --host 10.0.0.5
    """
    files = brk.make_ca(city, out_dir, hosts=host or ["localhost", "127.0.0.1"], server_days=days)
    out().print(f"CA {files.ca_cert} (key {files.ca_key}, mode 600); server certificate {files.server_cert}")
    out().print("mosquitto.conf: " + "; ".join(brk.mosquitto_tls_listener(files, 8883, "0.0.0.0")))
