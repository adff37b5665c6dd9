"""``imageqc service install|remove|start|stop`` on Windows, against a fake service manager.

The pywin32 calls are faked (tests/windows_service/fake_pywin32.py); the
service they start runs a real Daemon on a real state folder.
"""

from __future__ import annotations

import os
from pathlib import PurePath

import pytest

from daemon.cli import main
from daemon.config import Config, WatchRoot
from daemon.install import ServiceInstallError
from daemon.status import collect_status
from tests.helpers import wait_until
from tests.windows_service.fake_pywin32 import (
    SC_ACTION_RESTART,
    SERVICE_AUTO_START,
    SERVICE_DEMAND_START,
    SERVICE_RUNNING,
)
from windows_service import manage


def test_install_registers_the_class_the_config_and_restart_on_failure_fake_service_manager(
    fake_scm, make_config, tmp_path, monkeypatch
):
    make_config()
    monkeypatch.chdir(tmp_path)
    lines = manage.install("imageqc.toml", modules=fake_scm.modules, drive_type=lambda root: 3)  # a relative path
    rec = fake_scm.manager.services["imageqc"]
    assert rec.class_string == "windows_service.service.ImageQCService"
    assert rec.start_type == SERVICE_AUTO_START and rec.delayed is True and rec.user is None and rec.deps is None
    assert rec.params["Config"] == str(tmp_path / "imageqc.toml")  # absolute: the service runs in System32
    assert rec.failure_actions == {
        "ResetPeriod": 86_400,
        "RebootMsg": None,
        "Command": None,
        "Actions": ((SC_ACTION_RESTART, 10_000), (SC_ACTION_RESTART, 60_000), (SC_ACTION_RESTART, 300_000)),
    }
    assert rec.failure_actions_on_error is True  # also when the service stops with an error, not only on a crash
    assert fake_scm.manager.handles_open == 0
    assert any("restart after 10 s, 60 s, 300 s" in line for line in lines)


def test_install_for_unc_shares_as_a_domain_account_fake_service_manager(fake_scm, tmp_path):
    cfg = tmp_path / "site.toml"
    cfg.write_text('state_dir = "state"\n[[watch]]\npath = "//scope-pc/export"\n', encoding="utf-8")
    manage.install(
        str(cfg),
        username="LAB\\svc-imageqc",
        password="pw",
        startup="manual",
        modules=fake_scm.modules,
        drive_type=lambda r: 3,
    )
    rec = fake_scm.manager.services["imageqc"]
    assert rec.deps == ("LanmanWorkstation",)  # UNC paths need the SMB client running first
    assert rec.user == "LAB\\svc-imageqc" and rec.password == "pw" and rec.start_type == SERVICE_DEMAND_START


def test_install_start_status_stop_remove_round_trip_fake_service_manager(fake_scm, make_config, monkeypatch):
    cfg = make_config()
    from daemon.service import Daemon

    monkeypatch.setattr(
        fake_scm.service.ImageQCService,
        "daemon_factory",
        staticmethod(lambda c, notify: Daemon(c, target="tests.daemon.targets:ok", notify=notify)),
    )
    manage.install(cfg.source, modules=fake_scm.modules, drive_type=lambda r: 3)
    assert manage.start(modules=fake_scm.modules) == ["service imageqc is running; `imageqc status` shows what it does"]
    assert fake_scm.manager.services["imageqc"].state == SERVICE_RUNNING
    wait_until(
        lambda: collect_status(cfg)["service"]["running"], "collect_status(cfg)['service']['running']"
    )  # what an admin sees with `imageqc status`
    assert manage.stop(modules=fake_scm.modules) == ["service imageqc stopped"]
    assert collect_status(cfg)["service"]["reason"] == "stopped cleanly"
    assert manage.stop(modules=fake_scm.modules) == ["service imageqc was not running"]
    assert manage.remove(modules=fake_scm.modules)[-1].startswith("removed service imageqc")
    assert fake_scm.manager.services == {}
    assert cfg.database_path.exists()  # state is kept
    with pytest.raises(ServiceInstallError, match="not installed"):
        manage.remove(modules=fake_scm.modules)


def test_errors_say_what_to_do_fake_service_manager(fake_scm, make_config):
    cfg = make_config()
    manage.install(cfg.source, modules=fake_scm.modules, drive_type=lambda r: 3)
    with pytest.raises(ServiceInstallError, match="installed already"):
        manage.install(cfg.source, modules=fake_scm.modules, drive_type=lambda r: 3)
    fake_scm.manager.deny_access = True
    with pytest.raises(
        ServiceInstallError, match=r"Access is denied.*\(error 5\); run the command from an elevated prompt"
    ):
        manage.remove(modules=fake_scm.modules)


def test_install_refuses_a_config_that_does_not_load_fake_service_manager(fake_scm, tmp_path):
    bad = tmp_path / "site.toml"
    bad.write_text("[[watch]]\npath = 'inbox'\nsettle_seconds = -1\n", encoding="utf-8")
    with pytest.raises(Exception, match="settle_seconds: must be >= 0"):
        manage.install(str(bad), modules=fake_scm.modules, drive_type=lambda r: 3)
    assert fake_scm.manager.services == {}


