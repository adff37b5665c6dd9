"""checksum = "auto": CRC-32 part checksums declared as boto3 does, and Content-MD5 alone for a server that refuses them.

The refusing server is real: moto behind :class:`ChecksumRefusingProxy`, which
answers 400 InvalidArgument to any request carrying an x-amz-checksum-* header.
The fallback is learned once per target (kept in the state folder) and the
uploads still verify: Content-MD5 per part, the composite ETag of the part MD5s
after completion, and a part damaged on its way is caught with nothing published.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import UploadTarget
from daemon.errors import PermanentUploadError, TransientUploadError
from daemon.upload import make_uploader
from daemon.upload.base import IntegrityError, Transfer
from daemon.upload.credentials import Credentials
from daemon.upload.s3 import S3Uploader, composite_etag
from daemon.upload.throttle import BufferBody
from tests.moto_s3 import S3Server

from .checksum_proxy import ChecksumRefusingProxy
from .conftest import S3_KEYS, new_bucket, pending_file, unique_key

MiB = 1 << 20


@pytest.fixture
def refusing(s3_server: S3Server) -> Iterator[ChecksumRefusingProxy]:
    proxy = ChecksumRefusingProxy(s3_server.endpoint.split("//", 1)[1])
    yield proxy
    proxy.close()


@pytest.fixture
def uploaders() -> Iterator[list[S3Uploader]]:
    made: list[S3Uploader] = []
    yield made
    for up in made:
        up.close()


def _uploader(made: list[S3Uploader], endpoint: str, bucket: str, state: Path, **overrides: Any) -> S3Uploader:
    fields: dict[str, Any] = {
        "name": "t",
        "type": "s3",
        "endpoint": endpoint,
        "bucket": bucket,
        "region": "us-east-1",
        "addressing_style": "path",
        "part_size_mb": 5,
        "concurrency": 2,
        "max_attempts": 1,
        "timeout_s": 10,
    }
    up = make_uploader(UploadTarget(**{**fields, **overrides}), state_dir=state, credentials=Credentials(*S3_KEYS))
    assert isinstance(up, S3Uploader)
    made.append(up)
    return up


def _part_md5s(data: bytes) -> tuple[str, ...]:
    return tuple(hashlib.md5(data[i : i + 5 * MiB]).hexdigest() for i in range(0, len(data), 5 * MiB))


def test_auto_declares_crc32_parts_as_boto3_does(
    s3_server: S3Server, big: Path, tmp_path: Path, uploaders: list[S3Uploader]
) -> None:
    bucket = new_bucket(s3_server)
    up = _uploader(uploaders, s3_server.endpoint, bucket, tmp_path / "state")
    assert up.checksum == "crc32"
    key = unique_key()
    outcome = up.send(Transfer(local=pending_file(up, big), key=key))
    head = s3_server.client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    data = big.read_bytes()
    crcs = b"".join(zlib.crc32(data[i : i + 5 * MiB]).to_bytes(4, "big") for i in range(0, len(data), 5 * MiB))
    # the object's checksum is built from the 4 parts' CRC-32s the upload declared and sent
    assert head["ChecksumCRC32"].split("-")[0] == base64.b64encode(zlib.crc32(crcs).to_bytes(4, "big")).decode()
    assert outcome.checksum == composite_etag(_part_md5s(data))


def test_a_server_refusing_checksum_headers_gets_content_md5_alone_learned_once_and_uploads_still_verify(
    s3_server: S3Server,
    refusing: ChecksumRefusingProxy,
    big: Path,
    tmp_path: Path,
    uploaders: list[S3Uploader],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = new_bucket(s3_server)
    admin = s3_server.client()
    data = big.read_bytes()
    state = tmp_path / "state"
    up = _uploader(uploaders, refusing.endpoint, bucket, state)
    key = unique_key()
    outcome = up.send(Transfer(local=pending_file(up, big), key=key))
    assert [e["op"] for e in refusing.requests() if e["refused"]] == ["CreateMultipartUpload"]
    assert up.checksum == "md5"
    parts = refusing.requests("UploadPart")
    assert len(parts) == 4 and all(p["checksums"] == [] for p in parts)
    assert admin.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert outcome.local is not None and outcome.local.sha256 == hashlib.sha256(data).hexdigest()
    assert outcome.checksum == composite_etag(_part_md5s(data))  # the object proved by the MD5s of the bytes sent

    # remembered for this target: a new uploader (a restart) sends no checksum header at all
    again = _uploader(uploaders, refusing.endpoint, bucket, state)
    assert again.checksum == "md5"
    before = len(refusing.requests())
    small = tmp_path / "report.json"
    small.write_bytes(os.urandom(MiB))
    again.send(Transfer(local=pending_file(again, small), key=unique_key()))
    again.send(Transfer(local=pending_file(again, big), key=unique_key()))
    assert all(not e["checksums"] for e in refusing.requests()[before:])

    # still verified: a part damaged after its MD5 was taken is caught, nothing is published
    real_body = S3Uploader._body
    flipped: list[int] = []

    def corrupting_body(self: S3Uploader, t: Transfer, chunk: bytes) -> BufferBody:
        if not flipped and len(chunk) == 5 * MiB:
            flipped.append(1)
            chunk = chunk[:100] + bytes([chunk[100] ^ 1]) + chunk[101:]
        return real_body(self, t, chunk)

    monkeypatch.setattr(S3Uploader, "_body", corrupting_body)
    torn = unique_key()
    with pytest.raises(IntegrityError, match="is not the MD5 of what was sent"):
        again.send(Transfer(local=pending_file(again, big), key=torn))
    assert flipped and "Contents" not in admin.list_objects_v2(Bucket=bucket, Prefix=torn)

    # the same target name on another endpoint tries CRC-32 again
    elsewhere = _uploader(uploaders, s3_server.endpoint, bucket, state)
    assert elsewhere.checksum == "crc32"


def test_a_single_put_refused_for_its_checksum_is_sent_again_without_it(
    s3_server: S3Server, refusing: ChecksumRefusingProxy, tmp_path: Path, uploaders: list[S3Uploader]
) -> None:
    bucket = new_bucket(s3_server)
    path = tmp_path / "report.json"
    path.write_bytes(os.urandom(3 * MiB))
    up = _uploader(uploaders, refusing.endpoint, bucket, tmp_path / "state", part_size_mb=0, concurrency=0)
    key = unique_key()
    up.send(Transfer(local=pending_file(up, path), key=key))
    puts = refusing.requests("PutObject")
    assert [p["refused"] for p in puts] == [True, False] and puts[0]["checksums"] == ["x-amz-checksum-crc32"]
    head = s3_server.client().head_object(Bucket=bucket, Key=key)
    assert head["Metadata"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert head["ETag"].strip('"') == hashlib.md5(path.read_bytes()).hexdigest()


def test_parts_refused_after_the_upload_was_declared_with_crc32_start_the_upload_again_without(
    s3_server: S3Server, big: Path, tmp_path: Path, uploaders: list[S3Uploader]
) -> None:
    """A server that takes the declaration at CreateMultipartUpload but refuses the parts' headers: the attempt
    fails as transient, and the next one (the manager retries with the same state) aborts that upload and
    starts one with Content-MD5 alone."""
    proxy = ChecksumRefusingProxy(s3_server.endpoint.split("//", 1)[1], refuse={"UploadPart"})
    try:
        bucket = new_bucket(s3_server)
        admin = s3_server.client()
        up = _uploader(uploaders, proxy.endpoint, bucket, tmp_path / "state", concurrency=1)
        key = unique_key()
        t = Transfer(local=pending_file(up, big), key=key)
        with pytest.raises(TransientUploadError, match="refuses x-amz-checksum-crc32"):
            up.send(t)
        first = t.state["upload_id"]
        assert t.state["checksum"] == "crc32" and up.checksum == "md5"
        up.send(t)
        assert admin.get_object(Bucket=bucket, Key=key)["Body"].read() == big.read_bytes()
        assert first not in [u["UploadId"] for u in admin.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
        creates = proxy.requests("CreateMultipartUpload")
        assert [c["checksums"] for c in creates] == [["x-amz-checksum-algorithm"], []]
    finally:
        proxy.close()


def test_an_explicit_checksum_setting_is_never_overridden(
    s3_server: S3Server, refusing: ChecksumRefusingProxy, big: Path, tmp_path: Path, uploaders: list[S3Uploader]
) -> None:
    bucket = new_bucket(s3_server)
    state = tmp_path / "state"
    up = _uploader(uploaders, refusing.endpoint, bucket, state, checksum="crc32")
    with pytest.raises(PermanentUploadError, match="InvalidArgument"):
        up.send(Transfer(local=pending_file(up, big), key=unique_key()))
    assert up.checksum == "crc32"
    assert not list((state / "upload-checkpoints").glob("*.checksum"))
