"""S3 and OSS uploads read the file once: digests while sending, the servers' checks instead of a second read.

On moto, on rclone (whose multipart ETag is the whole file's MD5) and on OSS
through the test proxy (CRC-64 checked by oss2): every
byte of the file is read once per upload (counted through ``open``), a
resumed upload proves the parts the server holds against the local bytes,
a part corrupted on its way is caught by the server's or the ETag check and
nothing is completed, and the part size follows the file size.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.config import UploadTarget, load_config
from daemon.errors import ConfigError
from daemon.upload import base, make_uploader, oss, s3
from daemon.upload.base import (
    AUTO_MIN_PART,
    ByteBudget,
    ContentChanged,
    IntegrityError,
    Interrupted,
    Transfer,
    choose_concurrency,
    choose_part_size,
    file_stat,
)
from daemon.upload.credentials import Credentials
from daemon.upload.s3 import S3Uploader, composite_etag
from daemon.upload.stream import StreamingUploader
from daemon.upload.throttle import BufferBody

from .conftest import OSS_KEYS, S3_KEYS, new_bucket, pending_file, unique_key
from .oss_proxy import crc64

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Server:
    kind: str  # moto, rclone or oss (the test proxy in front of moto)
    endpoint: str
    admin: Any  # an S3 client of the store behind
    bucket: str
    part_requests: Callable[[str], int] | None  # UploadPart requests seen for a key (rclone: not counted)
    proxy: Any = None


@pytest.fixture(params=["moto", "rclone", "oss"])
def server(request: pytest.FixtureRequest) -> Server:
    if request.param == "rclone":
        srv = request.getfixturevalue("rclone_server")
        bucket = srv.bucket(f"b-{uuid.uuid4().hex[:12]}")
        return Server("rclone", srv.endpoint, srv.client(), bucket, None)
    srv = request.getfixturevalue("s3_server")
    bucket = new_bucket(srv)
    if request.param == "moto":
        return Server(
            "moto", srv.endpoint, srv.client(), bucket, lambda key: len(srv.requests("UploadPart", f"{bucket}/{key}"))
        )
    proxy = request.getfixturevalue("oss_proxy")

    def oss_parts(key: str) -> int:
        return sum(1 for e in proxy.requests("UploadPart") if e["path"].endswith(f"{bucket}/{key}"))

    return Server("oss", proxy.endpoint, srv.client(), bucket, oss_parts, proxy)


@pytest.fixture
def make(server: Server, tmp_path: Path) -> Iterator[Callable[..., StreamingUploader]]:
    made: list[StreamingUploader] = []

    def build(**overrides: Any) -> StreamingUploader:
        fields: dict[str, Any] = {
            "name": "t",
            "type": "s3",
            "endpoint": server.endpoint,
            "bucket": server.bucket,
            "region": "us-east-1",
            "addressing_style": "path",
            "part_size_mb": 5,
            "concurrency": 2,
            "max_attempts": 1,
            "timeout_s": 10,
        }
        keys = S3_KEYS
        if server.kind == "oss":
            fields.update(type="oss", region="", addressing_style="auto")
            keys = OSS_KEYS
        up = make_uploader(
            UploadTarget(**{**fields, **overrides}), state_dir=tmp_path / "state", credentials=Credentials(*keys)
        )
        assert isinstance(up, StreamingUploader)
        made.append(up)
        return up

    yield build
    for up in made:
        up.close()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes read from each path through ``open`` in the upload modules."""
    counts: dict[str, int] = {}

    class Counting:
        def __init__(self, f: Any, path: str) -> None:
            self._f, self._path = f, path

        def read(self, n: int = -1) -> bytes:
            data: bytes = self._f.read(n)
            counts[self._path] = counts.get(self._path, 0) + len(data)
            return data

        def __getattr__(self, name: str) -> Any:
            return getattr(self._f, name)

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()

    def counting_open(file: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
        f = builtins.open(file, mode, *a, **kw)  # noqa: SIM115 - returned, closed by the caller
        return Counting(f, str(file)) if "r" in mode and "b" in mode else f

    for module in (base, s3, oss):
        monkeypatch.setattr(module, "open", counting_open, raising=False)
    return counts


def test_an_upload_reads_the_file_once_and_is_verified_with_the_digests_of_the_bytes_sent(
    make: Callable[..., StreamingUploader], server: Server, big: Path, reads: dict[str, int]
) -> None:
    admin, bucket, part_requests = server.admin, server.bucket, server.part_requests
    data = big.read_bytes()
    up = make()
    key = unique_key()
    outcome = up.send(Transfer(local=pending_file(up, big), key=key))
    assert not outcome.present and outcome.local is not None
    assert reads == {str(big): len(data)}  # one read: no digest pass before, no re-read to verify
    assert up.throttle.total == len(data)
    local = outcome.local
    assert local.sha256 == hashlib.sha256(data).hexdigest()
    md5s = tuple(hashlib.md5(data[i : i + 5 * MiB]).hexdigest() for i in range(0, len(data), 5 * MiB))
    etag = admin.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    if server.kind == "oss":  # the parts' CRC-64s (checked by oss2) make the object's, which the HEAD confirms
        assert local.part_md5 == () and local.crc64 is not None and outcome.checksum == str(local.crc64)
    else:
        assert local.part_md5 == md5s
        assert etag in (composite_etag(md5s), hashlib.md5(data).hexdigest())  # moto: composite; rclone: whole MD5
        assert outcome.checksum == etag
    assert admin.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    if part_requests is not None:
        assert part_requests(key) == 4

    # the same file again: read once to compare with the stored object, nothing sent
    reads.clear()
    again = up.send(Transfer(local=pending_file(up, big), key=key))
    assert again.present and reads == {str(big): len(data)} and up.throttle.total == len(data)


def test_a_small_file_is_one_put_read_once_with_its_sha256_as_metadata(
    make: Callable[..., StreamingUploader], server: Server, tmp_path: Path, reads: dict[str, int]
) -> None:
    admin, bucket, part_requests = server.admin, server.bucket, server.part_requests
    path = tmp_path / "report.json"
    path.write_bytes(os.urandom(3 * MiB))
    up = make(part_size_mb=0, concurrency=0)  # automatic: 8 MiB parts, so one PUT
    key = unique_key()
    up.send(Transfer(local=pending_file(up, path), key=key))
    assert reads == {str(path): 3 * MiB}
    head = admin.head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"') == hashlib.md5(path.read_bytes()).hexdigest()
    if server.kind != "rclone":  # moto keeps metadata (rclone's local folder does not)
        assert head["Metadata"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert part_requests(key) == 0


def _stopped_in_part_three(up: StreamingUploader, big: Path, key: str) -> tuple[dict[str, Any], int]:
    """Send ``big`` until the third part is under way, then stop as a service stop would; the last state saved."""
    saves: list[tuple[dict[str, Any], int]] = []

    def stop_in_part_three() -> None:
        if up.throttle.total >= 11 * MiB:
            raise Interrupted("stop")

    with pytest.raises(Interrupted):
        up.send(
            Transfer(
                local=pending_file(up, big), key=key, save=lambda s, d: saves.append((s, d)), check=stop_in_part_three
            )
        )
    return saves[-1]


def test_a_resumed_upload_keeps_only_the_server_parts_that_are_the_local_bytes(
    make: Callable[..., StreamingUploader], server: Server, big: Path, reads: dict[str, int]
) -> None:
    admin, bucket, part_requests = server.admin, server.bucket, server.part_requests
    up = make(concurrency=1)
    key = unique_key()
    state, done = _stopped_in_part_three(up, big, key)
    assert done == 10 * MiB and sorted(state["parts"]) == ["1", "2"]
    assert state["file"] == list(file_stat(big))  # the file's identity, with each part's MD5 (OSS: CRC-64)
    if server.kind == "oss":
        assert state["parts"]["1"]["crc64"] and state["parts"]["1"]["etag"]
    else:
        assert state["parts"]["1"]["md5"] == hashlib.md5(big.read_bytes()[: 5 * MiB]).hexdigest()

    # part 2 of the local file changes behind the service's back, keeping size and mtime
    st = big.stat()
    with big.open("r+b") as f:
        f.seek(7 * MiB)
        f.write(os.urandom(1024))
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    data = big.read_bytes()
    sent_before = part_requests(key) if part_requests else None

    reads.clear()
    again = make(concurrency=1)  # as after a restart
    outcome = again.send(Transfer(local=pending_file(again, big), key=key, state=dict(state)))
    assert admin.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert outcome.local is not None and outcome.local.sha256 == hashlib.sha256(data).hexdigest()
    if server.kind != "rclone":
        assert sent_before is not None and part_requests is not None
        assert reads == {str(big): len(data)}  # the resumed upload reads the file once too
        assert again.throttle.total == len(data) - 5 * MiB  # part 1 proved and kept; part 2 is not the local bytes
        assert part_requests(key) - sent_before == 3  # parts 2..4
    else:  # rclone refuses to replace a stored part: the upload starts again, every part sent, part 2 never kept
        assert again.throttle.total in (len(data), len(data) + 5 * MiB)


@pytest.mark.parametrize("learned", [False, True], ids=["new-target", "etag-style-known"])
def test_a_part_corrupted_on_its_way_is_caught_and_no_corrupt_object_is_left(
    make: Callable[..., StreamingUploader], server: Server, big: Path, monkeypatch: pytest.MonkeyPatch, learned: bool
) -> None:
    """A byte flipped after the digests were taken (a faulty NIC, a proxy). With Content-MD5 (moto, any new
    target) the server refuses the part (rclone) or its ETag is not the MD5 sent (moto accepts the body); a
    target known to report the whole file's MD5 (rclone) gets no Content-MD5, and the part's ETag in its
    answer is not the MD5 sent. The upload is not completed; the next attempt stores the file."""
    admin, bucket = server.admin, server.bucket
    if learned and server.kind == "oss":
        pytest.skip("OSS has no ETag style to learn")
    up = make()
    if learned:
        up.send(Transfer(local=pending_file(up, big), key=unique_key()))  # the target's ETag style is learned
    key = unique_key()
    flipped: list[int] = []
    real_body = S3Uploader._body

    def corrupting_body(self: S3Uploader, t: Transfer, data: bytes) -> BufferBody:
        if not flipped and len(data) == 5 * MiB:
            flipped.append(1)
            data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
        return real_body(self, t, data)

    if server.kind == "oss":  # oss2 checks the CRC-64 of the bytes it sends: the proxy damages them on arrival
        server.proxy.flip_next = 1
        flipped.append(1)
    else:  # damaged after Content-MD5 was computed from the bytes read
        monkeypatch.setattr(S3Uploader, "_body", corrupting_body)
    match = r"BadDigest|InvalidDigest|is not the MD5 of what was sent|does not match|CRC-64"
    with pytest.raises(IntegrityError, match=match) as err:
        up.send(Transfer(local=pending_file(up, big), key=key))
    assert flipped
    if server.kind == "rclone":  # Content-MD5 checked by the server; once its whole-MD5 ETag is known, the ETag
        assert ("is not the MD5 of what was sent" if learned else "BadDigest") in str(err.value)
    assert "Contents" not in admin.list_objects_v2(Bucket=bucket, Prefix=key)  # nothing published

    up.send(Transfer(local=pending_file(up, big), key=key))  # the next attempt (the manager retries)
    assert admin.get_object(Bucket=bucket, Key=key)["Body"].read() == big.read_bytes()


def test_a_server_known_to_report_the_whole_md5_is_proved_by_its_completion_without_a_head(
    make: Callable[..., StreamingUploader], server: Server, big: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rclone hashes the whole object when it is first asked for it (a HEAD after the last part), and each part
    twice when it carries Content-MD5: once its ETag style is known, the upload computes the part MD5s alone,
    sent as no Content-MD5 (each part's ETag must be its MD5), and the completion's composite of them (the
    server refuses a listed ETag that is not its part's MD5) proves the object; no whole-file MD5 is computed
    and no HEAD follows."""
    if server.kind != "rclone":
        pytest.skip("the server whose multipart ETag is the whole file's MD5")
    up = make()
    assert isinstance(up, S3Uploader)
    up.send(Transfer(local=pending_file(up, big), key=unique_key()))  # the first multipart upload: style learned (HEAD)
    heads: list[str] = []
    real_probe = S3Uploader.probe

    def counting_probe(self: S3Uploader, key: str) -> Any:
        heads.append(key)
        return real_probe(self, key)

    sent: list[dict[str, Any]] = []
    real_args = S3Uploader._part_args

    def recorded_args(self: S3Uploader, *args: Any) -> dict[str, Any]:
        kw = real_args(self, *args)
        sent.append(kw)
        return kw

    monkeypatch.setattr(S3Uploader, "probe", counting_probe)
    monkeypatch.setattr(S3Uploader, "_part_args", recorded_args)
    key = unique_key()
    outcome = up.send(Transfer(local=pending_file(up, big), key=key))
    assert len(sent) == 4 and not any("ContentMD5" in kw for kw in sent)  # rclone would hash each part twice
    data = big.read_bytes()
    md5s = tuple(hashlib.md5(data[i : i + 5 * MiB]).hexdigest() for i in range(0, len(data), 5 * MiB))
    assert outcome.local is not None and outcome.local.md5 is None and outcome.local.part_md5 == md5s
    assert outcome.checksum == composite_etag(md5s)
    assert heads == [key]  # the probe before sending (nothing there); none after the completion
    assert server.admin.get_object(Bucket=server.bucket, Key=key)["Body"].read() == data
    assert up.send(Transfer(local=pending_file(up, big), key=key)).present  # a later job finds it: the whole MD5 then


def test_an_oss_multipart_upload_is_proved_by_the_crc64_its_completion_answers(
    make: Callable[..., StreamingUploader], server: Server, big: Path
) -> None:
    """oss2 compares the object's CRC-64 the completion answers with the one the parts sent make: no HEAD
    after it (the test proxy, like the benchmark's, reads the whole object back for a HEAD's CRC-64)."""
    if server.kind != "oss":
        pytest.skip("OSS's completion answers the object's CRC-64")
    up = make()
    key = unique_key()
    outcome = up.send(Transfer(local=pending_file(up, big), key=key))
    heads = [e for e in server.proxy.requests("HeadObject") if e["path"].endswith(key)]
    assert len(heads) == 1  # the probe before sending (nothing there)
    assert server.proxy.requests("CompleteMultipartUpload")[-1]["path"].endswith(key)
    data = big.read_bytes()
    assert outcome.local is not None and outcome.checksum == str(outcome.local.crc64) == str(crc64(data))
    assert server.admin.get_object(Bucket=server.bucket, Key=key)["Body"].read() == data


def test_oss_part_bodies_are_sent_in_large_blocks_each_throttled_and_checked(
    make: Callable[..., StreamingUploader], server: Server, big: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """oss2 hands request bodies to urllib3, which reads them 16 KiB at a time by default: oss2's CRC-64 and
    our part body (throttle, stop check) then ran their Python 64 times a MiB. Its pools read 1 MiB blocks."""
    if server.kind != "oss":
        pytest.skip("oss2's connection pools")
    reads: list[int] = []
    checks: list[int] = []
    real_read = BufferBody.read

    def read(self: BufferBody, size: int | None = -1) -> bytes:
        chunk = real_read(self, size)
        reads.append(len(chunk))
        return chunk

    monkeypatch.setattr(BufferBody, "read", read)
    up = make()
    up.send(Transfer(local=pending_file(up, big), key=unique_key(), check=lambda: checks.append(1)))
    assert sum(reads) == big.stat().st_size
    assert max(reads) == oss.SEND_BLOCK and len(reads) <= 20  # 16 MiB + 7 bytes in 1 MiB blocks (+ ends)
    assert len(checks) >= len(reads)  # every block still checks for a stop before it is sent


def test_content_that_is_not_what_qc_read_is_never_completed(
    make: Callable[..., StreamingUploader], server: Server, big: Path
) -> None:
    admin, bucket = server.admin, server.bucket
    up = make()
    key = unique_key()
    with pytest.raises(ContentChanged):
        up.send(Transfer(local=pending_file(up, big), key=key, expect_sha256="0" * 64))
    assert "Contents" not in admin.list_objects_v2(Bucket=bucket, Prefix=key)
    assert admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # aborted, not left


@pytest.mark.parametrize(
    ("size", "configured", "expected"),
    [
        (1 * MiB, 0, AUTO_MIN_PART),  # one PUT
        (2 * GiB, 0, 8 * MiB),  # 256 parts, as s3transfer's default chunk
        (100 * GiB, 0, 52 * MiB),  # grown so the file needs at most 2,000 parts
        (5 * 1024 * GiB, 0, 2622 * MiB),  # S3's largest object: still well under 10,000 parts
        (2 * GiB, 64, 64 * MiB),  # an explicit setting wins
        (100 * GiB, 5, 11 * MiB),  # ... grown only past S3's 10,000 parts
    ],
)
def test_the_part_size_follows_the_file_size_and_explicit_settings_win(
    size: int, configured: int, expected: int
) -> None:
    part = choose_part_size(size, configured)
    assert part == expected
    assert -(-size // part) <= (10_000 if configured else 2_000)


def test_automatic_sizes_are_the_default_and_explicit_ones_are_validated(tmp_path: Path) -> None:
    assert choose_concurrency(0) == 10 and choose_concurrency(3) == 3
    cfg = tmp_path / "imageqc.toml"
    target = '[[upload]]\nname = "t"\ntype = "s3"\nbucket = "b"\n'
    cfg.write_text(target)
    t = load_config(cfg).upload[0]
    assert (t.part_size_mb, t.concurrency) == (0, 0)
    cfg.write_text(target + "part_size_mb = 3\n")
    with pytest.raises(ConfigError, match="part_size_mb"):
        load_config(cfg)


def test_the_parts_read_ahead_of_the_network_are_bounded_per_target() -> None:
    budget = ByteBudget(10 * MiB)
    assert budget.acquire(6 * MiB, timeout=0)
    assert not budget.acquire(6 * MiB, timeout=0.01)  # would pass the limit: waits, then gives up
    budget.release(6 * MiB)
    assert budget.acquire(6 * MiB, timeout=0)
    budget.release(6 * MiB)
    assert budget.acquire(64 * MiB, timeout=0)  # a part larger than the budget goes, alone
    assert not budget.acquire(1, timeout=0.01)
    budget.release(64 * MiB)
    assert budget.used == 0


def test_crc32_part_checksums_are_sent_checked_by_the_server_and_kept_on_resume(
    make: Callable[..., StreamingUploader], server: Server, big: Path
) -> None:
    """checksum = "crc32": every part also carries x-amz-checksum-crc32 (AWS and MinIO check it; moto, declared at
    CreateMultipartUpload, builds the object's checksum from the parts' instead of a whole-object CRC64NVME)."""
    if server.kind != "moto":
        pytest.skip("moto keeps S3 checksums; rclone and the OSS proxy do not")
    up = make(checksum="crc32", concurrency=1)
    key = unique_key()
    state, _ = _stopped_in_part_three(up, big, key)
    assert all(p["crc32"] for p in state["parts"].values())
    again = make(checksum="crc32")
    again.send(Transfer(local=pending_file(again, big), key=key, state=dict(state)))
    head = server.admin.head_object(Bucket=server.bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"]  # built from the parts' CRC-32s
    assert server.admin.get_object(Bucket=server.bucket, Key=key)["Body"].read() == big.read_bytes()
