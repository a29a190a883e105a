"""The gateway decoder against the shared wire-format vectors (docs/vectors/wire-v1.json)."""

import json
import pathlib

import pytest

from gateway.decode import Rejected, decode_up

VECTORS = json.loads((pathlib.Path(__file__).parents[1] / "docs/vectors/wire-v1.json").read_text())


def _payload(case: dict) -> bytes:
    if "payload_hex" in case:
        return bytes.fromhex(case["payload_hex"])
    return json.dumps(case["payload_json"]).encode()


@pytest.mark.parametrize("case", VECTORS["cases"], ids=[c["name"] for c in VECTORS["cases"]])
def test_vector(case: dict) -> None:
    payload = _payload(case)
    if "reject" in case:
        with pytest.raises(Rejected) as exc:
            decode_up(case["topic"], payload, case["now"])
        assert exc.value.reason == case["reject"], exc.value.detail
        return
    out = decode_up(case["topic"], payload, case["now"])
    got = [{"seq": r.seq, "t": r.t, "flags": r.flags, "fields": r.values} for r in out.readings]
    assert got == case["readings"]
    got_rej = [{"index": r.index, "reason": r.reason} for r in out.rejected]
    assert got_rej == case.get("rejected_readings", [])


def test_vectors_cover_every_rejection_reason() -> None:
    reasons = {c["reject"] for c in VECTORS["cases"] if "reject" in c}
    reasons |= {r["reason"] for c in VECTORS["cases"] for r in c.get("rejected_readings", [])}
    assert {"identity", "truncated", "schema", "topic", "format", "size", "range", "time_future",
            "time_too_old", "empty", "unit", "unknown_field"} <= reasons
