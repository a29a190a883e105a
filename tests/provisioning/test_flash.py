"""`twinedge node flash` with the real esptool against esp32-mock-bootloader, and its error paths."""

from __future__ import annotations

import os
import pty
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from esptool.bin_image import ESP32FirmwareImage, ESP32S3FirmwareImage, ImageSegment

from twinedge.services import free_port

REPO = Path(__file__).resolve().parents[2]


def make_image(path: Path, cls: type = ESP32FirmwareImage) -> Path:
    """A small but well-formed ESP app image (what esptool's elf2image would write)."""
    img = cls()
    img.entrypoint = 0x40080000
    segs = []
    for addr, data, name in ((0x3FFB0000, os.urandom(2048), ".dram0.data"), (0x40080000, os.urandom(30000), ".iram0.text")):
        s = ImageSegment(addr, data)
        s.name = name  # type: ignore[attr-defined]  # save() reads it; the class does not declare it
        segs.append(s)
    img.segments = segs
    img.append_digest = True
    img.save(str(path))
    return path


def cli(*args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "twinedge.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "COLUMNS": "120"})


def mock_bootloader(chip: str) -> Iterator[str]:
    port = free_port()
    exe = Path(sys.executable).parent / "esp32-mock-bootloader"
    # Run in the foreground as our own child (not `start`/`stop`, which manage shared daemons).
    proc = subprocess.Popen([str(exe), "run", "--chip", chip, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "mock bootloader did not start"
            time.sleep(0.05)  # poll interval while waiting for the listener
    try:
        yield f"socket://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def esp32() -> Iterator[str]:
    yield from mock_bootloader("esp32")


@pytest.fixture
def esp32s3() -> Iterator[str]:
    yield from mock_bootloader("esp32s3")


def test_flash_writes_and_verifies(esp32: str, tmp_path: Path) -> None:
    img = make_image(tmp_path / "micropython.bin")
    p = cli("node", "flash", "--port", esp32, "--firmware", str(img), "--erase")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "flashed micropython.bin to ESP32" in p.stdout and "verified" in p.stdout
    assert "flash" in p.stdout and "100.0%" in p.stdout  # the progress display got to the end


def test_wrong_chip(esp32s3: str, tmp_path: Path) -> None:
    p = cli("node", "flash", "--port", esp32s3, "--firmware", str(make_image(tmp_path / "fw.bin")), "--connect-attempts", "2")
    assert p.returncode == 1
    assert "wrong chip: the board on socket://" in p.stderr and "is an ESP32-S3, not an ESP32" in p.stderr
    assert "--chip esp32s3" in p.stderr and "Traceback" not in p.stderr


def test_bad_images(tmp_path: Path) -> None:
    junk = tmp_path / "main.py"
    junk.write_text("print('not firmware')\n")
    p = cli("node", "flash", "--port", "socket://127.0.0.1:1", "--firmware", str(junk))
    assert p.returncode == 2 and "is not an ESP32 firmware image (bad header)" in p.stderr
    s3 = make_image(tmp_path / "s3.bin", ESP32S3FirmwareImage)
    p = cli("node", "flash", "--port", "socket://127.0.0.1:1", "--firmware", str(s3))
    assert p.returncode == 2 and "is built for ESP32S3, but --chip is esp32" in p.stderr
    p = cli("node", "flash", "--port", "socket://127.0.0.1:1", "--firmware", str(tmp_path / "nope.bin"))
    assert p.returncode == 2 and "firmware image" in p.stderr and "not found" in p.stderr


def test_missing_port(tmp_path: Path) -> None:
    p = cli("node", "flash", "--port", "/dev/ttyUSB-nope", "--firmware", str(make_image(tmp_path / "fw.bin")))
    assert p.returncode == 2
    assert "serial port /dev/ttyUSB-nope not found: plug the node in" in p.stderr


def test_no_response(tmp_path: Path) -> None:
    master, slave = pty.openpty()  # a serial port with nothing behind it
    try:
        p = cli("node", "flash", "--port", os.ttyname(slave), "--firmware", str(make_image(tmp_path / "fw.bin")),
                "--connect-attempts", "1")
    finally:
        os.close(master)
        os.close(slave)
    assert p.returncode == 1
    assert "no response from the node on /dev/" in p.stderr and "hold BOOT, tap EN/RESET" in p.stderr


def test_permission_denied() -> None:
    work = Path(tempfile.mkdtemp())
    try:
        work.chmod(0o755)
        img = make_image(work / "fw.bin")
        img.chmod(0o644)
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("needs setpriv to drop root")
            master, slave = pty.openpty()  # /dev/pts/N: root-owned, mode 620, not openable by nobody
            port = os.ttyname(slave)
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        else:
            master = slave = -1
            fake = work / "ttyUSB0"
            fake.write_text("")
            fake.chmod(0)
            port, prefix = str(fake), []
        try:
            p = cli("node", "flash", "--port", port, "--firmware", str(img), prefix=prefix)
        finally:
            for fd in (master, slave):
                if fd >= 0:
                    os.close(fd)
        assert p.returncode == 1, p.stderr
        assert f"permission denied on {port}: add yourself to the dialout group" in p.stderr
    finally:
        shutil.rmtree(work)


def test_setup_flashes_then_says_when_no_micropython_answers(esp32: str, reg, tmp_path: Path) -> None:
    """setup's flash stage with the real esptool; the mock bootloader has no REPL, so install stops there."""
    reg.store.ensure_mqtt("ops-copenhagen")
    img = make_image(tmp_path / "fw.bin")
    p = subprocess.run([sys.executable, "-m", "twinedge.cli", "node", "setup", "buoy-a", "--port", esp32, "--firmware", str(img)],
                       capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, **reg.env(), "COLUMNS": "120", "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert p.returncode == 1, p.stdout + p.stderr
    assert re.search(r"flash\s+━+\s+100\.0%", p.stdout), p.stdout
    assert f"no MicroPython REPL on {esp32}" in p.stderr


def test_setup_without_ops_credential_says_how_to_create_it(reg, tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "twinedge.cli", "node", "setup", "buoy-a", "--port", "/dev/null", "--no-flash"],
                       capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, **reg.env()})
    assert p.returncode == 2
    assert "secret 'mqtt/ops-copenhagen' not found" in p.stderr and "twinedge broker render --city CITY" in p.stderr
