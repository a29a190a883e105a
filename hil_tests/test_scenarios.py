"""Every scenario of the registry as a test (the same ones `twinedge hil run` reports)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from hil_tests.rig.rig import Rig
from hil_tests.rig.scenarios import SCENARIOS


def _params() -> list[object]:
    out = []
    for name, sc in SCENARIOS.items():
        marks = [pytest.mark.board(count=sc.nodes, needs=sc.needs, **sc.board)]
        if sc.long:
            marks.append(pytest.mark.hil_long)
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", _params())
def test_scenario(name: str, board: Rig, record_property: Callable[[str, object], None]) -> None:
    f = SCENARIOS[name].run(board)
    # figures go into the JUnit XML (and to the `twinedge hil run` report via user_properties)
    record_property("hil_figures", json.dumps(f.to_json()))
    print(f"\n{name}: taken {f.taken} landed {f.landed} duplicated {f.duplicated} lost {f.lost} "
          f"dropped {f.dropped} wrong {f.wrong} p50 {f.p50_ms} ms p99 {f.p99_ms} ms recovery {f.recovery_s} s "
          f"redelivered {f.redelivered}; " + "; ".join(f.notes))
    assert f.verdict == "pass", "\n".join(f.problems)
