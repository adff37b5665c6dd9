"""The pywin32 service class under a fake service manager (tests/windows_service/fake_pywin32.py).

pywin32, pythonservice.exe and the Windows service manager cannot run here;
the fakes stand in for them, following pywin32's own code, and every test
says so in its name. The Daemon, its store, its worker children and the
logs are real.
"""

from __future__ import annotations

import threading
from pathlib import Path

from daemon.config import load_config
from daemon.service import Daemon
from daemon.store import JobState, Store
from tests.helpers import scaled, wait_job, wait_until
from tests.windows_service.fake_pywin32 import (
    ERROR_SERVICE_SPECIFIC_ERROR,
    SERVICE_ACCEPT_SHUTDOWN,
    SERVICE_ACCEPT_STOP,
    SERVICE_CONTROL_SHUTDOWN,
    SERVICE_CONTROL_STOP,
    SERVICE_RUNNING,
    SERVICE_STOPPED,
)
from windows_service import manage


class BlockingStart:
    """A component whose start waits for the test: the daemon is 'still starting' meanwhile."""

    name = "slow-start"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def start(self, daemon):
        self.entered.set()
        assert self.release.wait(scaled(30)), "the test never released the start"

    def tick(self, now):
        pass

    def stop(self):
        pass

    def health(self):
        return {}


def _install(fake_scm, cfg, monkeypatch, *, target="tests.daemon.targets:ok", components=()):
    monkeypatch.setattr(
        fake_scm.service.ImageQCService,
        "daemon_factory",
        staticmethod(lambda c, notify: Daemon(c, target=target, components=list(components), notify=notify)),
    )
    manage.install(cfg.source, modules=fake_scm.modules, drive_type=lambda root: 3)
    return fake_scm.manager.services["imageqc"]


def _queue_job(cfg) -> int:
    with Store(cfg.database_path) as s:
        ssid, _ = s.add_scan_set(chip="SS200000135TL_D1", root=str(cfg.watch[0].path), fingerprint="fp", members=[])
        return s.create_job(ssid, state=JobState.QUEUED)


def test_svcdorun_reports_running_before_the_daemon_has_started_fake_service_manager(
    fake_scm, make_config, monkeypatch
):
    cfg = make_config()
    slow = BlockingStart()
    rec = _install(fake_scm, cfg, monkeypatch, components=[slow])
    mgr = fake_scm.manager
    mgr.start("imageqc")
    assert slow.entered.wait(scaled(30))
    wait_until(lambda: rec.state == SERVICE_RUNNING, "rec.state == SERVICE_RUNNING")
    # running is reported while Daemon.start is still in progress (no READY yet), and stop is accepted
    assert not slow.release.is_set() and not any("imageqc is running" in m for _lv, m in mgr.events)
    assert rec.status[2] & SERVICE_ACCEPT_STOP and rec.status[2] & SERVICE_ACCEPT_SHUTDOWN
    slow.release.set()
    wait_until(
        lambda: any("imageqc is running" in m for _lv, m in mgr.events),
        "any('imageqc is running' in m for _lv, m in mgr.events)",
    )
    mgr.control("imageqc", SERVICE_CONTROL_STOP)
    mgr.wait_for("imageqc", SERVICE_STOPPED, scaled(60))
    assert rec.status[3] == 0  # a clean stop: no error code, no recovery action
    states = rec.states()
    assert states[0] == "START_PENDING" and states[1] == "RUNNING" and states[-1] == "STOPPED"
    assert "STOP_PENDING" in states[states.index("RUNNING") :]
    assert mgr.events[-1] == ("info", "imageqc stopped")


def test_svcstop_stops_a_real_daemon_with_a_running_job_within_the_wait_hint_fake_service_manager(
    fake_scm, make_config, monkeypatch
):
    cfg = make_config()  # service.shutdown_timeout_s = 2
    job = _queue_job(cfg)
    rec = _install(fake_scm, cfg, monkeypatch, target="tests.daemon.targets:sleep_long")
    mgr = fake_scm.manager
    mgr.start("imageqc")
    with Store(cfg.database_path) as s:
        wait_job(s, job, timeout=60, stage="sleeping")
    mgr.control("imageqc", SERVICE_CONTROL_STOP)
    hints = [st[6] for _t, st in rec.history if st[1] == 3]  # STOP_PENDING wait hints
    assert hints and hints[0] == (2 + 30) * 1000
    mgr.wait_for("imageqc", SERVICE_STOPPED, scaled(hints[0] / 1000))
    assert rec.status[3] == 0
    with Store(cfg.database_path) as s:
        assert s.get_job(job).state == "queued"  # the QC child was stopped and the job returned to the queue
        assert s.get_status()["service"][0]["state"] == "stopped"


