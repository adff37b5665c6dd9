"""`imageqc follow [--notify]`: new verdicts printed, and shown through a real D-Bus notification server.

The desktop is real as far as it exists here: a private dbus-daemon session bus
and a notification server on it (tests/notification_server.py), reached by
desktop-notifier exactly as on a technician's Linux desktop.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.follow import AUTOSTART_NAME, desktop_problem, follow
from daemon.store import JobState, Store
from tests.helpers import scaled, wait_until

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="a D-Bus session bus is a Linux desktop's")

REASON = "SS200000135TL_D1.tif: track line score 12 < 60: no line grid found; check focus and exposure"


def _running_job(s: Store, cfg, chip: str) -> int:
    """A job of a one-file scan set of ``chip``, claimed by worker "w"."""
    ssid, _ = s.add_scan_set(
        chip=chip,
        root=str(cfg.watch[0].path),
        fingerprint=f"fp-{chip}",
        members=[{"name": chip, "path": f"{chip}.tif", "size": 1}],
    )
    job = s.create_job(ssid)
    assert job is not None
    s.claim("w")
    return job


def _verdict(cfg, chip: str, verdict: str, reason: str = "") -> int:
    with Store(cfg.database_path) as s:
        job = _running_job(s, cfg, chip)
        s.save_result(job, verdict=verdict, report={"verdict": verdict, "reasons": [reason] if reason else []})
        s.transition(job, JobState.QC_DONE, owner="w")
        s.transition(job, JobState.SKIPPED)
    return job


def _announced(cfg, chip: str, verdict: str, reason: str = "") -> int:
    """A job whose verdict was announced and whose archive then could not be written: failed, to be retried."""
    with Store(cfg.database_path) as s:
        job = _running_job(s, cfg, chip)
        report = {"verdict": verdict, "reasons": [reason] if reason else []}
        s.save_result(job, verdict=verdict, report=report, owner="w", announce=True)
        s.transition(job, JobState.FAILED, owner="w", error="disk full writing the archive", failed_stage="qc")
    return job


def _run_again(cfg, job: int, verdict: str, reason: str = "") -> None:
    """``imageqc retry`` of such a job: QC runs again, stores its verdict, writes the archive this time."""
    with Store(cfg.database_path) as s:
        s.retry(job)
        assert s.claim("w").id == job  # type: ignore[union-attr]
        report = {"verdict": verdict, "reasons": [reason] if reason else []}
        s.save_result(job, verdict=verdict, report=report, owner="w", announce=True)
        s.set_archive(job, f"/out/{job}.tar.gz", owner="w")
        s.transition(job, JobState.QC_DONE, owner="w")
        s.transition(job, JobState.SKIPPED)


def test_follow_shows_a_verdict_once_when_qc_runs_again_after_the_archive_failed(make_config):
    """The same verdict stored again by a rerun is not new; a verdict that changed is."""
    cfg = make_config()
    before = _announced(cfg, "C02533C", "pass")  # announced before follow starts
    out, stop = io.StringIO(), threading.Event()
    thread = threading.Thread(
        target=follow, args=(cfg,), kwargs={"since": time.time(), "interval": 0.05, "stop": stop, "out": out}
    )
    thread.start()
    try:
        during = _announced(cfg, "SS200000135TL_D1", "fail", REASON)
        changed = _announced(cfg, "A02677B5", "pass")
        wait_until(lambda: f"#{changed} " in out.getvalue(), "the verdicts to be shown", seen=out.getvalue)
        _run_again(cfg, before, "pass")
        _run_again(cfg, during, "fail", REASON)
        _run_again(cfg, changed, "fail", REASON)
        later = _verdict(cfg, "D02070C3D3", "pass")  # shown: follow looked again after the reruns
        wait_until(lambda: f"#{later} " in out.getvalue(), "the later verdict to be shown", seen=out.getvalue)
    finally:
        stop.set()
        thread.join()
    shown = [line.split("  ", 1)[1] for line in out.getvalue().splitlines()]
    assert shown == [
        f"#{during} SS200000135TL_D1  QC FAIL: {REASON}",
        f"#{changed} A02677B5  QC pass",
        f"#{changed} A02677B5  QC FAIL: {REASON}",
        f"#{later} D02070C3D3  QC pass",
    ], out.getvalue()


@pytest.fixture
def session_bus(tmp_path):
    """A real D-Bus session bus with a notification server on it; yields (env, received-file)."""
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed (Debian: apt-get install dbus)")
    sock = tmp_path / "bus"
    bus = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1", f"--address=unix:path={sock}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    address = bus.stdout.readline().strip()
    env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": address}
    received = tmp_path / "received.jsonl"
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).parents[1] / "notification_server.py"), str(received)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "ready"
        yield env, received
    finally:
        for p in (server, bus):
            p.terminate()
            p.wait(timeout=scaled(30))


def test_follow_notify_shows_each_new_verdict_on_the_desktop_once(make_config, tmp_path, session_bus):
    env, received = session_bus
    cfg = make_config()
    old = _verdict(cfg, "C02533C", "pass")  # before follow starts: not shown (no --since)
    env = {**env, "IMAGEQC_CONFIG": str(tmp_path / "imageqc.toml"), "PYTHONPATH": os.getcwd()}
    follow = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "follow", "--notify", "--interval", "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "following QC verdicts" in follow.stdout.readline()
        failed = _verdict(cfg, "SS200000135TL_D1", "fail", REASON)
        passed = _verdict(cfg, "A02677B5", "pass")

        def shown(n: int) -> list[dict] | None:
            rows = [json.loads(x) for x in received.read_text().splitlines()] if received.exists() else []
            return rows if len(rows) >= n else None

        wait_until(lambda: shown(2), "two notifications to reach the D-Bus server", timeout=60, seen=lambda: shown(0))
        # a later verdict shown means follow looked again after the first two: they must not come twice
        later = _verdict(cfg, "D02070C3D3", "pass")
        rows = wait_until(lambda: shown(3), "the later verdict's notification", timeout=60, seen=lambda: shown(0))
    finally:
        follow.terminate()
        out, err = follow.communicate(timeout=scaled(60))
    assert [r["summary"] for r in rows] == [
        "QC FAIL: SS200000135TL_D1",
        "QC pass: A02677B5",
        "QC pass: D02070C3D3",
    ], (rows, err)
    assert rows[0]["app"] == "imageqc" and rows[0]["urgency"] == 2 and rows[1]["urgency"] == 1  # critical, normal
    assert REASON in rows[0]["body"] and f"imageqc show {failed}" in rows[0]["body"]
    assert f"#{failed} SS200000135TL_D1  QC FAIL: {REASON}" in out and f"#{passed} A02677B5  QC pass" in out
    assert f"#{later} D02070C3D3  QC pass" in out
    assert f"#{old} " not in out


def test_follow_notify_without_a_desktop_says_so_and_exits_2(make_config, tmp_path, monkeypatch, capsys):
    make_config()
    monkeypatch.setenv("IMAGEQC_CONFIG", str(tmp_path / "imageqc.toml"))
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "no-runtime"))
    assert main(["follow", "--notify"]) == 2
    err = capsys.readouterr().err
    assert "no desktop session here: no D-Bus session bus" in err and "--follow-at-logon" in err
    # a bus address that leads nowhere: the notification service does not answer
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", f"unix:path={tmp_path / 'nobody-listens'}")
    assert main(["follow", "--notify"]) == 2
    assert "notification service does not answer" in capsys.readouterr().err


def test_desktop_problem_in_windows_session_0_fake_session_api(monkeypatch):
    """Windows session 0 cannot be entered here: the session query is faked (the only fake in this file)."""
    import types

    fake = types.ModuleType("windows_service.desktop")
    fake.session_id = lambda: 0
    monkeypatch.setitem(sys.modules, "windows_service.desktop", fake)
    assert "session 0" in desktop_problem({}, platform="win32")
    fake.session_id = lambda: 2
    assert desktop_problem({}, platform="win32") is None


def test_service_install_follow_at_logon_writes_an_xdg_autostart_file(make_config, tmp_path, capsys):
    make_config()
    conf = tmp_path / "imageqc.toml"
    auto = tmp_path / "autostart"
    (tmp_path / "units").mkdir()
    args = [
        "service",
        "install",
        "--systemd",
        "--config",
        str(conf),
        "--follow-at-logon",
        "--autostart-dir",
        str(auto),
        "--unit-dir",
        str(tmp_path / "units"),
    ]
    assert main([*args, "--dry-run"]) == 0
    assert f"Would write {auto / AUTOSTART_NAME}" in capsys.readouterr().out and not auto.exists()
    assert main(args) == 0
    text = (auto / AUTOSTART_NAME).read_text()
    exec_line = next(line for line in text.splitlines() if line.startswith("Exec="))
    assert exec_line.endswith(f"follow --notify --config {conf}") and "Type=Application" in text
    assert main(["service", "remove", "--systemd", "--autostart-dir", str(auto)]) == 0
    assert str(auto / AUTOSTART_NAME) in capsys.readouterr().out  # the rm line names it
