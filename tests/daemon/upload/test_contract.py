"""One contract, four real back ends: S3 on moto, S3 on rclone, OSS (oss2) through the proxy, a share folder.

Every uploader must: store the file byte for byte and verify it; resume an
interrupted file sending only what the server lacks; skip a key that already
holds the same file; notice a stored object that was corrupted; and tell a
permanent error (fix the config) from a transient one (retry).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.config import UploadTarget
from daemon.errors import PermanentUploadError, TransientUploadError
from daemon.upload import make_uploader
from daemon.upload.base import IntegrityError, Interrupted, Transfer, Uploader
from daemon.upload.credentials import Credentials
from daemon.upload.hpc import PARTIAL_SUFFIX

from .conftest import OSS_KEYS, S3_KEYS, free_port, new_bucket

MiB = 1 << 20
BACKENDS = ["s3-moto", "s3-rclone", "oss-proxy", "hpc"]


@dataclass
class Backend:
    name: str
    make: Callable[..., Uploader]  # target overrides -> uploader
    read: Callable[[str], bytes]  # the stored bytes of a key
    corrupt: Callable[[str], None]  # flip one stored byte, keep metadata
    part_requests: Callable[[str], int] | None  # UploadPart requests the server saw for a key
    missing: dict[str, Any]  # overrides giving a permanent error
    unreachable: dict[str, Any]  # overrides giving a transient error


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    made: list[Uploader] = []
    kind = request.param

    def build(base: dict[str, Any], creds: Credentials | None) -> Callable[..., Uploader]:
        def make(**overrides: Any) -> Uploader:
            target = UploadTarget(**{**base, **overrides})
            up = make_uploader(target, state_dir=tmp_path / "state", credentials=creds)
            made.append(up)
            return up

        return make

    common = {"name": kind, "part_size_mb": 5, "concurrency": 2, "max_attempts": 1, "timeout_s": 5}
    if kind.startswith("s3"):
        if kind == "s3-moto":
            srv = request.getfixturevalue("s3_server")
            bucket = new_bucket(srv)
            admin = srv.client()

            def corrupt(key: str) -> None:
                obj = admin.get_object(Bucket=bucket, Key=key)
                data = obj["Body"].read()
                admin.put_object(Bucket=bucket, Key=key, Body=_flip(data, len(data) // 2), Metadata=obj["Metadata"])

            def parts(key: str) -> int:
                return len(srv.requests("UploadPart", f"{bucket}/{key}"))

            def read(key: str) -> bytes:
                return admin.get_object(Bucket=bucket, Key=key)["Body"].read()
        else:
            srv = request.getfixturevalue("rclone_server")
            bucket = srv.bucket(f"b-{uuid.uuid4().hex[:12]}")
            parts = None  # type: ignore[assignment]

            def read(key: str) -> bytes:
                return (srv.root / bucket / key).read_bytes()

            def corrupt(key: str) -> None:
                path = srv.root / bucket / key
                data = path.read_bytes()
                path.write_bytes(_flip(data, len(data) // 2))

        base = {
            **common,
            "type": "s3",
            "endpoint": srv.endpoint,
            "bucket": bucket,
            "region": "us-east-1",
            "addressing_style": "path",
        }
        yield Backend(
            kind,
            build(base, Credentials(*S3_KEYS)),
            read,
            corrupt,
            parts,
            missing={"bucket": "no-such-bucket"},
            unreachable={"endpoint": f"http://127.0.0.1:{free_port()}"},
        )
    elif kind == "oss-proxy":
        srv = request.getfixturevalue("s3_server")
        proxy = request.getfixturevalue("oss_proxy")
        bucket = new_bucket(srv)
        admin = srv.client()

        def read(key: str) -> bytes:
            return admin.get_object(Bucket=bucket, Key=key)["Body"].read()

        def corrupt(key: str) -> None:
            obj = admin.get_object(Bucket=bucket, Key=key)
            data = obj["Body"].read()
            admin.put_object(Bucket=bucket, Key=key, Body=_flip(data, len(data) // 2), Metadata=obj["Metadata"])

        def oss_parts(key: str) -> int:
            return sum(1 for e in proxy.requests("UploadPart") if e["path"].endswith(f"{bucket}/{key}"))

        base = {**common, "type": "oss", "endpoint": proxy.endpoint, "bucket": bucket}
        yield Backend(
            kind,
            build(base, Credentials(*OSS_KEYS)),
            read,
            corrupt,
            oss_parts,
            missing={"bucket": "no-such-bucket"},
            unreachable={"endpoint": f"http://127.0.0.1:{free_port()}"},
        )
    else:
        share = tmp_path / "share"
        share.mkdir()
        not_a_folder = tmp_path / "plain-file"
        not_a_folder.write_bytes(b"x")

        def read(key: str) -> bytes:
            return share.joinpath(*key.split("/")).read_bytes()

        def corrupt(key: str) -> None:
            path = share.joinpath(*key.split("/"))
            data = path.read_bytes()
            path.write_bytes(_flip(data, len(data) // 2))

        base = {**common, "type": "hpc", "path": str(share)}
        yield Backend(
            kind,
            build(base, None),
            read,
            corrupt,
            None,
            missing={"path": str(not_a_folder)},
            unreachable={"path": str(tmp_path / "unmounted")},
        )
    for up in made:
        up.close()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    big = tmp_path / "SS200000135TL_D1.tif"
    big.write_bytes(os.urandom(11 * MiB + 3))  # three 5 MiB parts, the last one short
    small = tmp_path / "report.json"
    small.write_bytes(os.urandom(100_000))
    return {"big": big, "small": small}


def _key(name: str) -> str:
    return f"site/{uuid.uuid4().hex[:8]}/SS200000135TL_D1/run/{name}"


def _transfer(
    up: Uploader, path: Path, key: str, saves: list[tuple[dict[str, Any], int]] | None = None, **kw: Any
) -> Transfer:
    saves = [] if saves is None else saves
    return Transfer(local=up.digest(path), key=key, save=lambda state, done: saves.append((state, done)), **kw)


@pytest.mark.parametrize("which", ["big", "small"])
def test_upload_stores_the_file_byte_for_byte_and_verifies_it(
    backend: Backend, files: dict[str, Path], which: str
) -> None:
    up = backend.make()
    path, key = files[which], _key(files[which].name)
    saves: list[tuple[dict[str, Any], int]] = []
    outcome = up.send(_transfer(up, path, key, saves))
    assert not outcome.present and outcome.checksum
    assert backend.read(key) == path.read_bytes()
    assert saves and saves[-1] == ({}, path.stat().st_size)  # finished: no resumable state left
    assert up.throttle.total == path.stat().st_size  # each byte read for sending exactly once
    up.verify(up.digest(path), key)
    if backend.part_requests is not None:
        assert backend.part_requests(key) == (3 if which == "big" else 0)


def test_an_interrupted_upload_resumes_sending_only_what_the_server_lacks(
    backend: Backend, files: dict[str, Path]
) -> None:
    up = backend.make(concurrency=1)  # one part at a time: part 1 is stored when part 2 is cut
    path, key = files["big"], _key("resume.tif")
    size = path.stat().st_size

    def stop_half_way() -> None:
        if up.throttle.total >= 7 * MiB:
            raise Interrupted("stop")

    saves: list[tuple[dict[str, Any], int]] = []
    with pytest.raises(Interrupted):
        up.send(_transfer(up, path, key, saves, check=stop_half_way))
    state, done = saves[-1]
    assert 0 < done < size and state  # some parts (or bytes) are safely stored, the rest is not
    parts_before = backend.part_requests(key) if backend.part_requests else None

    sent_before = up.throttle.total
    again = make_uploader(
        up.target, state_dir=up.state_dir, credentials=getattr(up, "creds", None)
    )  # as after a restart
    try:
        outcome = again.send(_transfer(again, path, key, state=dict(state)))
    finally:
        again.close()
    assert not outcome.present
    assert again.throttle.total == size - done, "only the missing part of the file was sent"
    assert backend.read(key) == path.read_bytes()
    if parts_before is not None:
        assert backend.part_requests(key) - parts_before == -(-(size - done) // (5 * MiB))
    assert up.throttle.total == sent_before


def test_a_key_already_holding_the_same_file_is_skipped(backend: Backend, files: dict[str, Path]) -> None:
    up = backend.make()
    path, key = files["big"], _key("present.tif")
    up.send(_transfer(up, path, key))
    sent = up.throttle.total
    parts = backend.part_requests(key) if backend.part_requests else None
    outcome = up.send(_transfer(up, path, key))
    assert outcome.present
    assert up.throttle.total == sent
    if parts is not None:
        assert backend.part_requests(key) == parts


def test_verify_notices_a_corrupted_object_and_a_new_send_repairs_it(backend: Backend, files: dict[str, Path]) -> None:
    up = backend.make()
    for which in ("big", "small"):
        path, key = files[which], _key(f"corrupt-{which}")
        up.send(_transfer(up, path, key))
        backend.corrupt(key)
        assert backend.read(key) != path.read_bytes()
        with pytest.raises(IntegrityError, match="does not match"):
            up.verify(up.digest(path), key)
        outcome = up.send(_transfer(up, path, key))
        assert not outcome.present
        assert backend.read(key) == path.read_bytes()


def test_only_an_object_that_claims_to_be_the_file_but_is_not_is_removed_as_torn(
    backend: Backend, files: dict[str, Path]
) -> None:
    """What a transfer leaves when its file changes while it is sent (#20 case 3) is deleted; nothing else is."""
    up = backend.make()
    path = files["small"]
    local = up.digest(path)
    good, torn = _key("good.json"), _key("torn.json")
    up.send(_transfer(up, path, good))
    up.send(_transfer(up, path, torn))
    backend.corrupt(torn)  # the stored bytes differ, its SHA-256 metadata still names the file
    assert not up.remove_if_torn(good, local) and backend.read(good) == path.read_bytes()
    assert not up.remove_if_torn(_key("absent.json"), local)
    claims = up.probe(torn).sha256 is not None
    assert up.remove_if_torn(torn, local) is claims
    if claims:
        assert up.probe(torn) is None
    else:  # no SHA-256 stored with the object (a share folder): never guessed, left alone
        assert backend.read(torn) != path.read_bytes()


def test_a_missing_bucket_or_folder_is_a_permanent_error_that_names_the_target_and_the_fix(
    backend: Backend, files: dict[str, Path]
) -> None:
    up = backend.make(**backend.missing)
    with pytest.raises(PermanentUploadError) as err:
        up.send(_transfer(up, files["small"], _key("x.json")))
    assert f"upload target {backend.name!r}" in str(err.value)
    assert err.value.hint  # says what to do


def test_an_unreachable_server_or_share_is_a_transient_error(backend: Backend, files: dict[str, Path]) -> None:
    up = backend.make(**backend.unreachable)
    with pytest.raises(TransientUploadError) as err:
        up.send(_transfer(up, files["small"], _key("x.json")))
    assert not isinstance(err.value, PermanentUploadError)
    assert f"upload target {backend.name!r}" in str(err.value)


def test_hpc_hashes_only_the_whole_file_not_part_md5s_it_never_sends(tmp_path: Path, files: dict[str, Path]) -> None:
    share = tmp_path / "share"
    share.mkdir()
    up = make_uploader(UploadTarget(name="hpc", type="hpc", path=str(share)), state_dir=tmp_path / "state")
    local = up.digest(files["big"])
    assert local.part_md5 == () and local.part_sha256 == ()
    assert local.sha256 == hashlib.sha256(files["big"].read_bytes()).hexdigest()
    assert up.reusable(local)


def test_hpc_never_shows_a_partial_file_under_the_real_name(tmp_path: Path, files: dict[str, Path]) -> None:
    share = tmp_path / "share"
    share.mkdir()
    up = make_uploader(UploadTarget(name="hpc", type="hpc", path=str(share)), state_dir=tmp_path / "state")

    def stop_early() -> None:
        if up.throttle.total >= 3 * MiB:
            raise Interrupted("stop")

    key = "a/b/SS200000135TL_D1.tif"
    with pytest.raises(Interrupted):
        up.send(_transfer(up, files["big"], key, check=stop_early))
    assert not (share / "a" / "b" / "SS200000135TL_D1.tif").exists()
    partial = share / "a" / "b" / f".SS200000135TL_D1.tif{PARTIAL_SUFFIX}"
    assert partial.stat().st_size == 3 * MiB
    partial.write_bytes(b"garbage" + partial.read_bytes()[7:])  # a damaged partial copy is noticed...
    with pytest.raises(IntegrityError):
        up.send(_transfer(up, files["big"], key))
    assert not partial.exists()
    up.send(_transfer(up, files["big"], key))  # ...and the next attempt copies from scratch
    assert (share / key).read_bytes() == files["big"].read_bytes()


def test_small_documents_are_stored_whole_listed_and_read_back(backend):
    """The fleet status documents (#19): put, list under a prefix, get; with the upload's own permissions."""
    up = backend.make()
    assert up.list_documents("p/_fleet/") == []
    assert up.get_document("p/_fleet/lab/nobody.json") is None
    up.put_document("p/_fleet/lab/pc-1.json", b'{"n": 1}')
    up.put_document("p/_fleet/lab/pc-2.json", b'{"n": 2}')
    up.put_document("p/_fleet/lab/pc-1.json", b'{"n": 3}')  # replaced whole
    up.put_document("p/outputs/x.json", b"{}")
    assert up.list_documents("p/_fleet/") == ["p/_fleet/lab/pc-1.json", "p/_fleet/lab/pc-2.json"]
    assert up.get_document("p/_fleet/lab/pc-1.json") == b'{"n": 3}'
    assert backend.read("p/_fleet/lab/pc-2.json") == b'{"n": 2}'
