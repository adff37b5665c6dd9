"""The systemd unit generated from a config, checked by systemd itself, and the sd_notify protocol for real."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import default_config, load_config, load_config_text
from daemon.install import (
    ServiceInstallError,
    build_systemd_unit,
    next_steps,
    stop_timeout_seconds,
    systemd_quote,
    watchdog_seconds,
)
from tests.helpers import run_child, scaled

REPO = Path(__file__).resolve().parents[2]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed here (apt-get install systemd)"
)


def _entries(text: str) -> dict[str, list[str]]:
    """``section.Key`` -> values, in order (keys may repeat, e.g. Environment=)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def _one(entries: dict[str, list[str]], key: str) -> str:
    (value,) = entries[key]
    return value


def _site_config(tmp_path: Path, text: str, name: str = "imageqc.toml"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def _network_under_mnt(path: Path) -> bool:
    return str(path).startswith("/mnt/")


def test_a_config_with_the_systemd_folders_uses_state_and_logs_directories():
    cfg = load_config_text(
        'state_dir = "/var/lib/imageqc"\n'
        '[[watch]]\npath = "/srv/microscope/export"\n'
        '[[watch]]\npath = "/mnt/nas/scope2"\n'
        '[logging]\nfile = "/var/log/imageqc/imageqc.jsonl"\n',
        file="/etc/imageqc/imageqc.toml",
        base=Path("/etc/imageqc"),
    )
    unit = build_systemd_unit(cfg, command=["/opt/imageqc/venv/bin/imageqc"], is_network=_network_under_mnt)
    e = _entries(unit.text)
    assert _one(e, "Service.Type") == "notify" and _one(e, "Service.NotifyAccess") == "main"
    assert _one(e, "Service.ExecStart") == "/opt/imageqc/venv/bin/imageqc run --config /etc/imageqc/imageqc.toml"
    assert "IMAGEQC_CONFIG=/etc/imageqc/imageqc.toml" in e["Service.Environment"]
    assert _one(e, "Service.StateDirectory") == "imageqc" and _one(e, "Service.LogsDirectory") == "imageqc"
    assert "Service.ReadWritePaths" not in e  # outputs live in the state folder systemd manages
    assert _one(e, "Service.ReadOnlyPaths") == "-/srv/microscope/export -/mnt/nas/scope2"
    assert _one(e, "Unit.RequiresMountsFor") == "/srv/microscope/export /mnt/nas/scope2"
    assert _one(e, "Unit.After") == "network-online.target remote-fs.target"
    assert _one(e, "Service.User") == "imageqc" and _one(e, "Service.Group") == "imageqc"
    assert _one(e, "Service.Restart") == "on-failure" and _one(e, "Service.KillMode") == "mixed"
    assert _one(e, "Service.WatchdogSec") == "60" and _one(e, "Service.TimeoutStopSec") == "50"
    for key, value in [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "read-only"),
    ]:
        assert _one(e, f"Service.{key}") == value
    assert unit.prepare_dirs == () and unit.warnings == ()
    steps = next_steps(unit)
    assert steps[0].startswith(
        "getent passwd imageqc >/dev/null || useradd --system --user-group --home-dir /var/lib/imageqc"
    )
    assert steps[-2:] == ["systemctl daemon-reload", "systemctl enable --now imageqc.service"]


def test_other_folders_get_write_access_mount_dependencies_and_setup_commands():
    cfg = load_config_text(
        'state_dir = "/srv/imageqc/state"\n'
        '[[watch]]\npath = "/mnt/scope/export"\n'
        '[output]\ndir = "/mnt/nas/qc-out"\n'
        "[service]\ntick_seconds = 12\nshutdown_timeout_s = 45.5\n"
        '[[upload]]\nname = "hpc"\ntype = "hpc"\npath = "/mnt/hpc/incoming"\n'
        '[[upload]]\nname = "off"\ntype = "hpc"\nmode = "none"\npath = "/mnt/hpc/never"\n',
        file="/etc/imageqc/site.toml",
        base=Path("/etc/imageqc"),
    )
    unit = build_systemd_unit(
        cfg, user="labqc", group="scope", command=["/usr/local/bin/imageqc"], is_network=_network_under_mnt
    )
    e = _entries(unit.text)
    assert "Service.StateDirectory" not in e and "Service.LogsDirectory" not in e
    # state (with its log folder inside) and outputs must exist; the HPC folder is optional ("-")
    assert _one(e, "Service.ReadWritePaths") == "/srv/imageqc/state /mnt/nas/qc-out -/mnt/hpc/incoming"
    assert _one(e, "Unit.RequiresMountsFor") == "/mnt/scope/export /mnt/nas/qc-out /mnt/hpc/incoming"
    assert _one(e, "Service.User") == "labqc" and _one(e, "Service.Group") == "scope"
    assert _one(e, "Service.WatchdogSec") == "120"  # 10 ticks of 12 s
    assert _one(e, "Service.TimeoutStopSec") == "76"  # ceil(45.5) + 30
    assert unit.prepare_dirs == (Path("/srv/imageqc/state"), Path("/mnt/nas/qc-out"))
    steps = next_steps(unit)
    assert (
        "--home-dir /srv/imageqc/state" in steps[0]
        and steps[1] == "getent group scope >/dev/null || groupadd --system scope"
    )
    assert "install -d -m 0750 -o labqc -g scope /srv/imageqc/state" in steps
    assert "install -d -m 0750 -o labqc -g scope /mnt/nas/qc-out" in steps
    assert "chgrp scope /etc/imageqc/site.toml && chmod 0640 /etc/imageqc/site.toml" in steps


