"""Faults: the service killed mid-file (kill -9), the server stopped mid-upload, bad credentials."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.config import UploadTarget, load_config
from daemon.errors import PermanentUploadError
from daemon.status import collect_status
from daemon.store import JobState, Store
from daemon.upload import make_uploader
from daemon.upload.base import Transfer
from daemon.upload.credentials import Credentials
from daemon.upload.manager import UploadManager
from daemon.upload.s3 import composite_etag
from tests.helpers import QC_NORMAL_PRIORITY, scaled, tail, wait_until

from .conftest import OSS_KEYS, REPO, S3_KEYS, RcloneServer, free_port, make_qc_done_job, new_bucket
from .test_manager import UTC, Host, drive

MiB = 1 << 20


def _service(cfg_path: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "IMAGEQC_T_ACCESS_KEY_ID": S3_KEYS[0],
        "IMAGEQC_T_SECRET_ACCESS_KEY": S3_KEYS[1],
    }
    with (tmp_path / "service.out").open("ab") as out:  # what it printed, for a failure message
        return subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg_path)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _printed(tmp_path: Path) -> str:
    path = tmp_path / "service.out"
    return tail(path.read_bytes() if path.exists() else None)


def test_after_kill_9_mid_file_the_restarted_service_sends_only_the_missing_parts(tmp_path, s3_server):
    bucket = new_bucket(s3_server)
    cfg_path = tmp_path / "imageqc.toml"
    cfg_path.write_text(
        'state_dir = "state"\n[[watch]]\npath = "inbox"\n[service]\ntick_seconds = 0.2\nlease_seconds = 5\n'
        '[logging]\nconsole = "off"\n' + QC_NORMAL_PRIORITY + '[[upload]]\nname = "moto"\ntype = "s3"\n'
        f'endpoint = "{s3_server.endpoint}"\nbucket = "{bucket}"\nregion = "us-east-1"\naddressing_style = "path"\n'
        'mode = "outputs"\npart_size_mb = 5\nconcurrency = 2\nbandwidth_limit = "16MB/s"\ncredentials = "env:IMAGEQC_T"\n'
    )
    (tmp_path / "inbox").mkdir()
    db = tmp_path / "state" / "imageqc.sqlite3"
    with Store(db) as store:
        job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out", archive_payload=60 * MiB)
    size = job.archive.stat().st_size
    n_parts = -(-size // (5 * MiB))
    key = f"default/{job.chip}/{job.run}/{job.run}.tar.gz"

    def archive_row():
        with Store(db, readonly=True) as s:
            return next((r for r in s.uploads(job.id) if r.local_path == str(job.archive)), None)

    first = _service(cfg_path, tmp_path)
    try:
        row = wait_until(
            lambda: (r := archive_row()) and len(((r.parts or {}).get("state") or {}).get("parts") or {}) >= 3 and r,
            "three parts stored",
            timeout=60,
            every=0.05,
            seen=lambda: (archive_row(), _printed(tmp_path)),
        )
    finally:
        first.kill()  # SIGKILL: no clean-up, no lease release
        first.wait(scaled(30))
    row = archive_row()
    assert row is not None and row.state == "active" and row.upload_id
    with Store(db, readonly=True) as s:
        assert s.get_job(job.id).state == "uploading"  # as the dead process left it
    admin = s3_server.client()
    data = job.archive.read_bytes()
    md5s = [hashlib.md5(data[i : i + 5 * MiB]).hexdigest() for i in range(0, size, 5 * MiB)]
    recorded = row.parts["state"]["parts"]  # the MD5 of each part, recorded as it was sent
    assert all(recorded[n]["md5"] == md5s[int(n) - 1] for n in recorded)
    held = admin.list_parts(Bucket=bucket, Key=key, UploadId=row.upload_id).get("Parts", [])
    good = [p for p in held if p["ETag"].strip('"') == md5s[p["PartNumber"] - 1]]
    assert 3 <= len(good) < n_parts
    s3_server.clear_log()

    second = _service(cfg_path, tmp_path)
    cfg = load_config(cfg_path)
    busy = []
    try:

        def finished():
            st = collect_status(cfg)  # what `imageqc status` shows while the service uploads
            target = st["uploads"].get("targets", {}).get("moto", {})
            if st["service"]["running"] and target.get("files") and target.get("rate_bps"):
                busy.append(target)
            with Store(db, readonly=True) as s:
                return s.get_job(job.id).state == JobState.DONE

        wait_until(
            finished,
            "the upload to finish after the restart",
            timeout=90,
            every=0.1,
            seen=lambda: (archive_row(), _printed(tmp_path)),
        )
    finally:
        second.terminate()
        second.wait(timeout=scaled(60))
    assert busy and busy[0]["bytes"] > 0 and busy[0]["rate_bps"] > 0  # the backlog and the rate, from the heartbeat
    parts_sent = {e["part"] for e in s3_server.requests("UploadPart", f"{bucket}/{key}")}
    assert len(s3_server.requests("UploadPart", f"{bucket}/{key}")) == n_parts - len(good)
    assert parts_sent == set(range(1, n_parts + 1)) - {p["PartNumber"] for p in good}
    assert s3_server.requests("CreateMultipartUpload", f"{bucket}/{key}") == []  # the same multipart upload, resumed
    obj = admin.get_object(Bucket=bucket, Key=key)
    assert obj["Body"].read() == data
    assert obj["ETag"].strip('"') == composite_etag(tuple(md5s))  # what the verification compared
    done = archive_row()
    assert done.sha256 == hashlib.sha256(data).hexdigest()  # accumulated while the resumed upload read the file
    assert admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    log = [json.loads(line) for line in (tmp_path / "state" / "logs" / "imageqc.jsonl").read_text().splitlines()]
    assert any(e["event"] == "recovered jobs left by a previous run" for e in log)


def test_a_server_stopped_mid_upload_is_retried_until_it_returns(make_config, tmp_path, monkeypatch):
    rclone = RcloneServer(tmp_path / "rclone-data", free_port())
    rclone.root.mkdir()
    rclone.start()
    try:
        bucket = rclone.bucket("stereo")
        monkeypatch.setenv("IMAGEQC_T_ACCESS_KEY_ID", S3_KEYS[0])
        monkeypatch.setenv("IMAGEQC_T_SECRET_ACCESS_KEY", S3_KEYS[1])
        cfg = make_config(
            f'[[upload]]\nname = "rclone"\ntype = "s3"\nendpoint = "{rclone.endpoint}"\nbucket = "{bucket}"\n'
            'region = "us-east-1"\naddressing_style = "path"\nmode = "outputs"\npart_size_mb = 5\nconcurrency = 2\n'
            'bandwidth_limit = "10MB/s"\ncredentials = "env:IMAGEQC_T"\nmax_attempts = 30\nretry_base_s = 0.1\n'
            "retry_max_s = 0.5\ntimeout_s = 3\n"
        )
        store = Store(cfg.database_path)
        mgr = UploadManager(cfg, tz=UTC)
        mgr.start(Host(store))
        job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out", archive_payload=20 * MiB)
        with capture_logs() as logs:
            try:

                def some_parts_sent():
                    mgr.tick(time.time())
                    return any(r.bytes_done >= 5 * MiB for r in store.uploads(job.id))

                wait_until(
                    some_parts_sent, "the first part", timeout=60, every=0.05, seen=lambda: store.uploads(job.id)
                )
                rclone.stop()  # the server goes away mid-upload...

                def failed_twice():
                    mgr.tick(time.time())
                    return sum(e["event"] == "upload attempt failed; retrying" for e in logs) >= 2

                wait_until(failed_twice, "two failed attempts while the server is down", timeout=60, every=0.05)
                assert store.get_job(job.id).state == "uploading"  # ...the job keeps retrying, it does not fail
                rclone.start()  # ...and comes back (with its multipart state lost: the file starts over)
                drive(mgr, store, job.id, {"done"}, timeout=60)
            finally:
                mgr.stop()
                store.close()
        retries = [e for e in logs if e["event"] == "upload attempt failed; retrying"]
        assert retries and all(e["target"] == "rclone" for e in retries)
        stored = rclone.root / bucket / "default" / job.chip / job.run / f"{job.run}.tar.gz"
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(job.archive.read_bytes()).hexdigest()
    finally:
        rclone.stop()


@pytest.mark.parametrize("which", ["s3-rclone-secret", "oss-secret", "oss-key-id"])
def test_bad_credentials_are_a_clear_permanent_error(which, tmp_path, rclone_server, oss_proxy, s3_server):
    path = tmp_path / "report.json"
    path.write_bytes(b"{}" * 1000)
    if which.startswith("s3"):
        target = UploadTarget(
            name="lab",
            type="s3",
            endpoint=rclone_server.endpoint,
            bucket=rclone_server.bucket("creds"),
            region="us-east-1",
            addressing_style="path",
            credentials="env:LAB",
        )
        creds = Credentials(S3_KEYS[0], "not-the-secret")
    else:
        target = UploadTarget(
            name="lab", type="oss", endpoint=oss_proxy.endpoint, bucket=new_bucket(s3_server), credentials="env:LAB"
        )
        creds = Credentials(OSS_KEYS[0] if which == "oss-secret" else "LTAIunknown", "not-the-secret")
    up = make_uploader(target, state_dir=tmp_path / "state", credentials=creds)
    try:
        with pytest.raises(PermanentUploadError) as err:
            up.send(Transfer(local=up.digest(path), key="k/report.json"))
    finally:
        up.close()
    msg = str(err.value)
    assert msg.startswith("upload target 'lab': access denied")
    assert "wrong access key or secret" in msg and "upload.credentials = env:LAB" in msg
