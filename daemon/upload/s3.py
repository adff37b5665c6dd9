"""AWS S3 and S3-compatible stores (MinIO, Ceph, rclone...) through boto3.

One read of the file (``streams = True``): the manager hands over the file
undigested and the upload reads it once, part by part in order
(:class:`~daemon.upload.base.PartReader`). The reading thread accumulates
the file's SHA-256 (and, until a new endpoint's ETag style is known, the
whole file's MD5); each part's MD5 and CRC-32 (or SHA-256) are computed in
the part's thread from the very bytes it sends. At most ``concurrency`` parts of
a transfer, and 256 MiB of a target's transfers together, are in memory.

Files up to one part are a single PUT, from the bytes read: Content-MD5, and
the file's SHA-256 as metadata ``sha256`` (known before the PUT). Larger
files are a multipart upload; the whole file's SHA-256 is known only after
its last part is read, too late for the object's metadata (set at
CreateMultipartUpload), so multipart objects carry none. What replaces it:

* the SHA-256 of the bytes sent is kept in the upload record (``sha256``)
  and, for an input, compared with the one QC recorded *before*
  CompleteMultipartUpload: content that is not what QC read is never
  published (the multipart upload is aborted, the job goes back to QC);
* the object is proved by its ETag, the composite of the part MD5s computed
  from the bytes sent (a HEAD on AWS, moto, MinIO, Ceph; the completion's
  answer on a server whose HEAD reports the whole file's MD5, rclone); its
  metadata ``part-size`` says how to recompute the
  composite when a later job finds the object already there (one read, no
  send). FULL_OBJECT CRC64NVME checksums are not used: botocore computes
  CRC64NVME only with awscrt (not a dependency here), and moto and rclone
  would not check it.

Integrity while sending: every part carries Content-MD5, which S3 and
rclone enforce (BadDigest; not on a server known to report the whole file's
MD5, below), and its CRC-32 (x-amz-checksum-crc32, declared
at CreateMultipartUpload as boto3 does: ``checksum = "auto"`` or ``"crc32"``;
``"sha256"`` sends x-amz-checksum-sha256 instead, ``"md5"`` neither); a part
ETag that is an MD5 must be the part's MD5 (moto checks no Content-MD5).
After completion a HEAD compares size and ETag (or the completion's answer
does, below); no second read; an object that does not match is deleted at
once. Declaring a checksum also spares
moto its whole-object CRC64NVME, computed in Python at completion for an
upload that declares none.

A server that refuses the x-amz-checksum-* headers (400 to a request that
carries them, e.g. an older S3-compatible store) is learned with
``checksum = "auto"``: the refused CreateMultipartUpload or PUT is sent again
without them, an upload already declared with CRC-32 whose part is refused
starts again, and the target sends Content-MD5 alone from then on
(remembered for its endpoint in ``upload-checkpoints/s3-<target>.checksum``;
delete the file to try again). An explicit setting is never overridden.

Whether a server's multipart ETag is the whole file's MD5 is learned from
the HEAD after its first multipart upload and kept in the state folder
(``upload-checkpoints/s3-<target>.etag-style``); until then that MD5 is
computed too. Once a target is known to report it, no whole-file MD5 is
computed and no HEAD follows the completion: such a server (rclone) computes
that MD5 when the object is first asked for, reading the whole object again
(0.6 s for 256 MiB after the last part, measured with rclone 1.75), and one MD5
pass in a single thread is the slowest digest here (~530 MiB/s a core). Its
part MD5s are computed in the parts' threads and sent as no Content-MD5
(rclone would hash each part twice: 8.2 against 6.4 s of its CPU for 1 GiB,
measured): each part's ETag in the server's answer must be the MD5 of the
bytes sent (a part damaged on its way is caught at once), the completion
names each part's ETag (refused unless it is the MD5 the server computed of
the part it holds: InvalidPart) and answers the composite of the part MD5s,
which must be the composite of the MD5s of the bytes sent: that proves the
object, as the composite ETag does on AWS.

Resuming: the state saved after every part (``transfer.state``) names the
upload id, the part size, the file's size and mtime, and each stored part's
ETag, size and MD5. A resumed upload whose file still has that size and
mtime asks the server which parts it holds (ListParts) and reads the file
from the start as always; a listed part is kept, not sent, only when its
ETag is the MD5 of the local bytes just read (or its SHA-256 checksum is
theirs, or, for ETags that are no MD5, the MD5 recorded when it was sent is
theirs). A file changed since (size or mtime) starts a new upload. Other
multipart uploads of the same key (left by a crash before the id was saved)
are aborted.

Checksum settings that keep non-AWS endpoints working: botocore's default
CRC32 trailers (aws-chunked bodies) are switched off
(``request_checksum_calculation="when_required"``,
``response_checksum_validation="when_required"``); payloads are not
SHA-256-signed (``payload_signing_enabled=False``: Content-MD5 covers them);
botocore's own retries are off, ours apply.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, cast

from isal import isal_zlib

from daemon.config import UploadTarget
from daemon.errors import UploadError
from daemon.logging import get_logger, register_secret
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
from daemon.upload.stream import MD5_ETAG, StreamingUploader, b64
from daemon.upload.throttle import BufferBody

__all__ = ["S3Uploader"]

log = get_logger("imageqc.upload.s3")

_MD5_ETAG = MD5_ETAG
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
    "NoSuchUpload",  # the multipart upload vanished (rclone drops it on a bad part): resumed, it starts again
}
#: The server saw a body that is not the one the digests were computed from (retried; the file is checked).
_DIGEST_CODES = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"}
#: 400s that are no refusal of the x-amz-checksum-* headers (the request is wrong in another way).
_NOT_A_CHECKSUM_REFUSAL = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchBucket",
    "NoSuchKey",
    "AuthorizationHeaderMalformed",
    "RequestTimeTooSkewed",
    "EntityTooSmall",
    "EntityTooLarge",
    "InvalidBucketName",
    "KeyTooLongError",
    "MetadataTooLarge",
    "TooManyParts",
}
_PERMS = "s3:PutObject, s3:GetObject, s3:ListBucketMultipartUploads and s3:AbortMultipartUpload"


_b64 = b64


def _plain(etag: str | None) -> str:
    return (etag or "").strip().strip('"').lower()


def composite_etag(part_md5: tuple[str, ...]) -> str:
    """The ETag S3 gives a multipart object: MD5 of the part MD5s, dash, part count."""
    joined = b"".join(bytes.fromhex(m) for m in part_md5)
    return f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(part_md5)}"


def _crc32(data: Any) -> str:
    """x-amz-checksum-crc32 of ``data``: base64 of the big-endian CRC-32.

    ISA-L's CRC-32 (isal, already a dependency for the archive's gzip) is the same function as zlib's, about four
    times as fast (7.4 against 1.8 GiB/s a core here): 0.3 instead of 1.1 s of CPU for 2 GiB of parts.
    """
    return base64.b64encode(isal_zlib.crc32(data).to_bytes(4, "big")).decode()


class _ChecksumRefused(Exception):
    """The server refused a request's x-amz-checksum-* headers; the target now sends Content-MD5 alone."""


