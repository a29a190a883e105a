"""The README's main command (`twinedge demo`), run headless and short, checked from outside.

The demo's own summary is compared with what the nodes' flash rings say they took and with
what the cities' InfluxDB servers hold once restarted on the demo's data; no process may be
left behind; misuse ends in one line and exit code 2."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hil_tests.rig.model import parse_ring
from twinedge import services
from twinedge.cli import build_app
from twinedge.demo import DemoError, lock_workdir, start_checked, start_with_retry
from twinedge.services import Influxd, Mosquitto, ServiceError

REPO = Path(__file__).resolve().parents[2]


def _processes_using(path: Path) -> list[str]:
    """Processes whose command line or working directory is under `path` (nodes run with cwd = their flash)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(d / "cwd")
        except OSError:
            continue
        if str(path) in cmd or cwd.startswith(str(path)):
            found.append(f"{d.name} {cwd} {cmd[:120]}")
    return found


def _demo(*args: str) -> list[str]:
    return [sys.executable, "-m", "twinedge.cli", "demo", *args]


def _summary_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out[out.index("demo summary"):].splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 10 and cells[0] in ("copenhagen", "tongyeong", "oslo", "busan"):
            rows[cells[0]] = cells
    return rows


def _num(cell: str) -> int:
    return int(cell.replace(",", ""))


