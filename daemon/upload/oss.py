"""Aliyun OSS through oss2: resumable multipart with its checkpoint under the state folder.

``oss2.resumable_upload`` does the multipart work: its checkpoint (upload id,
part size, the file's size and mtime) lives in
``<state_dir>/upload-checkpoints/oss-<target>/``, never in the user profile
(a service account's profile may not even exist); on resume it asks the
server for the parts it holds and sends only the rest. Files up to one part
are a single PUT.

Each transfer gets a thin :class:`oss2.Bucket` subclass whose ``put_object``
and ``upload_part`` pass the body through the target's throttle, hold a
concurrency slot, honour stop/pause and record each finished part in the
store. oss2 checks the CRC-64 of every request it sends; after completion a
HEAD compares the object's size, its ``x-oss-meta-sha256`` and its
``x-oss-hash-crc64ecma`` with the local file's.

Stale state: a checkpoint whose upload id differs from the one the store
recorded, or that no unfinished upload uses any more (:meth:`OSSUploader.sweep`),
has its multipart upload aborted and is deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import oss2
from oss2 import exceptions as ox

from daemon.config import UploadTarget
from daemon.errors import UploadError
from daemon.logging import get_logger
from daemon.upload.base import (
    IntegrityError,
    Interrupted,
    LocalFile,
    RemoteObject,
    Transfer,
    Uploader,
    digest_file,
    file_stat,
)
from daemon.upload.credentials import Credentials, resolve_credentials
from daemon.upload.throttle import ThrottledStream

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


class _TransferBucket(oss2.Bucket):  # type: ignore[misc]  # oss2 ships no types: Bucket is Any
    """oss2.Bucket for one transfer: throttled, bounded, interruptible, recorded."""

    def __init__(self, owner: OSSUploader, transfer: Transfer, **kw: Any) -> None:
        super().__init__(**kw)
        self._owner = owner
        self._t = transfer

    def put_object(self, key: Any, data: Any, headers: Any = None, progress_callback: Any = None) -> Any:
        t, o = self._t, self._owner
        t.between()
        size = os.fstat(data.fileno()).st_size - data.tell() if hasattr(data, "fileno") else len(data)
        with o.slots:
            body = ThrottledStream(data, size, o.throttle, check=t.check, wait=t.wait)
            return super().put_object(key, body, headers=headers, progress_callback=progress_callback)

    def upload_part(
        self, key: Any, upload_id: str, part_number: int, data: Any, progress_callback: Any = None, headers: Any = None
    ) -> Any:
        t, o = self._t, self._owner
        t.between()
        with t.lock:
            if t.state.get("upload_id") != upload_id:
                t.state.update(upload_id=upload_id, parts={})
        with o.slots:
            body = ThrottledStream(data, data.len, o.throttle, check=t.check, wait=t.wait)
            result = super().upload_part(
                key, upload_id, part_number, body, progress_callback=progress_callback, headers=headers
            )
        with t.lock:
            t.state.setdefault("parts", {})[str(part_number)] = {
                "etag": result.etag,
                "size": data.len,
                "crc64": result.crc,
            }
            done = sum(p["size"] for p in t.state["parts"].values())
        t.persist(done)
        return result


class OSSUploader(Uploader):
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
        self.session = oss2.Session(pool_size=self.concurrency + 4)
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
        if remote.size != local.size or (remote.sha256 or "").lower() != local.sha256:
            return False
        if remote.checksum is None or local.crc64 is None:
            return remote.checksum is None
        return int(remote.checksum) == local.crc64

    # -- upload -----------------------------------------------------------------

    def _store_key(self, key: str, path: Path) -> str:
        return str(oss2.ResumableStore.make_store_key(self.target.bucket, key, os.path.abspath(path)))

    def upload(self, transfer: Transfer) -> str:
        t, local = transfer, transfer.local
        store_key = self._store_key(t.key, local.path)
        checkpoint = self.store.get(store_key)
        old = t.state.get("upload_id")
        if old and (checkpoint is None or checkpoint.get("upload_id") != old):
            self._abort(t.key, old)  # the store's upload is not the checkpoint's: an orphan
            with t.lock:
                t.state.clear()
        with t.lock:
            t.state["checkpoint"] = store_key
        bucket = self._bucket(_TransferBucket, self, t)
        try:
            oss2.resumable_upload(
                bucket,
                t.key,
                str(local.path),
                store=self.store,
                headers={"x-oss-meta-sha256": local.sha256},
                multipart_threshold=local.part_size + 1,
                part_size=local.part_size,
                num_threads=self.concurrency,
            )
        except (Interrupted, UploadError):
            raise
        except Exception as e:
            t.check()
            if isinstance(e, ox.NoSuchUpload):
                self._drop_checkpoint(store_key)
            raise self._classify(e, "upload") from None
        with t.lock:
            t.state.clear()
        t.persist(local.size)
        return self.verify(local, t.key)

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
