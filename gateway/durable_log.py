"""The gateway's durable log: append-only segment files with group fsync, one cursor per sink.

Chosen by benchmark over SQLite (bench/log_bench.py): an append of a framed batch plus
one fdatasync is cheaper than an SQLite WAL commit of the same rows, reads by sinks are
sequential preads from the page cache, and freeing space is deleting a whole file.

Group commit: ingest `write()`s batches and one `sync()` (fdatasync) then covers all of them,
inline for a small group and on a worker thread for a large one while ingest goes on
decoding; only then are the messages acknowledged and the frames visible to sinks
(`read()` stops at `durable_end`). With one fdatasync per small
batch on the event loop, py-spy found the loop blocked in fdatasync 38 % of the time at one
reading per message (bench/gateway_bench.py --mode 1).

Frame: u32 length | u32 crc32 | payload (never empty). Offsets are global byte positions;
a segment file is named by the offset of its first byte. Segments are preallocated
(posix_fallocate) so an fdatasync after an append flushes data only, not the inode's
size: measured ~1.45x more commits/s for small groups on ext4. The end of a segment is
the first frame whose length is zero or whose length or CRC does not check out; a torn
tail (crash mid-write) is cut there at start-up: it was never acknowledged, so the
broker redelivers it.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

_FRAME = struct.Struct("<II")
_SEG_SUFFIX = ".seg"


class LogFull(Exception):
    pass


@dataclass
class _Segment:
    base: int
    path: Path
    size: int
    fd: int


class DurableLog:
    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int, fsync: bool = True) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.segment_bytes = min(segment_bytes, max(max_bytes // 8, 64 * 1024))
        self.fsync = fsync
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "cursors").mkdir(exist_ok=True)
        self._segments: list[_Segment] = []
        self.torn_bytes_cut = 0
        self._open()
        self._durable_end = self.end  # what survived a crash on disk is in the page cache or on it

    # -- start-up -------------------------------------------------------------------
    def _open(self) -> None:
        paths = sorted(self.dir.glob("*" + _SEG_SUFFIX))
        for i, path in enumerate(paths):
            base = int(path.stem)
            fd = os.open(path, os.O_RDWR)
            seg = _Segment(base, path, os.fstat(fd).st_size, fd)
            last = i == len(paths) - 1
            good = self._scan_valid_end(seg, check_crc=last)
            if last:
                self.torn_bytes_cut = self._torn_bytes(seg, good)
                if self.torn_bytes_cut:
                    # Zero the torn bytes so a later scan stops at the same place.
                    os.pwrite(fd, bytes(self.torn_bytes_cut), good)
                    os.fsync(fd)
            seg.size = good
            self._segments.append(seg)
        if not self._segments:
            self._new_segment(self._cursor_floor())

    def _cursor_floor(self) -> int:
        offsets = [self.cursor(p.stem) for p in (self.dir / "cursors").glob("*.pos")]
        return max(offsets, default=0)

    def _scan_valid_end(self, seg: _Segment, check_crc: bool) -> int:
        pos = 0
        while pos + _FRAME.size <= seg.size:
            length, crc = _FRAME.unpack(os.pread(seg.fd, _FRAME.size, pos))
            if length == 0 or pos + _FRAME.size + length > seg.size:
                break
            if check_crc and zlib.crc32(os.pread(seg.fd, length, pos + _FRAME.size)) != crc:
                break
            pos += _FRAME.size + length
        return pos

    @staticmethod
    def _torn_bytes(seg: _Segment, good: int) -> int:
        """Non-zero bytes after the valid end (a partial frame), up to the first all-zero block."""
        tail = os.pread(seg.fd, min(seg.size - good, 16 * 1024 * 1024), good)
        stripped = tail.rstrip(b"\0")
        return len(stripped)

    def _new_segment(self, base: int) -> None:
        path = self.dir / f"{base:020d}{_SEG_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.segment_bytes)
        except OSError:
            pass  # file systems without fallocate: appends still work, just with costlier fsyncs
        self._segments.append(_Segment(base, path, 0, fd))
        if self.fsync:
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    # -- state ----------------------------------------------------------------------
    @property
    def start(self) -> int:
        return self._segments[0].base

    @property
    def end(self) -> int:
        last = self._segments[-1]
        return last.base + last.size

    @property
    def size_bytes(self) -> int:
        return self.end - self.start

    @property
    def durable_end(self) -> int:
        """End of what has been fdatasync'ed: sinks read up to here, ingest acknowledges up to here."""
        return self._durable_end

    def has_room(self, nbytes: int = 0) -> bool:
        return self.size_bytes + nbytes <= self.max_bytes

    # -- append (ingest side) -------------------------------------------------------
    def append(self, records: list[bytes]) -> int:
        """Append records durably (one write, one fdatasync, on this thread). Returns the new end offset."""
        end = self.write(records)
        self.sync(self.unsynced_fds())
        self.mark_durable(end)
        return end

    def write(self, records: list[bytes]) -> int:
        """Write records without syncing (invisible to `read()` until `mark_durable`). Returns the new end."""
        if not records:
            return self.end
        if not all(records):
            raise ValueError("empty log records are not allowed (a zero length marks the end of a segment)")
        buf = bytearray()
        for rec in records:
            buf += _FRAME.pack(len(rec), zlib.crc32(rec))
            buf += rec
        if not self.has_room(len(buf)):
            raise LogFull(f"durable log holds {self.size_bytes} bytes, bound {self.max_bytes}")
        seg = self._segments[-1]
        if seg.size and seg.size + len(buf) > self.segment_bytes:
            self._new_segment(self.end)
            seg = self._segments[-1]
        written = os.pwrite(seg.fd, buf, seg.size)
        if written != len(buf):
            raise OSError(f"short write to {seg.path}: {written} of {len(buf)} bytes")
        seg.size += len(buf)
        return self.end

    def unsynced_fds(self) -> list[int]:
        """The files holding bytes past `durable_end` (taken on the loop thread, synced on a worker)."""
        return [seg.fd for seg in self._segments if seg.base + seg.size > self._durable_end]

    def sync(self, fds: list[int]) -> None:
        """fdatasync the given segment files; safe on a worker thread while the loop writes further on."""
        if self.fsync:
            for fd in fds:
                os.fdatasync(fd)

    def mark_durable(self, end: int) -> None:
        self._durable_end = max(self._durable_end, end)

    # -- read (sink side) -----------------------------------------------------------
    def read(self, offset: int, max_bytes: int = 4 * 1024 * 1024) -> list[tuple[int, bytes]]:
        """Records starting at `offset`: list of (offset after the record, payload)."""
        out: list[tuple[int, bytes]] = []
        if offset < self.start:
            offset = self.start
        taken = 0
        for seg in self._segments:
            size = min(seg.size, self._durable_end - seg.base)
            if offset >= seg.base + size:
                continue
            rel = offset - seg.base
            chunk = os.pread(seg.fd, min(size - rel, max(max_bytes - taken, 0) + 65536), rel)
            pos = 0
            while pos + _FRAME.size <= len(chunk):
                length, _crc = _FRAME.unpack_from(chunk, pos)
                endpos = pos + _FRAME.size + length
                if endpos > len(chunk):
                    if not out:  # a single record larger than the chunk
                        rec = os.pread(seg.fd, length, rel + pos + _FRAME.size)
                        out.append((seg.base + rel + pos + _FRAME.size + length, rec))
                    return out
                out.append((seg.base + rel + endpos, bytes(chunk[pos + _FRAME.size : endpos])))
                pos = endpos
                taken += _FRAME.size + length
                if taken >= max_bytes:
                    return out
            offset = seg.base + rel + pos
        return out

    # -- cursors --------------------------------------------------------------------
    def _cursor_path(self, name: str) -> Path:
        return self.dir / "cursors" / f"{name}.pos"

    def cursor(self, name: str) -> int:
        try:
            return int(self._cursor_path(name).read_text().strip() or 0)
        except FileNotFoundError:
            return self.start if self._segments else 0

    def commit_cursor(self, name: str, offset: int) -> None:
        """Persist a sink's position atomically (write, fsync, rename)."""
        path = self._cursor_path(name)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(str(offset))
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)

    def release(self, min_cursor: int) -> int:
        """Delete whole segments every sink has passed. Returns bytes freed."""
        freed = 0
        while len(self._segments) > 1 and self._segments[1].base <= min_cursor:
            seg = self._segments.pop(0)
            os.close(seg.fd)
            seg.path.unlink(missing_ok=True)
            freed += seg.size
        last = self._segments[-1]
        if len(self._segments) == 1 and last.size >= self.segment_bytes // 4 and min_cursor >= self.end:
            # Everything consumed: start a fresh segment so the old file can go.
            self._new_segment(self.end)
            old = self._segments.pop(0)
            os.close(old.fd)
            old.path.unlink(missing_ok=True)
            freed += old.size
        return freed

    def close(self) -> None:
        for seg in self._segments:
            try:
                os.close(seg.fd)
            except OSError:
                pass