def test_a_mount_below_another_watched_folder_gets_its_own_dependency():
    cfg = load_config_text(
        '[[watch]]\npath = "/mnt/scope"\n[[watch]]\npath = "/mnt/scope/second-share"\n',
        file="/etc/imageqc/imageqc.toml",
        base=Path("/var/lib/imageqc"),
    )
    e = _entries(build_systemd_unit(cfg, command=["/usr/bin/imageqc"], is_network=lambda p: False).text)
    assert _one(e, "Unit.RequiresMountsFor") == "/mnt/scope /mnt/scope/second-share"
    assert _one(e, "Service.ReadOnlyPaths") == "-/mnt/scope"  # read-only applies to everything below


@pytest.mark.parametrize(("tick", "watchdog"), [(0.05, 60), (2.0, 60), (6.0, 60), (6.5, 65), (30.0, 300)])
def test_the_watchdog_leaves_room_for_many_ticks(tick, watchdog):
    assert watchdog_seconds(tick) == watchdog
    assert watchdog >= 10 * tick


def test_stop_timeout_covers_the_running_jobs_grace_period():
    cfg = load_config_text('[[watch]]\npath = "inbox"\n[service]\nshutdown_timeout_s = 0\n', base=Path("/x"))
    assert stop_timeout_seconds(cfg) == 30
    assert stop_timeout_seconds(default_config()) == 20 + 30


def test_what_a_service_cannot_use_is_refused_or_warned_about(tmp_path):
    with pytest.raises(ServiceInstallError, match="needs a configuration file") as info:
        build_systemd_unit(default_config())
    assert info.value.exit_code == 2
    cfg = _site_config(tmp_path, '[[watch]]\npath = "inbox"\n')
    with pytest.raises(ServiceInstallError, match="not a valid user name"):
        build_systemd_unit(cfg, user="Lab User", command=["/bin/true"])
    unc = _site_config(tmp_path, '[[watch]]\npath = "//scope-pc/export"\n', name="unc.toml")
    with pytest.raises(ServiceInstallError, match="Windows path; on Linux mount the share"):
        build_systemd_unit(unc, command=["/bin/true"])
    unit = build_systemd_unit(cfg, user="root", command=["/bin/true"], is_network=lambda p: False)
    assert any("defeats most of the unit's hardening" in w for w in unit.warnings)
    assert any("PrivateTmp=yes" in w and str(tmp_path) in w for w in unit.warnings)  # tmp_path is under /tmp


def test_words_are_quoted_and_escaped_the_way_systemd_reads_them():
    assert systemd_quote("/opt/imageqc/bin/imageqc") == "/opt/imageqc/bin/imageqc"
    assert systemd_quote("/srv/lab data/50%") == '"/srv/lab data/50%%"'
    assert systemd_quote('/a"b\\c') == '"/a\\"b\\\\c"'
    assert systemd_quote("$HOME/x", command=True) == "$$HOME/x" and systemd_quote("$HOME/x") == "$HOME/x"
    argv = ["/opt/venv/bin/imageqc", "run", "--config", '/srv/lab data/50% $site "A"\\x.toml']
    line = " ".join(systemd_quote(a, command=True) for a in argv)
    assert shlex.split(line.replace("%%", "%").replace("$$", "$")) == argv


def _verify(unit_file: Path) -> subprocess.CompletedProcess[str]:
    return run_child([ANALYZE, "verify", str(unit_file)], timeout=120, what="systemd-analyze verify")


@needs_analyze
def test_the_generated_unit_passes_systemd_analyze_verify(tmp_path):
    # a folder name with a space and a '%z' (an unknown specifier unless escaped)
    site = tmp_path / "lab 1 %z"
    (site / "inbox").mkdir(parents=True)
    cfg = _site_config(site, 'state_dir = "state"\n[[watch]]\npath = "inbox"\n[output]\ndir = "qc out"\n')
    unit = build_systemd_unit(cfg, command=[sys.executable, "-m", "daemon.cli"])
    unit_file = tmp_path / "imageqc.service"
    unit_file.write_text(unit.text, encoding="utf-8")
    result = _verify(unit_file)
    assert result.returncode == 0 and (result.stdout + result.stderr).strip() == "", result.stdout + result.stderr
    # the check can fail: the same unit with the '%' left unescaped is rejected
    unit_file.write_text(unit.text.replace("%%z", "%z"), encoding="utf-8")
    broken = _verify(unit_file)
    assert broken.returncode != 0 and "Failed to resolve unit specifiers" in broken.stderr, broken.stderr


