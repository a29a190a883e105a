"""The emulated board on a pty, driven by the real `mpremote` command line."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from hil_tests.pty_board import start

MPREMOTE = [sys.executable, "-m", "mpremote"]


def mp(port: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MPREMOTE, "connect", port, *args], capture_output=True, text=True, timeout=60)


def test_mpremote_exec_fs_and_soft_reset(tmp_path: Path) -> None:
    flash = tmp_path / "flash"
    flash.mkdir()
    src = tmp_path / "hello.py"
    src.write_text("X = 'hello from flash'\n")
    with start(flash) as board:
        assert mp(board.port, "exec", "print(6*7)").stdout.strip() == "42"
        assert mp(board.port, "fs", "cp", str(src), ":hello.py").returncode == 0
        assert (flash / "hello.py").read_text() == src.read_text()
        assert "hello.py" in mp(board.port, "fs", "ls").stdout
        assert mp(board.port, "fs", "cat", ":hello.py").stdout.strip() == "X = 'hello from flash'"
        digest = mp(board.port, "fs", "sha256sum", ":hello.py").stdout.split()[-1]
        assert digest == hashlib.sha256(src.read_bytes()).hexdigest()
        assert mp(board.port, "exec", "import hello; print(hello.X)").stdout.strip() == "hello from flash"
        # State survives within one session and is gone after a soft reset (a fresh interpreter).
        r = mp(board.port, "exec", "y = 5", "exec", "print(y)", "soft-reset", "exec", "print('y' in globals())")
        assert r.stdout.split() == ["5", "False"], r.stdout + r.stderr
        boots = board.boots
        assert mp(board.port, "soft-reset").returncode == 0
        assert board.boots > boots


def test_main_py_runs_at_boot_and_ctrl_c_interrupts_it(tmp_path: Path) -> None:
    flash = tmp_path / "flash"
    flash.mkdir()
    (flash / "main.py").write_text("import time\nopen('booted', 'w').write('1')\nwhile True:\n    time.sleep(0.05)\n")
    with start(flash) as board:
        # mpremote interrupts the running main.py with Ctrl-C, then runs its command.
        r = mp(board.port, "exec", "import os; print('booted' in os.listdir())")
        assert r.stdout.strip() == "True", r.stderr


@pytest.mark.parametrize("heapsize", ["96K"])
def test_heapsize_is_applied(tmp_path: Path, heapsize: str) -> None:
    with start(tmp_path, heapsize=heapsize) as board:
        free = int(mp(board.port, "exec", "import gc; gc.collect(); print(gc.mem_free())").stdout)
        assert free < 96 * 1024
