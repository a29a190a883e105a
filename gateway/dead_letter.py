"""Dead-letter store: every rejected message or reading, with reason, topic, payload and time.

SQLite (one file in the data dir): low volume, must be durable before the PUBACK of the
message it came from, and must be listable and filterable by the operator.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    stage TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    topic TEXT NOT NULL,
    node TEXT,
    payload BLOB,
    item TEXT
);
CREATE INDEX IF NOT EXISTS dead_letter_reason ON dead_letter(reason);
"""


@dataclass(frozen=True)
class DeadLetter:
    stage: str  # "decode" (message), "reading", "influx" (rejected by the database)
    reason: str
    detail: str
    topic: str
    node: str | None = None
    payload: bytes | None = None
    item: dict[str, object] | None = None
    at: float = 0.0
    id: int = 0


class DeadLetterStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def add_many(self, letters: list[DeadLetter]) -> None:
        """Durable on return (one transaction)."""
        if not letters:
            return
        now = time.time()
        rows = [
            (
                dl.at or now,
                dl.stage,
                dl.reason,
                dl.detail,
                dl.topic,
                dl.node,
                dl.payload,
                json.dumps(dl.item, default=str) if dl.item is not None else None,
            )
            for dl in letters
        ]
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO dead_letter(at, stage, reason, detail, topic, node, payload, item) VALUES (?,?,?,?,?,?,?,?)",
                rows,
            )

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM dead_letter").fetchone()[0])

    def counts_by_reason(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT reason, count(*) FROM dead_letter GROUP BY reason").fetchall())

    def list(self, limit: int = 50, reason: str | None = None, node: str | None = None) -> list[DeadLetter]:
        q = "SELECT id, at, stage, reason, detail, topic, node, payload, item FROM dead_letter"
        where, args = [], []
        if reason:
            where.append("reason = ?")
            args.append(reason)
        if node:
            where.append("node = ?")
            args.append(node)
        if where:
            q += " WHERE " + " AND ".join(where)
        q += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        out = []
        for row in self._db.execute(q, args):
            out.append(
                DeadLetter(
                    id=row[0], at=row[1], stage=row[2], reason=row[3], detail=row[4], topic=row[5], node=row[6],
                    payload=row[7], item=json.loads(row[8]) if row[8] else None,
                )
            )
        return out

    def close(self) -> None:
        self._db.close()


def open_readonly(path: Path) -> DeadLetterStore:
    if not path.exists():
        raise FileNotFoundError(path)
    return DeadLetterStore(path)
