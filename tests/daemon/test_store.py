"""The SQLite job store: state machine, claims and leases across processes, migrations."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from pathlib import Path

import pytest

from daemon import fsinfo
from daemon.errors import DatabaseUnavailable, IllegalTransition, JobNotFound, StoreError
from daemon.store import MIGRATIONS, SCHEMA_VERSION, TRANSITIONS, JobState, Store
from tests.helpers import scaled

S = JobState
T0 = 1_700_000_000.0


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "state" / "imageqc.sqlite3") as s:
        yield s


def _job(store: Store, fp: str = "fp1", chip: str = "SS200000135TL_D1", state=S.QUEUED, now=T0) -> int:
    ssid, _ = store.add_scan_set(chip=chip, root="/scans", fingerprint=fp, members=[{"name": chip, "size": 1}], now=now)
    job_id = store.create_job(ssid, state=state, now=now)
    assert job_id is not None
    return job_id


def _force(store: Store, job_id: int, state: JobState) -> None:
    with store.db() as c:
        c.execute(
            "UPDATE jobs SET state = ?, lease_owner = 'w', lease_expires = ? WHERE id = ?",
            (state.value, T0 + 60, job_id),
        )


def test_new_database_is_at_the_latest_schema_in_wal_mode(store):
    assert store.schema_version == SCHEMA_VERSION
    assert store.journal == "wal"
    assert store.integrity_check() == "ok"


def test_same_fingerprint_makes_one_job_ever(store):
    job_id = _job(store, "abc")
    ssid, created = store.add_scan_set(
        chip="SS200000135TL_D1", root="/scans", fingerprint="abc", members=[], now=T0 + 5
    )
    assert not created
    assert store.create_job(ssid, now=T0 + 5) is None
    store.transition(job_id, S.SUPERSEDED, now=T0 + 6)
    assert store.create_job(ssid, now=T0 + 7) is None  # not even after the first ended
    assert len(store.list_jobs()) == 1


@pytest.mark.parametrize("src", list(JobState))
@pytest.mark.parametrize("dst", list(JobState))
def test_every_transition_is_either_allowed_or_raises(store, src, dst):
    job_id = _job(store)
    _force(store, job_id, src)
    if dst in TRANSITIONS[src]:
        job = store.transition(job_id, dst, now=T0 + 1, message="test")
        assert job.state == dst.value
        ev = store.events(job_id)[-1]
        assert (ev.from_state, ev.to_state) == (src.value, dst.value)
    else:
        with pytest.raises(IllegalTransition):
            store.transition(job_id, dst, now=T0 + 1)
        assert store.get_job(job_id).state == src.value


def test_the_happy_path_and_its_history(store):
    job_id = _job(store, state=S.SETTLING)
    store.transition(job_id, S.QUEUED, now=T0 + 60)
    job = store.claim("w1", now=T0 + 61, lease_s=30)
    assert job is not None and job.id == job_id and job.attempts == 1 and job.lease_expires == T0 + 91
    store.transition(job_id, S.QC_DONE, now=T0 + 70, owner="w1")
    up = store.claim("w1", now=T0 + 71, from_state=S.QC_DONE, to_state=S.UPLOADING)
    assert up is not None and up.attempts == 1
    store.transition(job_id, S.DONE, now=T0 + 80, owner="w1")
    job = store.get_job(job_id)
    assert job.state == "done" and job.lease_owner is None and job.finished_at == T0 + 80
    moves = [(e.from_state, e.to_state) for e in store.events(job_id)]
    assert moves == [
        (None, "settling"),
        ("settling", "queued"),
        ("queued", "running"),
        ("running", "qc_done"),
        ("qc_done", "uploading"),
        ("uploading", "done"),
    ]


def test_a_worker_that_lost_its_lease_cannot_write(store):
    job_id = _job(store)
    store.claim("w1", now=T0, lease_s=10)
    assert store.recover_expired(now=T0 + 11) == [job_id]
    store.claim("w2", now=T0 + 12, lease_s=10)
    with pytest.raises(IllegalTransition):
        store.transition(job_id, S.QC_DONE, now=T0 + 13, owner="w1")
    assert not store.renew_lease(job_id, "w1", now=T0 + 13)
    assert store.renew_lease(job_id, "w2", now=T0 + 13, lease_s=10)
    assert store.get_job(job_id).lease_expires == T0 + 23


def test_claim_takes_the_oldest_due_job_and_respects_retry_time(store):
    a = _job(store, "a", now=T0)
    b = _job(store, "b", now=T0 + 1)
    store.claim("w", now=T0 + 2)
    store.transition(
        a, S.FAILED, now=T0 + 3, owner="w", error="share gone", failed_stage="qc", next_attempt_at=T0 + 100
    )
    assert store.claim("w", now=T0 + 4).id == b  # type: ignore[union-attr]
    assert store.claim("w", now=T0 + 5) is None
    assert store.requeue_due(now=T0 + 50) == []
    assert store.requeue_due(now=T0 + 100) == [a]
    job = store.claim("w", now=T0 + 101)
    assert job is not None and job.id == a and job.attempts == 2


def test_requeue_stops_at_max_attempts(store):
    a = _job(store)
    store.claim("w", now=T0)
    store.transition(a, S.FAILED, now=T0 + 1, owner="w", error="x", failed_stage="qc", next_attempt_at=T0 + 2)
    assert store.requeue_due(now=T0 + 3, max_attempts=1) == []
    assert store.get_job(a).next_attempt_at is None


def test_upload_failures_resume_at_qc_done(store):
    a = _job(store)
    store.claim("w", now=T0)
    store.transition(a, S.QC_DONE, now=T0 + 1, owner="w")
    store.claim("w", now=T0 + 2, from_state=S.QC_DONE, to_state=S.UPLOADING)
    store.transition(a, S.FAILED, now=T0 + 3, owner="w", error="503", failed_stage="upload", next_attempt_at=T0 + 4)
    assert store.requeue_due(now=T0 + 5) == [a]
    assert store.get_job(a).state == "qc_done"


def test_an_upload_failure_is_retried_whatever_the_qc_runs_it_took(store):
    """service.max_attempts caps QC runs; a job whose QC passed on its last allowed run still retries its upload
    (the uploads component counts those attempts per file and gives up by itself)."""
    a = _job(store)
    store.claim("w", now=T0)
    store.transition(a, S.FAILED, now=T0 + 1, owner="w", error="disk full", failed_stage="qc", next_attempt_at=T0 + 2)
    assert store.requeue_due(now=T0 + 2, max_attempts=2) == [a]
    store.claim("w", now=T0 + 3)
    store.transition(a, S.QC_DONE, now=T0 + 4, owner="w")
    store.claim("w", now=T0 + 5, from_state=S.QC_DONE, to_state=S.UPLOADING)
    store.transition(a, S.FAILED, now=T0 + 6, owner="w", error="503", failed_stage="upload", next_attempt_at=T0 + 7)
    assert store.get_job(a).attempts == 2
    assert store.requeue_due(now=T0 + 8, max_attempts=2) == [a]
    assert store.get_job(a).state == "qc_done"


def test_a_job_leaving_failed_drops_its_error_and_its_history_keeps_it(store):
    """Requeued by its retry time, by hand, or to its upload: queued, running or uploading again, it shows no
    old failure; each failure stays in its events."""
    a = _job(store)
    store.claim("w", now=T0)
    store.transition(a, S.FAILED, now=T0 + 1, owner="w", error="disk full", failed_stage="qc", next_attempt_at=T0 + 2)
    assert store.requeue_due(now=T0 + 2) == [a]
    job = store.get_job(a)
    assert (job.state, job.error, job.failed_stage) == ("queued", None, None)
    assert store.claim("w", now=T0 + 3).error is None  # type: ignore[union-attr]
    store.transition(a, S.FAILED, now=T0 + 4, owner="w", error="share gone", failed_stage="files")
    assert store.retry(a, now=T0 + 5).error is None
    store.claim("w", now=T0 + 6)
    store.transition(a, S.QC_DONE, now=T0 + 7, owner="w")
    store.claim("w", now=T0 + 8, from_state=S.QC_DONE, to_state=S.UPLOADING)
    store.transition(a, S.FAILED, now=T0 + 9, owner="w", error="503", failed_stage="upload", next_attempt_at=T0 + 10)
    assert store.requeue_due(now=T0 + 10) == [a]
    job = store.get_job(a)
    assert (job.state, job.error, job.failed_stage) == ("qc_done", None, None)
    assert store.claim("w", now=T0 + 11, from_state=S.QC_DONE, to_state=S.UPLOADING).error is None  # type: ignore[union-attr]
    failures = [(e.message, e.at) for e in store.events(a) if e.to_state == "failed"]
    assert failures == [("disk full", T0 + 1), ("share gone", T0 + 4), ("503", T0 + 9)]
    requeues = [e.message for e in store.events(a) if e.from_state == "failed"]
    assert requeues[:2] == ["retry 2 after: disk full", "retry requested"] and requeues[2].endswith(" after: 503")


def test_qc_run_again_with_the_same_verdict_keeps_when_it_was_reached_and_is_not_announced_again(store):
    """A job whose archive failed after its verdict was announced is run again: the result is replaced (new
    created_at: the run's id for the upload keys) but the verdict stands since the first run; a changed
    verdict is announced anew."""
    a = _job(store)
    store.claim("w", now=T0)
    store.save_result(a, verdict="fail", report={"reasons": ["blur"]}, owner="w", announce=True, now=T0 + 1)
    store.transition(a, S.FAILED, now=T0 + 2, owner="w", error="disk full", failed_stage="qc", next_attempt_at=T0 + 3)
    store.requeue_due(now=T0 + 3)
    store.claim("w", now=T0 + 4)
    store.save_result(a, verdict="fail", report={"reasons": ["blur"]}, owner="w", announce=True, now=T0 + 5)
    assert store.get_result(a)["created_at"] == T0 + 5  # type: ignore[index]
    assert store.recent_verdicts() == [
        {"job_id": a, "chip": "SS200000135TL_D1", "verdict": "fail", "reason": "blur", "at": T0 + 1}
    ]
    assert [(e.message, e.at) for e in store.events(a, kinds=["verdict"])] == [("QC fail: blur", T0 + 1)]
    store.save_result(a, verdict="pass", report={"reasons": []}, owner="w", announce=True, now=T0 + 6)
    assert store.recent_verdicts()[0]["at"] == T0 + 6
    assert [(e.message, e.at) for e in store.events(a, kinds=["verdict"])][-1] == ("QC pass", T0 + 6)
    # the same verdict for other inputs (a file replaced after QC, sent back to QC) is a new verdict
    seen = {"/scans/a.tif": {"size": 1, "mtime_ns": 2, "sha256": "aa"}}
    store.save_result(a, verdict="pass", report={"reasons": []}, owner="w", inputs=seen, announce=True, now=T0 + 7)
    assert store.recent_verdicts()[0]["at"] == T0 + 6  # the first run recorded no inputs: not compared
    store.save_result(a, verdict="pass", report={"reasons": []}, owner="w", inputs=seen, announce=True, now=T0 + 8)
    assert store.recent_verdicts()[0]["at"] == T0 + 6
    other = {"/scans/a.tif": {"size": 1, "mtime_ns": 2, "sha256": "bb"}}
    store.save_result(a, verdict="pass", report={"reasons": []}, owner="w", inputs=other, announce=True, now=T0 + 9)
    assert store.recent_verdicts()[0]["at"] == T0 + 9
    assert len(store.events(a, kinds=["verdict"])) == 3


def test_expired_upload_lease_goes_back_to_qc_done(store):
    a = _job(store)
    store.claim("w", now=T0, lease_s=10)
    store.transition(a, S.QC_DONE, now=T0 + 1, owner="w")
    store.claim("w", now=T0 + 2, from_state=S.QC_DONE, to_state=S.UPLOADING, lease_s=10)
    assert store.recover_expired(now=T0 + 5) == []
    assert store.recover_expired(now=T0 + 13) == [a]
    assert store.get_job(a).state == "qc_done"


def test_retry_and_cancel(store):
    a = _job(store)
    job = store.cancel(a, now=T0 + 1, reason="cancelled by ana")
    assert (job.state, job.error, job.failed_stage) == ("failed", "cancelled by ana", "cancelled")
    assert store.requeue_due(now=T0 + 10**6) == []  # a cancelled job is never retried on its own
    with pytest.raises(IllegalTransition):
        store.cancel(a)
    assert store.retry(a, now=T0 + 2).state == "queued"
    store.claim("w", now=T0 + 3)
    store.transition(a, S.QC_DONE, now=T0 + 4, owner="w")
    store.transition(a, S.SKIPPED, now=T0 + 5)
    assert store.retry(a, now=T0 + 6).state == "qc_done"
    with pytest.raises(IllegalTransition):
        store.retry(a)
    with pytest.raises(JobNotFound):
        store.retry(999)


def test_supersede_older_jobs_of_a_chip(store):
    old = _job(store, "v1", now=T0)
    other = _job(store, "x", chip="C02533C", now=T0)
    new = _job(store, "v2", now=T0 + 10)
    assert store.supersede_older("SS200000135TL_D1", new, now=T0 + 11) == [old]
    assert store.get_job(old).state == "superseded"
    assert store.get_job(other).state == "queued"


def test_results_kv_and_status(store):
    a = _job(store)
    store.save_result(a, verdict="fail", report={"verdict": "fail", "reasons": ["track line score 42 < 60"]}, now=T0)
    store.save_result(a, verdict="pass", report={"verdict": "pass", "reasons": []}, archive="/o/a.tar.gz", now=T0 + 1)
    res = store.get_result(a)
    assert res is not None and res["verdict"] == "pass" and res["archive"] == "/o/a.tar.gz"
    store.kv_put_many("pairs", [(f"k{i}", bytes([i % 256])) for i in range(1200)], now=T0)
    got = store.kv_get_many("pairs", [f"k{i}" for i in range(0, 1300, 100)])
    assert sorted(got) == sorted(f"k{i}" for i in range(0, 1200, 100)) and got["k500"] == bytes([500 % 256])
    assert store.kv_get("other", "k1") is None and store.kv_count("pairs") == 1200
    store.set_status("service", {"state": "running"}, now=T0)
    assert store.get_status() == {"service": ({"state": "running"}, T0)}


def test_only_the_lease_holder_saves_a_qc_result(store):
    a = _job(store)
    store.claim("w1", now=T0, lease_s=10)
    store.recover_expired(now=T0 + 11)
    store.claim("w2", now=T0 + 12, lease_s=10)
    with pytest.raises(IllegalTransition):
        store.save_result(a, verdict="pass", report={}, owner="w1", now=T0 + 13)  # the orphan of a killed service
    store.save_result(a, verdict="fail", report={"verdict": "fail"}, owner="w2", now=T0 + 13)
    assert store.get_result(a)["verdict"] == "fail"  # type: ignore[index]


def test_a_job_sent_back_to_qc_keeps_only_the_records_of_what_its_old_run_stored(store):
    """#20 case 3: inputs whose content changed after QC (same size and time) make QC run again."""
    job_id = _job(store)
    assert store.claim("w", now=T0, lease_s=60) is not None
    inputs = {"/scans/a.tif": {"size": 10, "mtime_ns": 5, "sha256": "ab" * 32}}
    store.save_result(
        job_id, verdict="pass", report={}, archive="/out/run1.tar.gz", inputs=inputs, owner="w", now=T0 + 1
    )
    assert store.get_result(job_id)["inputs"] == inputs  # type: ignore[index]
    store.transition(job_id, S.QC_DONE, owner="w", now=T0 + 2)
    store.plan_uploads(
        job_id,
        [
            {"target": "s3", "kind": kind, "local_path": path, "remote_key": f"run1/{path}", "size": 10, "mtime_ns": 5}
            for kind, path in (
                ("inputs", "a.tif"),
                ("inputs", "b.tif"),
                ("outputs", "run1.tar.gz"),
                ("outputs", "report.json"),
            )
        ],
        now=T0 + 3,
    )
    rows = {r.local_path: r.id for r in store.uploads(job_id)}
    store.update_upload(rows["a.tif"], state="done", sha256="ab" * 32)
    store.update_upload(rows["report.json"], state="done")
    assert store.claim("u", now=T0 + 4, lease_s=60, from_state=S.QC_DONE, to_state=S.UPLOADING) is not None
    with pytest.raises(IllegalTransition):
        store.send_back_to_qc(job_id, owner="someone else", reason="x", now=T0 + 5)
    job = store.send_back_to_qc(job_id, owner="u", reason="/scans/b.tif: changed after QC; QC runs again", now=T0 + 5)
    assert (job.state, job.lease_owner, job.next_attempt_at) == ("queued", None, None)
    assert [(r.kind, r.local_path, r.state) for r in store.uploads(job_id)] == [("outputs", "report.json", "done")]
    event = store.events(job_id)[-1]
    assert event.message == (
        "/scans/b.tif: changed after QC; QC runs again "
        "(1 input file(s) already stored for the old QC run stay there: s3:run1/a.tif)"
    )
    assert event.data == {"stored_for_old_run": [["s3", "run1/a.tif"]]}
    with pytest.raises(IllegalTransition):
        store.send_back_to_qc(job_id, reason="again", now=T0 + 6)  # queued: nothing QC'd to send back


def test_counts_list_every_state(store):
    _job(store, "a")
    counts = store.counts()
    assert set(counts) == {s.value for s in JobState}
    assert counts["queued"] == 1 and sum(counts.values()) == 1


def test_readonly_store_reads_and_refuses_writes(tmp_path):
    path = tmp_path / "db.sqlite3"
    with pytest.raises(DatabaseUnavailable, match="never run"):
        Store(path, readonly=True)
    assert not path.exists()
    with Store(path) as rw:
        _job(rw)
        with Store(path, readonly=True) as ro:
            assert ro.counts()["queued"] == 1
            with pytest.raises(StoreError):
                ro.add_event(None, "x", "y")


def test_corrupt_database_is_refused_with_advice(tmp_path):
    path = tmp_path / "db.sqlite3"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(DatabaseUnavailable, match=r"damaged.*Move it aside"):
        Store(path)


def test_a_full_disk_is_named_as_such_and_the_change_rolled_back(store):
    """SQLITE_FULL (here: the page limit; in the field: a full state disk) says where to free space."""
    _job(store, "kept")
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(
        DatabaseUnavailable, match=r"disk holding the job database .* is full .*rolled back.*Free space in"
    ):
        store.kv_put_many("pairs", [(str(i), b"x" * 4000) for i in range(100)])
    assert store.kv_count("pairs") == 0 and store.counts()["queued"] == 1


def damage_pages(path: Path, seed: int = 7) -> None:
    """Overwrite every page but the first (header and schema) with noise: tables unreadable, header fine."""
    import random

    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    rng = random.Random(seed)
    data[page:] = bytes(rng.randrange(256) for _ in range(len(data) - page))
    path.write_bytes(bytes(data))


def test_damaged_pages_met_while_reading_are_reported_as_damage_not_a_raw_sqlite_error(tmp_path):
    path = tmp_path / "db.sqlite3"
    with Store(path) as s:
        _job(s, "a")
    damage_pages(path)
    # the header still reads: opening works
    with (
        Store(path, readonly=True) as ro,
        pytest.raises(DatabaseUnavailable, match=r"is damaged .*malformed.*Move it aside"),
    ):
        ro.list_jobs()
    with Store(path, readonly=True) as ro, ro.db(commit=False) as c, pytest.raises(sqlite3.OperationalError):
        c.execute("SELECT nothing FROM nowhere")  # a bad query stays a programming error


def test_database_from_a_newer_imageqc_is_refused(tmp_path):
    path = tmp_path / "db.sqlite3"
    c = sqlite3.connect(path)
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    c.close()
    with pytest.raises(StoreError, match="upgrade imageqc"):
        Store(path)


def test_migration_from_version_1_keeps_every_row(tmp_path):
    path = tmp_path / "old.sqlite3"
    c = sqlite3.connect(path, isolation_level=None)
    c.executescript(MIGRATIONS[0])
    c.execute("PRAGMA user_version = 1")
    c.execute(
        "INSERT INTO scan_sets (chip, root, fingerprint, members, first_seen, last_seen) VALUES ('C02533C', '/s', 'f1', '[]', 1, 2)"
    )
    c.execute(
        "INSERT INTO jobs (scan_set_id, chip, fingerprint, state, created_at, updated_at) VALUES (1, 'C02533C', 'f1', 'failed', 1, 2)"
    )
    c.execute("INSERT INTO events (job_id, at, kind, message) VALUES (1, 1.5, 'state', 'share gone')")
    c.execute(
        "INSERT INTO qc_results (job_id, verdict, report, created_at) VALUES (1, 'fail', '{\"verdict\": \"fail\"}', 2)"
    )
    c.close()
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        job = store.get_job(1)
        assert (job.chip, job.state) == ("C02533C", "failed")
        assert [e.message for e in store.events(1)] == ["share gone"]
        assert store.get_result(1)["report"] == {"verdict": "fail"}  # type: ignore[index]
        assert store.get_result(1)["inputs"] is None  # type: ignore[index]  # version 5: none recorded before it
        store.kv_put("pairs", "k", b"v")  # tables of version 2 exist
        assert store.retry(1).state == "queued"


def test_network_share_uses_a_rollback_journal_simulated_nfs_mount_table(tmp_path, monkeypatch):
    """No NFS server here: the mount table is the boundary we fake."""
    Part = namedtuple("Part", "device mountpoint fstype opts")
    real = fsinfo.psutil.disk_partitions

    def parts(all=True):
        return [*real(all=all), Part("nas:/export", str(tmp_path), "nfs4", "rw,relatime")]

    monkeypatch.setattr(fsinfo.psutil, "disk_partitions", parts)
    assert fsinfo.is_network_path(tmp_path / "state")
    with Store(tmp_path / "state" / "db.sqlite3") as store:
        assert store.journal == "delete"


def test_unc_paths_are_network_paths():
    assert fsinfo.is_network_path(r"\\nas\scans\chip")
    assert fsinfo.is_network_path("//nas/scans")


# ---------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------


def _claimer(db: str, owner: str, out, ready, go) -> None:
    with Store(db) as s:
        got = []
        ready.put(owner)
        go.wait(scaled(60))  # all start claiming together, so they really contend
        while True:
            job = s.claim(owner, lease_s=60)
            if job is None:
                break
            got.append(job.id)
            time.sleep(0.002)  # a little work between claims
            s.transition(job.id, S.QC_DONE, owner=owner)
        out.put((owner, got))


def test_several_processes_never_claim_the_same_job(tmp_path):
    db = tmp_path / "db.sqlite3"
    with Store(db) as s:
        ids = [_job(s, f"fp{i}", now=T0 + i) for i in range(300)]
    ctx = mp.get_context("spawn")
    out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claimer, args=(str(db), f"w{i}", out, ready, go)) for i in range(4)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=scaled(120))
    go.set()
    results = [out.get(timeout=scaled(120)) for _ in procs]
    for p in procs:
        p.join(scaled(30))
        assert p.exitcode == 0
    claimed = [j for _, got in results for j in got]
    assert sorted(claimed) == ids, "a job was claimed twice or not at all"
    assert sum(1 for _, got in results if got) >= 2, "the test did not exercise contention"
    with Store(db) as s:
        assert s.counts()["qc_done"] == 300


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from daemon.store import Store
    s = Store(sys.argv[1])
    job = s.claim("doomed", lease_s=float(sys.argv[2]))
    print(job.id, flush=True)
    time.sleep(600)
    """
)


def test_a_process_killed_while_holding_a_lease_has_its_job_recovered(tmp_path):
    db = tmp_path / "db.sqlite3"
    with Store(db) as s:
        job_id = _job(s, now=time.time())
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(db), "60"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        assert int(proc.stdout.readline()) == job_id
        with Store(db) as s:
            held = s.get_job(job_id)
            assert held.state == "running"
        proc.kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no cleanup runs
        proc.wait(scaled(30))
    finally:
        if proc.poll() is None:
            proc.kill()
    with Store(db) as s:
        # the clock passed in, not slept through: a busy machine cannot make the lease run out early
        assert s.recover_expired(now=held.lease_expires - 1) == []  # the lease has not run out yet
        assert s.recover_expired(now=held.lease_expires + 0.1) == [job_id]
        job = s.get_job(job_id)
        assert job.state == "queued" and job.lease_owner is None
        assert "doomed" in (s.events(job_id)[-1].message or "")
        again = s.claim("rescuer")
        assert again is not None and again.id == job_id and again.attempts == 2
