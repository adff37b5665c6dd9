"""The worker: real child processes, outcomes, leases, limits, priority."""

from __future__ import annotations

import sys
import time

import psutil
import pytest

from daemon.store import Store
from daemon.worker import ProcessWorker
from tests.helpers import scaled, wait_job, wait_until


@pytest.fixture
def env(make_config):
    def make(extra: str = ""):
        cfg = make_config(extra)
        store = Store(cfg.database_path)
        ssid, _ = store.add_scan_set(chip="SS200000135TL_D1", root="/s", fingerprint="fp", members=[])
        job_id = store.create_job(ssid)
        return cfg, store, job_id

    made = []

    def factory(extra: str = ""):
        out = make(extra)
        made.append(out[1])
        return out

    yield factory
    for s in made:
        s.close()


def _run(cfg, store, target, *, timeout=60.0, during=None):
    worker = ProcessWorker(cfg, store, target=f"tests.daemon.targets:{target}", owner="svc-1")
    job = store.claim("svc-1", lease_s=cfg.service.lease_seconds)
    assert job is not None
    worker.submit(job)
    if during:
        during(worker, job)
    worker.join(scaled(timeout))
    assert worker.free_slots() == 1, f"the child was still busy after {scaled(timeout):g} s: {store.get_job(job.id)}"
    return store.get_job(job.id)


def test_a_successful_job_reaches_qc_done_with_its_result_and_progress(env):
    cfg, store, job_id = env()
    job = _run(cfg, store, "ok")
    assert job.state == "qc_done" and job.lease_owner is None
    assert store.get_result(job_id)["verdict"] == "pass"  # type: ignore[index]
    assert (job.stage, job.progress) == ("qc", 100.0)


def test_a_raising_job_fails_permanently_with_the_reason(env):
    cfg, store, _job_id = env()
    job = _run(cfg, store, "boom")
    assert job.state == "failed"
    assert job.error == "ValueError: the image is upside down"
    assert job.next_attempt_at is None and job.failed_stage == "qc"


def test_a_transient_failure_is_retried_later(env):
    cfg, store, _job_id = env()
    before = time.time()
    job = _run(cfg, store, "transient")
    assert job.state == "failed" and job.error == "share went away"
    assert job.next_attempt_at is not None and before < job.next_attempt_at <= time.time() + cfg.service.retry_base_s


def test_a_crashed_child_fails_the_job_transiently(env):
    cfg, store, _job_id = env()
    job = _run(cfg, store, "crash")
    assert job.state == "failed" and "exit code 17" in (job.error or "")
    assert job.next_attempt_at is not None


def test_timeout_stops_the_child(env):
    cfg, store, job_id = env("[qc]\ntimeout_s = 10")
    worker_timer = iter(range(0, 10**6, 20))  # every read of the worker's monotonic timer jumps 20 s
    worker = ProcessWorker(
        cfg, store, target="tests.daemon.targets:sleep_long", owner="w", timer=lambda: float(next(worker_timer))
    )
    job = store.claim("w", lease_s=60)
    assert job is not None
    worker.submit(job)
    worker.join(scaled(30))
    job = store.get_job(job_id)
    assert job.state == "failed" and "qc.timeout_s" in (job.error or "")


def test_a_wall_clock_stepped_forward_an_hour_does_not_kill_a_running_qc(env):
    """Issue #20 case 8: qc.timeout_s was timed on the wall clock, so an NTP step of +1 h killed the QC (set lost)."""

    cfg, store, job_id = env("[qc]\ntimeout_s = 600")
    shift = [0.0]
    worker = ProcessWorker(
        cfg, store, target="tests.daemon.targets:wait_for_go", owner="w", clock=lambda: time.time() + shift[0]
    )
    job = store.claim("w", lease_s=cfg.service.lease_seconds)
    assert job is not None
    worker.submit(job)
    wait_job(store, job_id, timeout=30, stage="waiting")
    shift[0] = 3600.0
    stepped = time.time() + 3600

    def renewed_on_the_stepped_clock():  # the supervisor has gone round its checks since the step
        j = store.get_job(job_id)
        return j.state != "running" or (j.lease_expires or 0) > stepped

    wait_until(
        renewed_on_the_stepped_clock,
        "the lease renewed on the stepped clock",
        timeout=30,
        seen=lambda: store.get_job(job_id),
    )
    (cfg.state_dir / f"go-{job_id}").touch()
    worker.join(scaled(60))
    job = store.get_job(job_id)
    assert job.state == "qc_done", job.error


