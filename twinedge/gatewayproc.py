"""Run a gateway as a real subprocess (`twinedge gateway run`): for tests, benchmarks, stack and demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w


@dataclass
class GatewayProcess:
    workdir: Path
    city: str
    mqtt_port: int
    influx_url: str
    database: str = "twinedge"
    instance: str = "gw1"
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the TOML (sections as dicts)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    http_port: int = 0

    @property
    def data_dir(self) -> Path:
        return self.workdir / f"gw-{self.city}-{self.instance}"

    @property
    def config_path(self) -> Path:
        return self.workdir / f"gateway-{self.city}-{self.instance}.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"gateway-{self.city}-{self.instance}.log"

    def write_config(self) -> Path:
        cfg: dict[str, Any] = {
            "city": self.city,
            "instance": self.instance,
            "data_dir": str(self.data_dir),
            "stats_interval_s": 2.0,
            "mqtt": {"host": "127.0.0.1", "port": self.mqtt_port},
            "influx": {"url": self.influx_url, "database": self.database, "max_backoff_s": 2.0},
            "http": {"port": 0},
        }
        for k, v in self.extra.items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k].update(v)
            else:
                cfg[k] = v
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(tomli_w.dumps(cfg))
        return self.config_path

    def start(self, timeout: float = 20.0) -> "GatewayProcess":
        self.write_config()
        port_file = self.data_dir / "http.port"
        port_file.unlink(missing_ok=True)
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(self.config_path)],
            stdout=logf, stderr=logf, env={**os.environ, **self.env}, start_new_session=True,
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}: {self.log_tail()}")
            if port_file.exists():
                try:
                    self.http_port = int(port_file.read_text())
                    if self.subscribed():
                        return self
                except ValueError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"gateway did not become ready within {timeout} s: {self.log_tail()}")

    def subscribed(self) -> bool:
        """True once the MQTT session is up (so publishes from now on reach the gateway's session)."""
        metrics = self.metrics()
        return metrics.get("twinedge_mqtt_connected", 0.0) == 1.0 and "mqtt connected" in self.log_path.read_text()

    def metrics(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except (urllib.error.URLError, OSError):
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def health(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text()[-n:]
        except FileNotFoundError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        return events

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
