"""Aliyun OSS through oss2: the file read once while it is sent, each part's CRC-64 checked by oss2.

The multipart work is the streaming engine S3 uses (:mod:`daemon.upload.stream`):
the file is read once, part by part in order; its SHA-256 is accumulated as
it is read, and each part goes from the bytes read. oss2 (``enable_crc``)
computes the CRC-64 of every request body it sends and compares it with the
server's ``x-oss-hash-crc64ecma``; the parts' CRC-64s combine into the
object's, which oss2 compares with the one the completion answers: that
proves the object (a HEAD compares it only when the completion named none,
and after a single PUT). No part MD5s are computed (the CRC-64s do that work), except to prove
the parts a resumed upload finds on the server (ListParts ETags are the part
MD5s). Files up to one part are a single PUT, with the file's SHA-256 as
``x-oss-meta-sha256``; a multipart object carries none (it is known only
after the last part; the upload record keeps it, and an input's is compared
with QC's before the upload is completed) and ``x-oss-meta-part-size``.
Request bodies go out in 1 MiB blocks (:data:`SEND_BLOCK`; urllib3 reads
16 KiB by default), each paid to the throttle and checked for a stop.

Resumable state lives in the job database as for S3 (upload id, part size,
the file's size and mtime, each part's ETag, size and CRC-64). Checkpoints
that oss2's ``resumable_upload`` left under
``<state_dir>/upload-checkpoints/oss-<target>/`` (earlier versions) are swept
with their multipart uploads (:meth:`OSSUploader.sweep`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import oss2
import requests.adapters
from oss2 import exceptions as ox
from oss2.models import PartInfo
from oss2.utils import Crc64, calc_obj_crc_from_parts

from daemon.config import UploadTarget
from daemon.errors import UploadError
from daemon.logging import get_logger
from daemon.upload.base import (
    IntegrityError,
    Interrupted,
    LocalFile,
    RemoteObject,
    Transfer,
    digest_file,
    file_stat,
)
from daemon.upload.credentials import Credentials, resolve_credentials
from daemon.upload.pool import DaemonPool
from daemon.upload.stream import Listed, StreamingUploader
from daemon.upload.throttle import BufferBody

__all__ = ["OSSUploader"]

log = get_logger("imageqc.upload.oss")


def _not_an_interruption(record: logging.LogRecord) -> bool:
    """oss2's task queue logs every exception of a part thread; ours report stops themselves."""
    return Interrupted.__name__ not in record.getMessage()


logging.getLogger("oss2.task_queue").addFilter(_not_an_interruption)

_PERMANENT_CODES = {
    "InvalidAccessKeyId": "the server does not know the access key id (InvalidAccessKeyId)",
    "SignatureDoesNotMatch": "the secret does not match the access key id (SignatureDoesNotMatch)",
    "InvalidBucketName": "the bucket name is not valid (InvalidBucketName)",
    "RequestTimeTooSkewed": "this PC's clock is too far off for the server (RequestTimeTooSkewed)",
    "SecurityTokenExpired": "the STS security token has expired",
}


#: Bytes a request body is read and sent in (urllib3's default is 16 KiB): oss2's CRC-64 and our throttled,
#: interruptible part body then do their Python work once per MiB, not 64 times.
SEND_BLOCK = 1 << 20


class _LargeBlocks(requests.adapters.HTTPAdapter):
    """oss2's connection pools, with request bodies sent in :data:`SEND_BLOCK` blocks."""

    def init_poolmanager(self, *args: Any, **pool_kwargs: Any) -> None:
        super().init_poolmanager(*args, **{**pool_kwargs, "blocksize": SEND_BLOCK})


