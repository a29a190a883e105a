"""Durable-log candidates, same workload: group commits of framed records, fsync per commit, then a
sequential read from a cursor. Prints appends/s and MB/s for each; the gateway uses the winner
(gateway/durable_log.py).

  python -m bench.log_bench [--records 200000] [--group 50]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from pathlib import Path

from gateway.durable_log import DurableLog


def bench_segments(d: Path, recs: list[bytes], group: int) -> tuple[float, float]:
    log = DurableLog(d, 8 * 1024**3, 64 * 1024**2)
    t0 = time.perf_counter()
    for i in range(0, len(recs), group):
        log.append(recs[i:i + group])
    t1 = time.perf_counter()
    off, n = 0, 0
    while True:
        got = log.read(off, 4 * 1024 * 1024)
        if not got:
            break
        off = got[-1][0]
        n += len(got)
    t2 = time.perf_counter()
    assert n == len(recs)
    log.close()
    return t1 - t0, t2 - t1


def bench_sqlite(d: Path, recs: list[bytes], group: int) -> tuple[float, float]:
    db = sqlite3.connect(d / "log.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, rec BLOB NOT NULL)")
    t0 = time.perf_counter()
    for i in range(0, len(recs), group):
        db.execute("BEGIN")
        db.executemany("INSERT INTO log(rec) VALUES (?)", [(r,) for r in recs[i:i + group]])
        db.execute("COMMIT")
    t1 = time.perf_counter()
    last, n = 0, 0
    while True:
        rows = db.execute("SELECT id, rec FROM log WHERE id > ? ORDER BY id LIMIT 5000", (last,)).fetchall()
        if not rows:
            break
        last = rows[-1][0]
        n += len(rows)
    t2 = time.perf_counter()
    assert n == len(recs)
    db.close()
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--group", type=int, default=50, help="records per durable commit (fsync)")
    ap.add_argument("--size", type=int, default=600, help="bytes per record (a 50-reading message is ~10 KB)")
    args = ap.parse_args()
    recs = [os.urandom(args.size) for _ in range(args.records)]
    mb = args.records * args.size / 1e6
    results = {}
    for name, fn in (("segment files (chosen)", bench_segments), ("sqlite WAL synchronous=FULL", bench_sqlite)):
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            w, r = fn(Path(tmp), recs, args.group)
        commits = args.records / args.group
        results[name] = w
        print(f"{name:30s} append {args.records / w:>10,.0f} rec/s ({mb / w:6.1f} MB/s, {commits / w:,.0f} fsyncs/s); "
              f"read {args.records / r:>10,.0f} rec/s", flush=True)
    seg, sql = results["segment files (chosen)"], results["sqlite WAL synchronous=FULL"]
    print(f"segment files append {sql / seg:.1f}x faster than SQLite for {args.size} B records in groups of {args.group}")


if __name__ == "__main__":
    main()
