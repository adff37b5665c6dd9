"""Orphaned multipart uploads are aborted; OSS checkpoints of earlier versions and partial copies are removed."""

from __future__ import annotations

import json
import os

import pytest

from daemon.config import UploadTarget
from daemon.store import Store
from daemon.upload import make_uploader
from daemon.upload.base import Interrupted, Transfer
from daemon.upload.credentials import Credentials
from daemon.upload.manager import UploadManager
from tests.helpers import scaled

from .conftest import OSS_KEYS, S3_KEYS, make_qc_done_job, new_bucket
from .test_manager import UTC, Host

MiB = 1 << 20


@pytest.fixture
def big(tmp_path):
    path = tmp_path / "big.tif"
    path.write_bytes(os.urandom(11 * MiB))
    return path


def test_s3_aborts_orphaned_multipart_uploads_of_the_key_it_uploads(tmp_path, s3_server, big):
    bucket = new_bucket(s3_server)
    admin = s3_server.client()
    orphan = admin.create_multipart_upload(Bucket=bucket, Key="k/big.tif")[
        "UploadId"
    ]  # a crash before the id was saved
    admin.upload_part(Bucket=bucket, Key="k/big.tif", UploadId=orphan, PartNumber=1, Body=b"x" * (5 * MiB))
    other = admin.create_multipart_upload(Bucket=bucket, Key="k/another-file.tif")["UploadId"]  # not ours to touch
    up = make_uploader(
        UploadTarget(
            name="s3",
            type="s3",
            endpoint=s3_server.endpoint,
            bucket=bucket,
            region="us-east-1",
            addressing_style="path",
            part_size_mb=5,
        ),
        state_dir=tmp_path,
        credentials=Credentials(*S3_KEYS),
    )
    try:
        up.send(Transfer(local=up.digest(big), key="k/big.tif"))
    finally:
        up.close()
    left = {(u["Key"], u["UploadId"]) for u in admin.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert left == {("k/another-file.tif", other)}


def test_oss_keeps_its_resumable_state_in_the_store_and_sweeps_checkpoints_of_earlier_versions(
    tmp_path, s3_server, oss_proxy, big
):
    bucket = new_bucket(s3_server)
    admin = s3_server.client()
    up = make_uploader(
        UploadTarget(name="oss", type="oss", endpoint=oss_proxy.endpoint, bucket=bucket, part_size_mb=5, concurrency=1),
        state_dir=tmp_path / "state",
        credentials=Credentials(*OSS_KEYS),
    )

    def stop_after_one_part() -> None:
        if up.throttle.total > 6 * MiB:
            raise Interrupted("stop")

    folder = tmp_path / "state" / "upload-checkpoints" / "oss-oss"
    try:
        state: dict = {}
        with pytest.raises(Interrupted):
            up.send(Transfer(local=up.digest(big), key="k/big.tif", state=state, check=stop_after_one_part))
        assert state["upload_id"] and state["parts"]["1"]["crc64"]  # what the store records; no checkpoint file
        assert not folder.exists() or not any(folder.iterdir())
        up.discard("k/big.tif", state)
        assert admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

        # a checkpoint oss2's resumable_upload left (an earlier version), with its multipart upload
        orphan = admin.create_multipart_upload(Bucket=bucket, Key="k/old.tif")["UploadId"]
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint = folder / "0123abcd"
        checkpoint.write_text(json.dumps({"upload_id": orphan, "key": "k/old.tif"}), encoding="utf-8")
        assert up.sweep({checkpoint.name}) == []  # still in use: kept
        assert up.sweep(set(), older_than_s=3600) == []  # too recent to be stale
        assert up.sweep(set()) == [checkpoint.name]
        assert not checkpoint.exists()
        assert admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    finally:
        up.close()


def test_at_start_the_manager_discards_resumable_state_no_job_will_use(make_config, tmp_path, s3_server, monkeypatch):
    bucket = new_bucket(s3_server)
    monkeypatch.setenv("IMAGEQC_T_ACCESS_KEY_ID", S3_KEYS[0])
    monkeypatch.setenv("IMAGEQC_T_SECRET_ACCESS_KEY", S3_KEYS[1])
    cfg = make_config(
        f'[[upload]]\nname = "s3"\ntype = "s3"\nendpoint = "{s3_server.endpoint}"\nbucket = "{bucket}"\n'
        'region = "us-east-1"\naddressing_style = "path"\ncredentials = "env:IMAGEQC_T"\n'
    )
    admin = s3_server.client()
    with Store(cfg.database_path) as store:
        job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out")
        store.plan_uploads(
            job.id,
            [
                {
                    "target": "s3",
                    "kind": "outputs",
                    "local_path": str(job.archive),
                    "remote_key": "k/a.tar.gz",
                    "size": 1,
                }
            ],
        )
        upload_id = admin.create_multipart_upload(Bucket=bucket, Key="k/a.tar.gz")["UploadId"]
        row = store.uploads(job.id)[0]
        store.update_upload(
            row.id,
            upload_id=upload_id,
            parts={"local": None, "state": {"upload_id": upload_id, "part_size": 5 * MiB, "parts": {}}},
        )
        ssid, _ = store.add_scan_set(chip=job.chip, root=str(tmp_path / "inbox"), fingerprint="newer", members=[])
        store.supersede_older(job.chip, store.create_job(ssid))  # the job will never upload again
        mgr = UploadManager(cfg, tz=UTC)
        mgr.start(Host(store))
        try:
            mgr._janitor.result(timeout=scaled(60))  # the clean-up round ends (its error, if any, raised here)
        finally:
            mgr.stop()
        assert store.uploads(job.id)[0].upload_id is None
    assert admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
