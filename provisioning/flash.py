"""Flash a MicroPython image onto an ESP32 with the real `esptool`, with progress and plain errors.

esptool runs as a subprocess of the same interpreter (`python -m esptool`): its logger is
process-global, and a subprocess can be timed out and killed without leaving a port open.
Its output is parsed for progress (`NN.N%`) and, on failure, classified into one line that
says what to do.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from provisioning.errors import ProvisioningError, UsageError

ESP_IMAGE_MAGIC = 0xE9
# Extended image header chip ids (esptool bin_image: IMAGE_CHIP_ID) -> esptool --chip names.
CHIP_IDS = {0: "esp32", 2: "esp32s2", 5: "esp32c3", 9: "esp32s3", 12: "esp32c2", 13: "esp32c6", 16: "esp32h2", 18: "esp32p4"}
# Where a MicroPython combined image goes (bootloader offset), per chip.
FLASH_OFFSET = {"esp32": 0x1000, "esp32s2": 0x1000, "esp32s3": 0x0, "esp32c3": 0x0, "esp32c6": 0x0, "esp32c2": 0x0, "esp32h2": 0x0, "esp32p4": 0x2000}
PERCENT = re.compile(rb"(\d{1,3}(?:\.\d)?)\s?%")

Progress = Callable[[str, float], None]  # (stage, percent 0..100)


@dataclass(frozen=True)
class FlashResult:
    chip: str
    mac: str
    seconds: float
    verified: bool


def check_port(port: str) -> None:
    """Fail early, with a fix, for a port that is missing or not ours to open."""
    if "://" in port:  # pyserial URL (socket://, rfc2217://): esptool reports reachability
        return
    if not os.path.exists(port):
        hint = "plug the node in with a data (not charge-only) USB cable and check `ls /dev/ttyUSB* /dev/ttyACM*`"
        raise UsageError(f"serial port {port} not found: {hint}")
    try:
        fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        os.close(fd)
    except PermissionError:
        raise ProvisioningError(
            f"permission denied on {port}: add yourself to the dialout group "
            "(`sudo usermod -aG dialout $USER`), then log out and back in"
        ) from None
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise ProvisioningError(f"{port} is busy: close the other program using it (serial monitor, mpremote, IDE) and retry") from None
        raise ProvisioningError(f"cannot open {port} ({e.strerror}): unplug and replug the node, then retry") from None


def check_image(image: Path, chip: str) -> None:
    """A MicroPython ESP32 image starts with an ESP app/bootloader header naming its chip."""
    if not image.is_file():
        raise UsageError(f"firmware image {image} not found: download the ESP32 MicroPython .bin and pass its path with --firmware")
    head = image.read_bytes()[:24]
    if len(head) < 24 or head[0] != ESP_IMAGE_MAGIC:
        raise UsageError(
            f"{image} is not an ESP32 firmware image (bad header): use the .bin from micropython.org/download for your board, "
            "not a .py, .uf2, .elf or .zip"
        )
    chip_id = struct.unpack_from("<H", head, 12)[0]
    built_for = CHIP_IDS.get(chip_id)
    if built_for and built_for != chip:
        raise UsageError(f"{image} is built for {built_for.upper()}, but --chip is {chip}: use the image for {chip.upper()}")


def classify(output: str, port: str, chip: str) -> str:
    """One actionable line from esptool's output (last fatal error wins)."""
    m = re.search(r"This chip is ([\w-]+),? not ([\w-]+)", output)
    if m:
        found = m.group(1).lower().replace("-", "")
        return f"wrong chip: the board on {port} is an {m.group(1)}, not an {m.group(2)}: flash the image for {m.group(1)} with --chip {found}"
    if "Permission denied" in output:
        return (f"permission denied on {port}: add yourself to the dialout group "
                "(`sudo usermod -aG dialout $USER`), then log out and back in")
    if re.search(r"could not open port|No such file or directory|Could not open socket|Connection refused", output, re.I):
        return f"cannot open {port}: check the port name and that the node is plugged in (`ls /dev/ttyUSB* /dev/ttyACM*`)"
    if re.search(r"Failed to connect|No serial data received|Timed out waiting for packet|Invalid head of packet", output):
        return (f"no response from the node on {port}: hold BOOT, tap EN/RESET, release BOOT, then retry; "
                "if it persists, try another USB cable or port")
    if re.search(r"MD5 of file does not match|Hash of data verified.*not|Verification failed|does not match", output, re.I):
        return "flash verification failed: the written data differs; retry, and replace the cable or board if it repeats"
    m = re.search(r"(?:A fatal error occurred|Error):?\s*(.+)", output)
    detail = m.group(1).strip()[:160] if m else output.strip().splitlines()[-1][:160] if output.strip() else "no output"
    return f"esptool failed: {detail}"


def flash(
    port: str,
    image: Path,
    chip: str = "esp32",
    baud: int = 460800,
    erase: bool = False,
    progress: Progress | None = None,
    connect_attempts: int = 7,
    timeout: float = 300.0,
    offset: int | None = None,
) -> FlashResult:
    """Write `image` with esptool and verify it; raises ProvisioningError with a one-line fix."""
    if chip not in FLASH_OFFSET:
        raise UsageError(f"unknown chip {chip!r}: use one of {', '.join(FLASH_OFFSET)}")
    check_image(image, chip)
    check_port(port)
    args = [sys.executable, "-m", "esptool", "--chip", chip, "--port", port, "--baud", str(baud),
            "--connect-attempts", str(connect_attempts)]
    if erase:
        args += ["--after", "no-reset", "erase-flash"]
        _run(args, "erase", progress, timeout, port, chip)
        args = args[: -3]
    args += ["write-flash", "--flash-size", "detect", hex(FLASH_OFFSET[chip] if offset is None else offset), str(image)]
    t0 = time.monotonic()
    out = _run(args, "write", progress, timeout, port, chip)
    verified = "Hash of data verified" in out
    if not verified:
        raise ProvisioningError("flash written but esptool did not confirm the hash: run the flash again")
    mac = re.search(r"MAC:\s*([0-9a-f:]{17})", out)
    found = re.search(r"Connected to (ESP[\w-]+)", out)
    return FlashResult(found.group(1) if found else chip, mac.group(1) if mac else "", time.monotonic() - t0, verified)


def _run(args: list[str], stage: str, progress: Progress | None, timeout: float, port: str, chip: str) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    out = bytearray()
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    import select

    while True:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ProvisioningError(f"esptool took longer than {timeout:.0f} s on {port}: unplug and replug the node, then retry")
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
            if progress:
                if b"Connecting" in chunk:
                    progress("connect", 0.0)
                for m in PERCENT.finditer(chunk):
                    progress(stage, min(100.0, float(m.group(1))))
        elif proc.poll() is not None and not r:
            # drain whatever is left
            try:
                rest = os.read(fd, 65536)
            except BlockingIOError:
                rest = b""
            out += rest
            if not rest:
                break
    rc = proc.wait()
    text = out.decode(errors="replace")
    if rc != 0:
        raise ProvisioningError(classify(text, port, chip))
    return text
