"""The one small interface every uploader implements, and the values it passes.

An :class:`Uploader` serves one configured target. The manager hands it a
:class:`Transfer` per file: the local file with its digests, the remote key,
the resumable state saved from an earlier attempt and a callback that
persists new state. :meth:`Uploader.send` is the whole protocol:

1. :meth:`~Uploader.probe` the key: an object with the same size and SHA-256
   (and a consistent server checksum) is already there -> ``present``;
2. otherwise :meth:`~Uploader.upload` (resuming from ``transfer.state``),
   which ends with :meth:`~Uploader.verify` against the stored object.

Errors: :class:`~daemon.errors.PermanentUploadError` (the job fails at once,
the message names the target and the fix), :class:`~daemon.errors.TransientUploadError`
(retried with backoff; :class:`IntegrityError` is one), :class:`Interrupted`
(stop, cancel or the window closed: state is saved, nothing is wrong).
"""

from __future__ import annotations

import hashlib
import os
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
    "READ_CHUNK",
    "ContentChanged",
    "InputChanged",
    "IntegrityError",
    "Interrupted",
    "LocalFile",
    "Outcome",
    "RemoteObject",
    "Transfer",
    "Uploader",
    "digest_file",
    "file_stat",
    "never",
]

READ_CHUNK = 8 << 20
#: S3's and OSS's limit on parts per multipart upload.
MAX_PARTS = 10_000


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
    check: Callable[[], None] = never,
    expect: tuple[int, int] | None = None,
) -> LocalFile:
    """Read a file once: SHA-256, per-part MD5s (and SHA-256s), optionally CRC-64.

    ``expect`` is the ``(size, mtime_ns)`` the file must still have; it is
    compared before and after the read, so a file written meanwhile raises
    :class:`InputChanged` instead of yielding digests of a torn file.
    """
    before = file_stat(path)
    if expect is not None and before != tuple(expect):
        raise InputChanged(path, f"size/mtime {before} differ from {tuple(expect)} recorded after QC")
    sha = hashlib.sha256()
    crc = _crc64() if crc64 else None
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
    )


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

    def persist(self, done: int) -> None:
        with self.lock:
            self.save(dict(self.state), done)


@dataclass(frozen=True)
class Outcome:
    """``present``: the same object was already stored, nothing was sent."""

    present: bool
    checksum: str


class Uploader(ABC):
    """One configured target. Thread-safe: the manager runs several files at once.

    Subclasses own their network clients and a pool for parallel parts of
    ``target.concurrency`` threads; :attr:`slots` bounds the requests in
    flight (parts and single PUTs) to that number, and :attr:`throttle`
    applies ``bandwidth_limit`` to all of them together.
    """

    type: str = ""

    def __init__(self, target: UploadTarget, *, state_dir: Path) -> None:
        self.target = target
        self.name = target.name
        self.state_dir = Path(state_dir)
        self.part_size = target.part_size_mb << 20
        self.throttle = Throttle(parse_bandwidth(target.bandwidth_limit))
        self.slots = threading.BoundedSemaphore(target.concurrency)

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
        """``part_size_mb``, grown in whole MiB when a file would need more than 10,000 parts."""
        need = -(-size // MAX_PARTS)
        return max(self.part_size, -(-need // (1 << 20)) << 20)

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
        """Skip when already present, else upload and verify."""
        remote = self.probe(transfer.key)
        if remote is not None and self.matches(remote, transfer.local):
            return Outcome(present=True, checksum=remote.checksum or transfer.local.sha256)
        return Outcome(present=False, checksum=self.upload(transfer))

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
