# Store-and-forward: a bounded ring of encoded readings in flash.
# Reading number `seq` lives in slot seq % cap of ring.bin, so the file never grows and
# the newest sequence number is found again after a reset by scanning the slots.
# Record (28 B): seq u32, t u32 (Unix s), then the 20-byte wire reading whose dt field
# holds the low 16 bits of the boot counter until it is encoded into a batch.
# ring.meta (written atomically: temp file + rename) keeps lo = oldest unacknowledged
# seq, the drop count and the boot counter. Readings leave only when PUBACKed (ack()).
import os
import struct
from micropython import const

REC = const(28)
STAGE_MAX = const(16)
_META = "<4sIIII"
_MAGIC = b"TER1"


class Store:
    def __init__(self, cap, flush_n=1, path=""):
        self.ring = path + "ring.bin"
        self.meta = path + "ring.meta"
        self.cap = cap
        self.lo = 1
        self.drop = 0
        self.boot = 0
        self.flush_n = flush_n
        self.writes = 0
        self.dirty = False
        self._load_meta()
        self.one = bytearray(REC)
        self.stage = bytearray(REC * STAGE_MAX)
        self.staged = 0
        try:
            size = os.stat(self.ring)[6]
        except OSError:
            size = -1
        if size != self.cap * REC:
            self._create()
        self.f = open(self.ring, "r+b")
        self.hi = max(self.lo, self._scan() + 1)  # next seq to assign
        self.flushed = self.hi
        self.boot = (self.boot + 1) & 0xFFFFFFFF
        self.save_meta()

    def _load_meta(self):
        try:
            with open(self.meta, "rb") as f:
                m = struct.unpack(_META, f.read(struct.calcsize(_META)))
            if m[0] == _MAGIC:
                self.cap, self.lo, self.drop, self.boot = m[1], m[2], m[3], m[4]
        except (OSError, ValueError):
            pass  # first boot or unreadable meta: start a new ring

    def save_meta(self):
        tmp = self.meta + ".tmp"
        with open(tmp, "wb") as f:
            f.write(struct.pack(_META, _MAGIC, self.cap, self.lo, self.drop, self.boot))
        os.rename(tmp, self.meta)
        self.writes += 1

    def _create(self):
        z = bytearray(REC * 16)
        with open(self.ring, "wb") as f:
            left = self.cap
            while left > 0:
                k = min(16, left)
                f.write(memoryview(z)[:k * REC])
                left -= k
        self.lo = max(self.lo, 1)

    def _scan(self):
        # highest valid seq in the ring (0 if none)
        buf = bytearray(REC * 16)
        top = 0
        slot = 0
        self.f.seek(0)
        while slot < self.cap:
            k = min(16, self.cap - slot)
            self.f.readinto(memoryview(buf)[:k * REC])
            for j in range(k):
                s = struct.unpack_from("<I", buf, j * REC)[0]
                if s and s % self.cap == slot + j and s > top:
                    top = s
            slot += k
        return top

    def depth(self):
        return self.hi - self.lo

    def add(self, t, reading):
        # reading: 20-byte wire reading (dt field ignored). Returns its seq.
        seq = self.hi
        off = self.staged * REC
        st = self.stage
        struct.pack_into("<II", st, off, seq, t)
        st[off + 8:off + REC] = reading
        struct.pack_into("<H", st, off + 8, self.boot & 0xFFFF)
        self.staged += 1
        self.hi += 1
        if self.hi - self.lo > self.cap:
            # full: the oldest reading is overwritten; counted, reported in status `drop`
            n = self.hi - self.lo - self.cap
            self.lo += n
            self.drop += n
            self.dirty = True
        if self.staged >= self.flush_n or self.staged >= STAGE_MAX:
            self.flush()
        return seq

    def flush(self):
        if not self.staged:
            return
        f = self.f
        seq = self.flushed
        i = 0
        while i < self.staged:
            slot = seq % self.cap
            k = min(self.staged - i, self.cap - slot)
            f.seek(slot * REC)
            f.write(memoryview(self.stage)[i * REC:(i + k) * REC])
            i += k
            seq += k
        f.flush()
        self.writes += 1
        self.flushed = seq
        self.staged = 0
        if self.dirty:
            self.dirty = False
            self.save_meta()  # lo moved because of drops

    def read(self, seq, n, buf):
        # copy records [seq, seq+n) into buf; returns how many were copied
        if seq < self.lo:
            seq = self.lo
        if seq + n > self.flushed:
            self.flush()
        n = min(n, self.hi - seq, len(buf) // REC)
        i = 0
        while i < n:
            slot = (seq + i) % self.cap
            k = min(n - i, self.cap - slot)
            self.f.seek(slot * REC)
            self.f.readinto(memoryview(buf)[i * REC:(i + k) * REC])
            i += k
        return n

    def ack(self, end):
        # everything below `end` is acknowledged
        if end > self.lo:
            self.lo = min(end, self.hi)
            self.save_meta()

    def fix_time(self, delta, flag_mask, start=0):
        # After the first NTP sync: shift the times of this boot's never-published readings
        # taken with the unsynced clock by `delta` seconds (they keep their UNSYNCED flag).
        # Readings from `start` on only: one already on the wire must be resent unchanged,
        # or its retransmission would land in InfluxDB as a second point.
        self.flush()
        b = self.boot & 0xFFFF
        r = self.one
        n = 0
        for seq in range(max(self.lo, start), self.hi):
            pos = (seq % self.cap) * REC
            self.f.seek(pos)
            self.f.readinto(r)
            s, t, bt = struct.unpack_from("<IIH", r, 0)
            if s == seq and bt == b and r[10] & flag_mask:
                struct.pack_into("<I", r, 4, max(0, t + delta))
                self.f.seek(pos)
                self.f.write(r)
                n += 1
        if n:
            self.f.flush()
            self.writes += 1
        return n

    def close(self):
        self.flush()
        self.f.close()
