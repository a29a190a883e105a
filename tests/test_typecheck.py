"""The gateway and the command line are typed: pyright reports no error on them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyright_clean_on_gateway_and_cli() -> None:
    pyright = Path(sys.executable).with_name("pyright")
    r = subprocess.run([str(pyright), "--pythonpath", sys.executable, "gateway", "twinedge"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "0 errors" in r.stdout