def test_install_refuses_mapped_drive_letters_fake_service_manager(fake_scm, make_config, monkeypatch):
    cfg = make_config()
    # On Linux a config file cannot hold a drive-letter path (it reads as relative), so the
    # configuration install checks is built directly, as it would load on Windows.
    windows_cfg = Config(state_dir=PurePath("C:/ProgramData/imageqc"), watch=(WatchRoot(path=PurePath("Z:/export")),))
    monkeypatch.setattr(manage, "load_config", lambda path: windows_cfg)
    with pytest.raises(
        ServiceInstallError, match=r"drive letters mapped in your session: watch.0..path = Z:/export"
    ) as info:
        manage.install(cfg.source, modules=fake_scm.modules, drive_type=lambda root: 4 if root == "Z:\\" else 3)
    assert info.value.exit_code == 2 and "UNC path" in str(info.value)
    assert fake_scm.manager.services == {}


def test_a_password_is_asked_only_for_accounts_that_have_one():
    asked: list[str] = []

    def ask(prompt):
        asked.append(prompt)
        return "secret"

    assert manage._password_for(None, ask) is None
    assert manage._password_for("NT AUTHORITY\\NetworkService", ask) is None
    assert manage._password_for("LAB\\imageqc-gmsa$", ask) is None
    assert manage._password_for("LAB\\svc-imageqc", ask) == "secret" and asked == ["password for LAB\\svc-imageqc: "]


@pytest.mark.skipif(os.name == "nt", reason="checks the refusal on a non-Windows machine")
def test_windows_actions_are_refused_off_windows(capsys, tmp_path):
    assert main(["service", "install", "--windows", "--config", str(tmp_path / "x.toml")]) == 2
    assert "managed on Windows" in capsys.readouterr().err


def test_the_windows_half_of_the_cli_fake_service_manager(fake_scm, make_config, monkeypatch, capsys):
    from daemon.cli import build_parser
    from daemon.service import Daemon

    cfg = make_config()
    monkeypatch.setattr(manage, "_drive_type", lambda root: 3)
    monkeypatch.setattr(
        fake_scm.service.ImageQCService,
        "daemon_factory",
        staticmethod(lambda c, notify: Daemon(c, target="tests.daemon.targets:ok", notify=notify)),
    )

    def run(*argv):
        assert manage.cli_action(build_parser().parse_args(["service", *argv, "--windows"])) == 0
        return capsys.readouterr().out

    monkeypatch.delenv("IMAGEQC_CONFIG", raising=False)
    with pytest.raises(ServiceInstallError, match="needs a configuration file"):
        manage.cli_action(build_parser().parse_args(["service", "install", "--windows"]))
    out = run("install", "--config", cfg.source, "--startup", "manual")
    assert "installed service imageqc" in out and "start manual" in out and "imageqc service start" in out
    assert "is running" in run("start")
    assert "stopped" in run("stop")
    assert "removed service imageqc" in run("remove")


def test_follow_at_logon_puts_a_startup_shortcut_fake_wscript_shell(
    fake_scm, make_config, monkeypatch, capsys, tmp_path
):
    """The shortcut is made through WScript.Shell, which exists only on Windows: faked here, the folder is real."""
    import sys
    from types import ModuleType, SimpleNamespace

    from daemon.cli import build_parser
    from windows_service import desktop

    saved: dict[str, object] = {}

    class FakeLink:
        def __init__(self, path: str) -> None:
            self.path = path

        def Save(self) -> None:
            saved.update(vars(self))
            open(self.path, "wb").close()

    client = ModuleType("win32com.client")
    client.Dispatch = lambda prog_id: SimpleNamespace(CreateShortcut=FakeLink) if prog_id == "WScript.Shell" else None
    monkeypatch.setitem(sys.modules, "win32com.client", client)
    startup = tmp_path / "StartUp"
    startup.mkdir()
    monkeypatch.setattr(desktop, "common_startup_folder", lambda env=None: startup)
    monkeypatch.setattr(manage, "_drive_type", lambda root: 3)
    cfg = make_config()
    argv = ["service", "install", "--config", cfg.source, "--follow-at-logon", "--windows"]
    assert manage.cli_action(build_parser().parse_args(argv)) == 0
    assert f"wrote {startup / desktop.SHORTCUT_NAME}" in capsys.readouterr().out
    assert saved["Arguments"] == f'-m daemon.cli follow --notify --config "{cfg.source}"'
    assert (startup / desktop.SHORTCUT_NAME).exists()
    assert manage.cli_action(build_parser().parse_args(["service", "remove", "--windows"])) == 0
    assert f"removed {startup / desktop.SHORTCUT_NAME}" in capsys.readouterr().out
    assert not (startup / desktop.SHORTCUT_NAME).exists()
