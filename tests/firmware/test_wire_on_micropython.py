"""The firmware encoder (firmware/lib/te_wire.py) on the real MicroPython unix port
reproduces every encoder case of the shared vectors byte for byte."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from hil_tests.board.runner import FIRMWARE, micropython_bin

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "docs/vectors/wire-v1.json"

SCRIPT = """
import json, sys, te_wire, binascii
d = json.load(open(sys.argv[1]))
out = {}
for c in d["cases"]:
    e = c.get("encode")
    if e:
        out[c["name"]] = binascii.hexlify(te_wire.encode(e["schema"], e["node"], e["seq0"], e["t0"], e["rows"])).decode()
print(json.dumps(out))
"""


def test_encoder_reproduces_vectors(tmp_path: Path) -> None:
    script = tmp_path / "enc.py"
    script.write_text(SCRIPT)
    r = subprocess.run([micropython_bin(), str(script), str(VECTORS)], capture_output=True, text=True,
                       env={"MICROPYPATH": f"{FIRMWARE / 'lib'}:.frozen"}, timeout=30)
    assert r.returncode == 0, r.stderr + r.stdout
    got = json.loads(r.stdout)
    cases = [c for c in json.loads(VECTORS.read_text())["cases"] if "encode" in c]
    assert len(cases) >= 3
    for c in cases:
        assert got[c["name"]] == c["payload_hex"], c["name"]
