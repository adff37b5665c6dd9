"""The one small interface every uploader implements, and the values it passes.

An :class:`Uploader` serves one configured target. The manager hands it a
:class:`Transfer` per file: the local file with its digests, the remote key,
the resumable state saved from an earlier attempt and a callback that
persists new state. :meth:`Uploader.send` is the whole protocol:

1. :meth:`~Uploader.probe` the key: an object with the same size and SHA-256
   (and a consistent server checksum) is already there -> ``present``;
2. otherwise :meth:`~Uploader.upload` (resuming from ``transfer.state``),
   which ends with :meth:`~Uploader.verify` against the stored object.

Streaming uploaders (``streams = True``, S3) take a :meth:`LocalFile.pending`
file (size and mtime only) and read it once: :class:`PartReader` reads the
parts in order and accumulates the whole-file digests while each part's own
digests are computed from the very bytes sent; the finished
:class:`LocalFile` comes back in :attr:`Outcome.local`. A transfer may name
the SHA-256 its content must have (``expect_sha256``, QC's for an input):
it is compared before anything is published (a single PUT, or
CompleteMultipartUpload), so a file whose content is not what QC read is
never stored. Others (OSS, HPC) are handed a file digested beforehand.

Part size and concurrency: ``part_size_mb = 0`` and ``concurrency = 0`` (the
defaults) choose them from the file size (:func:`choose_part_size`,
:func:`choose_concurrency`); explicit settings win.

Errors: :class:`~daemon.errors.PermanentUploadError` (the job fails at once,
the message names the target and the fix), :class:`~daemon.errors.TransientUploadError`
(retried with backoff; :class:`IntegrityError` is one), :class:`Interrupted`
(stop, cancel or the window closed: state is saved, nothing is wrong).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import UploadTarget, parse_bandwidth
from daemon.errors import PermanentUploadError, TransientUploadError
from daemon.upload.throttle import Throttle

__all__ = [
    "AUTO_MIN_PART",
    "READ_CHUNK",
    "ByteBudget",
    "ContentChanged",
    "InputChanged",
    "IntegrityError",
    "Interrupted",
    "LocalFile",
    "Outcome",
    "PartReader",
    "RemoteObject",
    "Transfer",
    "Uploader",
    "choose_concurrency",
    "choose_part_size",
    "digest_file",
    "file_stat",
    "never",
]

READ_CHUNK = 8 << 20
#: S3's and OSS's limit on parts per multipart upload.
MAX_PARTS = 10_000
#: Smallest part chosen automatically (s3transfer's default chunk, and its single-PUT threshold).
AUTO_MIN_PART = 8 << 20
#: Parts an automatically sized upload aims at, at most: far from the 10,000 limit, so a file of
#: 5 TB still fits and a part lost to a kill costs little.
AUTO_PARTS = 2_000
#: Requests in flight when ``concurrency = 0`` (s3transfer's default thread count).
AUTO_THREADS = 10
#: Bytes of parts one streaming transfer holds in memory at once (read ahead of the sockets).
PART_BUFFER_BUDGET = 256 << 20


def choose_part_size(size: int, configured_mb: int) -> int:
    """Part size in bytes for a file of ``size`` bytes.

    ``configured_mb`` > 0 (an explicit ``part_size_mb``) is used as is, grown
    in whole MiB only when the file would otherwise need more than 10,000
    parts. 0 (automatic): 8 MiB, or larger (whole MiB) so that the file needs
    at most :data:`AUTO_PARTS` parts. A file no larger than one part is sent
    in a single PUT.
    """
    if configured_mb > 0:
        need = -(-size // MAX_PARTS)
        return max(configured_mb << 20, -(-need // (1 << 20)) << 20)
    need = -(-size // AUTO_PARTS)
    return max(AUTO_MIN_PART, -(-need // (1 << 20)) << 20)


def choose_concurrency(configured: int) -> int:
    """Requests in flight for a target: ``configured`` when set, else :data:`AUTO_THREADS`."""
    return configured if configured > 0 else AUTO_THREADS


class ByteBudget:
    """Bytes of parts a target's streaming transfers hold in memory together, at most ``limit``.

    One part is always admitted when nothing is held, so a part larger than
    the budget (an explicit ``part_size_mb`` above it) still goes, alone.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, timeout: float) -> bool:
        with self._cond:
            if self.used and self.used + n > self.limit:
                self._cond.wait(timeout)
                if self.used and self.used + n > self.limit:
                    return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class Interrupted(Exception):
    """The transfer stopped on request; its state is saved and it resumes later.

    ``reason`` is ``"stop"`` (service stopping), ``"cancel"`` (job cancelled or
    its lease lost) or ``"pause"`` (the target's upload window closed).
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"upload interrupted ({reason})")


class InputChanged(Exception):
    """A local file changed (size or mtime) since it was planned or while it was read."""

    def __init__(self, path: Path | str, what: str) -> None:
        self.path = str(path)
        self.what = what
        super().__init__(f"{path}: {what}")


class ContentChanged(InputChanged):
    """An input's content is not what QC read although its size and mtime are: QC must run again."""


