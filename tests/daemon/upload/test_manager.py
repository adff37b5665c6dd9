"""The uploads component: claims QC'd jobs, runs files in threads, settles jobs; windows, errors, changes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.logging import configure_logging
from daemon.status import collect_status
from daemon.store import Store
from daemon.upload.manager import UploadManager
from tests.helpers import wait_until

from .conftest import (
    OSS_KEYS,
    S3_KEYS,
    free_port,
    make_qc_done_job,
    new_bucket,
    run_qc_again,
    write_tiff,
)

UTC = timezone.utc


class Host:
    """What the manager takes from the Daemon at start."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.owner = "pc-7:4242:test"
        self.clock = clock


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def at(hour: int, minute: int = 0) -> float:
    return datetime(2024, 6, 12, hour, minute, tzinfo=UTC).timestamp()


def tick_until(mgr: UploadManager, pred, what: str, *, clock=time.time, timeout: float = 30.0, seen=None, every=0.02):
    """Tick the manager until ``pred()`` holds (deadline scaled); fails with ``what`` and what was seen."""

    def ticked():
        mgr.tick(clock())
        return pred()

    return wait_until(ticked, what, timeout=timeout, seen=seen, every=every)


def drive(mgr: UploadManager, store: Store, job_id: int, states: set[str], *, clock=time.time, timeout: float = 30.0):
    """Tick until the job rests in one of ``states`` with nothing of it running."""

    def resting():
        job = store.get_job(job_id)
        return job if job.state in states and job_id not in mgr._active else None

    return tick_until(
        mgr,
        resting,
        f"job {job_id} to rest in {sorted(states)}",
        clock=clock,
        timeout=timeout,
        seen=lambda: (store.get_job(job_id), f"transfers running: {job_id in mgr._active}"),
    )


def drive_until_waiting(mgr: UploadManager, store: Store, job_id: int, *, clock=time.time):
    """Drive until the job rests in qc_done with a time set for its next attempt."""

    def waiting():
        job = drive(mgr, store, job_id, {"qc_done"}, clock=clock)
        return job if job.next_attempt_at is not None else None

    return wait_until(
        waiting, f"job {job_id} to wait for its next attempt", timeout=30, seen=lambda: store.get_job(job_id)
    )


@pytest.fixture
def setup(make_config, tmp_path):
    """Make a config, a store and a started manager; all closed at the end."""
    made = []

    def make(toml: str, *, clock=time.time, **kw):
        cfg = make_config(toml)
        store = Store(cfg.database_path)
        mgr = UploadManager(cfg, tz=UTC, **kw)
        mgr.start(Host(store, clock))
        made.append((mgr, store))
        # ticks do nothing until the start-up clean-up has run: tests count on their first ticks
        wait_until(
            lambda: mgr._janitor is None or mgr._janitor.done(),
            "mgr._janitor is None or mgr._janitor.done()",
            timeout=30,
        )
        return cfg, store, mgr

    yield make
    for mgr, store in made:
        mgr.stop()
        store.close()


