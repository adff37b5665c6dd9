"""The Windows service's logic without pywin32: a real Daemon, real store, real logs; only the event log is a list."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from daemon.config import Config, WatchRoot, load_config_text
from daemon.errors import DatabaseUnavailable
from daemon.logging import configure_logging, get_logger, register_secret
from daemon.service import Daemon
from daemon.store import JobState, Store
from tests.helpers import scaled, wait_job, wait_until
from windows_service.host import EventLogHandler, ServiceFailed, ServiceHost, child_python, mapped_drives, uses_unc


class ListEventLog:
    def __init__(self) -> None:
        self.entries: list[tuple[str, str]] = []

    def info(self, message: str) -> None:
        self.entries.append(("info", message))

    def warning(self, message: str) -> None:
        self.entries.append(("warning", message))

    def error(self, message: str) -> None:
        self.entries.append(("error", message))

    def texts(self, level: str) -> list[str]:
        return [m for lv, m in self.entries if lv == level]


def _queue_job(cfg, fp="fp", chip="SS200000135TL_D1") -> int:
    with Store(cfg.database_path) as s:
        ssid, _ = s.add_scan_set(chip=chip, root=str(cfg.watch[0].path), fingerprint=fp, members=[])
        job_id = s.create_job(ssid, state=JobState.QUEUED)
        assert job_id is not None
        return job_id


def _factory(target="tests.daemon.targets:ok", components=()):
    return lambda cfg, notify: Daemon(cfg, target=target, components=list(components), notify=notify)


def _run_in_thread(host: ServiceHost) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            host.run()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=target, name="test-svcdorun")
    t.start()
    return t, errors


def _log_events(cfg) -> list[dict]:
    return [json.loads(line) for line in cfg.log_file.read_text(encoding="utf-8").splitlines()]


def test_the_host_runs_a_real_daemon_until_stopped_and_logs_to_both_logs(make_config):
    cfg = make_config()
    job = _queue_job(cfg)
    ev = ListEventLog()
    pending: list[int] = []
    host = ServiceHost(
        config_path=cfg.source, eventlog=ev, report_stop_pending=pending.append, daemon_factory=_factory()
    )
    t, errors = _run_in_thread(host)
    try:
        with Store(cfg.database_path) as s:
            wait_job(s, job, state="skipped")  # the daemon did real work
        wait_until(lambda: ev.texts("info"), "ev.texts('info')")
        assert "imageqc is running" in ev.texts("info")[0] and str(cfg.watch[0].path) in ev.texts("info")[0]
    finally:
        host.stop()
        t.join(scaled(60))
    assert not t.is_alive() and errors == []
    assert ev.texts("info")[-1] == "imageqc stopped" and ev.texts("error") == []
    events = [r["event"] for r in _log_events(cfg)]
    assert "windows service starting" in events and "service started" in events and "service stopped" in events
    with Store(cfg.database_path) as s:
        assert s.get_status()["service"][0]["state"] == "stopped"


def test_a_corrupt_database_fails_the_start_with_an_error_in_both_logs(make_config):
    cfg = make_config()
    cfg.state_dir.mkdir(parents=True)
    cfg.database_path.write_bytes(b"garbage" * 1000)
    ev = ListEventLog()
    host = ServiceHost(
        config_path=cfg.source, eventlog=ev, report_stop_pending=lambda ms: None, daemon_factory=_factory()
    )
    with pytest.raises(ServiceFailed, match="could not start: DatabaseUnavailable") as info:
        host.run()
    assert isinstance(info.value.__cause__, DatabaseUnavailable)
    assert len([m for m in ev.texts("error") if "could not start" in m and str(cfg.database_path) in m]) == 1
    errors = [r for r in _log_events(cfg) if r["level"] == "error"]
    assert any("could not start" in r["event"] for r in errors)
    assert cfg.database_path.read_bytes() == b"garbage" * 1000  # left for a person to look at


class LosesTheDatabase:
    """A component whose tick finds the database gone, as a failing disk or share would."""

    name = "disk"

    def start(self, daemon):
        pass

    def tick(self, now):
        raise DatabaseUnavailable("database disk image is malformed")

    def stop(self):
        pass

    def health(self):
        return {}


def test_a_daemon_that_stops_on_its_own_is_a_service_failure(make_config):
    cfg = make_config()
    ev = ListEventLog()
    host = ServiceHost(
        config_path=cfg.source,
        eventlog=ev,
        report_stop_pending=lambda ms: None,
        daemon_factory=_factory(components=[LosesTheDatabase()]),
    )
    t, errors = _run_in_thread(host)
    t.join(scaled(60))
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ServiceFailed)
    assert "stopped on its own" in str(errors[0]) and "malformed" in str(errors[0])
    # the daemon's own error line reached the event log through the handler, and ours too
    assert any("job database unavailable" in m and "malformed" in m for m in ev.texts("error"))
    assert len([m for m in ev.texts("error") if "stopped on its own" in m]) == 1


def test_a_stop_that_arrives_while_the_config_loads_is_honoured(make_config):
    cfg = make_config()
    ev = ListEventLog()
    host = ServiceHost(
        config_path=cfg.source, eventlog=ev, report_stop_pending=lambda ms: None, daemon_factory=_factory()
    )
    host.stop()
    t, errors = _run_in_thread(host)
    t.join(scaled(60))
    assert not t.is_alive() and errors == []
    assert ev.texts("info")[-1] == "imageqc stopped"


def test_stop_pending_is_renewed_while_the_running_job_gets_its_grace_period(make_config):
    cfg = make_config()  # shutdown_timeout_s = 2
    job = _queue_job(cfg)
    ev = ListEventLog()
    pending: list[int] = []
    host = ServiceHost(
        config_path=cfg.source,
        eventlog=ev,
        report_stop_pending=pending.append,
        daemon_factory=_factory(target="tests.daemon.targets:sleep_long"),
    )
    t, errors = _run_in_thread(host)
    try:
        with Store(cfg.database_path) as s:
            wait_job(s, job, timeout=60, stage="sleeping")
    finally:
        host.stop()
        t.join(scaled(60))
    assert not t.is_alive() and errors == []
    assert pending and set(pending) == {(2 + 30) * 1000}  # the job's grace period plus the service's margin
    assert host.stop_wait_hint_ms == 32_000
    with Store(cfg.database_path) as s:
        assert s.get_job(job).state == "queued"  # abandoned cleanly, not lost


class StuckOnStop:
    """A component whose stop hangs (a share that never answers) until the test lets it go."""

    name = "stuck"

    def __init__(self) -> None:
        self.release = threading.Event()

    def start(self, daemon):
        pass

    def tick(self, now):
        pass

    def stop(self):
        self.release.wait(scaled(60))

    def health(self):
        return {}


def test_a_stop_that_overruns_its_budget_ends_the_service_with_an_error(make_config):
    cfg = make_config()
    ev = ListEventLog()
    stuck = StuckOnStop()
    host = ServiceHost(
        config_path=cfg.source,
        eventlog=ev,
        report_stop_pending=lambda ms: None,
        daemon_factory=_factory(components=[stuck]),
        stop_budget_s=1.0,
    )
    t, errors = _run_in_thread(host)
    try:
        wait_until(lambda: ev.texts("info"), "ev.texts('info')")  # running
        host.stop()
        t.join(scaled(30))
        assert not t.is_alive()  # the service manager is not left waiting
        assert len(errors) == 1 and "did not stop within 1 s" in str(errors[0])
        assert any("did not stop within 1 s" in m for m in ev.texts("error"))
    finally:
        stuck.release.set()
        if host.daemon is not None:  # the daemon finishes its stop once the share answers
            wait_until(lambda: host.daemon.store is None, "host.daemon.store is None")


def test_a_service_without_a_usable_config_says_how_to_fix_it(tmp_path):
    ev = ListEventLog()
    host = ServiceHost(config_path=None, eventlog=ev, report_stop_pending=lambda ms: None)
    with pytest.raises(ServiceFailed, match="--config"):
        host.run()
    assert "imageqc service install --config" in ev.texts("error")[0]
    bad = tmp_path / "site.toml"
    bad.write_text("[service]\nworkers = 0\n", encoding="utf-8")
    host = ServiceHost(config_path=str(bad), eventlog=ev, report_stop_pending=lambda ms: None)
    with pytest.raises(ServiceFailed):
        host.run()
    assert f"{bad}:2: service.workers: must be >= 1" in ev.texts("error")[-1]


def test_the_event_log_gets_errors_once_per_period_with_secrets_masked(tmp_path):
    configure_logging(console="off")
    ev = ListEventLog()
    now = [1000.0]
    handler = EventLogHandler(ev, repeat_s=300, clock=lambda: now[0])
    import logging

    logging.getLogger().addHandler(handler)
    log = get_logger("imageqc.test")
    register_secret("s3cr3t-key-value")
    for _ in range(3):
        log.error("upload failed", target="lab-minio", detail="denied for s3cr3t-key-value", password="hunter2")
    log.warning("slow share")  # below the handler's level
    now[0] += 301
    log.error("upload failed", target="lab-minio", detail="denied for s3cr3t-key-value", password="hunter2")
    try:
        raise ValueError("the image is upside down")
    except ValueError:
        log.exception("tick failed")
    texts = ev.texts("error")
    assert len(texts) == 3, texts
    assert texts[0] == "upload failed (target=lab-minio, detail=denied for ***, password=***)"
    assert texts[2] == "tick failed: ValueError: the image is upside down"
    assert ev.texts("warning") == []


def test_child_python_is_the_venv_python_under_pythonservice():
    files = {r"C:\imageqc\venv\Scripts\python.exe", r"C:\Program Files\Python311\python.exe"}
    venv = child_python(
        r"C:\imageqc\venv\pythonservice.exe",
        r"C:\imageqc\venv",
        r"C:\Program Files\Python311",
        isfile=files.__contains__,
    )
    assert venv == r"C:\imageqc\venv\Scripts\python.exe"
    plain = child_python(
        r"C:\Program Files\Python311\pythonservice.exe",
        r"C:\Program Files\Python311",
        r"C:\Program Files\Python311",
        isfile=files.__contains__,
    )
    assert plain == r"C:\Program Files\Python311\python.exe"
    assert (
        child_python(r"C:\imageqc\venv\Scripts\python.exe", r"C:\imageqc\venv", r"C:\x", isfile=files.__contains__)
        is None
    )


def test_mapped_drive_letters_and_unc_shares_are_recognised():
    cfg = Config(
        state_dir=Path("C:/ProgramData/imageqc"),
        watch=(WatchRoot(path=Path("Z:/export")), WatchRoot(path=Path("D:/scans"))),
    )
    remote = {"Z:\\": 4, "C:\\": 3, "D:\\": 3}
    assert mapped_drives(cfg, lambda root: remote[root]) == ["watch[0].path = Z:/export"]
    assert not uses_unc(cfg)
    unc = load_config_text('[[watch]]\npath = "//scope-pc/export"\n', file="x.toml", base=Path("/srv"))
    assert uses_unc(unc) and mapped_drives(unc, lambda root: 4) == []
