"""The flash path in CI: esptool against esp32-mock-bootloader on a loopback TCP port
(chip id, write with hash verify, verify-flash). Read-flash fails at 100 % on the mock
(FIELD-NOTES), so it is not used."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

from twinedge.services import free_port, wait_port


def esp32_image(path: Path, size: int = 64 * 1024) -> Path:
    """A stand-in ESP32 app image: valid header (magic 0xE9, chip id 0 = ESP32), patterned body."""
    head = bytearray(24)
    head[0] = 0xE9
    head[1] = 1  # segments
    struct.pack_into("<H", head, 12, 0)  # extended header chip id: ESP32
    body = bytes((i * 7 + 3) & 0xFF for i in range(size - len(head)))
    path.write_bytes(bytes(head) + body)
    return path


class MockBootloader:
    """esp32-mock-bootloader in the foreground on a free port, ended by its own pid."""

    def __init__(self, chip: str = "esp32") -> None:
        self.chip = chip
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def __enter__(self) -> "MockBootloader":
        exe = Path(sys.executable).parent / "esp32-mock-bootloader"
        self.proc = subprocess.Popen([str(exe), "run", "--chip", self.chip, "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port, 30, self.proc, "esp32-mock-bootloader")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def esptool(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "esptool", "--port", url, *args], capture_output=True,
                          text=True, timeout=timeout)