@needs_analyze
def test_the_hardening_keeps_the_exposure_score_low(tmp_path):
    cfg = _site_config(tmp_path, '[[watch]]\npath = "inbox"\n')
    unit_file = tmp_path / "imageqc.service"
    unit_file.write_text(build_systemd_unit(cfg, command=[sys.executable]).text, encoding="utf-8")
    result = run_child([ANALYZE, "security", "--offline=true", str(unit_file)], timeout=120, what="systemd-analyze")
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip(
            f"this systemd-analyze cannot score unit files offline (systemd >= 250 can): {result.stderr.strip()}"
        )
    m = re.search(r"Overall exposure level for imageqc\.service: ([0-9.]+)", result.stdout + result.stderr)
    assert m, result.stdout + result.stderr
    assert float(m.group(1)) <= 2.0, result.stdout  # 1.6 when written; User= alone scores 9.2


def test_the_checked_in_unit_is_what_the_generator_writes_for_the_checked_in_config(tmp_path):
    example = REPO / "systemd" / "imageqc.toml"
    cfg = load_config_text(
        example.read_text(encoding="utf-8"), file="/etc/imageqc/imageqc.toml", base=Path("/etc/imageqc")
    )
    unit = build_systemd_unit(cfg, command=["/opt/imageqc/venv/bin/imageqc"], is_network=_network_under_mnt)
    fresh = tmp_path / "imageqc.service"
    fresh.write_text(unit.text, encoding="utf-8")
    checked_in = (REPO / "systemd" / "imageqc.service").read_text(encoding="utf-8")
    assert checked_in == unit.text, f"systemd/imageqc.service is stale: copy {fresh} over it"


def test_service_install_writes_the_unit_and_prints_the_next_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("IMAGEQC_CONFIG", raising=False)
    _site_config(tmp_path, '[[watch]]\npath = "inbox"\n')
    units = tmp_path / "units"
    units.mkdir()
    args = ["service", "install", "--config", str(tmp_path / "imageqc.toml"), "--unit-dir", str(units)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    unit_file = units / "imageqc.service"
    assert stat.S_IMODE(unit_file.stat().st_mode) == 0o644
    assert "ExecStart=" in unit_file.read_text() and f"--config {tmp_path / 'imageqc.toml'}" in unit_file.read_text()
    assert f"wrote {unit_file}" in out and "systemctl enable --now imageqc.service" in out and "useradd --system" in out
    assert "PrivateTmp" in err  # the warnings go to stderr
    assert main(args) == 0
    assert "unchanged" in capsys.readouterr().out
    assert main([*args, "--dry-run", "--unit-dir", str(tmp_path / "nowhere")]) == 0
    dry = capsys.readouterr().out
    assert (
        dry.startswith("# imageqc.service: generated") and "[Service]" in dry and "#   systemctl daemon-reload" in dry
    )
    assert main([*args[:-1], str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(["service", "install"]) == 2  # no config: the embedded default is no service config
    assert "needs a configuration file" in capsys.readouterr().err


def test_service_start_stop_and_remove_on_linux_point_to_systemctl(capsys):
    assert main(["service", "start"]) == 2
    assert "sudo systemctl start imageqc.service" in capsys.readouterr().err
    assert main(["service", "remove"]) == 0
    assert "systemctl disable --now imageqc.service" in capsys.readouterr().out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sd_notify protocol is systemd's, on Linux")
def test_imageqc_run_speaks_sd_notify_ready_watchdog_stopping(make_config, tmp_path):
    cfg = make_config()  # tick 0.2 s
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(1.0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(sock_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run", "--config", cfg.source],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    messages: list[str] = []

    def read_until(pred, timeout):
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
            if pred():
                return True
        return pred()

    try:
        assert read_until(lambda: "READY=1" in messages, 180), (
            messages,
            proc.stderr.read() if proc.poll() is not None else "",
        )
        ready_at = messages.index("READY=1")
        assert read_until(lambda: messages[ready_at:].count("WATCHDOG=1") >= 3, 30), messages  # one per tick
        proc.send_signal(signal.SIGTERM)
        assert read_until(lambda: "STOPPING=1" in messages, 30), messages
        assert proc.wait(timeout=scaled(60)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(scaled(30))
        sock.close()
    assert set(messages) <= {"READY=1", "WATCHDOG=1", "STOPPING=1"}
    assert messages.count("READY=1") == 1 and messages.index("STOPPING=1") > ready_at
