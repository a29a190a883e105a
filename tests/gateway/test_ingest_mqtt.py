"""The ingest's MQTT reader, fed byte streams cut at every boundary (the real-broker paths are in
test_resilience.py and test_end_to_end.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import MqttConfig
from gateway.ingest_mqtt import MqttIngest, _Session, _utf8, _varint


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.reading = True
        self.written = b""

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def abort(self) -> None:
        pass


def publish(topic: str, payload: bytes, mid: int, v5: bool) -> bytes:
    body = _utf8(topic) + mid.to_bytes(2, "big") + (b"\x00" if v5 else b"") + payload
    return bytes([0x32]) + _varint(len(body)) + body


def stream(v5: bool, n: int) -> tuple[bytes, list[tuple[str, bytes, int]]]:
    msgs = [(f"twin/copenhagen/marine/buoy-{i % 7:02d}/up", bytes([i % 256]) * (i % 300), i + 1) for i in range(n)]
    connack = b"\x20\x03\x00\x00\x00" if v5 else b"\x20\x02\x00\x00"
    data = connack + b"".join(publish(t, p, m, v5) for t, p, m in msgs) + b"\xd0\x00"  # ends with a PINGRESP
    return data, msgs


@pytest.mark.parametrize("v5", [False, True])
@pytest.mark.parametrize("window", [1000, 7])
def test_every_message_is_queued_counted_and_wakes_ingest_whatever_the_cuts(v5: bool, window: int) -> None:
    loop = asyncio.new_event_loop()
    try:
        data, msgs = stream(v5, 40)
        for step in (1, 2, 3, 5, 64, 1000, len(data)):
            ingest = MqttIngest(MqttConfig(protocol=5 if v5 else 4, receive_maximum=max(10, window)), "copenhagen", loop)
            ingest.high_water = window
            session = _Session(ingest)
            transport = RecordingTransport()
            session.connection_made(transport)
            ingest._session = session  # noqa: SLF001 - what _one_session does after CONNACK
            got: list[tuple[str, bytes, int]] = []
            pos = 0
            while pos < len(data) or ingest.queue or session.rest:
                if transport.reading and pos < len(data):
                    session.data_received(data[pos:pos + step])
                    pos += step
                if ingest.queue:
                    # What ingest relies on: queued messages are counted and it was woken.
                    assert ingest.wakeup.is_set()
                    assert ingest.received_count - len(got) == len(ingest.queue)
                    assert len(ingest.queue) <= window
                    batch = list(ingest.queue)
                    ingest.queue.clear()
                    ingest.wakeup.clear()
                    got += [(m.topic, m.payload, m.mid) for m in batch]
                    ingest.taken(batch)
                    assert ingest.ack(batch) == len(batch)
                elif not transport.reading and pos < len(data):
                    pytest.fail(f"reader paused with an empty queue (step {step})")
            assert got == msgs, f"step {step}"
            assert ingest.queue_bytes == 0
            assert transport.written == b"".join(b"\x40\x02" + m.to_bytes(2, "big") for _t, _p, m in msgs)
    finally:
        loop.close()