def test_demo_headless_every_reading_accounted(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    t0 = time.monotonic()
    r = subprocess.run(_demo("--duration", "15", "--nodes", "4", "--batch", "2", "--seed", "3", "--workdir", str(work)),
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Traceback" not in out
    print(f"\ndemo run: {took:.1f} s wall clock")
    assert _processes_using(work) == [], "processes left behind"

    # The summary: every node reported, every reading acknowledged and in InfluxDB, mirror 100 %.
    rows = _summary_rows(out)
    assert set(rows) == {"copenhagen", "tongyeong"}, out
    for city, c in rows.items():
        reported, taken, acked, landed, on_flash, dead = c[1], _num(c[2]), _num(c[3]), _num(c[4]), _num(c[5]), _num(c[6])
        assert reported == "4/4", c
        assert taken > 0 and taken == acked == landed and on_flash == 0 and dead == 0, c
        assert c[8].endswith("= 100.0 %") and c[9] == "complete", c
    assert "every node reported, every reading is in InfluxDB" in out

    # Provisioning was real: registry, rendered broker files in use, no anonymous access.
    nodes = sorted(p.stem for p in (work / "registry" / "nodes").glob("*.toml"))
    assert nodes == ["cph-buoy-01", "cph-buoy-02", "cph-count-01", "cph-count-02",
                     "tyg-buoy-01", "tyg-buoy-02", "tyg-count-01", "tyg-count-02"]
    for city in ("copenhagen", "tongyeong"):
        conf = (work / city / "mosquitto" / "mosquitto.conf").read_text()
        assert "allow_anonymous false" in conf and f"password_file {work / city / 'broker' / 'passwd'}" in conf
        assert "user gateway-" + city in (work / city / "broker" / "acl").read_text()
        node_json = (work / city / "nodes" / ("cph-buoy-01" if city == "copenhagen" else "tyg-buoy-01") / "node.json")
        assert '"pass":' in node_json.read_text()  # written by `node install`
        for f in ("marine.json", "mobility.json", "fleet.json", "twin.json"):
            assert (work / "grafana" / city / "dashboards" / f).is_file()
        assert (work / "grafana" / city / "provisioning" / "datasources" / "twinedge.yaml").is_file()
        assert str(work / "grafana" / city / "dashboards") in out

    # Independently of the demo's own accounting: what each node's flash says it took is in
    # its city's InfluxDB (restarted on the demo's data), and the partner holds the buoys' points.
    for city, other in (("copenhagen", "tongyeong"), ("tongyeong", "copenhagen")):
        with Influxd(work / city / "influxdb") as db:
            for flash in sorted((work / city / "nodes").iterdir()):
                domain = "marine" if "-buoy-" in flash.name else "mobility"
                ring = parse_ring(domain, (flash / "ring.bin").read_bytes(), (flash / "ring.meta").read_bytes())
                taken = {s.t for s in ring.samples.values()}
                assert ring.samples and max(ring.samples) + 1 == ring.lo, f"{flash.name}: readings left unsent"
                res = db.query(f"SELECT * FROM \"{domain}\" WHERE \"node\" = '{flash.name}'", db="twinedge")
                times = {row[0] for row in res["results"][0]["series"][0]["values"]}
                assert taken <= times, f"{flash.name}: {len(taken - times)} readings not in InfluxDB"
            res = db.query(f"SELECT count(ph) FROM marine WHERE origin = '{other}' GROUP BY node", db="twinedge_partner")
            mirrored = {s["tags"]["node"] for s in res["results"][0]["series"]}
            code = {"copenhagen": "cph", "tongyeong": "tyg"}[other]
            assert mirrored == {f"{code}-buoy-01", f"{code}-buoy-02"}  # blue-city-twins shares marine only
    assert _processes_using(work) == []


def test_ctrl_c_stops_everything_and_prints_the_summary(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    p = subprocess.Popen(_demo("--nodes", "2", "--batch", "2", "--cities", "oslo,busan", "--workdir", str(work)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines: list[str] = []
    try:
        assert p.stdout is not None
        deadline = time.monotonic() + 150
        for line in p.stdout:
            lines.append(line)
            if "readings/s" in line and "2/2 nodes online" in line:
                break
            assert time.monotonic() < deadline, "".join(lines)
        p.send_signal(signal.SIGINT)
        rest, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    out = "".join(lines) + rest
    assert p.returncode == 0, out
    assert "Traceback" not in out and "Ctrl-C: stopping" in out
    assert "every process the demo started has stopped" in out
    rows = _summary_rows(out)
    assert {c[9] for c in rows.values()} == {"complete"}, out
    # A pair that is not one of the programme's: a generated policy, shared both ways.
    assert 'policy = "demo-busan-oslo"' in (work / "policy.toml").read_text()
    assert all(c[8].endswith("= 100.0 %") for c in rows.values()), out
    assert _processes_using(work) == []


def test_bad_city_pair_and_bad_name() -> None:
    r = subprocess.run(_demo("--cities", "copenhagen"), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and "needs two different names" in r.stdout
    r = subprocess.run(_demo("--cities", "Copen Hagen,tongyeong"), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and "is not a city name" in r.stdout and "Traceback" not in r.stdout + r.stderr


def test_second_demo_on_the_same_workdir_is_refused(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    fd = lock_workdir(work)  # a demo running in it
    try:
        r = subprocess.run(_demo("--workdir", str(work)), capture_output=True, text=True, timeout=60, cwd=REPO)
        assert r.returncode == 2 and f"another demo is running in {work} (pid {os.getpid()})" in r.stdout, r.stdout
    finally:
        os.close(fd)
    (work / "registry").mkdir()
    r = subprocess.run(_demo("--workdir", str(work)), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and "holds the data of an earlier demo" in r.stdout, r.stdout


def test_missing_service_binary_names_the_apt_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = services.find_binary

    def find(name: str) -> str:
        if name == "influxd":
            raise ServiceError(f"{name} not found: install it with `{services.APT_HINT[name]}`")
        return real(name)

    monkeypatch.setattr(services, "find_binary", find)
    r = CliRunner().invoke(build_app(), ["demo", "--workdir", str(tmp_path / "w")])
    assert r.exit_code == 2
    assert "influxd not found: install it with `sudo apt-get install -y influxdb`" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "w").exists()


def test_a_taken_port_costs_a_retry_not_the_demo(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        tries: list[int] = []

        def make(attempt: int) -> Mosquitto:
            tries.append(attempt)
            return Mosquitto(tmp_path / f"m{attempt}", port=taken if attempt == 0 else 0)

        m = start_with_retry(make, start_checked, "mosquitto")
        try:
            assert tries == [0, 1] and m.port != taken
        finally:
            m.stop()
        with pytest.raises(DemoError, match=r"mosquitto did not start after 2 tries on different ports"):
            start_with_retry(lambda a: Mosquitto(tmp_path / f"x{a}", port=taken), start_checked, "mosquitto",
                             attempts=2)


def test_ctrl_c_while_starting_leaves_nothing_running(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    # Started with SIGINT ignored, as `cmd &` in a script does: the demo still stops on it.
    p = subprocess.Popen(_demo("--nodes", "2", "--workdir", str(work)), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=REPO,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines: list[str] = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line)
            if "installed firmware on 4 emulated boards" in line:
                break
        p.send_signal(signal.SIGINT)
        rest, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    out = "".join(lines) + rest
    assert p.returncode == 130, out
    assert "interrupted while starting; stopping everything the demo started" in out and "Traceback" not in out
    assert _processes_using(work) == []
