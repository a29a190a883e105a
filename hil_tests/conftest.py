"""pytest wiring of the HIL rig: the `board` fixture and its options.

    --board PORT        run on a real board on this serial port (repeat for several);
                        default: emulated boards (MicroPython unix port)
    --hil-nodes N       nodes for fleet scenarios (default 4, two cities)
    --hil-scenario S    only these scenarios (repeat)
    --hil-long          also run the long scenarios (skipped by default)

A test asks for `board` and may shape it with `@pytest.mark.board(count=2, cfg={...},
world={...}, ring=8)`; it gets a started `Rig` (hil_tests/rig/rig.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hil_tests.rig.rig import Rig


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("hil", "TwinEdge hardware-in-the-loop rig")
    g.addoption("--board", action="append", default=[], metavar="PORT",
                help="serial port of a real board (repeatable); default: emulated boards")
    g.addoption("--hil-nodes", type=int, default=4, metavar="N", help="nodes in fleet scenarios (default 4)")
    g.addoption("--hil-scenario", action="append", default=[], metavar="NAME", help="run only these scenarios")
    g.addoption("--hil-long", action="store_true", default=False, help="also run long scenarios")
    g.addoption("--hil-broker-host", default="127.0.0.1",
                help="address real boards use to reach this machine's broker (default loopback)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "board(count=1, cfg=None, world=None, ring=4096): shape the board fixture")
    config.addinivalue_line("markers", "hil_long: long HIL scenario, skipped unless --hil-long")
    ports = config.getoption("--board", default=[]) or []
    if ports:
        from hil_tests.rig.real import BoardUnavailable, check_ports

        try:
            check_ports(ports)
        except BoardUnavailable as e:
            raise pytest.UsageError(str(e)) from None
    if (config.getoption("--hil-nodes", default=4) or 0) < 1:
        raise pytest.UsageError("--hil-nodes must be at least 1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    want = set(config.getoption("--hil-scenario", default=[]) or [])
    long_ok = config.getoption("--hil-long", default=False)
    keep, drop = [], []
    for item in items:
        sc = getattr(item, "callspec", None)
        name = sc.params.get("name") if sc is not None else None
        if want and name is not None and name not in want:
            drop.append(item)
            continue
        if item.get_closest_marker("hil_long") and not long_ok:
            item.add_marker(pytest.mark.skip(reason="long scenario: run with --hil-long"))
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def board(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    """A started rig: city stack(s) + nodes, emulated by default, real with --board."""
    m = request.node.get_closest_marker("board")
    kw = dict(m.kwargs) if m else {}
    count = kw.pop("count", 1) or request.config.getoption("--hil-nodes")
    needs = kw.pop("needs", frozenset())
    ports = request.config.getoption("--board")
    if ports:
        from hil_tests.rig.real import REAL_CAPS, skip_reason, real_rig

        reason = skip_reason(needs, REAL_CAPS)
        if reason:
            pytest.skip(reason)
        if count > len(ports):
            pytest.skip(f"needs {count} boards, {len(ports)} given with --board")
        rig = real_rig(tmp_path, ports[:count], broker_host=request.config.getoption("--hil-broker-host"), **kw)
    else:
        from hil_tests.rig.boards import emulated_rig

        rig = emulated_rig(tmp_path, count, **kw)
    try:
        yield rig
    finally:
        rig.stop()