class S3Uploader(StreamingUploader):
    """An ``[[upload]]`` target of type s3."""

    type = "s3"

    def __init__(self, target: UploadTarget, *, state_dir: Path, credentials: Credentials | None = None) -> None:
        super().__init__(target, state_dir=state_dir)
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import BotoCoreError

        self.creds = credentials if credentials is not None else resolve_credentials(target)
        self._checksum_file = self.state_dir / "upload-checkpoints" / f"s3-{target.name}.checksum"
        self._set_checksum(self._resolve_checksum(target))
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
            max_pool_connections=self.concurrency + 4,
            user_agent_extra="imageqc",
        )
        self.client = session.client("s3", endpoint_url=target.endpoint or None, verify=target.verify_tls, config=cfg)
        self.bucket = target.bucket
        self.pool = DaemonPool(self.concurrency, f"upload-{target.name}-parts")
        self._etag_file = self.state_dir / "upload-checkpoints" / f"s3-{target.name}.etag-style"
        self._etag_style: str | None = None
        self._md5_cache: collections.OrderedDict[tuple[str, int, int, str], str] = collections.OrderedDict()
        self._cache_lock = threading.Lock()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)  # a part stuck in a request is abandoned, not joined
        self.client.close()

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

    def _call(self, op: str, transfer: Transfer | None = None, *, refusable: bool = False, **kw: Any) -> Any:
        """``self.client.<op>(Bucket=..., **kw)`` with errors classified. ``refusable``: the request carries
        x-amz-checksum-* headers chosen automatically; a server refusing them raises :class:`_ChecksumRefused`
        (the target has then fallen back to Content-MD5 alone)."""
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
            if refusable and self._refused(e, op):
                raise _ChecksumRefused(op) from None
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
        """Whether a stored object is the (digested) local file.

        Single-PUT objects carry the file's SHA-256 as metadata; multipart ones
        cannot (it is known only after the last part is read) and are proved by
        their ETag: the composite of the part MD5s, or the whole file's MD5
        (rclone). An object with neither proof is not the file.
        """
        if remote.size != local.size:
            return False
        if remote.sha256 is not None and remote.sha256.lower() != local.sha256:
            return False
        etag = remote.checksum or ""
        if not _MD5_ETAG.match(etag):
            return remote.sha256 is not None  # e.g. SSE-KMS: only the SHA-256 metadata can vouch
        if len(local.part_md5) == 1 and etag == local.part_md5[0]:
            return True
        if len(local.part_md5) > 1 and etag == composite_etag(local.part_md5):
            return True
        if "-" in etag:
            return False
        if local.md5 is not None:
            return etag == local.md5
        return etag == self._whole_md5(local)  # servers that report the whole object's MD5 (rclone)

    def _whole_md5(self, local: LocalFile) -> str | None:
        """The MD5 of the local file, or None when the file is no longer the one ``local`` was digested from
        (same size and mtime are not enough: a replaced file must never vouch for a stored object).

        Read again only when the MD5 was not computed with the other digests: a stored object digested
        before this target's ETag style was known."""
        key = (str(local.path), local.size, local.mtime_ns, local.sha256)
        with self._cache_lock:
            if key in self._md5_cache:
                return self._md5_cache[key]
        log.info("hashing the file again for the server's whole-object ETag", target=self.name, path=str(local.path))
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

    # -- the part checksum (auto: CRC-32, unless the server is known to refuse it) ------------

    def _resolve_checksum(self, target: UploadTarget) -> str:
        """The part checksum in force: the setting, or for ``auto`` CRC-32 unless this endpoint is known to
        refuse x-amz-checksum-* headers (learned, kept in the state folder), then Content-MD5 alone."""
        if target.checksum != "auto":
            return target.checksum
        try:
            learned = json.loads(self._checksum_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "crc32"
        if isinstance(learned, dict) and learned.get("endpoint") == target.endpoint and learned.get("refuses"):
            return "md5"
        return "crc32"

    def _set_checksum(self, mode: str) -> None:
        self.checksum = mode
        self.sha256_parts = mode == "sha256"
        self.crc32_parts = mode == "crc32"

    def _refused(self, e: Exception, op: str) -> bool:
        """Whether ``e`` is a server's refusal of the x-amz-checksum-* headers ``op`` carried, on a target whose
        checksum was chosen automatically (an explicit setting is never overridden): then the target falls back
        to Content-MD5 alone, remembered for this endpoint."""
        from botocore.exceptions import ClientError

        if self.target.checksum != "auto" or not isinstance(e, ClientError):
            return False
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if status not in (400, 501) or code in _TRANSIENT_CODES or code in _NOT_A_CHECKSUM_REFUSAL:
            return False
        with self._cache_lock:
            if self.checksum == "md5":
                return True  # another request of this target learned it first
            self._set_checksum("md5")
        log.warning(
            "the server refuses x-amz-checksum headers; this target's parts carry Content-MD5 alone from now on",
            target=self.name,
            operation=op,
            code=code or status,
            message=str(err.get("Message") or ""),
        )
        try:
            self._checksum_file.parent.mkdir(parents=True, exist_ok=True)
            self._checksum_file.write_text(
                json.dumps({"endpoint": self.target.endpoint, "refuses": True}) + "\n", encoding="utf-8"
            )
        except OSError as write_error:
            log.debug("cannot record that the server refuses checksums", target=self.name, error=str(write_error))
        return True

    # -- the server's ETag style (learned) -----------------------------------------

    def _wants_whole_md5(self) -> bool:
        """Whether to compute the whole file's MD5 while sending: the server's multipart ETag may be it.

        AWS's never is (the composite of the part MD5s). For another endpoint
        the answer is learned from the first multipart object it completes and
        kept in the state folder; until then the MD5 is computed (cheaper than
        reading the file again to verify)."""
        if not self.target.endpoint:
            return False
        if self._etag_style is None:
            try:
                self._etag_style = self._etag_file.read_text(encoding="utf-8").strip() or None
            except OSError:
                self._etag_style = None
        return self._etag_style != "composite"

    def _learn_etag_style(self, etag: str) -> None:
        style = "composite" if "-" in etag else "whole-md5" if _MD5_ETAG.match(etag) else "other"
        if style == self._etag_style or not self.target.endpoint:
            return
        self._etag_style = style
        try:
            self._etag_file.parent.mkdir(parents=True, exist_ok=True)
            self._etag_file.write_text(style + "\n", encoding="utf-8")
        except OSError as e:
            log.debug("cannot record the server's ETag style", target=self.name, error=str(e))

    def remove(self, key: str) -> None:
        self._call("delete_object", Key=key)

    # -- upload -----------------------------------------------------------------

    def digest(self, path: Path, *, check: Any = lambda: None, expect: tuple[int, int] | None = None) -> LocalFile:
        size = file_stat(path)[0]
        return digest_file(
            path,
            part_size=self.part_size_for(size),
            sha256_parts=self.sha256_parts,
            whole_md5=self._wants_whole_md5() and size > self.part_size_for(size),
            check=check,
            expect=expect,
        )

    def upload(self, transfer: Transfer) -> str:
        transfer.proved = None
        if transfer.local.size <= transfer.local.part_size:
            self._put(transfer)
        else:
            self._multipart(transfer)
        return self._verify_stored(transfer)

    def _verify_stored(self, t: Transfer) -> str:
        """HEAD the new object: its size, and its ETag against the digests of the bytes sent.

        Every part was already checked by the server (Content-MD5, and the
        SHA-256 checksum where enabled) and the completion named each part's
        ETag; an ETag that is not an MD5 (SSE-KMS) leaves those checks as the
        proof.
        """
        local, key = t.local, t.key
        if t.proved is not None:
            return t.proved  # a multipart upload the completion proved, on a server whose HEAD would hash it all
        remote = self.probe(key)
        if remote is None:
            raise IntegrityError(
                self.name, f"{key} is missing right after it was uploaded", hint="it is uploaded again"
            )
        etag = remote.checksum or ""
        if local.parts > 1:
            self._learn_etag_style(etag)  # from the HEAD: rclone completes with a composite ETag, then reports the MD5
        ok = remote.size == local.size and (remote.sha256 is None or remote.sha256.lower() == local.sha256)
        if ok and _MD5_ETAG.match(etag):
            ok = self.matches(remote, local)
        if not ok:
            try:
                self.remove(key)  # just stored by this transfer: never left behind as if it were the file
            except UploadError as e:
                log.warning("could not delete an object that does not match its file", key=key, error=str(e))
            raise IntegrityError(
                self.name,
                f"{key} does not match {local.path} (stored size {remote.size}, sha256 {remote.sha256}, "
                f"checksum {remote.checksum}; local size {local.size}, sha256 {local.sha256}); deleted",
                hint="it is uploaded again",
            )
        return etag or local.sha256

    def _part_args(self, md5: str | None, sha256: str | None, crc32: str | None = None) -> dict[str, Any]:
        kw: dict[str, Any] = {"ContentMD5": _b64(md5)} if md5 is not None else {}
        if sha256 is not None:
            kw["ChecksumSHA256"] = _b64(sha256)
        if crc32 is not None:
            kw["ChecksumCRC32"] = crc32
        return kw

    def _put_bytes(self, t: Transfer, data: bytes, sha256: str) -> None:
        local = t.local
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        part_sha = hashlib.sha256(data).hexdigest() if self.sha256_parts else None
        while True:  # twice at most: a server that refuses the CRC-32 header gets the PUT again without it
            crc = _crc32(data) if self.crc32_parts else None
            with self.slots:
                body = self._body(t, data)
                try:
                    resp = self._call(
                        "put_object",
                        t,
                        refusable=crc is not None,
                        Key=t.key,
                        Body=body,
                        ContentLength=local.size,
                        Metadata={"sha256": sha256},
                        **self._part_args(md5, part_sha, crc),
                    )
                    break
                except _ChecksumRefused:
                    continue
                finally:
                    body.close()
        etag = _plain(resp.get("ETag"))
        if _MD5_ETAG.match(etag) and etag != md5:
            raise IntegrityError(self.name, f"PUT {t.key}: server ETag {etag} is not the MD5 {md5} of what was sent")
        t.local = replace(local, sha256=sha256, part_md5=(md5,), part_sha256=(part_sha,) if part_sha else (), md5=md5)
        t.persist(local.size)

    def _list_parts(self, key: str, upload_id: str) -> dict[int, tuple[str, int, str | None]] | None:
        """Parts the server holds (ETag, size, SHA-256 checksum if any), or None when the upload is gone."""
        from botocore.exceptions import ClientError

        parts: dict[int, tuple[str, int, str | None]] = {}
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
                parts[int(p["PartNumber"])] = (_plain(p["ETag"]), int(p["Size"]), p.get("ChecksumSHA256"))
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

    # -- the streaming engine's hooks (daemon/upload/stream.py) --------------------------

    def _digests_wanted(self) -> tuple[bool, bool]:
        # The whole file's MD5 only until the server's ETag style is known: a server known to report it is
        # proved by its completion (the composite of the part MD5s), not by a HEAD that would hash the object.
        return self._wants_whole_md5() and self._etag_style != "whole-md5", True

    def _upload_tag(self) -> dict[str, Any]:
        return {"checksum": self.checksum}

    def _mode(self, t: Transfer) -> str:
        """The part checksum of ``t``'s multipart upload (declared when it was created)."""
        return str(t.state.get("checksum") or self.checksum)

    def _create(self, t: Transfer) -> str:
        kw: dict[str, Any] = {"Key": t.key, "Metadata": {"part-size": str(t.local.part_size)}}
        if self.sha256_parts:
            kw["ChecksumAlgorithm"] = "SHA256"
        elif self.crc32_parts:
            kw["ChecksumAlgorithm"] = "CRC32"
        try:
            return str(self._call("create_multipart_upload", t, refusable="ChecksumAlgorithm" in kw, **kw)["UploadId"])
        except _ChecksumRefused:
            del kw["ChecksumAlgorithm"]  # now Content-MD5 alone (self.checksum == "md5")
            return str(self._call("create_multipart_upload", t, **kw)["UploadId"])

    def _send_part(
        self, t: Transfer, upload_id: str, n: int, body: BufferBody, length: int, md5: str | None, sha256: str | None
    ) -> dict[str, Any]:
        crc = _crc32(body.data) if self._mode(t) == "crc32" else None
        # a server whose ETag is the whole file's MD5 would hash the part twice: its answer's ETag is checked
        content_md5 = md5 if self._etag_style != "whole-md5" else None
        try:
            resp = self._call(
                "upload_part",
                t,
                refusable=crc is not None,
                Key=t.key,
                UploadId=upload_id,
                PartNumber=n,
                Body=body,
                ContentLength=length,
                **self._part_args(content_md5, sha256, crc),
            )
        except _ChecksumRefused:
            # the upload was declared with CRC-32: the next attempt aborts it and starts one without
            raise self.transient(
                f"part {n} of {t.key}: the server refuses x-amz-checksum-crc32",
                "the upload starts again with Content-MD5 alone",
            ) from None
        etag = _plain(resp.get("ETag"))
        if md5 is not None and _MD5_ETAG.match(etag) and etag != md5:
            raise IntegrityError(self.name, f"part {n} of {t.key}: server ETag {etag} is not the MD5 of what was sent")
        record: dict[str, Any] = {"etag": etag}
        if sha256 is not None:
            record["sha256"] = sha256
        if crc is not None:
            record["crc32"] = crc
        return record

    def _held_record(self, t: Transfer, etag: str, data: bytes) -> dict[str, Any]:
        return {"etag": etag, **({"crc32": _crc32(data)} if self._mode(t) == "crc32" else {})}

    def _complete(self, t: Transfer, upload_id: str, parts: list[dict[str, Any]]) -> None:
        listed = []
        for n, rec in enumerate(parts, 1):
            p = {"PartNumber": n, "ETag": f'"{rec["etag"]}"'}
            if self._mode(t) == "sha256":
                p["ChecksumSHA256"] = _b64(t.local.part_sha256[n - 1])
            elif self._mode(t) == "crc32":
                p["ChecksumCRC32"] = rec["crc32"]
            listed.append(p)
        resp = self._call(
            "complete_multipart_upload", t, Key=t.key, UploadId=upload_id, MultipartUpload={"Parts": listed}
        )
        if t.local.md5 is None and self._etag_style == "whole-md5":  # no HEAD follows (see the module's docstring)
            etag, want = _plain(resp.get("ETag")), composite_etag(t.local.part_md5)
            if etag != want:
                with contextlib.suppress(UploadError):
                    self.remove(t.key)  # just stored by this transfer: never left behind as if it were the file
                raise IntegrityError(
                    self.name,
                    f"{t.key}: the completion answered ETag {etag}, not {want}, the composite of the MD5s of the "
                    "parts sent; deleted",
                    hint="it is uploaded again",
                )
            t.proved = etag
