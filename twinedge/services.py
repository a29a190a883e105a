"""Start real Mosquitto and InfluxDB servers on free loopback ports with their own dirs.

Used by the test fixtures, the local stack, the demo, the HIL rig and the benchmarks.
Every process started here is stopped by `stop()` (or the context manager).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


class ServiceError(RuntimeError):
    pass


APT_HINT = {
    "mosquitto": "sudo apt-get install -y mosquitto",
    "influxd": "sudo apt-get install -y influxdb",
    "victoria-metrics": "sudo apt-get install -y victoria-metrics",
}


def find_binary(name: str) -> str:
    for cand in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise ServiceError(f"{name} not found: install it with `{APT_HINT.get(name, 'apt-get install ' + name)}`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """True when nothing listens on the port (bound like a server, so TIME_WAIT leftovers do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{what or 'service'} exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise ServiceError(f"{what or 'service'} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@dataclass
class Mosquitto:
    """A Mosquitto broker of our own. `extra_conf` lines are appended to the config."""

    workdir: Path
    port: int = 0
    extra_conf: list[str] = field(default_factory=list)
    allow_anonymous: bool = True
    password_file: Path | None = None
    acl_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        lines = [
            "user root",  # as root it would drop to `mosquitto` and fail to write our dirs
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "autosave_interval 60",  # a graceful stop always saves; 1 s made the broker re-serialise every backlog each second
            "log_dest file " + str(self.log_path),
            "log_type error",
            "log_type warning",
            "log_type notice",
            # The gateway session must survive long outages: the default 1000 would drop silently.
            "max_queued_messages 0",
            "max_inflight_messages 1000",
            "max_packet_size 1048576",
        ]
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        lines += self.extra_conf
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        binary = find_binary("mosquitto")
        if self.port and not port_free(self.port):
            # Otherwise the readiness check would connect to whatever holds the port and call it ours.
            raise ServiceError(f"mosquitto: port {self.port} is taken by another program")
        conf = self.write_config()
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            wait_port(self.port, timeout, self.proc, "mosquitto")
        except ServiceError as e:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            self.stop()
            raise ServiceError(f"{e}: {err.strip()[:300]}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, sig)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Influxd:
    """An InfluxDB 1.x server of our own (Debian's `influxdb`, v1 HTTP API)."""

    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        bind_port = free_port()
        conf = self.workdir / "influxdb.conf"
        conf.write_text(
            f"""reporting-disabled = true
bind-address = "127.0.0.1:{bind_port}"
[meta]
  dir = "{self.workdir}/meta"
[data]
  dir = "{self.workdir}/data"
  wal-dir = "{self.workdir}/wal"
  query-log-enabled = false
  cache-max-memory-size = "512m"
[http]
  enabled = true
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
  max-body-size = 0
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
[logging]
  level = "warn"
"""
        )
        return conf

    def start(self, timeout: float = 30.0) -> "Influxd":
        binary = find_binary("influxd")
        if self.port and not port_free(self.port):
            raise ServiceError(f"influxd: port {self.port} is taken by another program")
        conf = self.write_config()
        log = open(self.workdir / "influxd.log", "ab")
        self.proc = subprocess.Popen(
            [binary, "-config", str(conf)], stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                tail = (self.workdir / "influxd.log").read_text(errors="replace")[-300:]
                raise ServiceError(f"influxd exited with code {self.proc.returncode}: {tail.strip()}")
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=0.5) as r:
                    if r.status == 204:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"influxd did not answer /ping on {self.url} within {timeout:.0f} s")
            time.sleep(0.05)

    def query(self, q: str, db: str | None = None, method: str = "GET", epoch: str = "s") -> dict:
        params = {"q": q, "epoch": epoch}
        if db:
            params["db"] = db
        data = None
        url = self.url + "/query"
        if method == "POST":
            data = urllib.parse.urlencode(params).encode()
        else:
            url += "?" + urllib.parse.urlencode(params)
        import json

        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=30) as r:
            return json.loads(r.read())

    def create_db(self, db: str) -> None:
        self.query(f'CREATE DATABASE "{db}"', method="POST")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, sig)
        self.proc = None

    def __enter__(self) -> "Influxd":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process(proc: "subprocess.Popen[bytes] | None", sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Signal a process group started with start_new_session=True; SIGKILL it if it outlives `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@dataclass
class VictoriaMetrics:
    """A VictoriaMetrics single node (Debian `victoria-metrics`): a real server for the /api/v2/write path."""

    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "VictoriaMetrics":
        binary = find_binary("victoria-metrics")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        log = open(self.workdir / "victoria-metrics.log", "ab")
        self.proc = subprocess.Popen(
            [binary, f"-httpListenAddr=127.0.0.1:{self.port}", f"-storageDataPath={self.workdir}/data",
             "-search.latencyOffset=0s"],
            stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        wait_port(self.port, timeout, self.proc, "victoria-metrics")
        return self

    def export(self, match: str) -> list[dict]:
        """Series matching a selector, e.g. '{__name__="marine_ph"}' (flushes first, so recent writes show)."""
        import json

        urllib.request.urlopen(self.url + "/internal/force_flush", timeout=10).read()
        data = urllib.parse.urlencode({"match[]": match}).encode()
        with urllib.request.urlopen(urllib.request.Request(self.url + "/api/v1/export", data=data), timeout=30) as r:
            return [json.loads(line) for line in r.read().decode().splitlines() if line.strip()]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, sig)
        self.proc = None
