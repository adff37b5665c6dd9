"""AWS S3 and S3-compatible stores (MinIO, Ceph, rclone...) through boto3.

Files up to one part are a single PUT; larger ones a multipart upload whose
id and part ETags are saved (``transfer.state``) after every part. A resumed
upload asks the server which parts it holds (ListParts) and keeps those whose
ETag equals the local part's MD5, so after a kill only the missing parts are
sent. Other multipart uploads of the same key (left by a crash before the id
was saved) are aborted.

Integrity: every part carries Content-MD5 (and, on AWS or with
``checksum = "sha256"``, x-amz-checksum-sha256); the object carries the
file's SHA-256 as metadata ``sha256``; after completion a HEAD compares
size, that SHA-256 and the ETag (the multipart composite, or the whole-file
MD5 some servers report).

Checksum settings that keep non-AWS endpoints working: botocore's default
CRC32 trailers (aws-chunked bodies) are switched off
(``request_checksum_calculation="when_required"``,
``response_checksum_validation="when_required"``); payloads are not
SHA-256-signed (``payload_signing_enabled=False``: Content-MD5 covers them
and the body is read once, through the throttle); botocore's own retries are
off, ours apply.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import re
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from pathlib import Path
from typing import Any, Literal, cast

from daemon.config import UploadTarget
from daemon.errors import TransientUploadError, UploadError
from daemon.logging import get_logger, register_secret
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
from daemon.upload.pool import DaemonPool
from daemon.upload.throttle import FileSlice

__all__ = ["S3Uploader"]

log = get_logger("imageqc.upload.s3")

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}(-\d+)?$")
_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "BadDigest",
    "InvalidDigest",
    "XAmzContentSHA256Mismatch",
    "InvalidPart",
    "InvalidPartOrder",
    "OperationAborted",
    "RequestTimeoutException",
    "IncompleteBody",
}
#: The server saw a body that is not the one the digests were computed from (retried; the file is checked).
_DIGEST_CODES = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"}
_PERMS = "s3:PutObject, s3:GetObject, s3:ListBucketMultipartUploads and s3:AbortMultipartUpload"


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _plain(etag: str | None) -> str:
    return (etag or "").strip().strip('"').lower()


def composite_etag(part_md5: tuple[str, ...]) -> str:
    """The ETag S3 gives a multipart object: MD5 of the part MD5s, dash, part count."""
    joined = b"".join(bytes.fromhex(m) for m in part_md5)
    return f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(part_md5)}"


class S3Uploader(Uploader):
    """An ``[[upload]]`` target of type s3."""

    type = "s3"

    def __init__(self, target: UploadTarget, *, state_dir: Path, credentials: Credentials | None = None) -> None:
        super().__init__(target, state_dir=state_dir)
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import BotoCoreError

        self.creds = credentials if credentials is not None else resolve_credentials(target)
        self.sha256_parts = target.checksum == "sha256" or (target.checksum == "auto" and not target.endpoint)
        try:
            session = boto3.session.Session(
                aws_access_key_id=self.creds.access_key_id,
                aws_secret_access_key=self.creds.secret,
                aws_session_token=self.creds.token,
                profile_name=self.creds.profile,
                region_name=target.region or None,
            )
            found = session.get_credentials()
        except BotoCoreError as e:  # ProfileNotFound and friends
            raise self.permanent(f"cannot load credentials ({e})", self._cred_hint()) from None
        if found is not None:
            frozen = found.get_frozen_credentials()
            register_secret(frozen.secret_key)
            register_secret(frozen.token)
        cfg = BotoConfig(
            # the config allows only these three: the cast names them for botocore's typed dict
            s3={
                "addressing_style": cast(Literal["auto", "virtual", "path"], target.addressing_style),
                "payload_signing_enabled": False,
            },
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=target.timeout_s,
            read_timeout=target.timeout_s,
            max_pool_connections=target.concurrency + 4,
            user_agent_extra="imageqc",
        )
        self.client = session.client("s3", endpoint_url=target.endpoint or None, verify=target.verify_tls, config=cfg)
        self.bucket = target.bucket
        self.pool = DaemonPool(target.concurrency, f"upload-{target.name}-parts")
        self._md5_cache: collections.OrderedDict[tuple[str, int, int, str], str] = collections.OrderedDict()
        self._cache_lock = threading.Lock()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)  # a part stuck in a request is abandoned, not joined
        self.client.close()

    def digest(self, path: Path, *, check: Any = lambda: None, expect: tuple[int, int] | None = None) -> LocalFile:
        size = file_stat(path)[0]
        return digest_file(
            path, part_size=self.part_size_for(size), sha256_parts=self.sha256_parts, check=check, expect=expect
        )

    def reusable(self, local: LocalFile) -> bool:
        return super().reusable(local) and (not self.sha256_parts or len(local.part_sha256) == local.parts)

    # -- errors -------------------------------------------------------------

    def _cred_hint(self) -> str:
        spec = self.target.credentials or "''"
        return (
            f"check the keys ({self.creds.source}; upload.credentials = {spec}) "
            f"and that endpoint {self.target.endpoint or 'AWS'} is the right server"
        )

    def _classify(self, e: Exception, op: str) -> UploadError:
        from botocore.exceptions import (
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
            SSLError,
        )

        where = self.target.endpoint or "AWS"
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            msg = err.get("Message") or code
            if code == "InvalidAccessKeyId":
                return self.permanent(
                    "the server does not know the access key id (InvalidAccessKeyId)", self._cred_hint()
                )
            if code == "SignatureDoesNotMatch":
                return self.permanent(
                    "the secret key does not match the access key id (SignatureDoesNotMatch)", self._cred_hint()
                )
            if code == "NoSuchBucket":
                return self.permanent(
                    f"bucket {self.bucket!r} does not exist at {where}",
                    "create it, or correct upload.bucket, endpoint and region",
                )
            if (
                code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException")
                or status == 301
            ):
                return self.permanent(
                    f"bucket {self.bucket!r} is in another region ({code or status})",
                    "set upload.region to the bucket's region",
                )
            if code == "RequestTimeTooSkewed":
                return self.permanent(
                    "this PC's clock is too far off for the server (RequestTimeTooSkewed)",
                    "set the clock right (enable time synchronisation)",
                )
            if (
                code in ("AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidToken", "ExpiredToken")
                or status == 403
            ):
                why = ": wrong access key or secret, or keys without permission" if code in ("", "403") else ""
                return self.permanent(
                    f"access denied to bucket {self.bucket!r} at {where} ({code or 403}){why}",
                    f"{self._cred_hint()}; the keys need {_PERMS} on the bucket",
                )
            if code in _DIGEST_CODES:
                return IntegrityError(
                    self.name,
                    f"{op}: the server found the body does not match its digest ({code})",
                    hint="it is sent again",
                )
            if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
                return self.transient(f"{op} failed: {code or status} {msg}")
            return self.permanent(
                f"{op} refused by the server: {code or status} {msg}",
                "check the target's settings (bucket, prefix, region)",
            )
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return self.permanent(
                f"no credentials found ({e})",
                "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for the service, use ~/.aws/credentials, or set upload.credentials",
            )
        if isinstance(e, SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(e):
            return self.permanent(
                f"the TLS certificate of {where} is not trusted",
                "install the CA certificate, or for a lab endpoint set verify_tls = false",
            )
        return self.transient(f"{op} failed: {type(e).__name__}: {e}", hint=f"is {where} reachable?")

    def _call(self, op: str, transfer: Transfer | None = None, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError

        try:
            return getattr(self.client, op)(Bucket=self.bucket, **kw)
        except Interrupted:
            raise
        except HTTPClientError as e:
            inner = e.kwargs.get("error")
            if isinstance(inner, Interrupted):
                raise inner from None
            if transfer is not None:
                transfer.check()
            raise self._classify(e, op) from None
        except (ClientError, BotoCoreError) as e:
            if transfer is not None:
                transfer.check()
            raise self._classify(e, op) from None

    # -- small documents (fleet status) ---------------------------------------------

    def put_document(self, key: str, data: bytes) -> None:
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        self._call("put_object", Key=key, Body=data, ContentType="application/json", ContentMD5=_b64(md5))

    def list_documents(self, prefix: str) -> list[str]:
        keys: list[str] = []
        kw: dict[str, Any] = {"Prefix": prefix}
        while True:
            page = self._call("list_objects_v2", **kw)
            keys += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(keys)
            kw["ContinuationToken"] = page["NextContinuationToken"]

    def get_document(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._classify(e, "GetObject") from None
        except Exception as e:
            raise self._classify(e, "GetObject") from None

    # -- probe and verify --------------------------------------------------------

    def probe(self, key: str) -> RemoteObject | None:
        from botocore.exceptions import ClientError

        try:
            h = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if status == 404:
                return None
            raise self._classify(e, "HeadObject") from None
        except Exception as e:
            raise self._classify(e, "HeadObject") from None
        meta = {k.lower(): v for k, v in (h.get("Metadata") or {}).items()}
        return RemoteObject(
            key=key, size=int(h["ContentLength"]), sha256=meta.get("sha256"), checksum=_plain(h.get("ETag"))
        )

    def matches(self, remote: RemoteObject, local: LocalFile) -> bool:
        if remote.size != local.size or (remote.sha256 or "").lower() != local.sha256:
            return False
        etag = remote.checksum or ""
        if not _MD5_ETAG.match(etag):
            return True  # e.g. SSE-KMS: the part checksums and the SHA-256 metadata stand
        if len(local.part_md5) == 1 and etag == local.part_md5[0]:
            return True
        if len(local.part_md5) > 1 and etag == composite_etag(local.part_md5):
            return True
        if "-" in etag:
            return False
        return etag == self._whole_md5(local)  # servers that report the whole object's MD5 (rclone)

    def _whole_md5(self, local: LocalFile) -> str | None:
        """The MD5 of the local file, or None when the file is no longer the one ``local`` was digested from
        (same size and mtime are not enough: a replaced file must never vouch for a stored object)."""
        key = (str(local.path), local.size, local.mtime_ns, local.sha256)
        with self._cache_lock:
            if key in self._md5_cache:
                return self._md5_cache[key]
        md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
        with open(local.path, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                md5.update(block)
                sha.update(block)
        if sha.hexdigest() != local.sha256:
            return None  # not cached: the file may be put back
        value = md5.hexdigest()
        with self._cache_lock:
            self._md5_cache[key] = value
            while len(self._md5_cache) > 256:
                self._md5_cache.popitem(last=False)
        return value

    def remove(self, key: str) -> None:
        self._call("delete_object", Key=key)

    # -- upload -----------------------------------------------------------------

    def upload(self, transfer: Transfer) -> str:
        if transfer.local.size <= transfer.local.part_size:
            self._put(transfer)
        else:
            self._multipart(transfer)
        return self.verify(transfer.local, transfer.key)

    def _part_args(self, local: LocalFile, number: int) -> dict[str, Any]:
        kw: dict[str, Any] = {"ContentMD5": _b64(local.part_md5[number - 1])}
        if self.sha256_parts and local.part_sha256:
            kw["ChecksumSHA256"] = _b64(local.part_sha256[number - 1])
        return kw

    def _body(self, t: Transfer, offset: int, length: int) -> FileSlice:
        return FileSlice(t.local.path, offset, length, self.throttle, check=t.check, wait=t.wait)

    def _put(self, t: Transfer) -> None:
        local = t.local
        t.between()
        with self.slots:
            body = self._body(t, 0, local.size)
            try:
                resp = self._call(
                    "put_object",
                    t,
                    Key=t.key,
                    Body=body,
                    ContentLength=local.size,
                    Metadata={"sha256": local.sha256},
                    **self._part_args(local, 1),
                )
            finally:
                body.close()
        etag = _plain(resp.get("ETag"))
        if _MD5_ETAG.match(etag) and etag != local.part_md5[0]:
            raise IntegrityError(
                self.name, f"PUT {t.key}: server ETag {etag} is not the MD5 {local.part_md5[0]} of what was sent"
            )
        t.persist(local.size)

    def _list_parts(self, key: str, upload_id: str) -> dict[int, tuple[str, int]] | None:
        """Parts the server holds, or None when the upload is gone."""
        from botocore.exceptions import ClientError

        parts: dict[int, tuple[str, int]] = {}
        marker = 0
        while True:
            try:
                resp = self.client.list_parts(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") == "NoSuchUpload":
                    return None
                raise self._classify(e, "ListParts") from None
            except Exception as e:
                raise self._classify(e, "ListParts") from None
            for p in resp.get("Parts", []):
                parts[int(p["PartNumber"])] = (_plain(p["ETag"]), int(p["Size"]))
            if not resp.get("IsTruncated"):
                return parts
            marker = int(resp["NextPartNumberMarker"])

    def _abort(self, key: str, upload_id: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            log.info("aborted multipart upload", target=self.name, key=key, upload_id=upload_id)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "NoSuchUpload":
                log.warning(
                    "could not abort multipart upload", target=self.name, key=key, upload_id=upload_id, error=str(e)
                )

    def _abort_others(self, key: str, keep: str | None) -> None:
        """Abort this key's multipart uploads other than ``keep`` (orphans of a crash)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
        except (ClientError, BotoCoreError) as e:
            log.debug("cannot list multipart uploads", target=self.name, key=key, error=str(e))
            return
        for u in resp.get("Uploads", []):
            if u.get("Key") == key and u.get("UploadId") != keep:
                self._abort(key, u["UploadId"])

    def discard(self, key: str, state: dict[str, Any]) -> None:
        if state.get("upload_id"):
            self._abort(key, state["upload_id"])

    def _multipart(self, t: Transfer) -> None:
        local, key, st = t.local, t.key, t.state
        upload_id = st.get("upload_id") if st.get("part_size") == local.part_size else None
        if st.get("upload_id") and upload_id is None:
            self._abort(key, st["upload_id"])  # planned with another part size
        have: dict[str, dict[str, Any]] = {}
        if upload_id:
            server = self._list_parts(key, upload_id)
            if server is None:
                log.info(
                    "multipart upload gone from the server; starting again",
                    target=self.name,
                    key=key,
                    upload_id=upload_id,
                )
                upload_id = None
            else:
                for n, (etag, size) in server.items():
                    if 1 <= n <= local.parts and size == local.part_range(n)[1] and etag == local.part_md5[n - 1]:
                        have[str(n)] = {"etag": etag, "size": size}
        self._abort_others(key, keep=upload_id)
        if upload_id is None:
            t.between()
            kw: dict[str, Any] = {"Key": key, "Metadata": {"sha256": local.sha256}}
            if self.sha256_parts:
                kw["ChecksumAlgorithm"] = "SHA256"
            upload_id = self._call("create_multipart_upload", t, **kw)["UploadId"]
        with t.lock:
            st.clear()
            st.update(upload_id=upload_id, part_size=local.part_size, parts=have)
        t.persist(sum(p["size"] for p in have.values()))
        todo = [n for n in range(1, local.parts + 1) if str(n) not in have]
        if todo:
            log.debug("sending parts", target=self.name, key=key, parts=len(todo), of=local.parts, resumed=bool(have))
            self._send_parts(t, upload_id, todo)
        parts = []
        for n in range(1, local.parts + 1):
            p = {"PartNumber": n, "ETag": f'"{st["parts"][str(n)]["etag"]}"'}
            if self.sha256_parts and local.part_sha256:
                p["ChecksumSHA256"] = _b64(local.part_sha256[n - 1])
            parts.append(p)
        try:
            self._call("complete_multipart_upload", t, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
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

    def _send_parts(self, t: Transfer, upload_id: str, todo: list[int]) -> None:
        local, st = t.local, t.state
        halt = threading.Event()

        def one(n: int) -> None:
            if halt.is_set():
                return
            t.between()
            offset, length = local.part_range(n)
            with self.slots:
                body = self._body(t, offset, length)
                try:
                    resp = self._call(
                        "upload_part",
                        t,
                        Key=t.key,
                        UploadId=upload_id,
                        PartNumber=n,
                        Body=body,
                        ContentLength=length,
                        **self._part_args(local, n),
                    )
                finally:
                    body.close()
            etag = _plain(resp.get("ETag"))
            if _MD5_ETAG.match(etag) and etag != local.part_md5[n - 1]:
                raise IntegrityError(
                    self.name, f"part {n} of {t.key}: server ETag {etag} is not the MD5 of what was sent"
                )
            with t.lock:
                st["parts"][str(n)] = {"etag": etag, "size": length}
                done = sum(p["size"] for p in st["parts"].values())
            t.persist(done)

        futures: list[Future[None]] = [self.pool.submit(one, n) for n in todo]
        pending = set(futures)
        first: BaseException | None = None
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in finished:
                exc = f.exception()
                if exc is not None and first is None:
                    first = exc
                    halt.set()
        if first is not None:
            raise first
