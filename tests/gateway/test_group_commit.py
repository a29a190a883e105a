"""Ingest acknowledges a message only after the fdatasync that made its frame durable has returned."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from pathlib import Path

import pytest

from bench._common import build_payloads
from gateway import records
from gateway.config import GatewayConfig
from gateway.ingest_mqtt import Inbound
from gateway import service
from gateway.service import Gateway


class RecordingIngest:
    """What Gateway._ingest/_commit use of MqttIngest: a queue, a wakeup, taken() and ack()."""

    def __init__(self) -> None:
        self.queue: collections.deque[Inbound] = collections.deque()
        self.wakeup = asyncio.Event()
        self.acked: list[int] = []

    def taken(self, items: list[Inbound]) -> None:
        pass

    def ack(self, items: list[Inbound]) -> int:
        self.acked += [it.mid for it in items]
        return len(items)


async def test_no_puback_before_the_fdatasync_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "_THREAD_SYNC_BYTES", 1)  # every group on the worker thread (small ones sync inline)
    gw = Gateway(GatewayConfig(city="copenhagen", data_dir=tmp_path))
    gw.appended = asyncio.Condition()
    release = threading.Event()
    syncing = threading.Event()
    real_sync = gw.log.sync

    def slow_sync(fds: list[int]) -> None:
        syncing.set()
        release.wait(10)
        real_sync(fds)

    gw.log.sync = slow_sync  # type: ignore[method-assign]
    mq = RecordingIngest()
    t = int(time.time()) - 60
    for i, (topic, payload) in enumerate(build_payloads("copenhagen", 4, 3, 2, t)):
        mq.queue.append(Inbound(topic, payload, i + 1, 1, 1, time.time()))
    mq.wakeup.set()
    ingest = asyncio.create_task(gw._ingest_then_commit(mq))  # type: ignore[arg-type]
    commit = asyncio.create_task(gw._commit(mq))  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while not syncing.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert syncing.is_set() and not mq.queue  # all 12 messages taken and written, the sync is running
    assert gw.log.end > gw.log.durable_end and gw.log.read(0) == []
    await asyncio.sleep(0.2)  # were an ack to slip out before the sync, it would be here by now
    assert mq.acked == []
    release.set()
    while len(mq.acked) < 12 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert sorted(mq.acked) == list(range(1, 13)) and gw.log.durable_end == gw.log.end
    kinds = [records.decode(blob)["m"] for _, blob in gw.log.read(0)]
    assert len([k for k in kinds if k in ("marine", "mobility")]) == 12  # plus alarm records
    gw.stopping.set()
    mq.wakeup.set()
    await asyncio.gather(ingest, commit)
    gw.log.close()
    gw.dead.close()