class IntegrityError(TransientUploadError):
    """The stored object does not match the local file; it is uploaded again."""


def never() -> None:
    """A gate that never interrupts."""


@dataclass(frozen=True)
class LocalFile:
    """A local file and its digests, computed once and kept in the store.

    ``part_md5`` are the hex MD5s of consecutive ``part_size`` slices (the
    Content-MD5 of each S3 part); ``crc64`` is the CRC-64/ECMA of the file
    (OSS's checksum), when the target needs it.
    """

    path: Path
    size: int
    mtime_ns: int
    sha256: str
    part_size: int
    part_md5: tuple[str, ...] = ()
    crc64: int | None = None
    part_sha256: tuple[str, ...] = ()
    #: MD5 of the whole file, when the target needs it (servers whose multipart ETag is that MD5).
    md5: str | None = None

    @classmethod
    def pending(cls, path: Path, size: int, mtime_ns: int, part_size: int) -> LocalFile:
        """A file not read yet: a streaming uploader computes its digests while sending it."""
        return cls(path=Path(path), size=size, mtime_ns=mtime_ns, sha256="", part_size=part_size)

    @property
    def digested(self) -> bool:
        return bool(self.sha256)

    @property
    def parts(self) -> int:
        return max(1, -(-self.size // self.part_size))

    def part_range(self, number: int) -> tuple[int, int]:
        """``(offset, length)`` of part ``number`` (1-based)."""
        start = (number - 1) * self.part_size
        return start, min(self.part_size, self.size - start)

    def digests(self) -> dict[str, Any]:
        return {
            "part_size": self.part_size,
            "md5": list(self.part_md5),
            "crc64": self.crc64,
            "sha256": list(self.part_sha256),
            "whole_md5": self.md5,
        }

    @classmethod
    def from_record(cls, path: Path, size: int, mtime_ns: int, sha256: str, digests: dict[str, Any]) -> LocalFile:
        return cls(
            path=path,
            size=size,
            mtime_ns=mtime_ns,
            sha256=sha256,
            part_size=int(digests["part_size"]),
            part_md5=tuple(digests.get("md5") or ()),
            crc64=digests.get("crc64"),
            part_sha256=tuple(digests.get("sha256") or ()),
            md5=digests.get("whole_md5"),
        )


def file_stat(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def digest_file(
    path: Path,
    *,
    part_size: int,
    md5_parts: bool = True,
    sha256_parts: bool = False,
    crc64: bool = False,
    whole_md5: bool = False,
    check: Callable[[], None] = never,
    expect: tuple[int, int] | None = None,
) -> LocalFile:
    """Read a file once: SHA-256, per-part MD5s (and SHA-256s), optionally CRC-64 and the whole file's MD5.

    ``expect`` is the ``(size, mtime_ns)`` the file must still have; it is
    compared before and after the read, so a file written meanwhile raises
    :class:`InputChanged` instead of yielding digests of a torn file.
    """
    before = file_stat(path)
    if expect is not None and before != tuple(expect):
        raise InputChanged(path, f"size/mtime {before} differ from {tuple(expect)} recorded after QC")
    sha = hashlib.sha256()
    crc = _crc64() if crc64 else None
    md5_all = hashlib.md5(usedforsecurity=False) if whole_md5 else None
    kinds = [k for k, on in (("md5", md5_parts), ("sha256", sha256_parts)) if on]
    done: dict[str, list[str]] = {k: [] for k in kinds}
    current = {k: hashlib.new(k, usedforsecurity=k != "md5") for k in kinds}
    in_part = 0

    def parts_update(block: bytes) -> None:
        nonlocal in_part
        view = memoryview(block)
        while kinds and view:
            take = min(len(view), part_size - in_part)
            for h in current.values():
                h.update(view[:take])
            in_part += take
            view = view[take:]
            if in_part == part_size:
                for k in kinds:
                    done[k].append(current[k].hexdigest())
                    current[k] = hashlib.new(k, usedforsecurity=k != "md5")
                in_part = 0

    # hashlib releases the GIL on large buffers: the part hashes run beside the whole-file ones
    with open(path, "rb") as f, ThreadPoolExecutor(1, thread_name_prefix="digest") as side:
        while True:
            check()
            block = f.read(READ_CHUNK)
            if not block:
                break
            pending = side.submit(parts_update, block) if kinds else None
            sha.update(block)
            if crc is not None:
                crc.update(block)
            if md5_all is not None:
                md5_all.update(block)
            if pending is not None:
                pending.result()
    for k in kinds:
        if in_part or not done[k]:
            done[k].append(current[k].hexdigest())
    after = file_stat(path)
    if after != before:
        raise InputChanged(path, "changed while it was being read")
    return LocalFile(
        path=Path(path),
        size=before[0],
        mtime_ns=before[1],
        sha256=sha.hexdigest(),
        part_size=part_size,
        part_md5=tuple(done.get("md5", ())),
        crc64=crc.crc if crc is not None else None,
        part_sha256=tuple(done.get("sha256", ())),
        md5=md5_all.hexdigest() if md5_all is not None else None,
    )


class _Running:
    """One whole-file digest fed in part order by its own thread, so the digests of a file run side by side
    with each other, with the reading and with the part threads (hashlib releases the GIL)."""

    def __init__(self, h: Any, name: str) -> None:
        self.h = h
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=_HASH_QUEUE)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"digest-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (data := self._q.get()) is not None:
                self.h.update(data)
        finally:
            self._done.set()

    def update(self, data: bytes) -> None:
        self._q.put(data)

    def result(self) -> Any:
        """The digest object, once every part given before was added."""
        self._q.put(None)
        self._done.wait()
        return self.h

    def stop(self) -> None:
        if not self._done.is_set():
            with contextlib.suppress(queue.Empty):
                while True:  # drop what waits: the result is not wanted any more
                    self._q.get_nowait()
            with contextlib.suppress(queue.Full):
                self._q.put_nowait(None)


#: Parts a whole-file digest may lag behind the reading (bounds the memory it holds).
_HASH_QUEUE = 4


class PartReader:
    """One sequential read of a file, part by part, accumulating the whole-file digests.

    ``read(n)`` returns part ``n``'s bytes (parts must be read in order,
    1, 2, ...); each is handed, in order, to the file's SHA-256 (and MD5 or
    CRC-64 when asked), each digest in a thread of its own, so the
    whole-file digests are of exactly the bytes the parts carry. The file's
    size and mtime are checked when it is opened, after every part and at
    :meth:`finish`: a file written meanwhile raises :class:`InputChanged`.
    """

    def __init__(
        self,
        local: LocalFile,
        *,
        whole_md5: bool = False,
        crc64: bool = False,
        check: Callable[[], None] = never,
    ) -> None:
        self.local = local
        self._check = check
        try:
            now = file_stat(local.path)
        except FileNotFoundError:
            raise InputChanged(local.path, "is gone") from None
        if now != (local.size, local.mtime_ns):
            raise InputChanged(local.path, f"size/mtime {now} differ from {(local.size, local.mtime_ns)}")
        self._f = open(local.path, "rb")  # noqa: SIM115 - closed in close()
        self._next = 1
        self._sha256 = _Running(hashlib.sha256(), "sha256")
        self._md5 = _Running(hashlib.md5(usedforsecurity=False), "md5") if whole_md5 else None
        self._crc = _Running(_crc64(), "crc64") if crc64 else None
        #: Bytes read so far (the tests count them: every byte once).
        self.bytes_read = 0

    def _running(self) -> list[_Running]:
        return [r for r in (self._sha256, self._md5, self._crc) if r is not None]

    def read(self, number: int) -> bytes:
        if number != self._next:
            raise ValueError(f"parts are read in order: {self._next} next, not {number}")
        self._check()
        _, length = self.local.part_range(number)
        data = self._f.read(length)
        if len(data) != length or self._stat() != (self.local.size, self.local.mtime_ns):
            raise InputChanged(self.local.path, "changed while it was being read")
        self.bytes_read += len(data)
        for r in self._running():
            r.update(data)
        self._next += 1
        return data

    def _stat(self) -> tuple[int, int]:
        st = os.fstat(self._f.fileno())
        return st.st_size, st.st_mtime_ns

    def finish(self) -> tuple[str, str | None]:
        """``(sha256, md5)`` hex of the whole file, after every part was read; the file must be unchanged."""
        if self._next != self.local.parts + 1:
            raise ValueError(f"finish after part {self._next - 1} of {self.local.parts}")
        try:
            after = file_stat(self.local.path)
        except FileNotFoundError:
            raise InputChanged(self.local.path, "is gone") from None
        if after != (self.local.size, self.local.mtime_ns):
            raise InputChanged(self.local.path, "changed while it was being read")
        sha = self._sha256.result().hexdigest()
        md5 = self._md5.result().hexdigest() if self._md5 is not None else None
        return sha, md5

    @property
    def crc64(self) -> int | None:
        """The CRC-64 of the whole file (after :meth:`finish`), when asked for."""
        return int(self._crc.result().crc) if self._crc is not None else None

    def close(self) -> None:
        for r in self._running():
            r.stop()
        self._f.close()

    def __enter__(self) -> PartReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _crc64() -> Any:
    from oss2.utils import Crc64

    return Crc64(0)


@dataclass(frozen=True)
class RemoteObject:
    """What a HEAD tells about a stored object."""

    key: str
    size: int
    sha256: str | None = None
    checksum: str | None = None  # ETag, CRC-64 or SHA-256, as the store reports it


@dataclass
class Transfer:
    """One file's upload: what to send, where, and how to remember progress.

    ``state`` is the uploader's resumable state (a JSON-able dict) from the
    last attempt; ``save(state, bytes_done)`` persists it (the manager writes
    it into the store). ``check`` raises :class:`Interrupted` when the work
    must stop; ``between`` also raises it when the window closed (checked only
    between parts, so a part in flight finishes). ``wait(seconds)`` sleeps
    unless stopped.
    """

    local: LocalFile
    key: str
    state: dict[str, Any] = field(default_factory=dict)
    save: Callable[[dict[str, Any], int], None] = lambda state, done: None
    check: Callable[[], None] = never
    between: Callable[[], None] = never
    wait: Callable[[float], Any] = lambda s: threading.Event().wait(s)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: The SHA-256 the content must have (QC's, for an input); checked before anything is published.
    expect_sha256: str | None = None
    #: The stored object's checksum when the upload's completion already proved it against the digests of
    #: the bytes sent (S3 on servers whose HEAD would hash the whole object again); set by the uploader.
    proved: str | None = None

    def persist(self, done: int) -> None:
        with self.lock:
            self.save(dict(self.state), done)


@dataclass(frozen=True)
class Outcome:
    """``present``: the same object was already stored, nothing was sent.

    ``local``: the file with the digests computed while it was sent (or read
    to compare with a stored object), when the uploader computed them.
    """

    present: bool
    checksum: str
    local: LocalFile | None = None


class Uploader(ABC):
    """One configured target. Thread-safe: the manager runs several files at once.

    Subclasses own their network clients and a pool for parallel parts of
    ``target.concurrency`` threads; :attr:`slots` bounds the requests in
    flight (parts and single PUTs) to that number, and :attr:`throttle`
    applies ``bandwidth_limit`` to all of them together.
    """

    type: str = ""
    #: Whether :meth:`upload` reads the file itself, once, computing the digests while sending
    #: (the manager then hands it a :meth:`LocalFile.pending` file instead of digesting first).
    streams: bool = False

    def __init__(self, target: UploadTarget, *, state_dir: Path) -> None:
        self.target = target
        self.name = target.name
        self.state_dir = Path(state_dir)
        self.part_size = choose_part_size(0, target.part_size_mb)
        self.concurrency = choose_concurrency(target.concurrency)
        self.throttle = Throttle(parse_bandwidth(target.bandwidth_limit))
        self.slots = threading.BoundedSemaphore(self.concurrency)
        #: Parts read ahead of the network by this target's streaming transfers.
        self.buffers = ByteBudget(PART_BUFFER_BUDGET)

    # -- what each type implements ------------------------------------------------

    @abstractmethod
    def probe(self, key: str) -> RemoteObject | None:
        """The stored object at ``key``, or None."""

    @abstractmethod
    def upload(self, transfer: Transfer) -> str:
        """Send the file (resuming), verify it, return the server's checksum."""

    @abstractmethod
    def matches(self, remote: RemoteObject, local: LocalFile) -> bool:
        """Whether a stored object is exactly the local file."""

    @abstractmethod
    def discard(self, key: str, state: dict[str, Any]) -> None:
        """Drop what an unfinished upload left (multipart upload, checkpoint, temp file)."""

    def part_size_for(self, size: int) -> int:
        """The part size for a file of ``size`` bytes (:func:`choose_part_size` with this target's setting)."""
        return choose_part_size(size, self.target.part_size_mb)

    def digest(
        self, path: Path, *, check: Callable[[], None] = never, expect: tuple[int, int] | None = None
    ) -> LocalFile:
        """Digests this target needs for ``path``."""
        size = file_stat(path)[0]
        return digest_file(path, part_size=self.part_size_for(size), check=check, expect=expect)

    def reusable(self, local: LocalFile) -> bool:
        """Whether digests saved by an earlier attempt fit this target's settings."""
        return local.part_size == self.part_size_for(local.size) and len(local.part_md5) == local.parts

    def close(self) -> None:  # noqa: B027 - optional: only uploaders holding clients override it
        """Release threads and connections."""

    def remove(self, key: str) -> None:
        """Delete the stored object at ``key``."""
        raise NotImplementedError(f"{type(self).__name__} cannot delete objects")

    def remove_if_torn(self, key: str, local: LocalFile) -> bool:
        """Delete the object at ``key`` if it claims to be ``local`` but is not.

        What a transfer leaves when its file changed while it was sent (a
        server that checks no part digest stores the mix). An object that
        does not carry ``local``'s SHA-256 (another version, or a target with
        no such metadata) is left alone. Returns whether one was deleted.
        """
        remote = self.probe(key)
        if remote is None or remote.sha256 is None or remote.sha256.lower() != local.sha256:
            return False
        if self.matches(remote, local):
            return False
        self.remove(key)
        return True

    # -- shared ------------------------------------------------------------------

    def send(self, transfer: Transfer) -> Outcome:
        """Skip when already present, else upload and verify.

        A file not digested yet (streaming uploaders) is read to compare it
        only when an object of its size is stored at the key; otherwise the
        upload reads it, once.
        """
        t = transfer
        remote = self.probe(t.key)
        if remote is not None and not t.local.digested and remote.size == t.local.size:
            t.local = self.digest(t.local.path, check=t.check, expect=(t.local.size, t.local.mtime_ns))
        if remote is not None and t.local.digested and self.matches(remote, t.local):
            if t.expect_sha256 is not None and t.local.sha256 != t.expect_sha256:
                raise ContentChanged(t.local.path, "changed after QC (content differs, same size and time)")
            return Outcome(present=True, checksum=remote.checksum or t.local.sha256, local=t.local)
        checksum = self.upload(t)
        return Outcome(present=False, checksum=checksum, local=t.local)

    def verify(self, local: LocalFile, key: str) -> str:
        """Raise :class:`IntegrityError` unless the stored object is the local file."""
        remote = self.probe(key)
        if remote is None:
            raise IntegrityError(
                self.name, f"{key} is missing right after it was uploaded", hint="it is uploaded again"
            )
        if not self.matches(remote, local):
            raise IntegrityError(
                self.name,
                f"{key} does not match {local.path} (stored size {remote.size}, sha256 {remote.sha256}, "
                f"checksum {remote.checksum}; local size {local.size}, sha256 {local.sha256})",
                hint="it is uploaded again",
            )
        return remote.checksum or local.sha256

    # -- small documents (the fleet status, daemon/fleet.py) ----------------------------

    def put_document(self, key: str, data: bytes) -> None:
        """Store ``data`` (a few KB) at ``key`` whole, replacing what is there. Needs only the upload's permission."""
        raise self.permanent(f"a {self.type or 'this'} target cannot store documents", "use an s3, oss or hpc target")

    def list_documents(self, prefix: str) -> list[str]:
        """The keys under ``prefix`` (a folder-like prefix ending in '/'), sorted."""
        raise self.permanent(f"a {self.type or 'this'} target cannot list documents", "use an s3, oss or hpc target")

    def get_document(self, key: str) -> bytes | None:
        """The bytes stored at ``key``, or None when there is nothing."""
        raise self.permanent(f"a {self.type or 'this'} target cannot read documents", "use an s3, oss or hpc target")

    def permanent(self, problem: str, hint: str) -> PermanentUploadError:
        return PermanentUploadError(self.name, problem, hint=hint)

    def transient(self, problem: str, hint: str = "") -> TransientUploadError:
        return TransientUploadError(self.name, problem, hint=hint)
