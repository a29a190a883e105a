"""Time `twinedge node setup` on the emulated board, against a naive per-file mpremote baseline.

Run: .venv/bin/python bench/provisioning_setup.py [--runs 3]
Prints: setup on a fresh board (everything copied), setup again (nothing changed), and the
baseline measured in the same run: one `mpremote fs cp` process per firmware file (what a
technician scripting mpremote by hand would do), without verification.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hil_tests.pty_board import start as start_board  # noqa: E402
from provisioning import device  # noqa: E402
from provisioning.registry import City, Node, NodeConfig, Sensor, save_city, save_node  # noqa: E402
from provisioning.secrets import SecretStore  # noqa: E402
from tests.provisioning.e2e import SHIMS, rig  # noqa: E402


def world(work: Path) -> tuple[Path, SecretStore]:
    root = work / "reg"
    store = SecretStore(work / "sec")
    save_city(root, City(name="copenhagen"))
    save_node(root, Node(id="buoy-a", city="copenhagen", domain="marine", site="bench",
                         sensors=[Sensor(kind="ph"), Sensor(kind="temp"), Sensor(kind="battery")],
                         config=NodeConfig(interval_s=1, batch=1), credential_ref=store.ensure_mqtt("buoy-a")))
    store.put("wifi/copenhagen", {"ssid": "sim", "psk": "bench"})
    return root, store


def one_run(work: Path) -> tuple[float, float, float]:
    root, store = world(work)
    with rig(root, store, work) as r:
        args = ["node", "setup", "buoy-a", "--port", r.board.port, "--no-flash", "--broker", f"127.0.0.1:{r.broker.port}", "--timeout", "60"]
        t = time.monotonic()
        p = r.twinedge(*args)
        cold = time.monotonic() - t
        assert p.returncode == 0, p.stdout + p.stderr
        install = float(re.search(r"install (\d+\.\d) s", p.stdout).group(1))  # type: ignore[union-attr]
        t = time.monotonic()
        p = r.twinedge(*args)
        warm = time.monotonic() - t
        assert p.returncode == 0 and "0 file(s) sent" in p.stdout, p.stdout + p.stderr
    return cold, warm, install


def baseline(work: Path) -> float:
    files = device.build(device.manifest(REPO / "firmware"), work / "cache")
    stage = work / "stage"
    for dest, data in files.items():
        (stage / dest).parent.mkdir(parents=True, exist_ok=True)
        (stage / dest).write_bytes(data)
    flash = work / "flash-baseline"
    flash.mkdir()
    mp = [sys.executable, "-m", "mpremote"]
    with start_board(flash, micropath=str(SHIMS), run_main=False) as b:
        t = time.monotonic()
        subprocess.run([*mp, "connect", b.port, "fs", "mkdir", ":lib"], check=True, capture_output=True)
        for dest in sorted(files):
            subprocess.run([*mp, "connect", b.port, "fs", "cp", str(stage / dest), ":" + dest], check=True, capture_output=True)
        return time.monotonic() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    colds, warms, bases, installs = [], [], [], []
    for _ in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="bench-setup-"))
        try:
            c, w, i = one_run(work)
            installs.append(i)
            colds.append(c)
            warms.append(w)
            bases.append(baseline(work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    n = len(device.manifest(REPO / "firmware"))
    print(f"node setup, fresh emulated board (copy {n} files + config, verify): median {med(colds):.2f} s  runs {[round(x, 2) for x in colds]}")
    print(f"node setup again, nothing changed (hash compare, verify):          median {med(warms):.2f} s  runs {[round(x, 2) for x in warms]}")
    print(f"  of which the install step (copy, config, read-back check, reset):  median {med(installs):.2f} s")
    print(f"baseline: one `mpremote fs cp` per file, no config, no verify:    median {med(bases):.2f} s  runs {[round(x, 2) for x in bases]}")


if __name__ == "__main__":
    main()
