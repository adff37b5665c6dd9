"""Bandwidth limiting and rate measurement shared by the threads of one target.

A :class:`Throttle` is a token bucket: every byte handed to the network is
paid for first; when the bucket is empty the reader waits. Readers go into
debt (tokens below zero) and sleep it off, so several threads together never
exceed the rate. The same object measures the rate actually sent (a sliding
window), which ``imageqc status`` shows.

Client-side on purpose: the limit must hold for S3, OSS and a share alike,
and OSS's ``x-oss-traffic-limit`` is enforced by the server only.
"""

from __future__ import annotations

import collections
import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["BufferBody", "FileSlice", "Throttle", "ThrottledStream"]

_BUCKET_S = 0.1  # the rate meter adds up bytes per 100 ms


class Throttle:
    """Token bucket plus a rate meter.

    Parameters
    ----------
    rate : int
        Bytes per second; 0 means unlimited (only measured).
    burst_s : float
        Bucket capacity in seconds of ``rate`` (how far a reader may run ahead).
    clock : callable
        Monotonic seconds.
    window_s : float
        Span of the rate meter.
    """

    def __init__(
        self, rate: int, *, burst_s: float = 0.25, clock: Callable[[], float] = time.monotonic, window_s: float = 10.0
    ) -> None:
        self.rate = max(0, int(rate))
        self.capacity = max(64 * 1024, self.rate * burst_s) if self.rate else 0.0
        self.clock = clock
        self.window_s = window_s
        self._lock = threading.Lock()
        self._tokens = self.capacity
        self._last = clock()
        self._samples: collections.deque[list[float]] = collections.deque()  # [bucket start, bytes]
        self.total = 0

    def reserve(self, n: int) -> float:
        """Pay for ``n`` bytes; return how long the caller must wait first (s)."""
        with self._lock:
            now = self.clock()
            self.total += n
            if self._samples and now - self._samples[-1][0] < _BUCKET_S:
                self._samples[-1][1] += n
            else:
                self._samples.append([now, n])
            cutoff = now - self.window_s
            while self._samples and self._samples[0][0] < cutoff:
                self._samples.popleft()
            if not self.rate:
                return 0.0
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            return -self._tokens / self.rate if self._tokens < 0 else 0.0

    def consume(self, n: int, wait: Callable[[float], Any] = time.sleep) -> None:
        """Pay for ``n`` bytes and wait as needed; ``wait`` may be an Event's wait."""
        delay = self.reserve(n)
        if delay > 0:
            wait(delay)

    def rate_bps(self) -> float:
        """Bytes per second over the last ``window_s`` seconds."""
        with self._lock:
            now = self.clock()
            cutoff = now - self.window_s
            while self._samples and self._samples[0][0] < cutoff:
                self._samples.popleft()
            return sum(n for _, n in self._samples) / self.window_s


class FileSlice(io.RawIOBase):
    """``length`` bytes of a file from ``offset``, read through a throttle.

    The body given to boto3 for one part: seekable (botocore rewinds it) and
    sized, so no whole part is ever held in memory. ``check`` runs before
    every read and may raise to abort the request (service stopping, job
    cancelled).
    """

    def __init__(
        self,
        path: Path,
        offset: int,
        length: int,
        throttle: Throttle,
        *,
        check: Callable[[], None] = lambda: None,
        wait: Callable[[float], Any] = time.sleep,
    ) -> None:
        super().__init__()
        self._f: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._start = offset
        self._length = length
        self._pos = 0
        self._f.seek(offset)
        self._synced = True  # the OS file position is at _start + _pos
        self._throttle = throttle
        self._check = check
        self._wait = wait

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._length

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        self._synced = False
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        self._check()
        left = self._length - self._pos
        if size is None or size < 0 or size > left:
            size = left
        size = min(size, 1 << 20)
        if size <= 0:
            return b""
        if not self._synced:
            self._f.seek(self._start + self._pos)
            self._synced = True
        data = self._f.read(size)
        self._pos += len(data)
        self._throttle.consume(len(data), self._wait)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


class BufferBody(io.RawIOBase):
    """Bytes already read (one part of a streaming upload) as a request body, sent through a throttle.

    Seekable and sized like :class:`FileSlice` (botocore rewinds bodies), it
    hands out views of the buffer without copying; ``check`` runs before
    every read and may raise to abort the request.
    """

    def __init__(
        self,
        data: bytes,
        throttle: Throttle,
        *,
        check: Callable[[], None] = lambda: None,
        wait: Callable[[float], Any] = time.sleep,
    ) -> None:
        super().__init__()
        self._view = memoryview(data)
        self._pos = 0
        self._throttle = throttle
        self._check = check
        self._wait = wait

    @property
    def data(self) -> memoryview:
        """The whole buffer (for digests of exactly what is sent)."""
        return self._view

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._view)

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, min(len(self._view), base + pos))
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        self._check()
        left = len(self._view) - self._pos
        if size is None or size < 0 or size > left:
            size = left
        size = min(size, 1 << 20)
        if size <= 0:
            return b""
        chunk = self._view[self._pos : self._pos + size]
        self._pos += size
        self._throttle.consume(size, self._wait)
        return bytes(chunk)

    def readinto(self, buf: Any) -> int:
        self._check()
        size = min(len(buf), len(self._view) - self._pos, 1 << 20)
        if size <= 0:
            return 0
        buf[:size] = self._view[self._pos : self._pos + size]
        self._pos += size
        self._throttle.consume(size, self._wait)
        return size


class ThrottledStream:
    """A read-only stream of known length over another file-like, throttled.

    For oss2, which hands its own file objects to ``put_object`` and
    ``upload_part``; ``len`` tells oss2 the Content-Length.
    """

    def __init__(
        self,
        raw: Any,
        length: int,
        throttle: Throttle,
        *,
        check: Callable[[], None] = lambda: None,
        wait: Callable[[float], Any] = time.sleep,
    ) -> None:
        self._raw = raw
        self.len = length
        self._left = length
        self._throttle = throttle
        self._check = check
        self._wait = wait

    def read(self, size: int | None = -1) -> bytes:
        self._check()
        if size is None or size < 0 or size > self._left:
            size = self._left
        if size <= 0:
            return b""
        data: bytes | str = self._raw.read(size)
        if isinstance(data, str):  # oss2's SizedFileAdapter returns '' at the end
            data = data.encode()
        self._left -= len(data)
        self._throttle.consume(len(data), self._wait)
        return data