def test_memory_limit_stops_the_child(env):
    cfg, store, _job_id = env("[qc]\nmemory_limit_mb = 300")
    job = _run(cfg, store, "hog_memory")
    assert job.state == "failed" and "qc.memory_limit_mb = 300" in (job.error or "")


def test_cancel_stops_a_running_child(env):
    cfg, store, _job_id = env()

    def cancel(worker, job):
        wait_job(store, job.id, stage="sleeping")
        pid = worker.active()[0]["pid"]
        store.cancel(job.id, reason="cancelled by test")
        worker.join(scaled(30))
        import psutil

        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    job = _run(cfg, store, "sleep_long", during=cancel)
    assert job.state == "failed" and job.error == "cancelled by test"


def test_stop_returns_a_running_job_to_the_queue(env):
    cfg, store, job_id = env()
    worker = ProcessWorker(cfg, store, target="tests.daemon.targets:sleep_long", owner="w")
    job = store.claim("w", lease_s=60)
    worker.submit(job)  # type: ignore[arg-type]
    wait_job(store, job_id, stage="sleeping")
    t = time.monotonic()
    worker.stop(timeout=0.5)
    assert time.monotonic() - t < scaled(10)  # the grace period, then the child is stopped: not the job's 600 s
    assert store.get_job(job_id).state == "queued"
    assert worker.free_slots() == 0  # stopping: takes nothing new


@pytest.mark.skipif(sys.platform == "win32", reason="nice values are POSIX; Windows uses priority classes")
def test_child_runs_at_low_priority_with_bounded_threads(env):
    cfg, store, job_id = env("[qc]\nthreads = 1\npriority = 'low'")
    _run(cfg, store, "report_environment")
    ev = next(e for e in store.events(job_id) if e.to_state == "qc_done")
    assert ev.data is not None
    assert ev.data["nice"] >= 10 and ev.data["omp"] == "1"
    assert ev.data["huge_pages"] is False  # numpy's huge-page advice is off: no compaction stalls (worker.py)


def _pid_of_run(store, job_id):
    ev = [e for e in store.events(job_id) if e.to_state == "qc_done"][-1]
    return ev.data["pid"]


def test_a_warm_worker_runs_job_after_job_and_a_crashed_or_used_up_one_is_replaced(make_config):
    """#16 item 2: imports once per worker, not per job; a worker that dies is never reused; qc.worker_jobs bounds its life."""
    cfg = make_config("[qc]\nworker_jobs = 3")
    with Store(cfg.database_path) as store:
        worker = ProcessWorker(cfg, store, target="tests.daemon.targets:environment_or_crash", owner="svc-1", slots=1)

        def one(chip="SS200000135TL_D1"):
            ssid, _ = store.add_scan_set(chip=chip, root="/s", fingerprint=f"fp-{time.monotonic_ns()}", members=[])
            job_id = store.create_job(ssid)
            job = store.claim("svc-1", lease_s=cfg.service.lease_seconds)
            assert job is not None and job.id == job_id
            worker.submit(job)
            worker.join(scaled(60))
            return job_id

        try:
            pids = [_pid_of_run(store, one()) for _ in range(4)]
            assert pids[0] == pids[1] == pids[2] != pids[3]  # three jobs in one warm process, then a fresh one
            crashed = store.get_job(one("CRASH"))  # runs in the 4th job's process, which dies
            assert crashed.state == "failed" and "exit code 17" in (crashed.error or "")
            after = _pid_of_run(store, one())
            assert after not in pids  # the dead worker was not reused
        finally:
            worker.stop(10)
        assert not worker._idle
        assert not psutil.pid_exists(after) or psutil.Process(after).status() == psutil.STATUS_ZOMBIE


def test_a_warm_worker_warms_up_once_before_its_first_job(env):
    """The job module's warm(config) runs in the child before the first job, once (the QC imports, #16 item 2)."""
    cfg, store, job_id = env()
    job = _run(cfg, store, "report_warm")
    assert job.state == "qc_done", job.error
    data = store.events(job_id, kinds=["state"])[-1].data or {}
    assert data.get("warmed") == [data.get("pid")]