class OSSUploader(StreamingUploader):
    """An ``[[upload]]`` target of type oss."""

    type = "oss"

    def __init__(self, target: UploadTarget, *, state_dir: Path, credentials: Credentials | None = None) -> None:
        super().__init__(target, state_dir=state_dir)
        creds = credentials if credentials is not None else resolve_credentials(target)
        if not creds.access_key_id or not creds.secret:
            raise self.permanent(
                "no OSS access key found", "set OSS_ACCESS_KEY_ID/OSS_ACCESS_KEY_SECRET or upload.credentials"
            )
        self.creds = creds
        version = "v4" if target.region else "v1"
        if creds.token:
            self.auth: Any = oss2.StsAuth(creds.access_key_id, creds.secret, creds.token, auth_version=version)
        else:
            self.auth = (
                oss2.AuthV4(creds.access_key_id, creds.secret)
                if version == "v4"
                else oss2.Auth(creds.access_key_id, creds.secret)
            )
        pool = self.concurrency + 4
        self.session = oss2.Session(adapter=_LargeBlocks(pool_connections=pool, pool_maxsize=pool))
        self.pool = DaemonPool(self.concurrency, f"upload-{target.name}-parts")
        self.session.session.verify = target.verify_tls
        self.checkpoints = self.state_dir / "upload-checkpoints" / f"oss-{target.name}"
        self.store = oss2.ResumableStore(root=str(self.checkpoints.parent), dir=self.checkpoints.name)
        self.bucket = self._bucket(oss2.Bucket)

    def _bucket(self, cls: Any, *args: Any) -> Any:
        kw = dict(
            auth=self.auth,
            endpoint=self.target.endpoint,
            bucket_name=self.target.bucket,
            session=self.session,
            connect_timeout=self.target.timeout_s,
            enable_crc=True,
            app_name="imageqc",
            region=self.target.region or None,
        )
        return cls(*args, **kw)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)  # a part stuck in a request is abandoned, not joined
        self.session.session.close()

    def digest(self, path: Path, *, check: Any = lambda: None, expect: tuple[int, int] | None = None) -> LocalFile:
        size = file_stat(path)[0]
        return digest_file(
            path, part_size=self.part_size_for(size), md5_parts=False, crc64=True, check=check, expect=expect
        )

    def reusable(self, local: LocalFile) -> bool:
        return local.part_size == self.part_size_for(local.size) and local.crc64 is not None

    # -- errors -------------------------------------------------------------

    def _classify(self, e: Exception, op: str) -> UploadError:
        where = f"{self.target.endpoint} bucket {self.target.bucket!r}"
        cred_hint = (
            f"check the keys ({self.creds.source}; upload.credentials = {self.target.credentials or chr(39) * 2}) "
            f"and that {self.target.endpoint} is the bucket's endpoint"
        )
        if isinstance(e, ox.InconsistentError):
            return IntegrityError(
                self.name, f"{op}: CRC-64 of what was sent and what OSS stored differ", hint="it is sent again"
            )
        if isinstance(e, ox.RequestError):
            return self.transient(f"{op} failed: network error ({e})", hint=f"is {self.target.endpoint} reachable?")
        if isinstance(e, ox.OssError):
            code, status = e.code or "", int(e.status or 0)
            if code in _PERMANENT_CODES:
                return self.permanent(
                    _PERMANENT_CODES[code],
                    cred_hint if "Key" in code or "Signature" in code or "Token" in code else "set the clock right",
                )
            if code == "NoSuchBucket":
                return self.permanent(
                    f"bucket does not exist at {where}", "create it, or correct upload.bucket and endpoint"
                )
            if code == "AccessDenied" or status == 403:
                why = "" if code else ": wrong access key or secret, or keys without permission"
                return self.permanent(
                    f"access denied to {where} ({code or 'HTTP 403'}){why}",
                    f"{cred_hint}; the keys need oss:PutObject, oss:GetObject, oss:ListParts and oss:AbortMultipartUpload",
                )
            if (
                status >= 500
                or status in (408, 429)
                or code in ("RequestTimeout", "InvalidDigest", "InvalidPart", "NoSuchUpload")
            ):
                return self.transient(f"{op} failed: {code or status} {e.message}")
            if status > 0:
                return self.permanent(
                    f"{op} refused by OSS: {code or status} {e.message}",
                    "check the target's settings (bucket, prefix, endpoint)",
                )
        return self.transient(f"{op} failed: {type(e).__name__}: {e}", hint=f"is {self.target.endpoint} reachable?")

    # -- small documents (fleet status) ---------------------------------------------

    def put_document(self, key: str, data: bytes) -> None:
        try:
            self.bucket.put_object(key, data, headers={"Content-Type": "application/json"})
        except Exception as e:
            raise self._classify(e, "PutObject") from None

    def list_documents(self, prefix: str) -> list[str]:
        try:
            return sorted(o.key for o in oss2.ObjectIterator(self.bucket, prefix=prefix))
        except Exception as e:
            raise self._classify(e, "ListObjects") from None

    def get_document(self, key: str) -> bytes | None:
        try:
            return bytes(self.bucket.get_object(key).read())
        except ox.NoSuchKey:
            return None
        except Exception as e:
            raise self._classify(e, "GetObject") from None

    # -- probe and verify --------------------------------------------------------

    def probe(self, key: str) -> RemoteObject | None:
        try:
            h = self.bucket.head_object(key)
        except ox.NotFound:
            return None
        except Exception as e:
            raise self._classify(e, "HeadObject") from None
        crc = h.headers.get("x-oss-hash-crc64ecma")
        return RemoteObject(
            key=key, size=int(h.content_length or 0), sha256=h.headers.get("x-oss-meta-sha256"), checksum=crc
        )

    def matches(self, remote: RemoteObject, local: LocalFile) -> bool:
        if remote.size != local.size:
            return False
        if remote.sha256 is not None and remote.sha256.lower() != local.sha256:
            return False
        if remote.checksum is not None and local.crc64 is not None:
            return int(remote.checksum) == local.crc64
        return remote.sha256 is not None and remote.checksum is None  # no CRC-64 on the server: the SHA-256 vouches

    # -- upload -----------------------------------------------------------------

    def _store_key(self, key: str, path: Path) -> str:
        return str(oss2.ResumableStore.make_store_key(self.target.bucket, key, os.path.abspath(path)))

    def _oss(self, op: str, t: Transfer | None, *args: Any, **kw: Any) -> Any:
        """``self.bucket.<op>(*args, **kw)`` with errors classified; a stop raised inside a body stays a stop."""
        try:
            return getattr(self.bucket, op)(*args, **kw)
        except (Interrupted, UploadError):
            raise
        except Exception as e:
            inner = getattr(e, "exception", None)
            if isinstance(inner, Interrupted):
                raise inner from None
            if t is not None:
                t.check()
            raise self._classify(e, op) from None

    def upload(self, transfer: Transfer) -> str:
        t = transfer
        t.proved = None
        if t.state.get("checkpoint"):  # left by oss2's resumable_upload (an earlier version): not resumed
            self.discard(t.key, t.state)
            with t.lock:
                t.state.clear()
        if t.local.size <= t.local.part_size:
            self._put(t)
        else:
            self._multipart(t)
        return self._verify_stored(t)

    def _verify_stored(self, t: Transfer) -> str:
        """HEAD the new object: size, and its CRC-64 against the one of the bytes sent; a mismatch is deleted.

        A multipart upload whose completion answered the object's CRC-64 was proved then (no HEAD)."""
        if t.proved is not None:
            return t.proved
        try:
            return self.verify(t.local, t.key)
        except IntegrityError:
            with contextlib.suppress(UploadError):
                if self.probe(t.key) is not None:
                    self.remove(t.key)  # just stored by this transfer: never left behind as if it were the file
            raise

    def _put_bytes(self, t: Transfer, data: bytes, sha256: str) -> None:
        local = t.local
        with self.slots:
            body = self._body(t, data)
            try:
                result = self._oss("put_object", t, t.key, body, headers={"x-oss-meta-sha256": sha256})
            finally:
                body.close()
        t.local = replace(local, sha256=sha256, crc64=int(result.crc) if result.crc is not None else None)
        t.persist(local.size)

    def _create(self, t: Transfer) -> str:
        headers = {"x-oss-meta-part-size": str(t.local.part_size)}
        return str(self._oss("init_multipart_upload", t, t.key, headers=headers).upload_id)

    def _digests_wanted(self) -> tuple[bool, bool]:
        return False, False  # oss2 checks each part's CRC-64; MD5s only to prove parts found on resume

    def _send_part(
        self, t: Transfer, upload_id: str, n: int, body: BufferBody, length: int, md5: str | None, sha256: str | None
    ) -> dict[str, Any]:
        result = self._oss("upload_part", t, t.key, upload_id, n, body)
        return {"etag": result.etag, "crc64": int(result.crc)}

    def _held_record(self, t: Transfer, etag: str, data: bytes) -> dict[str, Any]:
        crc = Crc64(0)
        crc.update(data)
        return {"etag": etag, "crc64": int(crc.crc)}

    def _complete(self, t: Transfer, upload_id: str, parts: list[dict[str, Any]]) -> None:
        infos = [PartInfo(n, rec["etag"], size=rec["size"], part_crc=rec["crc64"]) for n, rec in enumerate(parts, 1)]
        result = self._oss("complete_multipart_upload", t, t.key, upload_id, infos)
        crc = int(calc_obj_crc_from_parts(infos))
        t.local = replace(t.local, crc64=crc)
        if result.crc is not None and int(result.crc) == crc:
            # the server's CRC-64 of the object it assembled is the one the parts sent make (oss2 raises
            # InconsistentError otherwise): proved, no HEAD needed
            t.proved = str(crc)

    def _list_parts(self, key: str, upload_id: str) -> dict[int, Listed] | None:
        try:
            return {
                int(p.part_number): (str(p.etag).strip('"'), int(p.size), None)
                for p in oss2.PartIterator(self.bucket, key, upload_id)
            }
        except ox.NoSuchUpload:
            return None
        except Exception as e:
            raise self._classify(e, "ListParts") from None

    def _abort_others(self, key: str, keep: str | None) -> None:
        try:
            uploads = [u for u in oss2.MultipartUploadIterator(self.bucket, prefix=key) if u.key == key]
        except Exception as e:
            log.debug("cannot list multipart uploads", target=self.name, key=key, error=str(e))
            return
        for u in uploads:
            if u.upload_id != keep:
                self._abort(key, u.upload_id)

    def remove(self, key: str) -> None:
        try:
            self.bucket.delete_object(key)
        except Exception as e:
            raise self._classify(e, "DeleteObject") from None

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.bucket.abort_multipart_upload(key, upload_id)
            log.info("aborted multipart upload", target=self.name, key=key, upload_id=upload_id)
        except ox.NoSuchUpload:
            pass
        except ox.OssError as e:
            log.warning(
                "could not abort multipart upload",
                target=self.name,
                key=key,
                upload_id=upload_id,
                error=str(e.message or e),
            )

    def _drop_checkpoint(self, store_key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.store.delete(store_key)

    def discard(self, key: str, state: dict[str, Any]) -> None:
        if state.get("upload_id"):
            self._abort(key, state["upload_id"])
        if state.get("checkpoint"):
            self._drop_checkpoint(state["checkpoint"])

    def sweep(self, active: set[str], *, older_than_s: float = 0.0, now: float | None = None) -> list[str]:
        """Abort and delete checkpoints that no unfinished upload uses (``active``: store keys)."""
        now = time.time() if now is None else now
        removed: list[str] = []
        if not self.checkpoints.is_dir():
            return removed
        for p in self.checkpoints.iterdir():
            if p.name in active or now - p.stat().st_mtime < older_than_s:
                continue
            try:
                record = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                record = {}
            if record.get("upload_id") and record.get("key"):
                self._abort(record["key"], record["upload_id"])
            p.unlink(missing_ok=True)
            removed.append(p.name)
        return removed