def hpc(name: str, mode: str = "all", *, root: Path, **extra: str | int) -> str:
    (root / f"{name}-share").mkdir(exist_ok=True)
    lines = [
        f'name = "{name}"',
        'type = "hpc"',
        f"path = {json.dumps(str(root / f'{name}-share'))}",
        f'mode = "{mode}"',
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "[[upload]]\n" + "\n".join(lines) + "\n"


def s3(endpoint: str, bucket: str, mode: str = "outputs", **extra) -> str:
    lines = [
        'name = "lab-s3"',
        'type = "s3"',
        f'endpoint = "{endpoint}"',
        f'bucket = "{bucket}"',
        'region = "us-east-1"',
        'addressing_style = "path"',
        f'mode = "{mode}"',
        'credentials = "env:IMAGEQC_T"',
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "[[upload]]\n" + "\n".join(lines) + "\n"


@pytest.fixture
def s3_env(monkeypatch):
    monkeypatch.setenv("IMAGEQC_T_ACCESS_KEY_ID", S3_KEYS[0])
    monkeypatch.setenv("IMAGEQC_T_SECRET_ACCESS_KEY", S3_KEYS[1])


def test_a_job_goes_to_every_target_and_ends_done(setup, tmp_path, s3_server, s3_env):
    bucket = new_bucket(s3_server)
    _cfg, store, mgr = setup(
        hpc("share-a", root=tmp_path) + s3(s3_server.endpoint, bucket) + '[site]\nname = "lab-7"\n'
    )
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out", tiles=True)
    done = drive(mgr, store, job.id, {"done"})
    assert "uploaded" in store.events(job.id)[-1].message
    rows = store.uploads(job.id)
    assert {r.state for r in rows} == {"done"} and len(rows) == 9  # hpc: 5 inputs + 2 outputs; s3: 2 outputs
    assert {r.target for r in rows if r.kind == "inputs"} == {"share-a"}
    key = f"lab-7/{job.chip}/{job.run}/{job.run}.tar.gz"
    body = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body == job.archive.read_bytes()
    share = tmp_path / "share-a-share" / "lab-7" / job.chip / job.run
    assert (share / f"{job.chip}_CD31_IF" / "tile_1_1.tif").read_bytes() == (
        job.inputs[1] / "tile_1_1.tif"
    ).read_bytes()
    assert not (share / f"{job.chip}_CD31_IF" / "~lock.tmp").exists()
    assert mgr.health()["targets"]["lab-s3"]["files"] == 0 and done.error is None
    # bytes sent since the start, for imageqc_upload_bytes_total (#19): at least both outputs of the run
    assert mgr.health()["targets"]["lab-s3"]["sent_bytes"] >= sum(r.size for r in rows if r.target == "lab-s3")

    archive = job.archive.read_bytes()
    again = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out")  # the same run uploaded again
    again.archive.write_bytes(archive)  # (a new gzip header otherwise: its time stamp)
    drive(mgr, store, again.id, {"done"})
    assert {r.state for r in store.uploads(again.id)} == {"present"}
    assert "already present" in store.events(again.id)[-1].message


def test_windows_decide_when_each_target_uploads(setup, tmp_path):
    clock = Clock(at(12, 0))
    _cfg, store, mgr = setup(
        hpc("day", "outputs", root=tmp_path) + hpc("night", "outputs", root=tmp_path, window="20:00-06:00"), clock=clock
    )
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out")
    # the job starts in qc_done: drive until the manager has uploaded to day and set it to wait for night
    waiting = drive_until_waiting(mgr, store, job.id, clock=clock)
    assert waiting.next_attempt_at == at(20, 0)  # back in qc_done until the night window opens
    assert {
        r.target: r.state for r in store.uploads(job.id) if r.kind == "outputs" and r.local_path == str(job.archive)
    } == {"day": "done", "night": "pending"}
    assert "waiting for the upload window of night" in store.events(job.id)[-1].message
    assert mgr.health()["targets"]["night"]["files"] == 2 and mgr.health()["targets"]["night"]["next_open"] == at(20, 0)
    n_events = len(store.events(job.id))
    clock.t = at(19, 0)
    for _ in range(5):
        mgr.tick(clock())
    assert store.get_job(job.id).state == "qc_done" and len(store.events(job.id)) == n_events  # no churn
    clock.t = at(20, 30)
    drive(mgr, store, job.id, {"done"}, clock=clock)
    assert (tmp_path / "night-share" / "default" / job.chip / job.run / f"{job.run}.tar.gz").exists()


def test_a_job_whose_targets_are_all_closed_waits_in_qc_done_with_its_backlog_visible(setup, tmp_path, capsys):
    clock = Clock(at(12, 0))
    cfg, store, mgr = setup(hpc("night", "all", root=tmp_path, window="20:00-06:00"), clock=clock)
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out")
    for _ in range(3):
        mgr.tick(clock())
    assert store.get_job(job.id).state == "qc_done" and [e.to_state for e in store.events(job.id)][-1] == "qc_done"
    size = job.archive.stat().st_size + job.report_json.stat().st_size + job.inputs[0].stat().st_size
    h = mgr.health()["targets"]["night"]
    assert (h["files"], h["bytes"], h["open"], h["next_open"]) == (3, size, False, at(20, 0))
    st = collect_status(cfg)  # no service heartbeat: the backlog comes from the database
    assert st["uploads"]["targets"]["night"]["files"] == 3 and st["uploads"]["targets"]["night"]["bytes"] == size
    assert main(["status", "--config", cfg.source]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("upload    night: 3 files,") and "waiting" in line for line in out.splitlines())
    assert all(len(line) <= 80 for line in out.splitlines())
    assert main(["uploads", "--json", "--config", cfg.source]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["schema"] == "imageqc.uploads/1"
    assert {(u["target"], u["state"], u["chip"]) for u in listed["uploads"]} == {("night", "pending", job.chip)}
    assert sorted(u["remote_key"].rsplit("/", 1)[1] for u in listed["uploads"]) == sorted(
        [f"{job.chip}.tif", f"{job.run}.tar.gz", "report.json"]
    )
    assert main(["uploads", "--config", cfg.source, "--state", "done"]) == 0
    assert "no uploads matching the filter" in capsys.readouterr().out
    assert main(["uploads", "--config", cfg.source]) == 0
    table = capsys.readouterr().out
    assert "night" in table and "pending" in table


def test_a_permanent_error_fails_the_job_at_once_naming_the_target_and_the_fix(setup, tmp_path, s3_server, s3_env):
    missing = f"no-such-bucket-{os.getpid()}-{time.monotonic_ns()}"  # own name: the session's server log is shared
    _cfg, store, mgr = setup(s3(s3_server.endpoint, missing, mode="outputs", max_attempts=8))
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out")
    failed = drive(mgr, store, job.id, {"failed"})
    assert failed.failed_stage == "upload" and failed.next_attempt_at is None
    assert "upload target 'lab-s3'" in failed.error and "does not exist" in failed.error and "create it" in failed.error
    assert all(r.attempts <= 1 for r in store.uploads(job.id))  # no retry storm
    puts = [
        e
        for e in s3_server.log()
        if e["path"].startswith(f"/{missing}/") and e["op"] in ("PutObject", "CreateMultipartUpload")
    ]
    assert len(puts) <= 2  # at most one try per file, cut short once the first failed
    store.requeue_due(now=time.time() + 10**6)
    assert store.get_job(job.id).state == "failed"  # never retried automatically


def test_transient_errors_are_retried_with_backoff_then_given_up(setup, tmp_path, s3_env):
    dead = f"http://127.0.0.1:{free_port()}"
    _cfg, store, mgr = setup(
        s3(dead, "bkt", mode="outputs", max_attempts=2, retry_base_s=0.01, retry_max_s=0.02, timeout_s=1)
        + "[service]\nmax_attempts = 2\n"  # the test config's retry_base_s is 1 s
    )
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out")
    t0 = time.time()
    first = drive(mgr, store, job.id, {"failed"})
    assert first.failed_stage == "upload" and "is http" in first.error and "reachable" in first.error
    assert t0 + 0.5 <= first.next_attempt_at <= time.time() + 1  # the job's retry: backoff from 1 s, jittered
    assert store.requeue_due(now=first.next_attempt_at) == [job.id]
    second = drive(mgr, store, job.id, {"failed"})
    assert second.next_attempt_at is None and "gave up after 2 attempts" in second.error
    assert f"imageqc retry {job.id}" in second.error


def test_inputs_changed_since_qc_are_never_uploaded_and_the_job_waits_for_discovery(setup, tmp_path):
    _cfg, store, mgr = setup(hpc("hpc", "all", root=tmp_path))
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out")
    tif = job.inputs[0]
    original, st = tif.read_bytes(), tif.stat()
    tif.write_bytes(original[:-10] + b"0123456789")  # same size, new content and mtime
    # the job starts in qc_done too: drive until the manager has looked at it and set it to wait
    waiting = drive_until_waiting(mgr, store, job.id)
    assert waiting.next_attempt_at is not None and waiting.next_attempt_at > time.time(), waiting
    assert "inputs changed since QC" in store.events(job.id)[-1].message
    assert not any((tmp_path / "hpc-share").rglob("*.tif"))
    assert {r.state for r in store.uploads(job.id) if r.kind == "inputs"} == {"changed"}
    # the files come back as QC saw them (say, the export was restored): the upload proceeds
    tif.write_bytes(original)
    os.utime(tif, ns=(st.st_atime_ns, st.st_mtime_ns))
    store._conn.execute("UPDATE jobs SET next_attempt_at = 0 WHERE id = ?", (job.id,))
    drive(mgr, store, job.id, {"done"})
    # a changed export that discovery re-queued: the old job ends superseded and is left alone
    other = make_qc_done_job(store, tmp_path / "inbox2", tmp_path / "out2", chip="C02533C")
    with open(other.inputs[0], "ab") as f:
        f.write(b"late bytes")
    drive(mgr, store, other.id, {"qc_done"})
    ssid, _ = store.add_scan_set(chip="C02533C", root=str(tmp_path / "inbox2"), fingerprint="new-export", members=[])
    newer = store.create_job(ssid)
    assert newer is not None and store.supersede_older("C02533C", newer) == [other.id]
    store._conn.execute("UPDATE jobs SET next_attempt_at = 0 WHERE id = ?", (other.id,))
    for _ in range(3):
        mgr.tick(time.time())
    assert store.get_job(other.id).state == "superseded"
    assert not list((tmp_path / "hpc-share").rglob("C02533C*"))


def _replace_keeping_size_and_time(path: Path, seed: int) -> bytes:
    """Replace a TIFF by another picture of the same size, then put its mtime back (``cp -p``, ``rsync -t``)."""
    st = path.stat()
    spare = write_tiff(path.with_name("replacement.tif"), shape=(256, 256), seed=seed)
    os.replace(spare, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    return path.read_bytes()


def _overwrite_keeping_size_and_time(path: Path, tail: int = 64 << 10) -> None:
    """Rewrite the last ``tail`` bytes of a file in place, then put its mtime back."""
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(st.st_size - tail)
        f.write(os.urandom(tail))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _objects(client, bucket: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def test_an_input_replaced_after_qc_with_the_same_size_and_time_goes_back_to_qc(setup, tmp_path, s3_server, s3_env):
    """Issue #20 case 3: the verdict is for the original; the replacement is never uploaded beside it."""
    bucket = new_bucket(s3_server)
    _, store, mgr = setup(s3(s3_server.endpoint, bucket, mode="all"))
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out")
    tif = job.inputs[0]
    replacement = _replace_keeping_size_and_time(tif, seed=999)
    back = drive(mgr, store, job.id, {"queued"})
    message = store.events(job.id)[-1].message
    assert f"{tif}: changed after QC (content differs, same size and time); QC runs again" == message, message
    assert back.next_attempt_at is None and back.error is None
    assert _objects(s3_server.client(), bucket) == {}  # neither the replacement nor the stale verdict was sent
    assert store.uploads(job.id) == []  # the new QC run plans its own (its run id is in the keys)

    # QC runs again on the file as it is now; its new verdict and the new file are uploaded together
    rerun = run_qc_again(store, job.id, job.chip, job.inputs, tmp_path / "out", stamp="20240612_111500")
    drive(mgr, store, job.id, {"done"})
    stored = _objects(s3_server.client(), bucket)
    assert stored[f"default/{job.chip}/{rerun.run}/{tif.name}"] == replacement
    assert stored[f"default/{job.chip}/{rerun.run}/{rerun.run}.tar.gz"] == rerun.archive.read_bytes()
    assert not any(job.run in k for k in stored)  # nothing of the stale run


@pytest.mark.parametrize("kind", ["s3", "oss"])
def test_an_input_replaced_while_it_is_uploaded_leaves_no_torn_object_and_goes_back_to_qc(
    setup, tmp_path, s3_server, kind, request, monkeypatch
):
    """Issue #20 case 3, mid-upload. S3 and OSS read the file once while sending: the SHA-256 of the bytes read
    differs from QC's, so the multipart upload is aborted before it is completed (nothing is ever stored, torn or
    not). Neither the job fails on the server's checksum nor does `imageqc retry` fail the same way forever."""
    bucket = new_bucket(s3_server)
    # four parts of 5 MiB, one at a time: the tail is read ~2 s after the first byte is sent
    slow = {"mode": "all", "bandwidth_limit": "8MB/s", "concurrency": 1, "part_size_mb": 5}
    shape = (4096, 4096)
    if kind == "s3":
        keys, toml = S3_KEYS, s3(s3_server.endpoint, bucket, **slow)
    else:
        proxy = request.getfixturevalue("oss_proxy")
        keys = OSS_KEYS
        toml = (
            s3(proxy.endpoint, bucket, **slow)
            .replace('type = "s3"', 'type = "oss"')
            .replace('addressing_style = "path"\n', "")
        )
    monkeypatch.setenv("IMAGEQC_T_ACCESS_KEY_ID", keys[0])
    monkeypatch.setenv("IMAGEQC_T_SECRET_ACCESS_KEY", keys[1])
    cfg, store, mgr = setup(toml)
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out", shape=shape)
    tif = job.inputs[0]

    def started():
        up = mgr._uploaders.get("lab-s3")
        return up is not None and up.throttle.total >= 256 << 10

    tick_until(mgr, started, "the upload of the input to start", seen=lambda: store.uploads(job.id))
    _overwrite_keeping_size_and_time(tif)  # re-exported in place while it is read (the tail: ~3 s ahead of the sender)
    back = drive(mgr, store, job.id, {"queued", "failed", "done"})
    message = store.events(job.id)[-1].message
    assert back.state == "queued", (back.state, back.error, message)
    key = f"default/{job.chip}/{job.run}/{tif.name}"
    assert message == f"{tif}: changed after QC (content differs, same size and time); QC runs again", message
    assert s3_server.requests("CompleteMultipartUpload", f"{bucket}/{key}") == []  # never published
    client = s3_server.client()
    assert _objects(client, bucket) == {}  # no torn object, and no verdict was sent
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    # a job that failed on such a change (as the old code left it, blaming the ETag) is retried by hand:
    # it goes back to QC instead of failing the same way again
    run_qc_again(store, job.id, job.chip, job.inputs, tmp_path / "out", stamp="20240612_111500")
    _overwrite_keeping_size_and_time(tif)
    store.transition(
        job.id, "failed", error="upload target 'lab-s3': PUT ...: server ETag ... is not the MD5", failed_stage="upload"
    )
    assert main(["retry", str(job.id), "--config", cfg.source]) == 0
    drive(mgr, store, job.id, {"queued"})
    assert (
        store.events(job.id)[-1].message
        == f"{tif}: changed after QC (content differs, same size and time); QC runs again"
    )
    assert _objects(client, bucket) == {}


def test_an_input_that_disappeared_fails_the_job(setup, tmp_path):
    _cfg, store, mgr = setup(hpc("hpc", "inputs", root=tmp_path))
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out")
    mgr._plan_waiting(time.time())  # records planned while the file was there
    job.inputs[0].unlink()
    failed = drive(mgr, store, job.id, {"failed"})
    assert "gone before upload" in failed.error and failed.next_attempt_at is None


def _share_matches(share: Path, job) -> None:
    """Every input of ``job`` (its TIFF and its tile folder's four tiles) stored on the share byte for byte."""
    tif, folder = job.inputs
    assert (share / tif.name).read_bytes() == tif.read_bytes()
    for tile in sorted(folder.glob("tile_*.tif")):
        assert (share / folder.name / tile.name).read_bytes() == tile.read_bytes()


def _outage_failure(store: Store, job_id: int) -> tuple[float, dict]:
    """The retry delay and event data of the job's latest failure."""
    event = [e for e in store.events(job_id) if e.to_state == "failed"][-1]
    return store.get_job(job_id).next_attempt_at - event.at, event.data


def test_a_watch_root_gone_before_the_upload_fails_it_transiently_and_it_completes_when_the_root_is_back(
    setup, tmp_path
):
    """An unmounted share (here: the watch root renamed away) is not a deleted input: the job waits, backing off,
    and uploads everything once the root is back."""
    _cfg, store, mgr = setup(hpc("hpc", "inputs", root=tmp_path))
    inbox = tmp_path / "inbox"
    job = make_qc_done_job(store, inbox, tmp_path / "out", tiles=True)
    mgr._plan_waiting(time.time())  # records planned while the files were there
    inbox.rename(tmp_path / "inbox-unmounted")
    failed = drive(mgr, store, job.id, {"failed"})
    assert failed.failed_stage == "upload" and failed.next_attempt_at is not None, failed
    assert failed.error.startswith(f"the watch root {inbox} is unavailable (folder missing): "), failed.error
    assert "upload is paused" in failed.error and "resumes once the share or folder is back" in failed.error
    assert "gone before upload" not in failed.error
    delay, data = _outage_failure(store, job.id)
    assert data == {"unreachable": 1} and delay > 0
    rows = [r for r in store.uploads(job.id) if r.kind == "inputs"]
    assert len(rows) == 5 and {r.state for r in rows} == {"pending"} and {r.attempts for r in rows} == {0}
    assert not any((tmp_path / "hpc-share").rglob("*.tif"))

    # still gone at the retry: failed again, waiting longer (the service's backoff; retry_base_s is 1 s here)
    assert store.requeue_due(now=failed.next_attempt_at) == [job.id]
    again = drive(mgr, store, job.id, {"failed"})
    delay, data = _outage_failure(store, job.id)
    assert again.next_attempt_at is not None and data == {"unreachable": 2} and delay >= 1.0

    (tmp_path / "inbox-unmounted").rename(inbox)
    assert store.requeue_due(now=again.next_attempt_at) == [job.id]
    done = drive(mgr, store, job.id, {"done"})
    assert done.error is None
    assert {r.state for r in store.uploads(job.id)} == {"done"}
    _share_matches(tmp_path / "hpc-share" / "default" / job.chip / job.run, job)


def test_a_watch_root_gone_mid_upload_pauses_it_keeping_what_was_sent(setup, tmp_path):
    """The root goes away while the tiles are sent one at a time: the files already stored stay stored and are not
    sent again, the others keep their attempts, and the retry after the root is back finishes the set."""
    _cfg, store, mgr = setup(hpc("hpc", "inputs", root=tmp_path, bandwidth_limit="2MB/s", concurrency=1))
    inbox = tmp_path / "inbox"
    job = make_qc_done_job(store, inbox, tmp_path / "out", tiles=True, tile_shape=(1024, 1024))  # 1 MiB a tile

    def inputs():
        return [r for r in store.uploads(job.id) if r.kind == "inputs"]

    tick_until(mgr, lambda: sum(r.state == "done" for r in inputs()) >= 2, "two inputs stored", seen=inputs)
    inbox.rename(tmp_path / "inbox-unmounted")
    failed = drive(mgr, store, job.id, {"failed"})
    assert failed.failed_stage == "upload" and failed.next_attempt_at is not None, failed
    assert failed.error.startswith(f"the watch root {inbox} is unavailable (folder missing): "), failed.error
    stored = {r.id for r in inputs() if r.state == "done"}
    assert 2 <= len(stored) < 5, inputs()  # the root went while tiles were still to send
    assert all(r.attempts == 1 for r in inputs() if r.id in stored)
    assert all(r.attempts == 0 and r.state in ("retry", "pending") for r in inputs() if r.id not in stored), inputs()

    (tmp_path / "inbox-unmounted").rename(inbox)
    assert store.requeue_due(now=failed.next_attempt_at) == [job.id]
    drive(mgr, store, job.id, {"done"})
    rows = inputs()
    assert {r.state for r in rows} <= {"done", "present"}  # present: a copy finished as the root went
    assert all(r.attempts == 1 for r in rows)  # what was stored before the outage is not sent again
    _share_matches(tmp_path / "hpc-share" / "default" / job.chip / job.run, job)


def test_a_stop_mid_file_and_a_new_manager_resume_from_the_records(setup, tmp_path):
    cfg, store, mgr = setup(hpc("hpc", "outputs", root=tmp_path, bandwidth_limit="2MB/s"))
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out", archive_payload=6 << 20)

    def one_mib_sent():
        rows = [r for r in store.uploads(job.id) if r.local_path == str(job.archive)]
        return rows and rows[0].bytes_done >= 1 << 20

    tick_until(mgr, one_mib_sent, "1 MiB of the archive sent", every=0.05, seen=lambda: store.uploads(job.id))
    mgr.stop()
    row = next(r for r in store.uploads(job.id) if r.local_path == str(job.archive))
    assert row.state == "pending" and 0 < row.bytes_done < row.size
    assert store.get_job(job.id).state == "qc_done"  # released, not left to lease recovery
    mgr2 = UploadManager(cfg, tz=UTC)
    mgr2.start(Host(store))
    try:
        drive(mgr2, store, job.id, {"done"})
        sent = mgr2._uploaders["hpc"].throttle.total
    finally:
        mgr2.stop()
    assert sent == job.archive.stat().st_size - row.bytes_done  # report.json was done before the stop
    dest = tmp_path / "hpc-share" / "default" / job.chip / job.run / f"{job.run}.tar.gz"
    assert dest.read_bytes() == job.archive.read_bytes()


def test_a_cancelled_job_stops_its_transfers(setup, tmp_path):
    _cfg, store, mgr = setup(hpc("hpc", "outputs", root=tmp_path, bandwidth_limit="4MB/s"))
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out", archive_payload=8 << 20)
    tick_until(
        mgr,
        lambda: any(r.bytes_done > 0 for r in store.uploads(job.id)),
        "the first bytes sent",
        every=0.05,
        seen=lambda: store.uploads(job.id),
    )
    store.cancel(job.id)
    tick_until(mgr, lambda: job.id not in mgr._active, "the cancelled job's transfers to stop", every=0.05)
    final = store.get_job(job.id)
    assert final.state == "failed" and final.failed_stage == "cancelled"
    assert not (tmp_path / "hpc-share" / "default" / job.chip / job.run / f"{job.run}.tar.gz").exists()


def test_secrets_never_reach_the_database_or_the_log(setup, tmp_path, rclone_server, monkeypatch, capsys):
    log_file = tmp_path / "log.jsonl"
    configure_logging(level="debug", file=log_file, console="off")
    bucket = rclone_server.bucket(f"b-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    monkeypatch.setenv("IMAGEQC_T_ACCESS_KEY_ID", S3_KEYS[0])
    monkeypatch.setenv("IMAGEQC_T_SECRET_ACCESS_KEY", S3_KEYS[1])
    cfg, store, mgr = setup(s3(rclone_server.endpoint, bucket, mode="all"))
    ok = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out")
    drive(mgr, store, ok.id, {"done"})
    mgr.stop()
    wrong = "Wr0ng-secret-must-not-leak"
    monkeypatch.setenv("IMAGEQC_T_SECRET_ACCESS_KEY", wrong)
    mgr2 = UploadManager(cfg, tz=UTC)
    mgr2.start(Host(store))
    bad = make_qc_done_job(store, tmp_path / "inbox2", tmp_path / "out2", chip="C02533C")
    try:
        failed = drive(mgr2, store, bad.id, {"failed"})
    finally:
        mgr2.stop()
    assert failed.next_attempt_at is None and "wrong access key or secret" in failed.error
    assert "upload target 'lab-s3'" in failed.error and "IMAGEQC_T" in failed.error
    assert main(["show", str(bad.id), "--json", "--config", cfg.source]) == 0
    shown = capsys.readouterr().out
    logging_done = log_file.read_text()
    assert "upload failed permanently" in logging_done
    store.close()
    blobs = b"".join(p.read_bytes() for p in cfg.state_dir.rglob("*") if p.is_file())
    for secret in (S3_KEYS[1], wrong):
        assert secret.encode() not in blobs
        assert secret not in logging_done
        assert secret not in shown
    configure_logging(console="off")


def test_a_window_closing_mid_file_lets_the_part_in_flight_finish_and_resumes_at_the_next_opening(
    setup, tmp_path, s3_server, s3_env
):
    bucket = new_bucket(s3_server)
    clock = Clock(at(21, 0))
    _cfg, store, mgr = setup(
        s3(
            s3_server.endpoint,
            bucket,
            mode="outputs",
            window="20:00-06:00",
            part_size_mb=5,
            concurrency=1,
            bandwidth_limit="10MB/s",
        ),
        clock=clock,
    )
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out", archive_payload=12 << 20)
    key = f"default/{job.chip}/{job.run}/{job.run}.tar.gz"

    def archive_started():
        row = next((r for r in store.uploads(job.id) if r.local_path == str(job.archive)), None)
        return row is not None and row.bytes_done > 0

    tick_until(mgr, archive_started, "the archive's first bytes sent", clock=clock, seen=lambda: store.uploads(job.id))
    clock.t = at(6, 30) + 86400  # the window closes
    waiting = drive(mgr, store, job.id, {"qc_done"}, clock=clock)
    assert waiting.next_attempt_at == at(20, 0) + 86400
    row = next(r for r in store.uploads(job.id) if r.local_path == str(job.archive))
    assert row.state == "pending" and 0 < row.bytes_done < row.size  # the part in flight finished, no new one began
    sent_before = {e["part"] for e in s3_server.requests("UploadPart", f"{bucket}/{key}") if e["status"] == 200}
    assert sent_before == set(range(1, len(row.parts["state"]["parts"]) + 1))
    clock.t = at(20, 5) + 86400
    drive(mgr, store, job.id, {"done"}, clock=clock)
    parts = s3_server.requests("UploadPart", f"{bucket}/{key}")
    assert sorted(e["part"] for e in parts) == [1, 2, 3]  # each part sent once
    assert s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read() == job.archive.read_bytes()
