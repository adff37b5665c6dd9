"""The store's upload records: planning is idempotent, updates are checked, backlog and deferral."""

from __future__ import annotations

import pytest

from daemon.errors import IllegalTransition, StoreError
from daemon.store import JobState, Store


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "db.sqlite3") as s:
        yield s


def _qc_done(store: Store, fp: str, now: float = 1000.0) -> int:
    ssid, _ = store.add_scan_set(chip="C02533C", root="/in", fingerprint=fp, members=[], now=now)
    job_id = store.create_job(ssid, now=now)
    assert job_id is not None
    store.claim("w", now=now)
    store.transition(job_id, JobState.QC_DONE, owner="w", now=now)
    return job_id


def _rows(n: int, target: str = "aws") -> list[dict]:
    return [
        {
            "target": target,
            "kind": "outputs",
            "local_path": f"/out/f{i}",
            "remote_key": f"k/f{i}",
            "size": 100 * (i + 1),
            "mtime_ns": i,
        }
        for i in range(n)
    ]


def test_planning_is_idempotent_and_keeps_progress(store):
    job = _qc_done(store, "a")
    assert store.jobs_without_uploads() == [store.get_job(job)]
    assert store.plan_uploads(job, _rows(3)) == 3
    first = store.uploads(job)[0]
    store.update_upload(first.id, state="active", bytes_done=40, upload_id="U1", parts={"state": {"upload_id": "U1"}})
    assert store.plan_uploads(job, _rows(4)) == 1  # only the new file
    again = store.uploads(job)[0]
    assert (again.state, again.bytes_done, again.upload_id, again.parts) == (
        "active",
        40,
        "U1",
        {"state": {"upload_id": "U1"}},
    )
    assert store.jobs_without_uploads() == []
    assert [r.remote_key for r in store.uploads(job, states=["pending"])] == ["k/f1", "k/f2", "k/f3"]


def test_updates_are_checked(store):
    job = _qc_done(store, "a")
    store.plan_uploads(job, _rows(1))
    rid = store.uploads(job)[0].id
    with pytest.raises(StoreError, match="unknown upload column"):
        store.update_upload(rid, remote_key="elsewhere")
    with pytest.raises(ValueError, match="'teleported' is not a valid UploadState"):
        store.update_upload(rid, state="teleported")
    with pytest.raises(StoreError, match="no upload record"):
        store.update_upload(rid + 99, state="done")


def test_the_backlog_counts_unfinished_files_of_live_jobs_only(store):
    live, finished = _qc_done(store, "a"), _qc_done(store, "b")
    store.plan_uploads(live, _rows(3) + _rows(1, target="hpc"))
    store.plan_uploads(finished, _rows(2))
    store._conn.execute("UPDATE jobs SET state = 'superseded' WHERE id = ?", (finished,))
    rows = store.uploads(live, target="aws")
    store.update_upload(rows[0].id, state="done", bytes_done=100)
    store.update_upload(rows[1].id, state="present")
    store.update_upload(rows[2].id, bytes_done=50)  # 300 bytes, 50 sent
    assert store.upload_backlog() == {"aws": {"files": 1, "bytes": 250}, "hpc": {"files": 1, "bytes": 100}}
    store.update_upload(store.uploads(live, target="hpc")[0].id, state="changed")  # never to be sent
    assert store.upload_backlog() == {"aws": {"files": 1, "bytes": 250}}


def test_defer_returns_the_job_to_qc_done_until_a_time(store):
    job = _qc_done(store, "a")
    assert store.claim("up", now=1000, from_state="qc_done", to_state="uploading") is not None
    with pytest.raises(IllegalTransition):
        store.defer(job, owner="someone-else", until=2000, message="x", now=1000)
    store.defer(job, owner="up", until=2000, message="waiting for the upload window of hpc", now=1000)
    j = store.get_job(job)
    assert (j.state, j.next_attempt_at, j.lease_owner) == ("qc_done", 2000, None)
    assert store.claim("up", now=1999, from_state="qc_done", to_state="uploading") is None
    assert store.claim("up", now=2000, from_state="qc_done", to_state="uploading").id == job
    assert store.events(job)[-2].data == {"until": 2000}
