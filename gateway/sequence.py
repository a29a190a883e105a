"""Per-node sequence tracking: skip duplicates, count gaps (data completeness)."""

from __future__ import annotations

from dataclasses import dataclass

WINDOW = 4096  # sequence numbers remembered per node for late (backfilled) arrivals; a small int bitset stays cheap


@dataclass
class NodeSeq:
    hi: int = 0
    seen: int = 0  # bitset over (hi - WINDOW, hi]
    received: int = 0
    duplicates: int = 0
    gaps: int = 0  # numbers below hi not (yet) received
    resets: int = 0
    last_seen: int = 0

    @property
    def completeness(self) -> float:
        total = self.received + self.gaps
        return self.received / total if total else 1.0


class SequenceTracker:
    """`check` answers whether a reading is new; `commit` records it once it is durable."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeSeq] = {}

    def is_new(self, node: str, seq: int) -> bool:
        st = self.nodes.get(node)
        if st is None or st.hi == 0:
            return True
        if seq > st.hi:
            return True
        if seq <= st.hi - WINDOW:
            return True  # too old to remember: let it through, InfluxDB overwrites a duplicate
        return not (st.seen >> (st.hi - seq)) & 1

    def commit(self, node: str, seq: int, t: int) -> None:
        st = self.nodes.get(node)
        if st is None:
            st = self.nodes[node] = NodeSeq()
        st.received += 1
        if t > st.last_seen:
            st.last_seen = t
        if st.hi == 0:
            st.hi, st.seen = seq, 1
            return
        if seq > st.hi:
            jump = seq - st.hi
            if jump > WINDOW * 16:
                # A re-flashed node starting again far ahead: count as a reset, not a huge gap.
                st.resets += 1
                st.hi, st.seen = seq, 1
                return
            st.gaps += jump - 1
            st.seen = ((st.seen << jump) | 1) & ((1 << WINDOW) - 1)
            st.hi = seq
        elif seq > st.hi - WINDOW:
            st.seen |= 1 << (st.hi - seq)
            if st.gaps:
                st.gaps -= 1
        elif st.hi - seq > WINDOW * 16:
            st.resets += 1
            st.hi, st.seen = seq, 1
        elif st.gaps:
            st.gaps -= 1  # older than the window: most likely a backfill filling a counted gap

    def commit_run(self, node: str, seq0: int, n: int, t_last: int) -> bool:
        """Fast path for a batch of consecutive, all-new sequence numbers above the node's highest.

        Returns False (and records nothing) when the run does not qualify; the caller then goes reading by reading.
        """
        st = self.nodes.get(node)
        if st is None or st.hi == 0 or seq0 <= st.hi or seq0 + n - 1 - st.hi > WINDOW:
            return False
        top = seq0 + n - 1
        st.gaps += seq0 - st.hi - 1
        st.seen = ((st.seen << (top - st.hi)) | ((1 << n) - 1)) & ((1 << WINDOW) - 1)
        st.hi = top
        st.received += n
        if t_last > st.last_seen:
            st.last_seen = t_last
        return True

    def duplicate(self, node: str) -> None:
        st = self.nodes.setdefault(node, NodeSeq())
        st.duplicates += 1

    # -- persistence: a snapshot in the data dir plus a replay of the log written after it -------
    def snapshot(self) -> dict[str, dict[str, int | str]]:
        return {node: {"hi": st.hi, "seen": f"{st.seen:x}", "received": st.received, "duplicates": st.duplicates,
                       "gaps": st.gaps, "resets": st.resets, "last_seen": st.last_seen}
                for node, st in self.nodes.items()}

    def restore(self, snap: dict[str, dict[str, int | str]]) -> None:
        """Load a snapshot; raises ValueError/TypeError/KeyError on a malformed one (the caller starts afresh)."""
        nodes = {}
        for node, d in snap.items():
            nodes[str(node)] = NodeSeq(hi=int(d["hi"]), seen=int(str(d["seen"]), 16), received=int(d["received"]),
                                       duplicates=int(d["duplicates"]), gaps=int(d["gaps"]), resets=int(d["resets"]),
                                       last_seen=int(d["last_seen"]))
        self.nodes = nodes

    def replay(self, node: str, seq: int, t: int) -> None:
        """A reading found in the durable log after the snapshot: record it unless already known."""
        if self.is_new(node, seq):
            self.commit(node, seq, t)
