"""Fixtures for provisioning tests: a registry with a few nodes and a secret store in tmp dirs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from provisioning.registry import City, Node, Sensor, save_city, save_node
from provisioning.secrets import SecretStore


@dataclass
class Reg:
    root: Path
    store: SecretStore

    def env(self) -> dict[str, str]:
        return {"TWINEDGE_REGISTRY": str(self.root), "TWINEDGE_SECRETS": str(self.store.root)}


@pytest.fixture
def reg(tmp_path: Path) -> Reg:
    root = tmp_path / "registry"
    store = SecretStore(tmp_path / "secrets")
    save_city(root, City(name="copenhagen", partner="tongyeong"))
    rows: tuple[tuple[str, Literal["marine", "mobility"], str], ...] = (
        ("buoy-a", "marine", "Nordhavn"), ("buoy-b", "marine", "Amager"), ("count-c", "mobility", "Langebro"))
    for nid, domain, site in rows:
        sensors = [Sensor(kind="ph", serial="PH-1"), Sensor(kind="temp", serial="T-1"), Sensor(kind="battery")] if domain == "marine" else [Sensor(kind="radar")]
        save_node(root, Node(id=nid, city="copenhagen", domain=domain, site=site, sensors=sensors,
                             credential_ref=store.ensure_mqtt(nid)))
    save_node(root, Node(id="buoy-old", city="copenhagen", domain="marine", retired=True, credential_ref=store.ensure_mqtt("buoy-old")))
    store.put("wifi/copenhagen", {"ssid": "quay-net", "psk": "wifi-secret-123"})
    return Reg(root, store)
