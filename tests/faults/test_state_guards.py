"""The state folder changed under a running service: the job database or the lock file deleted.

Issue #20 cases 5 and 6. The service here is the real service loop
(:class:`~daemon.service.Daemon` with discovery and real QC child processes),
run in the test's process so the test can read its failure; `imageqc run`
prints that failure and exits 1 (see test_disk_full.py for the exit code end to
end). The files are really deleted while the service and a QC child run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import load_config_text
from daemon.discovery import Discovery
from daemon.errors import DatabaseUnavailable
from daemon.service import AlreadyRunning, Daemon
from daemon.status import collect_status
from daemon.store import Store
from tests.daemon.test_discovery import _tif
from tests.helpers import wait_changes, wait_until

from .conftest import config_text

pytestmark = pytest.mark.soak

WAIT = "tests.daemon.targets:wait_for_go"  # a QC child that runs until the test lets it finish


def _config(tmp_path: Path, *, tick: float = 0.2):
    text = config_text(service={"tick_seconds": tick, "workers": 1})
    (tmp_path / "imageqc.toml").write_text(text, encoding="utf-8")
    (tmp_path / "inbox").mkdir(exist_ok=True)
    return load_config_text(text, file=str(tmp_path / "imageqc.toml"), base=tmp_path)


def _job(cfg, job_id):
    with Store(cfg.database_path, readonly=True) as s:
        return s.get_job(job_id)


def _until_count(d, state, n, what):
    """Until the running Daemon's store counts ``n`` jobs in ``state``; fails with the counts seen last."""
    wait_until(
        lambda: d.store is not None and d.store.counts()[state] == n,
        what,
        seen=lambda: d.store.counts() if d.store is not None else "no store",
    )


def _beat(cfg):
    """When the service last wrote its heartbeat."""
    with Store(cfg.database_path, readonly=True) as s:
        beat = s.get_status().get("service")
        return beat[1] if beat else None


def _go(cfg, job_id):
    (cfg.state_dir / f"go-{job_id}").touch()


def test_a_job_database_deleted_under_the_service_stops_it_and_the_next_start_resumes_from_the_copy(tmp_path):
    cfg = _config(tmp_path)
    inbox = cfg.watch[0].path
    d = Daemon(cfg, target=WAIT, components=[Discovery(cfg)])
    d.start()
    try:
        _tif(inbox / "SS200000135TL_D1.tif")
        _until_count(d, "running", 1, "set 1 in QC")
        _go(cfg, 1)
        _until_count(d, "skipped", 1, "set 1 finished")
        _tif(inbox / "later" / "C02533C.tif")
        _until_count(d, "running", 1, "set 2 in QC")
        cfg.database_path.unlink()  # the fault
        _go(cfg, 2)  # the QC child now opens the database to store its result
        wait_until(d._stop.is_set, "the service to notice its database was deleted and stop", seen=lambda: d.failure)
    finally:
        d.stop()
    assert d.failure is not None
    assert f"the job database {cfg.database_path} was deleted while the service ran" in d.failure
    saved = sorted(cfg.state_dir.glob("imageqc.sqlite3.saved-*"))
    assert (
        len(saved) == 1
        and f"a copy of what it held was saved as {saved[0]}; the next start resumes from it" in d.failure
    )
    assert not cfg.database_path.exists()  # no QC child (or anything else) made a new, empty one
    st = collect_status(cfg)
    assert f"the service saved what it held as {saved[0]}" in st["service"]["reason"]
    with pytest.raises(DatabaseUnavailable, match=r"start the service .* to resume from that copy"):
        Store(cfg.database_path)  # `imageqc qc`'s pair cache, say: no new database hides the copy

    d2 = Daemon(cfg, target="tests.daemon.targets:ok", components=[Discovery(cfg)])
    d2.start()
    try:
        assert cfg.database_path.exists() and not saved[0].exists()  # resumed from the copy
        _until_count(d2, "skipped", 2, "both sets finished after the restart")
        wait_changes(lambda: _beat(cfg), 3, "another heartbeat")  # a few more rounds: nothing new may appear
        with Store(cfg.database_path, readonly=True) as s:
            jobs = s.list_jobs(newest_first=False)
            assert [(j.chip, j.state) for j in jobs] == [("SS200000135TL_D1", "skipped"), ("C02533C", "skipped")]
            assert jobs[0].attempts == 1  # the set finished before the fault is not processed again
    finally:
        d2.stop()


def test_a_second_service_refuses_to_start_beside_a_live_one_whose_lock_file_was_deleted(tmp_path):
    cfg = _config(tmp_path, tick=30)  # one round at start, then the test drives the rounds
    with Store(cfg.database_path) as s:
        ssid, _ = s.add_scan_set(chip="SS200000135TL_D1", root=str(cfg.watch[0].path), fingerprint="fp", members=[])
        job_id = s.create_job(ssid)
    d1 = Daemon(cfg, target=WAIT)
    d1.start()
    try:
        wait_until(
            lambda: _job(cfg, job_id).stage == "waiting", "the job to wait in QC", seen=lambda: _job(cfg, job_id)
        )
        lock = cfg.state_dir / "service.lock"
        lock.unlink()  # the fault
        with pytest.raises(AlreadyRunning, match=r"although the lock file .*service.lock is missing") as refused:
            Daemon(cfg, target=WAIT).start()
        assert "another imageqc service (pid" in str(refused.value)
        job = _job(cfg, job_id)
        assert job.state == "running" and job.lease_owner == d1.owner  # not taken over
        d1.tick()  # the next round of the first service
        assert d1._stop.is_set() and d1.failure is not None
        assert d1.failure.startswith(
            f"the lock file {lock} was deleted while the service ran; another service could start"
        )
    finally:
        d1.stop()
    claims = [e for e in _events(cfg, job_id) if (e.message or "").startswith("claimed by")]
    assert len(claims) == 1
    cfg = _config(tmp_path)  # the usual short rounds again
    d3 = Daemon(cfg, target="tests.daemon.targets:ok")  # started again: a new lock file, the job resumes
    d3.start()
    try:
        wait_until(lambda: _job(cfg, job_id).state == "skipped", "the job to finish", seen=lambda: _job(cfg, job_id))
    finally:
        d3.stop()


def _events(cfg, job_id):
    with Store(cfg.database_path, readonly=True) as s:
        return s.events(job_id)


def test_commands_and_qc_children_never_create_a_job_database(tmp_path, monkeypatch, capsys):
    from daemon.cli import main

    cfg = _config(tmp_path)
    monkeypatch.setenv("IMAGEQC_CONFIG", cfg.source)
    assert main(["retry", "1"]) == 1
    assert "is missing (deleted or moved?); it is not created here" in capsys.readouterr().err
    assert not cfg.database_path.exists() and not cfg.state_dir.exists()