def test_a_corrupt_database_is_reported_and_the_service_stops_with_an_error_fake_service_manager(
    fake_scm, make_config, monkeypatch
):
    cfg = make_config()
    cfg.state_dir.mkdir(parents=True)
    cfg.database_path.write_bytes(b"garbage" * 1000)
    rec = _install(fake_scm, cfg, monkeypatch)
    mgr = fake_scm.manager
    mgr.start("imageqc")
    mgr.wait_for("imageqc", SERVICE_STOPPED, scaled(30))  # stops, does not hang in RUNNING
    assert rec.status[3] == ERROR_SERVICE_SPECIFIC_ERROR  # so the recovery actions restart it
    ours = [m for lv, m in mgr.events if lv == "error" and m.startswith("imageqc could not start")]
    assert ours and "DatabaseUnavailable" in ours[0] and str(cfg.database_path) in ours[0]
    assert rec.failure_actions_on_error  # the install asked Windows to apply recovery on such error stops


def test_system_shutdown_stops_urgently_without_the_grace_period_fake_service_manager(
    fake_scm, make_config, monkeypatch
):
    path = Path(make_config().source)
    path.write_text(path.read_text().replace("shutdown_timeout_s = 2", "shutdown_timeout_s = 600"))
    cfg = load_config(path)
    job = _queue_job(cfg)
    rec = _install(fake_scm, cfg, monkeypatch, target="tests.daemon.targets:sleep_long")
    mgr = fake_scm.manager
    mgr.start("imageqc")
    with Store(cfg.database_path) as s:
        wait_job(s, job, timeout=60, stage="sleeping")
    mgr.control("imageqc", SERVICE_CONTROL_SHUTDOWN)
    mgr.wait_for("imageqc", SERVICE_STOPPED, scaled(20))  # far below the 600 s a normal stop would grant the job
    assert rec.status[3] == 0
    with Store(cfg.database_path) as s:
        assert s.get_job(job).state == "queued"


def test_a_service_registered_without_a_config_stops_with_an_error_fake_service_manager(fake_scm, monkeypatch):
    monkeypatch.delenv("IMAGEQC_CONFIG", raising=False)
    fake_scm.win32serviceutil.InstallService(manage.SERVICE_CLASS, "imageqc", "imageqc image QC")
    mgr = fake_scm.manager
    mgr.start("imageqc")
    mgr.wait_for("imageqc", SERVICE_STOPPED, scaled(30))
    assert mgr.services["imageqc"].status[3] == ERROR_SERVICE_SPECIFIC_ERROR
    assert any(lv == "error" and "imageqc service install --config" in m for lv, m in mgr.events)


def test_the_config_can_come_from_the_environment_fake_service_manager(fake_scm, make_config, monkeypatch):
    cfg = make_config()
    monkeypatch.setenv("IMAGEQC_CONFIG", cfg.source)
    monkeypatch.setattr(
        fake_scm.service.ImageQCService,
        "daemon_factory",
        staticmethod(lambda c, notify: Daemon(c, target="tests.daemon.targets:ok", notify=notify)),
    )
    fake_scm.win32serviceutil.InstallService(manage.SERVICE_CLASS, "imageqc", "imageqc image QC")
    mgr = fake_scm.manager
    mgr.start("imageqc")
    wait_until(
        lambda: any("imageqc is running" in m for _lv, m in mgr.events),
        "any('imageqc is running' in m for _lv, m in mgr.events)",
    )
    mgr.control("imageqc", SERVICE_CONTROL_STOP)
    mgr.wait_for("imageqc", SERVICE_STOPPED, scaled(60))
    assert mgr.services["imageqc"].status[3] == 0
