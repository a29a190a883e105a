"""Build a rig for a scenario: the emulated backend (default) or real boards on serial ports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hil_tests.rig.emulated import EmulatedNode
from hil_tests.rig.model import NodeSpec, fleet
from hil_tests.rig.rig import EMULATED_CAPS, Rig
from hil_tests.rig.scenarios import BASE_CFG, INTERVAL_S, RIG_WDT_S, SPEED
from hil_tests.rig.stack import Stack


def write_registry(root: Path, specs: list[NodeSpec]) -> Path:
    """The node registry the gateway reads for site tags (what `twinedge node add` writes)."""
    from provisioning.registry import City, Node, save_city, save_node

    for city in sorted({s.city for s in specs}):
        save_city(root, City(name=city))
    for s in specs:
        save_node(root, Node(id=s.node, city=s.city, domain=s.domain, site=s.site))  # type: ignore[arg-type]
    return root


def emulated_rig(workdir: Path, count: int = 1, *, cfg: dict[str, Any] | None = None,
                 world: dict[str, Any] | None = None, ring: int = 4096, speed: float = SPEED,
                 wdt_timeout_s: float | None = RIG_WDT_S, start: bool = True) -> Rig:
    specs = fleet(count)
    cfg_doc = {**BASE_CFG, **(cfg or {})}
    registry = write_registry(workdir / "registry", specs)
    stack = Stack(workdir, registry=registry)
    rig = Rig("emulated", stack, [], workdir, speed=speed, interval_s=int(cfg_doc.get("interval_s", INTERVAL_S)),
              caps=EMULATED_CAPS)
    try:
        stack.start(sorted({s.city for s in specs}, key=lambda c: [x.city for x in specs].index(c)))
        for s in specs:
            rig.nodes.append(EmulatedNode(s, stack.city(s.city).proxy.port, workdir / "flash" / s.node, speed=speed,
                                          cfg=cfg_doc, world=world, ring=ring, wdt_timeout_s=wdt_timeout_s))
        rig.start()
        if start:
            for n in rig.nodes:
                n.start()
    except BaseException:
        rig.stop()
        raise
    return rig
