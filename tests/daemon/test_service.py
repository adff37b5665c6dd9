"""The service loop: start, recover, dispatch, stop; one instance per state folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.errors import DatabaseUnavailable
from daemon.service import AlreadyRunning, Daemon
from daemon.store import JobState, Store
from tests.helpers import dead_pid, run_child, scaled, wait_job, wait_until

REPO = Path(__file__).resolve().parents[2]


def _queue_job(cfg, fp="fp", chip="SS200000135TL_D1", state=JobState.QUEUED) -> int:
    with Store(cfg.database_path) as s:
        ssid, _ = s.add_scan_set(chip=chip, root=str(cfg.watch[0].path), fingerprint=fp, members=[])
        job_id = s.create_job(ssid, state=state)
        assert job_id is not None
        return job_id


class Exploding:
    name = "exploding"

    def __init__(self):
        self.ticks = 0

    def start(self, daemon):
        self.daemon = daemon

    def tick(self, now):
        self.ticks += 1
        raise RuntimeError("component bug")

    def stop(self):
        pass

    def health(self):
        return {"ticks": self.ticks}


def test_daemon_runs_queued_jobs_and_skips_upload_when_none_is_configured(make_config):
    cfg = make_config()
    a = _queue_job(cfg, "a")
    b = _queue_job(cfg, "b", chip="C02533C")
    bad = Exploding()
    d = Daemon(cfg, target="tests.daemon.targets:ok", components=[bad])
    d.start()
    try:
        with Store(cfg.database_path) as s:
            wait_until(lambda: s.counts()["skipped"] == 2, "s.counts()['skipped'] == 2", seen=lambda: s.counts())
            assert s.get_job(a).state == "skipped" and s.get_job(b).state == "skipped"
            assert bad.ticks >= 1  # a failing component does not stop the service
            status, _at = s.get_status()["service"]
            assert status["state"] == "running" and status["components"]["exploding"]["ticks"] >= 1
    finally:
        d.stop()
    with Store(cfg.database_path) as s:
        assert s.get_status()["service"][0]["state"] == "stopped"


def test_jobs_left_running_by_a_dead_service_are_recovered_at_start(make_config):
    cfg = make_config()
    job_id = _queue_job(cfg)
    with Store(cfg.database_path) as s:
        s.claim("old-host:123:abc", lease_s=3600)  # far from expiring
    d = Daemon(cfg, target="tests.daemon.targets:ok")
    d.start()
    try:
        with Store(cfg.database_path) as s:
            wait_job(s, job_id, state="skipped")
            msgs = [e.message or "" for e in s.events(job_id)]
            assert any("old-host:123:abc" in m for m in msgs)
            assert s.get_job(job_id).attempts == 2
    finally:
        d.stop()


def test_a_second_service_on_the_same_state_folder_is_refused(make_config):
    cfg = make_config()
    d1 = Daemon(cfg, target="tests.daemon.targets:ok")
    d1.start()
    try:
        with pytest.raises(AlreadyRunning, match="already running"):
            Daemon(cfg, target="tests.daemon.targets:ok").start()
    finally:
        d1.stop()
    d3 = Daemon(cfg, target="tests.daemon.targets:ok")  # free again after a stop
    d3.start()
    d3.stop()


def test_a_corrupt_database_stops_the_service_from_starting(make_config):
    cfg = make_config()
    cfg.state_dir.mkdir(parents=True)
    cfg.database_path.write_bytes(b"garbage" * 1000)
    with pytest.raises(DatabaseUnavailable, match="damaged"):
        Daemon(cfg).start()
    assert cfg.database_path.read_bytes() == b"garbage" * 1000  # never touched
    with pytest.raises(DatabaseUnavailable):  # and the lock was released: same error again, not AlreadyRunning
        Daemon(cfg).start()


def _cli(*args, cwd, env=None, timeout=120):
    return run_child(
        [sys.executable, "-m", "daemon.cli", *args],
        timeout=timeout,
        what=f"imageqc {' '.join(args)}",
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM semantics; Windows stops through the service manager")
def test_imageqc_run_with_the_embedded_default_reports_running_and_stops_on_sigterm(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        db = tmp_path / ".imageqc" / "imageqc.sqlite3"

        def running():
            if not db.exists():
                return False
            r = _cli("status", "--json", cwd=tmp_path)
            return r.returncode == 0 and json.loads(r.stdout)["service"]["running"]

        wait_until(
            running,
            "`imageqc status` to say the service runs",
            timeout=180,
            every=0.3,
            seen=lambda: proc.stderr.read() if proc.poll() is not None else "not up",
        )
        assert (tmp_path / "inbox").is_dir()
        human = _cli("status", cwd=tmp_path)
        assert human.returncode == 0 and "running" in human.stdout
        assert all(len(line) <= 80 for line in human.stdout.splitlines())
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=scaled(60)) == 0
        assert time.monotonic() - t < scaled(10)  # not the default grace period for running jobs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(scaled(30))
    st = json.loads(_cli("status", "--json", cwd=tmp_path).stdout)
    assert st["service"]["running"] is False and st["service"]["reason"] == "stopped cleanly"
    log_lines = (tmp_path / ".imageqc" / "logs" / "imageqc.jsonl").read_text().splitlines()
    events = [json.loads(x)["event"] for x in log_lines]
    assert "service started" in events and "service stopped" in events


class BrokenStart(Exploding):
    name = "broken"

    def start(self, daemon):
        raise OSError("share \\\\nas\\scans is gone")


def test_a_component_failing_to_start_releases_everything(make_config):
    cfg = make_config()
    with pytest.raises(OSError, match="gone"):
        Daemon(cfg, target="tests.daemon.targets:ok", components=[BrokenStart()]).start()
    d = Daemon(cfg, target="tests.daemon.targets:ok")  # lock and store were released
    d.start()
    d.stop()


def test_a_database_failure_during_ticks_stops_the_service_with_a_failure_simulated_by_closing_it(make_config):
    cfg = make_config()
    d = Daemon(cfg, target="tests.daemon.targets:ok")
    d.start()
    try:
        assert d.store is not None
        d.store.close()  # the database goes away under the running service (under the store's lock)
        d.tick()
        assert d.failure is not None and d._stop.is_set()
    finally:
        d.stop()


class Slow:
    """A component whose rounds take longer than the tick interval."""

    name = "slow"

    def __init__(self, seconds):
        self.seconds, self.ticks = seconds, 0

    def start(self, daemon):
        pass

    def tick(self, now):
        self.ticks += 1
        time.sleep(self.seconds)

    def stop(self):
        pass

    def health(self):
        return {"ticks": self.ticks}


def test_rounds_longer_than_the_tick_are_noted_once_a_minute(make_config, tmp_path):
    from daemon.logging import configure_logging

    log_path = tmp_path / "service.jsonl"
    configure_logging(level="info", file=log_path, console="off")
    try:
        cfg = make_config(tick=0.1)
        slow = Slow(0.35)
        d = Daemon(cfg, target="tests.daemon.targets:ok", components=[slow])
        d.start()
        try:
            wait_until(lambda: slow.ticks >= 4, "slow.ticks >= 4", timeout=20)
        finally:
            d.stop()
    finally:
        configure_logging(console="off")
    records = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines()]
    events = [r["event"] for r in records]
    long_rounds = [r for r in records if r["event"].startswith("a service round outlasted the tick interval")]
    assert len(long_rounds) == 1, events  # rate-limited: once a minute
    assert long_rounds[0]["seconds"] >= 0.3 and long_rounds[0]["tick_seconds"] == 0.1
    assert not [e for e in events if "maximum number of running instances" in e], events


def _dead_partial(output_dir: Path, stem: str) -> Path:
    from qc.report import _host_tag

    path = output_dir / f".{stem}.partial-{_host_tag()}-{dead_pid()}.zz9"
    (path / "pictures").mkdir(parents=True)
    (path / "report.json").write_text("{}", encoding="utf-8")
    return path


def test_half_written_outputs_of_killed_qc_runs_are_removed_at_start_and_while_running(make_config, monkeypatch):
    import daemon.service

    cfg = make_config()
    finished = cfg.output_dir / "C02533C_20231114_221320_0.1.0"
    finished.mkdir(parents=True)
    before = _dead_partial(cfg.output_dir, "C02533C_20231114_221321_0.1.0")
    d = Daemon(cfg, target="tests.daemon.targets:ok")
    d.start()
    try:
        assert not before.exists() and finished.exists()
        monkeypatch.setattr(daemon.service, "OUTPUT_SWEEP_S", 0.0)
        during = _dead_partial(cfg.output_dir, "C02533C_20231114_221322_0.1.0")  # e.g. a QC child killed on timeout
        wait_until(lambda: not during.exists(), "not during.exists()", timeout=10)
        assert finished.exists()
    finally:
        d.stop()


class KeepQueued:
    """A runner that takes no job: recovered jobs stay queued for the test to read."""

    def free_slots(self):
        return 0

    def submit(self, job):  # pragma: no cover - never called
        raise AssertionError("KeepQueued takes no job")

    def active(self):
        return []

    def stop(self, timeout):
        pass


def test_recovery_after_a_crash_stamps_the_real_time_and_every_reader_can_show_it(make_config, monkeypatch, capsys):
    """Issue #20 case 7: recovery at start stamped now=inf into the job and its event, for good."""
    from daemon.cli import main

    cfg = make_config()
    job_id = _queue_job(cfg)
    with Store(cfg.database_path) as s:  # what kill -9 leaves: a running job whose lease has long to run
        s.claim("old-host:123:abc", lease_s=3600)
    before = time.time()
    d = Daemon(cfg, target="tests.daemon.targets:ok", runner=KeepQueued())
    d.start()
    d.stop()
    with Store(cfg.database_path) as s:
        job, events = s.get_job(job_id), s.events(job_id)
    assert job.state == "queued" and job.lease_owner is None
    assert before <= job.updated_at <= time.time() and before <= job.queued_at <= time.time()  # type: ignore[operator]
    assert "old-host:123:abc is gone" in (events[-1].message or "") and before <= events[-1].at <= time.time()
    monkeypatch.setenv("IMAGEQC_CONFIG", cfg.source)
    assert main(["show", str(job_id)]) == 0
    assert "running -> queued" in capsys.readouterr().out
    assert main(["show", str(job_id), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert doc["events"][-1]["at"] >= before


def test_infinite_times_left_by_an_older_recovery_are_replaced_at_start(make_config):
    """Issue #20 case 7: a job re-queued by an older version's recovery (queued_at = inf) was last in the queue for good."""
    cfg = make_config()
    first = _queue_job(cfg, "a")
    second = _queue_job(cfg, "b")
    with Store(cfg.database_path) as s, s.db() as c:
        c.execute("UPDATE jobs SET queued_at = ?, updated_at = ? WHERE id = ?", (float("inf"), float("inf"), first))
    d = Daemon(cfg, target="tests.daemon.targets:ok", runner=KeepQueued())
    d.start()
    d.stop()
    with Store(cfg.database_path) as s:
        job = s.get_job(first)
        assert job.queued_at is None and job.updated_at < float("inf")
        assert s.claim("t").id == first  # type: ignore[union-attr]  # back in its place: oldest first
        assert s.get_job(second).state == "queued"


class SteppedClock:
    """A wall clock the test steps the way NTP or an operator does: ``time.time()`` plus an offset."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self):
        return time.time() + self.offset

    def step(self, seconds):
        self.offset += seconds


def test_a_wall_clock_stepped_forward_an_hour_neither_kills_nor_takes_back_a_running_qc(make_config):
    """Issue #20 case 8: +1 h killed the running QC as over qc.timeout_s and the tick took its lease away."""
    cfg = make_config("[qc]\ntimeout_s = 600")
    job_id = _queue_job(cfg)
    wall = SteppedClock()
    d = Daemon(cfg, target="tests.daemon.targets:wait_for_go", clock=wall)
    d.start()
    try:
        with Store(cfg.database_path) as s:
            wait_job(s, job_id, timeout=30, stage="waiting")
            wall.step(3600)
            stepped = time.time() + 3600

            def rounds_ran_on_the_stepped_clock():
                job = s.get_job(job_id)
                beat = s.get_status()["service"][1]
                return job.state != "running" or (beat > stepped + 1 and (job.lease_expires or 0) > stepped)

            wait_until(
                rounds_ran_on_the_stepped_clock,
                "rounds on the stepped clock (heartbeat and lease past it)",
                timeout=30,
                seen=lambda: (s.get_job(job_id), s.get_status()["service"][1] - stepped),
            )
            (cfg.state_dir / f"go-{job_id}").touch()
            wait_until(
                lambda: s.get_job(job_id).state in ("skipped", "failed"),
                "s.get_job(job_id).state in ('skipped', 'failed')",
                timeout=30,
                seen=lambda: s.get_job(job_id),
            )
            job = s.get_job(job_id)
            assert job.state == "skipped" and job.attempts == 1, (job.error, [e.message for e in s.events(job_id)])
            assert [e.to_state for e in s.events(job_id)] == ["queued", "running", "qc_done", "skipped"]
    finally:
        d.stop()


def test_a_wall_clock_stepped_back_ten_minutes_freezes_nothing(tmp_path):
    """Issue #20 case 8: -600 s froze the service for 600 s (a set settling then waited out the step)."""
    from daemon.discovery import Discovery
    from tests.daemon.test_discovery import _tif, make_discovery_config

    cfg = make_discovery_config(tmp_path, "settle_seconds = 1\n")
    wall = SteppedClock()
    disc = Discovery(cfg)
    d = Daemon(cfg, target="tests.daemon.targets:ok", components=[disc], clock=wall)
    d.start()
    try:
        inbox = cfg.watch[0].path
        _tif(inbox / "SS200000135TL_D1.tif")
        wait_until(lambda: _settling(disc) >= 1, "_settling(disc) >= 1", timeout=30)  # seen, settling
        with Store(cfg.database_path) as s:
            before = s.get_status()["service"][1]
            wall.step(-600)
            _tif(inbox / "later" / "C02533C.tif")  # a set that arrives after the step
            wait_until(
                lambda: s.counts()["skipped"] == 2, "s.counts()['skipped'] == 2", timeout=40, seen=lambda: s.counts()
            )
            beat = s.get_status()["service"][1]
            assert beat >= before  # the heartbeat never went back
            wait_until(
                lambda: s.get_status()["service"][1] > beat, "s.get_status()['service'][1] > beat", timeout=10
            )  # and it goes on
    finally:
        d.stop()


def _settling(disc) -> int:
    """Sets discovery is watching settle (read from the test's thread while the tick runs)."""
    try:
        return int(disc.health()["roots"][0]["pending"])
    except RuntimeError:  # changed during iteration: ask again
        return 0
