"""The README's main command, headless and short: every reading lands, nothing is left running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _processes_using(path: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line and "pytest" not in line]


def test_demo_runs_headless_and_cleans_up(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "twinedge.cli", "demo", "--duration", "8", "--nodes", "3",
                        "--interval", "1", "--batch", "2", "--workdir", str(work)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    summary = r.stdout[r.stdout.index("demo summary"):]
    assert summary.count("complete") == 2, summary
    assert _processes_using(work) == []
    assert (work / "copenhagen" / "influxdb").is_dir() and (work / "tongyeong" / "gw-tongyeong-gw1").is_dir()


def test_demo_refuses_a_bad_city_pair(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "twinedge.cli", "demo", "--cities", "copenhagen"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs two different names" in r.stdout
