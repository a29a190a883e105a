"""Shared set-up for end-to-end provisioning runs: broker with rendered ACL + emulated board."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hil_tests.pty_board import PtyBoard
from hil_tests.pty_board import start as start_board
from provisioning.broker import render
from provisioning.registry import load_city, load_registry
from provisioning.secrets import SecretStore
from twinedge.services import Mosquitto

REPO = Path(__file__).resolve().parents[2]
SHIMS = REPO / "hil_tests" / "board"
SCENARIO = {"speed": 1, "values": {"ph": 8.1, "temp": 15.2, "bat": 3.9}}


@dataclass
class Rig:
    broker: Mosquitto
    board: PtyBoard
    env: dict[str, str]

    def twinedge(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "twinedge.cli", *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout, cwd=REPO)


@contextmanager
def rig(registry: Path, store: SecretStore, work: Path, scenario: dict[str, object] = SCENARIO) -> Iterator[Rig]:
    city = load_city(registry, "copenhagen")
    passwd, acl, _ = render(city, list(load_registry(registry).values()), store, work / "broker-files")
    flash = work / "flash"
    flash.mkdir(parents=True, exist_ok=True)
    (flash / "scenario.json").write_text(json.dumps(scenario))
    env = {**os.environ, "TWINEDGE_REGISTRY": str(registry), "TWINEDGE_SECRETS": str(store.root),
           "XDG_CACHE_HOME": str(work / "cache"), "COLUMNS": "120"}
    with Mosquitto(work / "mosq", allow_anonymous=False, password_file=passwd, acl_file=acl) as b:
        board = start_board(flash, micropath=str(SHIMS), env={"TE_SCENARIO": "scenario.json"})
        try:
            yield Rig(b, board, env)
        finally:
            board.stop()
