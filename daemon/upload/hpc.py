"""An HPC share: a mounted folder or a UNC path (``//server/share/dir``).

Each file is copied to a hidden temporary name beside its destination
(``.<name>.imageqc-partial``, the name shortened with a hash when that would
pass 255 bytes), flushed and fsynced, its SHA-256 compared with
the local file's, then renamed into place, so nothing downstream ever sees a
partial file under the real name. An interrupted copy resumes from the
temporary file's length (the final SHA-256 check catches a damaged tail:
the copy then starts over).

The share's own permissions authenticate; there are no credentials here.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.config import UploadTarget
from daemon.errors import UploadError
from daemon.upload.base import (
    READ_CHUNK,
    IntegrityError,
    LocalFile,
    RemoteObject,
    Transfer,
    Uploader,
    digest_file,
    file_stat,
    never,
)
from daemon.upload.credentials import Credentials
from qc.filenames import fit_name

__all__ = ["PARTIAL_SUFFIX", "HPCUploader"]

PARTIAL_SUFFIX = ".imageqc-partial"
_COPY_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_CHUNK)
            if not block:
                return h.hexdigest()
            h.update(block)


def _fsync_dir(path: Path) -> None:
    if sys.platform == "win32":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HPCUploader(Uploader):
    """An ``[[upload]]`` target of type hpc."""

    type = "hpc"

    def __init__(self, target: UploadTarget, *, state_dir: Path, credentials: Credentials | None = None) -> None:
        super().__init__(target, state_dir=state_dir)
        self.root = Path(target.path)

    def digest(
        self, path: Path, *, check: Callable[[], None] = never, expect: tuple[int, int] | None = None
    ) -> LocalFile:
        """Only the whole-file SHA-256: a copy has no parts to checksum."""
        size = file_stat(path)[0]
        return digest_file(path, part_size=self.part_size_for(size), md5_parts=False, check=check, expect=expect)

    def reusable(self, local: LocalFile) -> bool:
        return True  # only the SHA-256 is needed

    def _dest(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    @staticmethod
    def _partial(dest: Path) -> Path:
        return dest.with_name(fit_name(f".{dest.name}", PARTIAL_SUFFIX))  # a 250-byte name still gets one

    def _os_error(self, e: OSError, what: str) -> UploadError:
        if isinstance(e, PermissionError):
            return self.permanent(
                f"permission denied to {what} ({e.strerror})", f"give the service's account write access to {self.root}"
            )
        if isinstance(e, (NotADirectoryError, IsADirectoryError)):
            return self.permanent(
                f"cannot {what}: {e.strerror}",
                f"upload.path must be a folder and keys must not clash with folders in {self.root}",
            )
        if e.errno == errno.ENOSPC:
            return self.transient(f"the share {self.root} is full", hint="free space there; uploads resume")
        return self.transient(f"cannot {what}: {e}", hint=f"is {self.root} reachable?")

    def _check_root(self) -> None:
        try:
            if self.root.is_dir():
                return
            exists = self.root.exists()
        except OSError as e:
            raise self._os_error(e, f"reach {self.root}") from None
        if exists:
            raise self.permanent(f"{self.root} is not a folder", "point upload.path at a folder on the share")
        raise self.transient(
            f"the folder {self.root} is not reachable (share offline or not mounted)",
            hint="mount it; uploads resume when it is back",
        )

    def probe(self, key: str) -> RemoteObject | None:
        self._check_root()
        try:
            st = self._dest(key).stat()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._os_error(e, f"read {self._dest(key)}") from None
        return RemoteObject(key=key, size=st.st_size)

    # -- small documents (fleet status) ---------------------------------------------

    def put_document(self, key: str, data: bytes) -> None:
        self._check_root()
        dest = self._dest(key)
        partial = self._partial(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(data)
            os.replace(partial, dest)  # readers see the old document or the new one, never half of it
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise self._os_error(e, f"write {dest}") from None

    def list_documents(self, prefix: str) -> list[str]:
        self._check_root()
        folder = self._dest(prefix.rstrip("/")) if prefix.strip("/") else self.root
        try:
            files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
        except FileNotFoundError:
            return []
        except OSError as e:
            raise self._os_error(e, f"list {folder}") from None
        return sorted(p.relative_to(self.root).as_posix() for p in files)

    def get_document(self, key: str) -> bytes | None:
        self._check_root()
        try:
            return self._dest(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._os_error(e, f"read {self._dest(key)}") from None

    def matches(self, remote: RemoteObject, local: LocalFile) -> bool:
        if remote.size != local.size:
            return False
        try:
            return _sha256(self._dest(remote.key)) == local.sha256
        except OSError as e:
            raise self._os_error(e, f"read {self._dest(remote.key)}") from None

    def discard(self, key: str, state: dict[str, Any]) -> None:
        self._partial(self._dest(key)).unlink(missing_ok=True)

    def remove(self, key: str) -> None:
        try:
            self._dest(key).unlink(missing_ok=True)
        except OSError as e:
            raise self._os_error(e, f"delete {self._dest(key)}") from None

    def upload(self, transfer: Transfer) -> str:
        t, local = transfer, transfer.local
        self._check_root()
        dest = self._dest(t.key)
        partial = self._partial(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            offset = partial.stat().st_size if partial.exists() else 0
        except OSError as e:
            raise self._os_error(e, f"create {dest.parent}") from None
        if offset > local.size:
            offset = 0
        with t.lock:
            t.state.clear()
            t.state["partial"] = partial.name
        t.persist(offset)
        t.between()
        with self.slots:
            self._copy(t, partial, offset)
        try:
            same = _sha256(partial) == local.sha256
            if not same:
                partial.unlink(missing_ok=True)
                raise IntegrityError(
                    self.name,
                    f"the copy of {local.path} at {partial} differs from the original",
                    hint="it is copied again",
                )
            os.replace(partial, dest)
            _fsync_dir(dest.parent)
            size = dest.stat().st_size
        except OSError as e:
            raise self._os_error(e, f"finish {dest}") from None
        if size != local.size:
            raise IntegrityError(self.name, f"{dest} has {size} bytes after the rename, expected {local.size}")
        with t.lock:
            t.state.clear()
        t.persist(local.size)
        return f"sha256:{local.sha256}"

    def _copy(self, t: Transfer, partial: Path, offset: int) -> None:
        done = offset
        last = time.monotonic()
        try:
            with open(t.local.path, "rb") as src, open(partial, "r+b" if offset else "wb") as dst:
                src.seek(offset)
                dst.seek(offset)
                dst.truncate()
                try:
                    while True:
                        t.check()
                        block = src.read(_COPY_CHUNK)
                        if not block:
                            break
                        self.throttle.consume(len(block), t.wait)
                        dst.write(block)
                        done += len(block)
                        if time.monotonic() - last > 1.0:
                            dst.flush()
                            t.persist(done)
                            last = time.monotonic()
                finally:
                    dst.flush()
                    os.fsync(dst.fileno())
                    t.persist(done)
        except OSError as e:
            raise self._os_error(e, f"write {partial}") from None
