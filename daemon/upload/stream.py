"""The streaming multipart engine S3 and OSS share: read the file once, digest what is sent, resume by proof.

:class:`StreamingUploader` reads a file once, part by part in order
(:class:`~daemon.upload.base.PartReader`): the reading thread feeds the
whole-file digests (each in a thread of its own), each part's MD5 (and
SHA-256) is computed in the part's pool thread from the very bytes it
sends. A transfer holds at most ``concurrency`` parts in memory, and a
target's transfers together :data:`~daemon.upload.base.PART_BUFFER_BUDGET`
bytes. Content that is not what the transfer must carry (QC's SHA-256 for an
input) is never completed: the multipart upload is aborted.

Resumable state (``transfer.state``): the upload id, the part size, the
file's ``[size, mtime_ns]`` and, for each part stored, its ETag, size and
the MD5 of the bytes sent (plus what the store adds, e.g. OSS's CRC-64). On
resume the file is read from the start as always (the whole-file digests
need every byte); a part the server lists is kept, not sent, when its ETag
is the MD5 of the local bytes just read (or its SHA-256 checksum is theirs,
or, for ETags that are no MD5, the MD5 recorded when it was sent is theirs).
A file changed since (size or mtime) starts a new upload; a server that
refuses to replace a stored part that differs (rclone) gets a new upload.

A store implements the hooks: :meth:`_create`, :meth:`_send_part`,
:meth:`_complete`, :meth:`_list_parts`, :meth:`_abort`, :meth:`_abort_others`,
and says which digests it needs (:meth:`_digests_wanted`).
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from abc import abstractmethod
from concurrent.futures import Future, wait
from dataclasses import replace
from typing import Any

from daemon.errors import TransientUploadError, UploadError
from daemon.logging import get_logger
from daemon.upload.base import (
    ContentChanged,
    InputChanged,
    IntegrityError,
    Interrupted,
    PartReader,
    Transfer,
    Uploader,
)
from daemon.upload.pool import DaemonPool
from daemon.upload.throttle import BufferBody

__all__ = ["MD5_ETAG", "Listed", "StreamingUploader", "b64"]

log = get_logger("imageqc.upload")

#: An MD5 ETag (hex, lower case), or a multipart composite ("<md5>-<parts>").
MD5_ETAG = re.compile(r"^[0-9a-f]{32}(-\d+)?$")
#: A part the server lists: (ETag in lower case, size, SHA-256 checksum in base64 or None).
Listed = tuple[str, int, str | None]


def b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _precedence(e: BaseException) -> int:
    """Which of several part failures a transfer reports: a stop, the file, the data, then the rest."""
    for rank, kind in enumerate((Interrupted, InputChanged, _ReplaceRefused, IntegrityError)):
        if isinstance(e, kind):
            return rank
    return 9


class _ReplaceRefused(Exception):
    """Resuming, a part the server holds is not the local bytes and the server refuses to replace it (rclone)."""

    def __init__(self, part: int, error: UploadError) -> None:
        super().__init__(f"part {part}: {error}")
        self.part = part
        self.error = error


class StreamingUploader(Uploader):
    """An uploader whose multipart uploads stream the file once (S3, OSS)."""

    streams = True
    #: The pool the parts run in (``concurrency`` threads); set by the subclass.
    pool: DaemonPool
    #: Part SHA-256 checksums (x-amz-checksum-sha256), when the target sends them.
    sha256_parts: bool = False

    # -- hooks ------------------------------------------------------------------------

    @abstractmethod
    def _create(self, t: Transfer) -> str:
        """Start a multipart upload for ``t.key``; its id."""

    @abstractmethod
    def _send_part(
        self, t: Transfer, upload_id: str, n: int, body: BufferBody, length: int, md5: str | None, sha256: str | None
    ) -> dict[str, Any]:
        """Send part ``n``; its record (``etag`` and whatever :meth:`_complete` needs). Checks the server's answer."""

    @abstractmethod
    def _complete(self, t: Transfer, upload_id: str, parts: list[dict[str, Any]]) -> None:
        """Complete the upload from the parts' records, in part order."""

    @abstractmethod
    def _list_parts(self, key: str, upload_id: str) -> dict[int, Listed] | None:
        """Parts the server holds, or None when the upload is gone."""

    @abstractmethod
    def _abort(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload (a gone one is no error)."""

    @abstractmethod
    def _put_bytes(self, t: Transfer, data: bytes, sha256: str) -> None:
        """Store the whole file (``data``, read once; ``sha256`` its digest, already checked) in one request."""

    def _abort_others(self, key: str, keep: str | None) -> None:
        """Abort this key's multipart uploads other than ``keep`` (orphans of a crash)."""

    def _digests_wanted(self) -> tuple[bool, bool]:
        """``(whole-file MD5, part MD5s)`` this store needs while sending."""
        return False, True

    def _held_record(self, t: Transfer, etag: str, data: bytes) -> dict[str, Any]:
        """The record of a part kept from the server (the store may add what it needs of the bytes)."""
        return {"etag": etag}

    def _upload_tag(self) -> dict[str, Any]:
        """What else a multipart upload is started with and a resumed one must share (S3: the part checksum)."""
        return {}

    # -- shared -------------------------------------------------------------------------

    def _put(self, t: Transfer) -> None:
        """A file up to one part: read once into memory (within the target's read-ahead budget), checked, sent."""
        size = t.local.size
        t.between()
        while not self.buffers.acquire(size, timeout=0.2):
            t.check()
        try:
            with PartReader(replace(t.local, part_size=max(1, size)), check=t.check) as reader:
                data = reader.read(1)
                sha256, _ = reader.finish()
            self._expected(t, sha256)
            self._put_bytes(t, data, sha256)
        finally:
            self.buffers.release(size)

    def _body(self, t: Transfer, data: bytes) -> BufferBody:
        return BufferBody(data, self.throttle, check=t.check, wait=t.wait)

    def _expected(self, t: Transfer, sha256: str) -> None:
        """Raise unless the content read is what the transfer must carry (QC's content, or earlier digests)."""
        if t.expect_sha256 is not None and sha256 != t.expect_sha256:
            raise ContentChanged(t.local.path, "changed after QC (content differs, same size and time)")
        if t.local.digested and sha256 != t.local.sha256:
            raise InputChanged(t.local.path, "changed since it was digested (content differs)")

    def _multipart(self, t: Transfer) -> None:
        """Create or resume the multipart upload, stream the file through it once, complete it.

        Resumable state (``transfer.state``): the upload id, the part size,
        the file's ``[size, mtime_ns]`` and, for each part stored, its ETag,
        size and the MD5 of the bytes sent. On resume the file is read from
        the start as always (the whole-file digests need every byte); a part
        the server lists is kept, not sent, when its ETag is the MD5 of the
        local bytes just read (or its SHA-256 checksum is theirs, or, for
        ETags that are no MD5, the recorded MD5 is theirs and the server still
        lists the recorded ETag).
        """
        local, key, st = t.local, t.key, t.state
        identity = [local.size, local.mtime_ns]
        upload_id = st.get("upload_id")
        tag = self._upload_tag()
        same = (
            st.get("part_size") == local.part_size
            and st.get("file", identity) == identity
            and all(st.get(k) == v for k, v in tag.items())
        )
        if upload_id and not same:
            self._abort(key, upload_id)  # planned with another part size, or the file changed since
            upload_id = None
        recorded: dict[str, dict[str, Any]] = dict(st.get("parts") or {}) if upload_id else {}
        server: dict[int, Listed] = {}
        if upload_id:
            listed = self._list_parts(key, upload_id)
            if listed is None:
                log.info(
                    "multipart upload gone from the server; starting again",
                    target=self.name,
                    key=key,
                    upload_id=upload_id,
                )
                upload_id = None
                recorded = {}
            else:
                server = listed
        self._abort_others(key, keep=upload_id)
        if upload_id is None:
            t.between()
            upload_id = self._create(t)
            tag = self._upload_tag()  # what the upload was created with (a server may have refused a checksum)
        with t.lock:
            st.clear()
            st.update(upload_id=upload_id, part_size=local.part_size, file=identity, parts={}, **tag)
        t.persist(0)
        if server:
            log.debug("resuming", target=self.name, key=key, parts_on_server=len(server), of=local.parts)
        try:
            sha256, whole_md5, part_md5, part_sha = self._stream_parts(t, upload_id, server, recorded)
            self._expected(t, sha256)
        except (InputChanged, ContentChanged):
            self._abort(key, upload_id)  # nothing of a file that is not what it must be is ever completed
            with t.lock:
                st.clear()
            t.persist(0)
            raise
        except _ReplaceRefused as e:
            if not server:
                raise e.error from None
            log.info(
                "the server refuses to replace a stored part that differs from the file; starting the upload again",
                target=self.name,
                key=key,
                part=e.part,
                error=str(e.error),
            )
            self._abort(key, upload_id)
            with t.lock:
                st.clear()
            t.persist(0)
            self._multipart(t)  # a new upload: its own server parts are none, so this happens once
            return
        t.local = replace(local, sha256=sha256, part_md5=tuple(part_md5), part_sha256=tuple(part_sha), md5=whole_md5)
        try:
            self._complete(t, upload_id, [st["parts"][str(n)] for n in range(1, local.parts + 1)])
        except TransientUploadError:
            if self._list_parts(key, upload_id) is None and self.probe(key) is None:
                with t.lock:
                    st.clear()
                t.persist(0)
                raise self.transient(
                    f"multipart upload of {key} vanished before it was completed", "it starts again"
                ) from None
            raise
        with t.lock:
            st.clear()
        t.persist(local.size)

    def _stream_parts(
        self,
        t: Transfer,
        upload_id: str,
        server: dict[int, Listed],
        recorded: dict[str, dict[str, Any]],
    ) -> tuple[str, str | None, list[str], list[str]]:
        """Read every part once, in order; send those the server lacks, from the bytes read.

        The reading thread (this one) feeds the whole-file digests; each part's
        MD5 (and SHA-256) is computed in the part's pool thread from the bytes
        it sends. A transfer holds at most ``concurrency`` parts, and the target's
        transfers together :data:`~daemon.upload.base.PART_BUFFER_BUDGET` bytes.
        Returns the file's SHA-256 and MD5 (None unless wanted) and the part
        MD5s and SHA-256s in part order.
        """
        local, st = t.local, t.state
        n_parts = local.parts
        whole_md5, part_md5s = self._digests_wanted()
        part_md5: list[str] = [""] * n_parts
        part_sha: list[str] = [""] * n_parts if self.sha256_parts else []
        room = threading.Semaphore(self.concurrency)
        halt = threading.Event()

        def one(n: int, data: bytes) -> None:
            try:
                if halt.is_set():
                    return
                md5 = hashlib.md5(data, usedforsecurity=False).hexdigest() if part_md5s or n in server else None
                sha = hashlib.sha256(data).hexdigest() if self.sha256_parts else None
                record = self._held(t, server.get(n), recorded.get(str(n)), data, md5, sha)
                if record is None:
                    t.between()
                    with self.slots:
                        body = self._body(t, data)
                        try:
                            record = self._send_part(t, upload_id, n, body, len(data), md5, sha)
                        except UploadError as e:
                            if n in server:  # a stored part that is not the local bytes, and the server keeps it
                                raise _ReplaceRefused(n, e) from e
                            raise
                        finally:
                            body.close()
                if md5 is not None:
                    part_md5[n - 1] = md5
                if sha is not None:
                    part_sha[n - 1] = sha
                with t.lock:
                    st["parts"][str(n)] = {**record, "size": len(data), **({"md5": md5} if md5 else {})}
                    done = sum(p["size"] for p in st["parts"].values())
                t.persist(done)
            except BaseException:
                halt.set()
                raise
            finally:
                self.buffers.release(len(data))
                room.release()

        futures: list[Future[None]] = []
        first: BaseException | None = None
        whole: tuple[str, str | None] = ("", None)
        try:
            with PartReader(local, whole_md5=whole_md5, check=t.check) as reader:
                for n in range(1, n_parts + 1):
                    size = local.part_range(n)[1]
                    if not self._room(room, halt, t, size):
                        break
                    try:
                        futures.append(self.pool.submit(one, n, reader.read(n)))
                    except BaseException:
                        self.buffers.release(size)
                        room.release()
                        raise
                wait(futures)
                if not halt.is_set():
                    whole = reader.finish()
        except BaseException as e:
            first = e
            halt.set()
        wait(futures)
        errors = [e for e in [first, *(f.exception() for f in futures)] if e is not None]
        if errors:
            raise min(errors, key=_precedence)
        return whole[0], whole[1], part_md5 if part_md5s else [], part_sha

    def _room(self, room: threading.Semaphore, halt: threading.Event, t: Transfer, size: int) -> bool:
        """Wait until one more part may be read: a request slot of this transfer's and ``size`` bytes of the
        target's read-ahead budget. False when the transfer is failing."""
        while not room.acquire(timeout=0.2):
            t.check()
            if halt.is_set():
                return False
        while not self.buffers.acquire(size, timeout=0.2):
            if halt.is_set():
                room.release()
                return False
            try:
                t.check()
            except BaseException:
                room.release()
                raise
        if halt.is_set():
            self.buffers.release(size)
            room.release()
            return False
        return True

    def _held(
        self,
        t: Transfer,
        listed: Listed | None,
        recorded: dict[str, Any] | None,
        data: bytes,
        md5: str | None,
        sha256: str | None,
    ) -> dict[str, Any] | None:
        """The record of a part the server already holds with exactly these bytes, else None (send it)."""
        if listed is None or listed[1] != len(data):
            return None
        etag, _, checksum = listed
        if MD5_ETAG.match(etag.lower()):  # OSS: upper case
            same = etag.lower() == md5
        elif sha256 is not None and checksum is not None:
            same = checksum == b64(sha256)
        else:
            rec = recorded or {}
            same = md5 is not None and rec.get("etag") == etag and rec.get("md5") == md5
        return self._held_record(t, etag, data) if same else None
